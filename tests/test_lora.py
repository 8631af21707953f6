"""LoRA / QLoRA: zero-B identity, frozen base, merge == unmerged, adapter
checkpoints, merged params in the plain and the official model, QLoRA error."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemma_mt import lora as L
from gemma_mt import weights
from gemma_mt.models import gemma as M
from gemma_mt.models import layers  # noqa: E402

V = 128
CFG = M.TransformerConfig.tiny(vocab_size=V)
# Gemma 1 MHA layout: fused `qkv_einsum`, untransposed `gating_einsum`.
MHA = M.TransformerConfig.gemma_2b().replace(
    vocab_size=V, embed_dim=64, hidden_dim=96, num_heads=4, num_kv_heads=4,
    head_dim=16, query_pre_attn_scalar=16**-0.5, attention_types=('global',) * 2)


def inputs(seed=0, lengths=(8, 5), L_=8):
  rng = np.random.default_rng(seed)
  mask = np.arange(L_)[None] < np.asarray(lengths)[:, None]
  tokens = jnp.asarray(np.where(mask, rng.integers(1, V, mask.shape), 0),
                       jnp.int32)
  mask = jnp.asarray(mask)
  return tokens, layers.positions_from_mask(mask), layers.causal_mask(mask)


@functools.cache
def plain_apply(cfg):
  return jax.jit(M.Transformer(cfg).apply)


@functools.cache
def lora_model(cfg, lcfg):
  """(lora model, its jitted apply), built once per config."""
  lm = L.apply_lora(M.Transformer(cfg), lcfg)
  return lm, jax.jit(lm.apply)


def key(seed):
  """An 'rbg' key: CPU compiles threefry-heavy inits very slowly."""
  return jax.random.key(seed, impl='rbg')


def base_params(cfg, seed=1):
  """Random params with non-zero norm scales, drawn in numpy (no compile)."""
  shapes = jax.eval_shape(lambda: M.Transformer(cfg).init(
      jax.random.key(0), *inputs())['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(
      0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def randomize_b(adapters, seed=3):
  """Non-zero B (A is already random), so the adapters change the output."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
      if str(p[-1]).endswith("_lora_b']") else x, adapters)


def leaves_by_path(tree):
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_frozen(before, after):
  b, a = leaves_by_path(before), leaves_by_path(after)
  assert b.keys() == a.keys()
  for k in b:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


LCFG = L.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope='module')
def setup():
  lm, _ = lora_model(CFG, LCFG)
  return LCFG, lm, base_params(CFG), L.init_lora_params(lm, key(7))


def test_adapter_tree_and_zero_b_is_identity(setup):
  lcfg, lm, base, adapters = setup
  names = {k.split("']['", 1)[1] for k in leaves_by_path(adapters)}
  assert names == {
      f"attn']['{w}']['w_lora_{ab}']" for w in
      ('q_einsum', 'kv_einsum', 'attn_vec_einsum') for ab in 'ab'} | {
      f"mlp']['{w}_lora_{ab}']" for w in ('gating_einsum', 'linear')
      for ab in 'ab'}
  shapes = {k: v.shape for k, v in leaves_by_path(adapters['layer_0']).items()}
  assert shapes["['mlp']['gating_einsum_lora_b']"] == (4, 2, CFG.hidden_dim)
  for k, x in leaves_by_path(adapters).items():
    assert bool(jnp.any(x != 0)) == k.endswith("_lora_a']"), k
  ours = lora_model(CFG, lcfg)[1]({'params': L.combine(base, adapters)},
                                  *inputs())[0]
  plain = plain_apply(CFG)({'params': base}, *inputs())[0]
  np.testing.assert_allclose(ours, plain, atol=1e-6, rtol=0)


def test_target_subset():
  lcfg = L.LoraConfig(rank=2, targets=('q', 'down'))
  lm = L.apply_lora(M.Transformer(CFG), lcfg)
  adapters = jax.eval_shape(lambda: L.init_lora_params(lm, jax.random.key(0)))
  assert set(adapters['layer_1']['attn']) == {'q_einsum'}
  assert set(adapters['layer_1']['mlp']) == {'linear_lora_a', 'linear_lora_b'}
  with pytest.raises(ValueError, match='targets'):
    L.LoraConfig(targets=('q', 'ffn'))


def test_sgd_step_changes_only_adapters(setup):
  lcfg, lm, base, adapters = setup
  params = L.combine(base, adapters)
  tokens, pos, attn = inputs()
  tx = L.frozen_base_optimizer(optax.sgd(0.5))

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = lm.apply({'params': p}, tokens, pos, attn)[0]
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 3])
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates)

  new_base, new_adapters = L.split_params(step(params, tx.init(params)))
  assert_frozen(base, new_base)
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(adapters), jax.tree.leaves(new_adapters))]
  assert all(changed[1::2])  # every B moved (A's grads are 0 while B == 0)


def merged_and_unmerged(cfg, base, adapters, lcfg=LCFG):
  unmerged = lora_model(cfg, lcfg)[1]({'params': L.combine(base, adapters)},
                                      *inputs())[0]
  merged_params = L.apply_adapters(base, adapters, lcfg)
  assert jax.tree.structure(merged_params) == jax.tree.structure(base)
  merged = plain_apply(cfg)({'params': merged_params}, *inputs())[0]
  plain = plain_apply(cfg)({'params': base}, *inputs())[0]
  assert float(jnp.max(jnp.abs(unmerged - plain))) > 0.05  # adapters matter
  np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=1e-5)
  return merged_params, merged


def test_merged_equals_unmerged_mha_layout():
  """Fused qkv_einsum and the untransposed gating_einsum merge right too."""
  lm, _ = lora_model(MHA, LCFG)
  adapters = randomize_b(L.init_lora_params(lm, key(7)))
  assert 'qkv_einsum' in adapters['layer_0']['attn']
  merged_and_unmerged(MHA, base_params(MHA), adapters)


@pytest.mark.reference
def test_merged_equals_unmerged_and_loads_in_official(setup):
  from support.reference import gm_transformer
  _, _, base, adapters = setup
  merged_params, merged = merged_and_unmerged(CFG, base, randomize_b(adapters))
  cfg = CFG
  tokens, pos, attn = inputs()
  ref = jax.jit(gm_transformer(cfg).apply)(
      {'params': merged_params}, tokens, positions=pos,
      attention_mask=attn).logits
  real = np.asarray(tokens != 0)[..., None]
  assert np.max(np.abs(np.asarray(ref) - np.asarray(merged)) * real) < 2e-5


def test_adapter_checkpoint_round_trip(setup, tmp_path):
  lcfg, _, _, adapters = setup
  adapters = randomize_b(adapters)
  lcfg = L.LoraConfig(rank=4, alpha=8.0, targets=('q', 'kv'), quant='int4')
  save = lambda: weights.save_adapters(tmp_path / 'ad', 'tiny', adapters, lcfg,
                                      base_model='gemma3_270m')
  path = save()
  assert sorted(p.name for p in path.iterdir()) == [
      'adapters', 'gemma_mt.files.json', 'gemma_mt.json', 'lora.json']
  loaded, loaded_cfg, meta = weights.adapters.load(path)
  assert loaded_cfg == lcfg and meta['base_model'] == 'gemma3_270m'
  assert_frozen(adapters, loaded)  # same tree, bit-for-bit
  with pytest.raises(FileExistsError):
    save()
  with pytest.raises(FileNotFoundError):
    weights.adapters.load(tmp_path / 'missing')


@pytest.mark.parametrize('quant,tile,tol', [('int8', None, 0.02),
                                           ('int4', 16, 0.4)])
def test_qlora_close_to_lora_and_trains_adapters_only(setup, quant, tile, tol):
  lcfg, lm, base, adapters = setup
  adapters = randomize_b(adapters)
  qcfg = L.LoraConfig(rank=4, alpha=8.0, quant=quant, tile_size=tile)
  qm = L.apply_lora(M.Transformer(CFG), qcfg)
  qbase = L.quantize_base(qm, base)
  qw = qbase['layer_0']['mlp']['gating_einsum']
  assert qw.array.qvalue.dtype == jnp.dtype(quant)
  assert qbase['layer_0']['pre_ffw_norm']['scale'].dtype == jnp.float32

  tokens, pos, attn = inputs()
  lora_logits = lora_model(CFG, lcfg)[1]({'params': L.combine(base, adapters)},
                                         tokens, pos, attn)[0]

  @jax.jit
  def step(adapters, qbase):
    def loss(a):
      logits = qm.apply({'params': L.combine(qbase, a)}, tokens, pos, attn)[0]
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
    return optax.apply_updates(adapters, jax.tree.map(lambda g: -0.5 * g,
                                                      grads)), logits

  new_adapters, q_logits = step(adapters, qbase)
  rel = jnp.linalg.norm(q_logits - lora_logits) / jnp.linalg.norm(lora_logits)
  assert 0 < float(rel) < tol, float(rel)
  assert all(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(adapters), jax.tree.leaves(new_adapters)))
  # Merging a QLoRA tree dequantizes: the plain model reproduces its output.
  merged = L.apply_adapters(qbase, adapters, qcfg)
  plain = plain_apply(CFG)({'params': merged}, tokens, pos, attn)[0]
  np.testing.assert_allclose(plain, q_logits, atol=1e-4, rtol=1e-4)


def test_dropout_only_with_rng(setup):
  _, _, base, adapters = setup
  lm = L.apply_lora(M.Transformer(CFG), L.LoraConfig(rank=4, alpha=8.0,
                                                     dropout=0.5))
  params = {'params': L.combine(base, randomize_b(adapters))}
  apply = jax.jit(lambda p, rngs: lm.apply(p, *inputs(), rngs=rngs)[0])
  a = apply(params, {})
  b = apply(params, {'dropout': key(0)})
  c = apply(params, {'dropout': key(1)})
  assert not np.allclose(b, c) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, apply(params, {}))


@pytest.mark.parametrize('name,expected', [
    ('gemma3_270m', 1_714_176), ('gemma_2b', 9_216_000)])
def test_adapter_param_counts(name, expected):
  cfg = M.TransformerConfig.from_name(name)
  lm = L.apply_lora(M.Transformer(cfg), L.LoraConfig(rank=8))
  adapters = jax.eval_shape(lambda: L.init_lora_params(lm, jax.random.key(0)))
  d, f, h, r = cfg.embed_dim, cfg.hidden_dim, cfg.head_dim, 8
  n, k = cfg.num_heads, cfg.num_kv_heads
  per_layer = ((d * r + r * n * h) + (d * r + r * 2 * k * h)
               + (n * h * r + r * d) + (d * r + r * 2 * f) + (f * r + r * d))
  assert L.count_params(adapters) == cfg.num_layers * per_layer == expected
