"""The decoder equals Google's official `gemma` implementation, and its KV-cache path equals its full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.reference import gm, gm_transformer

from gemma_mt.models import gemma as M
from gemma_mt.models import layers  # noqa: E402

V = 512


def small(base: M.TransformerConfig, **kw) -> M.TransformerConfig:
  return base.replace(vocab_size=V, embed_dim=64, hidden_dim=96, num_heads=4,
                      head_dim=16, query_pre_attn_scalar=16**-0.5, **kw)


CONFIGS = {
    'gemma3': M.TransformerConfig.tiny(vocab_size=V),
    'gemma2': small(M.TransformerConfig.gemma2_2b(), num_kv_heads=2,
                    sliding_window_size=3, attention_types=('local', 'global') * 2),
    'gemma1_mqa': small(M.TransformerConfig.gemma_2b(), num_kv_heads=1,
                        attention_types=('global',) * 2),
    'gemma1_mha': small(M.TransformerConfig.gemma_2b(), num_kv_heads=4,
                        attention_types=('global',) * 2),
    # Gemma 3 4B+ (and TranslateGemma): global RoPE scaled by 8; 27B scales
    # queries by (embed_dim / num_heads) ** -0.5, not head_dim ** -0.5.
    'gemma3_4b_style': M.TransformerConfig.tiny(vocab_size=V, global_rope_scale=8.0),
    'gemma3_27b_style': M.TransformerConfig.tiny(
        vocab_size=V, global_rope_scale=8.0, head_dim=8,
        query_pre_attn_scalar=(64 / 4)**-0.5),
}


def batch(lengths, L, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.arange(L)[None] < np.asarray(lengths)[:, None]
  tokens = np.where(mask, rng.integers(1, V, (len(lengths), L)), 0)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def params_with_nonzero_norms(cfg, seed=1):
  tokens, mask = batch([4], 4)
  m = M.Transformer(cfg)
  params = m.init(jax.random.key(seed), tokens, layers.positions_from_mask(mask),
                  layers.causal_mask(mask))['params']
  # Non-zero norm scales, so the (1 + scale) convention is exercised.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def flat_shapes(tree):
  return {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('ours,theirs', [
    (M.TransformerConfig.gemma3_270m, 'Gemma3_270M'),
    (M.TransformerConfig.gemma3_1b, 'Gemma3_1B'),
    (M.TransformerConfig.gemma2_2b, 'Gemma2_2B'),
    (M.TransformerConfig.gemma3_4b, 'Gemma3_4B'),
    (M.TransformerConfig.gemma3_12b, 'Gemma3_12B'),
    (M.TransformerConfig.gemma3_27b, 'Gemma3_27B'),
])
def test_param_tree_matches_official(ours, theirs):
  tokens, mask = batch([4], 4)
  cfg = ours()
  mine = jax.eval_shape(lambda: M.Transformer(cfg).init(
      jax.random.key(0), tokens, layers.positions_from_mask(mask),
      layers.causal_mask(mask)))['params']
  official = getattr(gm.nn, theirs)
  kw = {'text_only': True} if 'text_only' in official.__dataclass_fields__ else {}
  ref = jax.eval_shape(lambda: official(**kw).init(
      jax.random.key(0), tokens))['params']
  assert flat_shapes(mine) == flat_shapes(ref)
  assert cfg.num_params() == sum(np.prod(s) for s in flat_shapes(ref).values())


@pytest.mark.parametrize('name,theirs', [
    ('gemma3_270m', 'Gemma3_270M'), ('gemma3_1b', 'Gemma3_1B'),
    ('gemma3_4b', 'Gemma3_4B'), ('gemma3_12b', 'Gemma3_12B'),
    ('gemma3_27b', 'Gemma3_27B'), ('gemma2_2b', 'Gemma2_2B'),
])
def test_config_matches_official(name, theirs):
  """What shapes do not show: window, RoPE, query scale, layer pattern."""
  ours, ref = M.TransformerConfig.from_name(name), getattr(gm.nn, theirs).config
  assert ours.sliding_window_size == ref.sliding_window_size
  assert ours.global_rope_scale == ref.global_scale_factor
  assert ours.local_rope_scale == ref.local_scale_factor
  assert (ours.local_rope_base, ours.global_rope_base) == (
      ref.local_base_frequency, ref.global_base_frequency)
  assert abs(ours.query_pre_attn_scalar - ref.query_pre_attn_scalar()) < 1e-12
  assert [t == 'global' for t in ours.attention_types] == [
      t.name == 'GLOBAL' for t in ref.attention_types]
  assert (ours.final_logit_softcap, ours.attn_logits_soft_cap) == (
      ref.final_logit_softcap, ref.attn_logits_soft_cap)


def test_gemma1_2b_layout():
  """Gemma 1 2B: MQA (`q_einsum` + `kv_einsum`), 18 layers, no post-norms."""
  cfg = M.TransformerConfig.gemma_2b()
  tokens, mask = batch([4], 4)
  shapes = flat_shapes(jax.eval_shape(lambda: M.Transformer(cfg).init(
      jax.random.key(0), tokens, layers.positions_from_mask(mask),
      layers.causal_mask(mask)))['params'])
  assert shapes["['embedder']['input_embedding']"] == (256128, 2048)
  assert shapes["['layer_17']['attn']['kv_einsum']['w']"] == (2, 1, 2048, 256)
  assert shapes["['layer_0']['mlp']['gating_einsum']"] == (2, 2048, 16384)
  assert not any('post_' in k for k in shapes)
  # Gemma 1 2B as published (2,506,172,416 with a 256,000 vocabulary); the
  # Flax checkpoints carry 128 extra embedding rows.
  assert cfg.num_params() == 2_506_172_416 + 128 * 2048


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_equal_official(name):
  cfg = CONFIGS[name]
  params = params_with_nonzero_norms(cfg)
  tokens, mask = batch([12, 7, 3], 12)
  pos, attn = layers.positions_from_mask(mask), layers.causal_mask(mask)
  ours, _ = jax.jit(M.Transformer(cfg).apply)({'params': params}, tokens, pos, attn)
  ref = jax.jit(gm_transformer(cfg).apply)({'params': params}, tokens, positions=pos,
                                  attention_mask=attn).logits
  real = np.asarray(mask)[..., None]
  err = np.max(np.abs(np.asarray(ours) - np.asarray(ref)) * real)
  assert err < 2e-5, err
  assert np.max(np.abs(ref)) > 1.0  # a meaningful comparison


@pytest.mark.parametrize('name', ['gemma3', 'gemma2'])
def test_fused_attention_path_equals_einsum(name):
  cfg = CONFIGS[name].replace(attn_logits_soft_cap=None)
  params = params_with_nonzero_norms(cfg)
  tokens, mask = batch([12, 5], 12)
  args = (tokens, layers.positions_from_mask(mask), layers.causal_mask(mask))
  a, _ = jax.jit(M.Transformer(cfg).apply)({'params': params}, *args)
  b, _ = jax.jit(M.Transformer(cfg, attention_impl='jax').apply)({'params': params}, *args)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_packed_segments_equal_separate_rows():
  cfg = CONFIGS['gemma3']
  params = params_with_nonzero_norms(cfg)
  m = M.Transformer(cfg)
  apply = jax.jit(m.apply)
  a, _ = batch([5], 5, seed=3)
  b, _ = batch([6], 6, seed=4)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 6 + [0] * 2])
  pos = jnp.asarray([list(range(5)) + list(range(6)) + [0, 0]])
  out, _ = apply({'params': params}, packed, pos, layers.segment_causal_mask(seg))
  for row, sl in ((a, slice(0, 5)), (b, slice(5, 11))):
    mask = jnp.ones(row.shape, bool)
    ref, _ = apply({'params': params}, row, layers.positions_from_mask(mask),
                     layers.causal_mask(mask))
    np.testing.assert_allclose(np.asarray(out[0, sl]), np.asarray(ref[0]),
                               atol=2e-5)


@pytest.mark.parametrize('name', ['gemma3', 'gemma2', 'gemma1_mha'])
def test_kv_cache_decoding_equals_full_forward(name):
  """Prefill right-padded prompts, then decode one token at a time."""
  cfg = CONFIGS[name]
  params = params_with_nonzero_norms(cfg)
  apply = jax.jit(M.Transformer(cfg).apply)
  lengths, P, steps, S = [6, 3], 6, 5, 16
  prompt, pmask = batch(lengths, P, seed=5)
  gen = np.random.default_rng(6).integers(1, V, (2, steps))
  cache = cfg.init_cache(2, S, dtype=jnp.float32)
  valid = np.zeros((2, S), bool)
  valid[:, :P] = np.asarray(pmask)
  attn = jnp.zeros((2, P, S), bool).at[:, :, :P].set(layers.causal_mask(pmask))
  logits, cache = apply({'params': params}, prompt,
                          layers.positions_from_mask(pmask), attn, cache)
  step_logits = [logits[np.arange(2), np.asarray(lengths) - 1]]
  for t in range(steps):
    # `valid` is mutated each step: jnp.array copies it (jnp.asarray may
    # alias the numpy buffer on CPU while the async step still reads it).
    valid[:, P + t] = True
    pos = jnp.asarray(lengths)[:, None] + t
    logits, cache = apply({'params': params}, jnp.asarray(gen[:, t:t + 1]),
                            pos, jnp.array(valid)[:, None, :], cache)
    step_logits.append(logits[:, 0])
    # One dispatch at a time: with jax's async CPU dispatch, back-to-back
    # calls feeding each other the cache gave wrong logits about half the
    # time on jax 0.10 (not seen with jax_cpu_enable_async_dispatch=False).
    # The sampler decodes inside one jit (a while_loop), so it is unaffected.
    jax.block_until_ready(cache)
  assert int(cache['end_index']) == P + steps
  assert_steps_equal_full_forward(apply, params, prompt, lengths, gen,
                                  step_logits)


def assert_steps_equal_full_forward(apply, params, prompt, lengths, gen,
                                    step_logits):
  """Row r's logits after its prompt and each fed token of gen[r] equal a
  full forward over the prompt and gen[r]."""
  for r, n in enumerate(lengths):
    seq = np.concatenate([np.asarray(prompt[r, :n]), gen[r]])[None]
    full, _ = apply({'params': params}, jnp.asarray(seq),
                    jnp.arange(seq.shape[1])[None],
                    layers.causal_mask(jnp.ones(seq.shape, bool)))
    for t in range(len(gen[r]) + 1):
      np.testing.assert_allclose(np.asarray(step_logits[t][r]),
                                 np.asarray(full[0, n - 1 + t]), atol=3e-5)


@pytest.mark.parametrize('fast_decode', [False, True])
def test_per_row_cache_writes_equal_full_forward(fast_decode):
  """end_index [B] (continuous batching): each row writes its next token
  right after its own tokens, and sees only those; the Pallas kernel then
  reads no slot past a row's length. Logits = a full forward per row."""
  cfg = CONFIGS['gemma3']
  params = params_with_nonzero_norms(cfg)
  model = M.Transformer(cfg, fast_decode=fast_decode)
  apply = jax.jit(model.apply)
  lengths, P, steps, S = np.array([6, 3]), 6, 5, 16
  prompt, pmask = batch(list(lengths), P, seed=7)
  gen = np.random.default_rng(8).integers(1, V, (2, steps))
  cache = cfg.init_cache(2, S, dtype=jnp.float32)
  attn = jnp.zeros((2, P, S), bool).at[:, :, :P].set(layers.causal_mask(pmask))
  logits, cache = apply({'params': params}, prompt,
                        layers.positions_from_mask(pmask), attn, cache)
  step_logits = [logits[np.arange(2), lengths - 1]]
  for t in range(steps):
    cache = dict(cache, end_index=jnp.asarray(lengths + t))
    seen = np.arange(S)[None] < (lengths + t + 1)[:, None]
    logits, cache = apply({'params': params}, jnp.asarray(gen[:, t:t + 1]),
                          jnp.asarray(lengths + t)[:, None],
                          jnp.asarray(seen)[:, None, :], cache)
    step_logits.append(logits[:, 0])
    jax.block_until_ready(cache)
  np.testing.assert_array_equal(cache['end_index'], lengths + steps)
  for r, n in enumerate(lengths):  # Positions written at each row's slots.
    np.testing.assert_array_equal(cache['positions'][r, :n + steps],
                                  np.arange(n + steps))
  assert_steps_equal_full_forward(apply, params, prompt, lengths, gen,
                                  step_logits)


def test_per_row_writes_take_one_token():
  buf = jnp.zeros((2, 8, 3))
  with pytest.raises(ValueError, match='one token'):
    layers.write_at(buf, jnp.ones((2, 2, 3)), jnp.array([0, 1]))


def test_bf16_compute_close_to_float32():
  cfg = CONFIGS['gemma3']
  params = params_with_nonzero_norms(cfg)
  tokens, mask = batch([12, 9], 12)
  args = (tokens, layers.positions_from_mask(mask), layers.causal_mask(mask))
  f32, _ = jax.jit(M.Transformer(cfg).apply)({'params': params}, *args)
  bf16, _ = jax.jit(M.Transformer(cfg, dtype=jnp.bfloat16).apply)({'params': params}, *args)
  rel = np.linalg.norm(np.asarray(bf16) - np.asarray(f32)) / np.linalg.norm(np.asarray(f32))
  assert bf16.dtype == jnp.float32  # logits are accumulated in float32
  assert rel < 3e-2, rel


def test_remat_same_gradients():
  cfg = CONFIGS['gemma3']
  params = params_with_nonzero_norms(cfg)
  tokens, mask = batch([12, 9], 12)
  args = (tokens, layers.positions_from_mask(mask), layers.causal_mask(mask))
  def loss(p, remat):
    out, _ = M.Transformer(cfg, remat=remat).apply({'params': p}, *args)
    return jnp.mean(out**2)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g0, g1 = grad(params, False), grad(params, True)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_unknown_model_name():
  with pytest.raises(ValueError, match='gemma3_270m'):
    M.TransformerConfig.from_name('gemma9')


SENTENCES = [
    'The cat sat on the mat and looked out of the window.',
    'Translate this into French:\nHello, my name is Morgane.\n',
    "Je pense que c'est une très bonne idée, merci beaucoup !",
    'lol this is the best thing I have seen all week',
]


@pytest.fixture(scope='module')
def real_270m(tokenizer):
  from gemma_mt.weights.embedded import load_gemma3_270m
  params = load_gemma3_270m()
  rows = [tokenizer.tokenize(s, add_eos=False) for s in SENTENCES]
  L = max(map(len, rows))
  tokens = np.zeros((len(rows), L), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return params, jnp.asarray(tokens), jnp.asarray(tokens != 0)


@pytest.mark.slow
def test_real_270m_logits_equal_official(real_270m):
  params, tokens, mask = real_270m
  pos, attn = layers.positions_from_mask(mask), layers.causal_mask(mask)
  cfg = M.TransformerConfig.gemma3_270m()
  ours, _ = jax.jit(M.Transformer(cfg).apply)({'params': params}, tokens, pos, attn)
  ref = jax.jit(gm.nn.Gemma3_270M(dtype=jnp.float32).apply)(
      {'params': params}, tokens, positions=pos, attention_mask=attn).logits
  err = float(np.max(np.abs(np.asarray(ours) - np.asarray(ref)) * np.asarray(mask)[..., None]))
  print(f'\nGemma 3 270M (real weights, float32): max |Δlogit| vs gemma.gm = {err:.2e}')
  assert err < 1e-3, err


@pytest.mark.slow
def test_real_270m_nll(real_270m):
  params, tokens, mask = real_270m
  cfg = M.TransformerConfig.gemma3_270m()
  logits, _ = jax.jit(M.Transformer(cfg).apply)(
      {'params': params}, tokens, layers.positions_from_mask(mask), layers.causal_mask(mask))
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  m = mask[:, 1:]
  mean_nll = float(jnp.sum(nll * m) / jnp.sum(m))
  print(f'\nGemma 3 270M mean NLL: {mean_nll:.3f} nats/token')
  assert mean_nll < 3.5, mean_nll
