"""The Pallas decode-attention kernel (interpreted on CPU) == the einsum path.

On a GPU the kernel runs compiled; float32 references then use full
matmul precision (XLA's default there is TF32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt.decoding import sampler as S
from gemma_mt.models import decode_attention as DA
from gemma_mt.models import gemma as M
from gemma_mt.models import layers


def inputs(B, N, K, H, S_, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in
             ((B, 1, N, H), (B, S_, K, H), (B, S_, K, H)))
  return q, k, v, rng


# The last case has Gemma 4's global head_dim (512), where blocks shrink to
# fit shared memory: 160 = 5 blocks of 32.
@pytest.mark.parametrize('N,K,soft_cap,H,S_', [(4, 1, None, 32, 80),
                                               (8, 2, 50.0, 32, 80),
                                               (16, 16, None, 32, 80),
                                               (8, 1, None, 512, 160)])
def test_matches_einsum_attention(N, K, soft_cap, H, S_):
  B, kv_len = 3, S_ - 10  # The last 10 slots are skipped.
  q, k, v, rng = inputs(B, N, K, H, S_, jnp.float32)
  mask = (rng.random((B, 1, S_)) < 0.6) & (np.arange(S_) < kv_len)
  mask[:, 0, kv_len - 1] = True  # Every row sees its own new token.
  with jax.default_matmul_precision('highest'):
    want = layers.attention_einsum(q, k, v, jnp.asarray(mask), soft_cap)
  got = DA.decode_attention(q, k, v, jnp.asarray(mask), jnp.int32(kv_len),
                            soft_cap)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_and_slots_past_kv_len_skipped():
  q, k, v, rng = inputs(2, 4, 1, 64, 128, jnp.bfloat16)
  mask = jnp.asarray(rng.random((2, 1, 128)) < 0.5).at[:, :, 0].set(True)
  mask &= jnp.arange(128) < 40
  want = layers.attention_einsum(q, k, v, mask, None)
  # Blocks of 64 slots: 40..63 are read but masked, 64.. are never read
  # (NaN there would poison the sums).
  k, v = k.at[:, 40:].set(1e4), v.at[:, 40:].set(1e4)
  k, v = k.at[:, 64:].set(jnp.nan), v.at[:, 64:].set(jnp.nan)
  got = DA.decode_attention(q, k, v, mask, jnp.int32(40))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=0.03)


def test_per_row_kv_len_reads_only_each_rows_slots():
  """kv_len [B]: row b reads slots [0, kv_len[b]) and never the rest (NaN
  past a row's last block would poison its sums); = einsum per row."""
  B, S_ = 4, 192
  q, k, v, rng = inputs(B, 4, 1, 32, S_, jnp.float32, seed=3)
  kv_len = np.array([1, 50, 64, 150], np.int32)
  mask = jnp.asarray((rng.random((B, 1, S_)) < 0.7)
                     & (np.arange(S_) < kv_len[:, None, None])
                     ).at[np.arange(B), 0, kv_len - 1].set(True)
  with jax.default_matmul_precision('highest'):
    want = layers.attention_einsum(q, k, v, mask, None)
  block_end = -(-kv_len // 64) * 64  # Blocks of 64 slots.
  past = np.arange(S_)[None, :, None, None] >= block_end[:, None, None, None]
  k, v = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
  got = DA.decode_attention(q, k, v, mask, jnp.asarray(kv_len))
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_row_that_sees_nothing_gets_the_uniform_average():
  q, k, v, _ = inputs(1, 4, 1, 16, 32, jnp.float32)
  mask = jnp.zeros((1, 1, 32), bool)
  got = DA.decode_attention(q, k, v, mask, jnp.int32(32))
  with jax.default_matmul_precision('highest'):
    want = layers.attention_einsum(q, k, v, mask, None)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got[0, 0, 0], v[0, :, 0].mean(0), atol=1e-5)


def test_rejects_bad_shapes():
  q, k, v, _ = inputs(1, 4, 1, 16, 32, jnp.float32)
  with pytest.raises(ValueError, match='one query position'):
    DA.decode_attention(jnp.concatenate([q, q], 1), k, v,
                        jnp.ones((1, 2, 32), bool), jnp.int32(32))
  with pytest.raises(ValueError, match='cache length 24'):
    DA.decode_attention(q, k[:, :24], v[:, :24], jnp.ones((1, 1, 24), bool),
                        jnp.int32(24))
  with pytest.raises(ValueError, match='head_dim 12'):
    DA.decode_attention(q[..., :12], k[..., :12], v[..., :12],
                        jnp.ones((1, 1, 32), bool), jnp.int32(32))


GEMMA1_LAYOUT = M.TransformerConfig.gemma_2b().replace(  # [2, D, F] gating
    vocab_size=512, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
    num_kv_heads=1, attention_types=('global',) * 2,
    query_pre_attn_scalar=16**-0.5)


@pytest.mark.parametrize('cfg', [M.TransformerConfig.tiny(vocab_size=512),
                                 GEMMA1_LAYOUT], ids=['gemma3', 'gemma1'])
def test_sampler_greedy_same_with_fast_decode(cfg):
  # tiny: local + global layers; gemma1: the batched gating einsum too.
  model = M.Transformer(cfg)
  tokens = jnp.ones((1, 4), jnp.int32)
  mask = jnp.ones((1, 4), bool)
  params = model.init(jax.random.key(0), tokens, layers.positions_from_mask(mask),
                      layers.causal_mask(mask))['params']
  params = jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x + 0.1, params)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(2, 512, n).astype(np.int32) for n in (3, 17, 8)]
  outs = [S.Sampler(m, params, pad_id=0, stop_ids=[], batch_size=4)
          .generate(prompts, max_new_tokens=12)
          for m in (model, model.clone(fast_decode=True))]
  assert [o.tolist() for o in outs[0]] == [o.tolist() for o in outs[1]]
  assert len({tuple(o) for o in outs[0]}) == 3  # Not a degenerate model.


@pytest.mark.slow
def test_real_270m_greedy_same_with_fast_decode(tokenizer, mtnt_dir):
  from gemma_mt.data.mtnt import read_mtnt_tsv
  from gemma_mt.translator import Translator
  from gemma_mt.weights.embedded import load_gemma3_270m

  cfg, params = M.TransformerConfig.gemma3_270m(), load_gemma3_270m()
  pairs, _ = read_mtnt_tsv(mtnt_dir / 'valid' / 'valid.en-fr.tsv')
  sources = [s for s, _ in pairs[:4]]
  outs = [Translator(cfg, params, tokenizer, dtype=jnp.float32,
                     fast_decode=fd, batch_size=4)
          .generate(sources, max_new_tokens=24, guard=False).token_ids
          for fd in (False, True)]
  assert [o.tolist() for o in outs[0]] == [o.tolist() for o in outs[1]]
  assert sum(len(o) for o in outs[0]) > 20  # Real translations, not stops.
