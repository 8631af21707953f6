"""Gemma 4's text decoder equals Google's `gemma.gm.nn` Gemma 4 (same params)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gemma.gm.nn.gemma4 import _config as g4_config  # noqa: E402
from gemma.gm.nn.gemma4 import _modules as g4_modules  # noqa: E402
from gemma.gm.nn.gemma4 import _transformer as g4_transformer  # noqa: E402
from support.reference import gm  # noqa: F401  (skips without the gemma library)

from gemma_mt.models import gemma4 as G
from gemma_mt.models import layers  # noqa: E402

V = 512


def small(base: G.Gemma4Config, **kw) -> G.Gemma4Config:
  """A few layers of a released variant, every feature of it kept."""
  return base.replace(vocab_size=V, embed_dim=64, hidden_dim=96, num_heads=4,
                      head_dim=16, sliding_window_size=3, **kw)


CONFIGS = {
    # Per-layer inputs, MQA, the last 3 of 5 layers share KV (wider FFW).
    'e2b': small(G.Gemma4Config.gemma4_e2b(), num_kv_heads=1,
                 attention_types=('local', 'global') * 2 + ('local',),
                 per_layer_input_dim=8, frac_shared_layers=3 / 5,
                 shared_hidden_dim=192, global_key_size=32),
    'e4b': small(G.Gemma4Config.gemma4_e4b(), num_kv_heads=2,
                 attention_types=('local', 'global') * 3,
                 per_layer_input_dim=8, frac_shared_layers=2 / 6,
                 global_key_size=32),
    # Global layers: 1 KV head, key size 32, keys = values.
    '31b': small(G.Gemma4Config.gemma4_31b(), num_kv_heads=2,
                 num_global_kv_heads=1, global_key_size=32,
                 attention_types=('local', 'local', 'global')),
    # MoE: 8 experts, top 2, beside a dense MLP.
    '26b_a4b': small(G.Gemma4Config.gemma4_26b_a4b(), num_kv_heads=2,
                     num_global_kv_heads=1, global_key_size=32,
                     attention_types=('local', 'global'), num_experts=8,
                     expert_dim=24, top_k_experts=2),
}


def official(cfg: G.Gemma4Config):
  t = {'global': g4_modules.AttentionType.GLOBAL,
       'local': g4_modules.AttentionType.LOCAL_SLIDING}
  sharing = (g4_config.KVCacheSharingConfig(cfg.frac_shared_layers, True, True)
             if cfg.frac_shared_layers else None)
  return g4_transformer.Transformer(config=g4_config.TransformerConfig(
      num_embed=cfg.vocab_size, embed_dim=cfg.embed_dim,
      hidden_dim=cfg.hidden_dim, num_heads=cfg.num_heads,
      head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
      final_logit_softcap=cfg.final_logit_softcap, use_post_attn_norm=True,
      use_post_ffw_norm=True,
      attention_types=tuple(t[a] for a in cfg.attention_types),
      sliding_window_size=cfg.sliding_window_size,
      num_global_kv_heads=cfg.num_global_kv_heads,
      global_key_size=cfg.global_key_size, k_eq_v_global=cfg.k_eq_v_global,
      global_rope_proportion=cfg.global_rope_proportion,
      local_rope_proportion=cfg.local_rope_proportion,
      local_base_frequency=int(cfg.local_rope_base),
      global_base_frequency=int(cfg.global_rope_base),
      per_layer_input_dim=cfg.per_layer_input_dim,
      kv_cache_sharing_config=sharing,
      override_kv_shared_ffw_hidden=cfg.shared_hidden_dim,
      enable_moe=cfg.num_experts > 0, num_experts=cfg.num_experts,
      expert_dim=cfg.expert_dim, top_k_experts=cfg.top_k_experts,
      moe_dense_hidden_dim=cfg.hidden_dim if cfg.num_experts else 0),
      dtype=jnp.float32)


def batch(lengths, L, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.arange(L)[None] < np.asarray(lengths)[:, None]
  tokens = np.where(mask, rng.integers(1, V, (len(lengths), L)), 0)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def random_params(cfg, seed=0):
  tokens, mask = batch([4], 4)
  params = G.Gemma4(cfg).init(jax.random.key(seed), tokens,
                              layers.positions_from_mask(mask),
                              layers.causal_mask(mask))['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def flat_shapes(tree):
  return {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('name', CONFIGS)
def test_param_tree_equals_official(name):
  cfg = CONFIGS[name]
  tokens, mask = batch([4], 4)
  mine = jax.eval_shape(lambda: G.Gemma4(cfg).init(
      jax.random.key(0), tokens, layers.positions_from_mask(mask),
      layers.causal_mask(mask)))['params']
  ref = jax.eval_shape(lambda: official(cfg).init(jax.random.key(0), tokens))
  assert flat_shapes(mine) == flat_shapes(ref['params'])


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_equal_official(name):
  cfg = CONFIGS[name]
  params = random_params(cfg)
  tokens, mask = batch([12, 7, 3], 12)
  pos, attn = layers.positions_from_mask(mask), layers.causal_mask(mask)
  ours, _ = jax.jit(G.Gemma4(cfg).apply)({'params': params}, tokens, pos, attn)
  ref = jax.jit(official(cfg).apply)({'params': params}, tokens, positions=pos,
                                     attention_mask=attn).logits
  real = np.asarray(mask)[..., None]
  err = np.max(np.abs(np.asarray(ours) - np.asarray(ref)) * real)
  print(f'\n{name}: max |Δlogit| vs gemma.gm = {err:.1e}')
  assert err < 2e-5, err
  assert np.max(np.abs(ref)) > 1.0


@pytest.mark.parametrize('name,theirs', [
    ('gemma4_e2b', 'Gemma4_E2B'), ('gemma4_e4b', 'Gemma4_E4B'),
    ('gemma4_31b', 'Gemma4_31B'), ('gemma4_26b_a4b', 'Gemma4_26B_A4B')])
def test_released_configs_equal_official(name, theirs):
  """The full-size trees (text part), traced only."""
  cfg = getattr(G.Gemma4Config, name)()
  tokens, mask = batch([4], 4)
  mine = jax.eval_shape(lambda: G.Gemma4(cfg).init(
      jax.random.key(0), tokens, layers.positions_from_mask(mask),
      layers.causal_mask(mask)))['params']
  ref = jax.eval_shape(lambda: getattr(gm.nn, theirs)(text_only=True).init(
      jax.random.key(0), tokens))['params']
  assert flat_shapes(mine) == flat_shapes(ref)
  sharing = g4_config.create_kv_cache_sharing_patterns(
      getattr(gm.nn, theirs).config.kv_cache_sharing_config, cfg.num_layers,
      getattr(gm.nn, theirs).config.attention_types)
  assert [cfg.kv_source(i) for i in range(cfg.num_layers)] == sharing


@pytest.mark.parametrize('name', ['e2b', '31b'])  # sharing; keys as values
def test_kv_cache_decoding_equals_full_forward(name):
  """Prefill right-padded prompts, then decode token by token: KV-sharing
  layers read their source's cache slots and own none."""
  cfg = CONFIGS[name]
  params = random_params(cfg)
  apply = jax.jit(G.Gemma4(cfg).apply)
  lengths, P, steps, S = [6, 3], 6, 5, 16
  prompt, pmask = batch(lengths, P, seed=5)
  gen = np.random.default_rng(6).integers(1, V, (2, steps))
  cache = cfg.init_cache(2, S, dtype=jnp.float32)
  owners = [i for i in range(cfg.num_layers) if cfg.kv_source(i) == i]
  assert sorted(k for k in cache if k.startswith('layer_')) == sorted(
      f'layer_{i}' for i in owners)
  valid = np.zeros((2, S), bool)
  valid[:, :P] = np.asarray(pmask)
  attn = jnp.zeros((2, P, S), bool).at[:, :, :P].set(layers.causal_mask(pmask))
  logits, cache = apply({'params': params}, prompt,
                        layers.positions_from_mask(pmask), attn, cache)
  step_logits = [logits[np.arange(2), np.asarray(lengths) - 1]]
  for t in range(steps):
    valid[:, P + t] = True
    pos = jnp.asarray(lengths)[:, None] + t
    logits, cache = apply({'params': params}, jnp.asarray(gen[:, t:t + 1]),
                          pos, jnp.array(valid)[:, None, :], cache)
    step_logits.append(logits[:, 0])
    jax.block_until_ready(cache)  # (see test_model's same test)
  for r, n in enumerate(lengths):
    seq = np.concatenate([np.asarray(prompt[r, :n]), gen[r]])[None]
    full, _ = apply({'params': params}, jnp.asarray(seq),
                    jnp.arange(seq.shape[1])[None],
                    layers.causal_mask(jnp.ones(seq.shape, bool)))
    for t in range(steps + 1):
      np.testing.assert_allclose(np.asarray(step_logits[t][r]),
                                 np.asarray(full[0, n - 1 + t]), atol=3e-5)


# ------------------------------------------------------------- downstream
# A Gemma 4 with the real tokenizer's vocabulary, for the product paths.
TINY = CONFIGS['e2b'].replace(vocab_size=262_144)


@pytest.fixture(scope='module')
def tiny():
  from gemma_mt.train.state import random_params as init
  params = init(G.Gemma4(TINY))
  return jax.tree.map(lambda x: x * 30 if x.ndim > 1 else x, params)


def test_translator_decodes_gemma4_as_full_forwards(tokenizer, tiny):
  """Greedy through the Translator (continuous and static batching, the KV
  cache shared where the config shares it) = argmax of full forwards;
  beam search runs on it too."""
  from gemma_mt.decoding.options import SamplingOptions
  from gemma_mt.translator import Translator
  sources = ['Hello there', 'A longer sentence to translate, with commas.',
             'Three']  # More than the 2 rows: continuous refills a row.
  opts = SamplingOptions(max_new_tokens=6, guard=False)
  apply = jax.jit(G.Gemma4(TINY).apply)
  for continuous in (True, False):
    tr = Translator(TINY, tiny, tokenizer, batch_size=2, continuous=continuous)
    gen = tr.generate(sources, opts)
    for src, ids in zip(sources, gen.token_ids):
      seq = list(tr.prompt_tokens(src))
      for t in np.asarray(ids).tolist():
        logits, _ = apply({'params': tiny}, jnp.asarray([seq]),
                          jnp.arange(len(seq))[None],
                          layers.causal_mask(jnp.ones((1, len(seq)), bool)))
        assert int(np.argmax(logits[0, -1])) == t
        seq.append(t)
    kinds = {k[0] for k in tr.compiled_shapes}
    assert ('chunk' in kinds) == continuous
  beams = Translator(TINY, tiny, tokenizer, batch_size=2).translate_detailed(
      sources, SamplingOptions(max_new_tokens=6, beam_size=2))
  assert all(len(b.candidates) == 2 for b in beams)


def test_fused_loss_and_lora_on_gemma4(tiny, tokenizer):
  """The fused chunked loss equals the plain one; a LoRA step moves only
  adapters, which sit on q, kv / k (keys as values), o, the dense MLPs."""
  import optax

  from gemma_mt import lora as L
  from gemma_mt.train import loss as loss_lib
  cfg = CONFIGS['26b_a4b']
  model = G.Gemma4(cfg)
  params = random_params(cfg)
  tokens, mask = batch([10, 6], 10)
  targets = mask.at[:, :3].set(False)
  b = {'input_tokens': tokens, 'target_mask': targets}
  fused, _ = loss_lib.forward_and_loss_fn(params, model, b, chunk_size=4)
  logits, _ = model.apply({'params': params}, tokens,
                          layers.positions_from_mask(mask), layers.causal_mask(mask))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                             tokens[:, 1:, None], -1)[..., 0]
  w = targets[:, 1:]
  np.testing.assert_allclose(fused, jnp.sum(nll * w) / jnp.sum(w), rtol=1e-5)

  lcfg = L.LoraConfig(rank=2)
  lm = L.apply_lora(model, lcfg)
  adapters = L.init_lora_params(lm, jax.random.key(0))
  names = {jax.tree_util.keystr(p[:-1]) + p[-1].key.split('_lora')[0]
           for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
  assert any("['k_einsum']w" in n for n in names)  # the global layer's
  assert any("['mlp2']gating_einsum" in n for n in names)
  assert not any('router' in n or "['mlp']['" in n for n in names)

  def loss(a):
    return loss_lib.forward_and_loss_fn(L.combine(params, a), lm, b)[0]
  grads = jax.grad(loss)(adapters)
  new = optax.apply_updates(adapters, jax.tree.map(lambda g: -0.5 * g, grads))
  moved = [not np.array_equal(x, y) for x, y in
           zip(jax.tree.leaves(adapters), jax.tree.leaves(new))]
  assert all(moved[1::2])  # every B (A's gradients are 0 while B is 0)
  merged = L.apply_adapters(params, new, lcfg)
  assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_orbax_round_trip_in_the_official_layout(tokenizer, tiny, tmp_path):
  """Saved as a model dir (official tree + its config), loaded back equal;
  gemma.gm's own checkpoint loader reads the same tree."""
  from gemma_mt import weights
  path = weights.save(tmp_path / 'm', TINY, tiny, tokenizer, prompt_format='chat')
  back = weights.load_dir(path)
  assert back.config == TINY and back.prompt_format == 'chat'
  for x, y in zip(jax.tree.leaves(tiny), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  theirs = gm.ckpts.load_params(path)
  assert flat_shapes(theirs) == flat_shapes(tiny)


def test_gemma4_turn_markers(tokenizer):
  """Gemma 4's tokenizer spells the turn markers `<|turn>` / `<turn|>`: the
  chat prompt uses them, and decoding stops at `<turn|>`."""
  from sentencepiece import sentencepiece_model_pb2 as pb

  from gemma_mt.data import prompts
  from gemma_mt.data.tokenizer import GemmaTokenizer
  from gemma_mt.decoding import postprocess
  proto = pb.ModelProto()
  proto.ParseFromString(tokenizer.serialized_model_proto())
  proto.pieces[105].piece, proto.pieces[106].piece = '<|turn>', '<turn|>'
  tok4 = GemmaTokenizer.from_serialized(proto.SerializeToString())
  ids = prompts.prompt_ids(tok4, 'Hi', prompt_format='chat').tolist()
  assert ids[:2] == [tok4.bos_id, 105] and ids.count(106) == 1
  assert prompts.answer_ids(tok4, 'Salut', 'chat').tolist()[-1] == 106
  assert 106 in postprocess.stop_token_ids(tok4)


def test_moe_layer_equals_official():
  """The MoE FFW alone: same routing (top-k of the softmax router,
  renormalised) and the same expert outputs as gm's MoERagged, token for
  token (a different expert choice would move the output by O(1))."""
  from gemma.gm.nn.gemma4 import _moe
  cfg = CONFIGS['26b_a4b']
  x = jax.random.normal(jax.random.key(0), (3, 7, cfg.embed_dim))
  ref_mod = _moe.MoERagged(features=cfg.embed_dim, hidden_dim=cfg.expert_dim,
                           num_experts=cfg.num_experts,
                           num_experts_per_datapoint=cfg.top_k_experts)
  params = ref_mod.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(
      jax.random.key(2), p.shape), params)
  ref = ref_mod.apply({'params': params}, x)
  ours = G.MoE(cfg).apply({'params': params}, x)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_packed_rows_and_qlora_on_gemma4(tokenizer):
  """Packing: two segments in a row give each segment's own logits; QLoRA
  (int8 base) runs and stays close to the float model."""
  from gemma_mt import lora as L
  cfg = CONFIGS['e2b']
  params = random_params(cfg)
  model = G.Gemma4(cfg)
  a, b = batch([5], 5, seed=3)[0][0], batch([4], 4, seed=4)[0][0]
  packed = jnp.concatenate([a, b])[None]
  seg = jnp.asarray([[1] * 5 + [2] * 4])
  pos = jnp.asarray([list(range(5)) + list(range(4))])
  out, _ = model.apply({'params': params}, packed, pos, layers.segment_causal_mask(seg))
  for tokens, sl in ((a, slice(0, 5)), (b, slice(5, 9))):
    n = len(tokens)
    alone, _ = model.apply({'params': params}, tokens[None], jnp.arange(n)[None],
                           layers.causal_mask(jnp.ones((1, n), bool)))
    np.testing.assert_allclose(out[0, sl], alone[0], atol=2e-5)
  lcfg = L.LoraConfig(rank=2, quant='int8')
  lm = L.apply_lora(model, lcfg)
  frozen = L.quantize_base(lm, params)
  adapters = L.init_lora_params(lm, jax.random.key(0))
  tokens, mask = batch([8], 8)
  q, _ = lm.apply({'params': L.combine(frozen, adapters)}, tokens,
                  layers.positions_from_mask(mask), layers.causal_mask(mask))
  f, _ = model.apply({'params': params}, tokens, layers.positions_from_mask(mask),
                     layers.causal_mask(mask))
  assert float(jnp.max(jnp.abs(q - f))) < 0.05 * float(jnp.max(jnp.abs(f)))


def test_export_says_gemma4_is_not_covered(tokenizer, tiny, tmp_path, capsys):
  from gemma_mt import export, weights
  path = weights.save(tmp_path / 'm', TINY, tiny, tokenizer)
  for to in ('hf', 'gguf'):
    assert export.main(['--checkpoint', str(path), '--to', to,
                        str(tmp_path / f'out.{to}')]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'error: HF and GGUF export cover Gemma 1-3; not Gemma 4 yet')
    assert not (tmp_path / f'out.{to}').exists()
