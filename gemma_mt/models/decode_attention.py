"""A decode step's attention over the KV cache as one Pallas (Triton) kernel.

For one new token, XLA runs attention as five kernels per layer (logits
matmul, two softmax reductions, the normalised probabilities, probabilities
x values); at decode shapes each is a few microseconds of fixed cost, and
with ~18 kernels per layer the decode step is bound by kernel count, not by
bytes (profile in BENCHMARKS.md). This kernel does the five in one: a
program per (row, kv head) streams the cache in blocks with an online
softmax, as flash attention does, and stops at the last written slot.

Semantics are those of `layers.attention_einsum` for one query position:
float32 logits, optional soft-cap, masked slots at the official mask value
(a row that sees nothing gets the uniform average, as there). Probabilities
meet the values in the cache dtype before normalisation, so bf16 results
differ from the einsum path by bf16 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -2.3819763e38  # layers.NEG_INF (the official mask value)
MAX_BLOCK = 64           # cache slots per inner step, at head_dim <= 256
# A block's K and V tiles (and their pipelined copies) live in shared memory:
# at head_dim 512 (Gemma 4's global layers) 64 slots ask for 281 KB on an
# H200, which has 227 KB. Blocks shrink so that block x head_dim stays here.
MAX_BLOCK_ELEMENTS = MAX_BLOCK * 256
# float32 inputs: full-precision dots (Triton's default is TF32); no effect
# on bf16 inputs.
_EXACT = jax.lax.Precision.HIGHEST


def _kernel(q_ref, k_ref, v_ref, mask_ref, kv_len_ref, o_ref, *, block,
            soft_cap):
  """q [B, K, Gp, H], k/v [B, S, K, H], mask [B, S] int32, kv_len [B]."""
  from jax.experimental import pallas as pl

  b, h = pl.program_id(0), pl.program_id(1)
  q = q_ref[b, h]  # [Gp, H]
  g = q.shape[0]

  def body(j, carry):
    o, m, l = carry
    slots = pl.ds(pl.multiple_of(j * block, block), block)
    k = k_ref[b, slots, h, :]  # [block, H]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_EXACT,
                            preferred_element_type=jnp.float32)
    if soft_cap is not None:
      s = jnp.tanh(s / soft_cap) * soft_cap
    s = jnp.where(mask_ref[b, slots][None, :] != 0, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = corr * l + jnp.sum(p, axis=1)
    v = v_ref[b, slots, h, :]
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=_EXACT,
                             preferred_element_type=jnp.float32)
    return corr[:, None] * o + pv, m_new, l

  n_blocks = (kv_len_ref[b] + block - 1) // block
  init = (jnp.zeros(q.shape, jnp.float32),
          jnp.full((g,), -jnp.inf, jnp.float32), jnp.zeros((g,), jnp.float32))
  o, _, l = jax.lax.fori_loop(0, n_blocks, body, init)
  o_ref[b, h] = (o / l[:, None]).astype(o_ref.dtype)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     mask: jax.Array, kv_len: jax.Array,
                     soft_cap: float | None = None, *,
                     interpret: bool | None = None) -> jax.Array:
  """Attention of one query position over a KV cache.

  q [B, 1, N, H] (already scaled), k/v [B, S, K, H] (the cache, new token
  written), mask [B, 1, S] bool, kv_len (a scalar, or one per row [B]):
  slots [kv_len, S) of a row are never read (it may not see them), so a
  row of a continuous batch reads only its own tokens. Returns [B, 1, N, H] in q's dtype. `interpret` (default:
  on CPU) runs the kernel in the Pallas interpreter, for tests.
  """
  from jax.experimental import pallas as pl

  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if T != 1:
    raise ValueError(f'decode_attention takes one query position, got {T}')
  # Triton blocks are powers of two, and dots need >= 16 along each side.
  if S % 16:  # Sampler caches (P + budget) are.
    raise ValueError(f'cache length {S} is not a multiple of 16')
  if H & (H - 1) or H < 16:
    raise ValueError(f'head_dim {H} is not a power of two >= 16')
  G = N // K
  Gp = max(16, 1 << (G - 1).bit_length())  # q rows, padded.
  q = q.reshape(B, K, G, H)
  if Gp > G:
    q = jnp.pad(q, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  # A power of two that divides S, >= 16 for the dots.
  block = max(16, min(MAX_BLOCK, MAX_BLOCK_ELEMENTS // H, S & -S))
  out = pl.pallas_call(
      functools.partial(_kernel, block=block, soft_cap=soft_cap),
      out_shape=jax.ShapeDtypeStruct((B, K, Gp, H), q.dtype),
      grid=(B, K), interpret=interpret,
  )(q, k, v, mask[:, 0].astype(jnp.int32),
    jnp.broadcast_to(kv_len, (B,)).astype(jnp.int32))
  return out[:, :, :G].reshape(B, 1, N, H)
