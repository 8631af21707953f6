"""Every family implements `models.ModelConfig`, and what callers rely on
holds for each: the cache the module writes is the one `init_cache` builds,
the LM head alone equals the full call's, the accounting matches the
weights and the cache, and `attention_impl` / `fast_decode` pick kernels
that agree with the reference einsum attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt import models
from gemma_mt.models import layers
from gemma_mt.train.state import random_params

TINY = sorted(models.TINY)
PROTOCOL = ('family', 'NAMES', 'norm_scale_init', 'tokenizer_source',
            'vocab_size', 'embed_dim', 'final_logit_softcap', 'attention_types',
            'num_layers', 'name', 'to_dict', 'replace', 'module', 'init_cache',
            'num_params', 'matmul_params', 'attention_flops',
            'kv_bytes_per_token', 'hf_model_type')


def batch(lengths=(6, 4), L=6):
  mask = jnp.arange(L)[None] < jnp.asarray(lengths)[:, None]
  tokens = jnp.where(mask, (jnp.arange(2 * L).reshape(2, L) * 37) % 500 + 2, 0)
  return tokens, layers.positions_from_mask(mask), layers.causal_mask(mask), mask


@pytest.fixture(scope='module', params=TINY)
def tiny(request):
  cfg = models.from_name(request.param)
  return cfg, random_params(cfg.module(), seed=2)


@pytest.mark.parametrize('name', sorted(models.NAMES) + TINY)
def test_every_config_implements_the_protocol(name):
  cfg = models.from_name(name)
  missing = [m for m in PROTOCOL if not hasattr(cfg, m)]
  assert not missing, missing
  assert cfg.family in models.FAMILIES
  assert models.from_dict(cfg.to_dict()) == cfg
  assert name in TINY or cfg.name() == name


def test_cache_written_is_the_cache_built(tiny):
  cfg, params = tiny
  tokens, pos, attn, _ = batch()
  S = 16
  cache = cfg.init_cache(2, S, dtype=jnp.float32)
  mask = jnp.zeros((2, 6, S), bool).at[:, :, :6].set(attn)
  _, new = cfg.module().apply({'params': params}, tokens, pos, mask, cache)
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(new) == shapes(cache)
  assert int(new['end_index']) == 6
  # One layer_<i> entry per layer that owns keys/values; each holds
  # kv_bytes_per_token's share.
  owned = sum(x.size * x.dtype.itemsize for k, v in cache.items()
              if k.startswith('layer_') for x in v.values())
  assert owned == cfg.kv_bytes_per_token(itemsize=4) * 2 * S


def test_logits_method_is_the_head_of_the_call(tiny):
  cfg, params = tiny
  tokens, pos, attn, _ = batch()
  module = cfg.module()
  logits, _ = module.apply({'params': params}, tokens, pos, attn)
  hidden, _ = module.apply({'params': params}, tokens, pos, attn,
                           return_hidden=True)
  head = module.apply({'params': params}, hidden, method='logits')
  np.testing.assert_allclose(head, logits, rtol=1e-6, atol=1e-6)


def test_accounting_matches_the_weights(tiny):
  cfg, params = tiny
  emb = params['embedder']
  lookups = sum(math.prod(emb[k].shape) for k in
                ('input_embedding', 'per_layer_embeddings') if k in emb)
  total = sum(x.size for x in jax.tree.leaves(params))
  assert cfg.num_params() == total
  assert cfg.num_params(include_embedding=False) == total - lookups
  # Each weight a token multiplies through: the body and the tied head.
  head = math.prod(emb['input_embedding'].shape)
  assert cfg.matmul_params() == total - lookups + head
  ctx = 10
  assert models.flops_per_token(cfg, ctx) == pytest.approx(
      2 * cfg.matmul_params() + cfg.attention_flops(ctx))
  assert models.flops_per_token(cfg, ctx, training=True) == pytest.approx(
      3 * models.flops_per_token(cfg, ctx))


def test_released_accounting_known_values():
  # Gemma 3 270M: 18 layers x (K=1, H=256) x (k, v) x bf16.
  assert models.from_name('gemma3_270m').kv_bytes_per_token() == 18 * 2 * 256 * 2
  # Gemma 4 E2B: 15 of 35 layers own KV: 12 local (H=256), 3 global (512).
  assert models.from_name('gemma4_e2b').kv_bytes_per_token() == (
      2 * 2 * (12 * 256 + 3 * 512))
  # 26B-A4B runs 8 of 128 experts per token.
  moe = models.from_name('gemma4_26b_a4b')
  experts = moe.num_layers * moe.num_experts * 3 * moe.expert_dim * moe.embed_dim
  dense = moe.matmul_params() - (moe.num_params(False) - experts
                                 + moe.vocab_size * moe.embed_dim)
  assert dense == experts * 8 // 128


def test_attention_kernels_agree(tiny):
  """Fused attention (training path) and the Pallas decode kernel (one
  token over the cache; interpreted on CPU) equal the einsum reference."""
  cfg, params = tiny
  tokens, pos, attn, mask = batch()
  ref, _ = cfg.module().apply({'params': params}, tokens, pos, attn)
  fused, _ = cfg.module(attention_impl='jax').apply({'params': params}, tokens,
                                                    pos, attn)
  real = np.asarray(mask)[..., None]
  np.testing.assert_allclose(np.asarray(fused) * real, np.asarray(ref) * real,
                             atol=2e-4, rtol=2e-4)
  S = 16
  step = []
  for fast in (False, True):
    module = cfg.module(fast_decode=fast)
    cache = cfg.init_cache(2, S, dtype=jnp.float32)
    pre = jnp.zeros((2, 5, S), bool).at[:, :, :5].set(attn[:, :5, :5])
    _, cache = module.apply({'params': params}, tokens[:, :5], pos[:, :5], pre,
                            cache)
    seen = jnp.broadcast_to(jnp.arange(S)[None, None] < 6, (2, 1, S))
    out, _ = module.apply({'params': params}, tokens[:, 5:6], pos[:, 5:6],
                          seen, cache)
    step.append(np.asarray(out))
  np.testing.assert_allclose(step[1][0], step[0][0], atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(step[0][0, 0], np.asarray(ref)[0, 5], atol=2e-4,
                             rtol=2e-4)
