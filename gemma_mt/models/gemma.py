"""The Gemma text decoder (Gemma 1, 2 and 3; 270M to 27B), in Flax linen.

The parameter tree is name-for-name and shape-for-shape the one of Google's
official checkpoints (and of `gemma.gm.nn.Gemma3_270M`), so weights load both
ways. Two call paths share one module:

* training: `tokens, positions, attention_mask [B, L, L]`, no cache;
* decoding: the same plus a KV `cache`, `attention_mask [B, T, S]` over the
  cache slots; the new keys/values are written at `cache['end_index']` (one
  slot for all rows, or one per row: continuous batching).
  `fast_decode` (for sampling; not under LoRA): one-token steps attend with
  a Pallas kernel (`decode_attention`) instead of the XLA einsums, and an
  untransposed gating weight is read as stored (see `FeedForward`).

Parameters are stored in `param_dtype`; every weight is cast to `dtype` (the
compute dtype) where it is used, so float32 master weights with bfloat16
compute is just `Transformer(cfg, dtype=jnp.bfloat16)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_mt.models.config import FamilyConfig
from gemma_mt.models.layers import (GLOBAL, LOCAL, Array, Einsum, TiedHead,
                                    apply_rope, attention, empty_cache,
                                    sliding_mask, write_at, write_cache)

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TransformerConfig(FamilyConfig):
  """Architecture hyper-parameters; one classmethod per released model.

  Implements `models.ModelConfig`: the module, cache and accounting of the
  family live here, so no caller asks which family it holds.
  """

  family: ClassVar[str] = 'gemma'
  NAMES: ClassVar[tuple[str, ...]] = (
      'gemma_2b', 'gemma2_2b', 'gemma3_270m', 'gemma3_1b', 'gemma3_4b',
      'gemma3_12b', 'gemma3_27b')
  norm_scale_init: ClassVar[float] = 0.0  # norms multiply by 1 + scale
  tokenizer_source: ClassVar[str | None] = None  # Gemma 3's is embedded

  vocab_size: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  head_dim: int
  num_kv_heads: int
  attention_types: tuple[str, ...]
  query_pre_attn_scalar: float
  final_logit_softcap: float | None = None
  attn_logits_soft_cap: float | None = None
  sliding_window_size: int | None = None
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  use_qk_norm: bool = False
  transpose_gating_einsum: bool = False
  local_rope_base: float = 10_000.0
  global_rope_base: float = 10_000.0
  local_rope_scale: float = 1.0
  global_rope_scale: float = 1.0

  @property
  def use_qkv_einsum(self) -> bool:
    """Official checkpoints fuse q/k/v into one tensor when heads == kv heads."""
    return self.num_heads == self.num_kv_heads

  def num_params(self, include_embedding: bool = True) -> int:
    d, f, h = self.embed_dim, self.hidden_dim, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    norms = d * (2 + self.use_post_attn_norm + self.use_post_ffw_norm)
    norms += 2 * h * self.use_qk_norm
    per_layer = attn + 3 * d * f + norms
    emb = self.vocab_size * d if include_embedding else 0
    return self.num_layers * per_layer + emb + d

  # --- Released models -------------------------------------------------------
  @classmethod
  def gemma_2b(cls) -> 'TransformerConfig':
    """Gemma 1 2B (the tutorial's `2b` / `2b-it`)."""
    return cls(
        vocab_size=256_128, embed_dim=2048, hidden_dim=16_384, num_heads=8,
        head_dim=256, num_kv_heads=1, attention_types=(GLOBAL,) * 18,
        query_pre_attn_scalar=256**-0.5)

  @classmethod
  def gemma2_2b(cls) -> 'TransformerConfig':
    return cls(
        vocab_size=256_128, embed_dim=2304, hidden_dim=9216, num_heads=8,
        head_dim=256, num_kv_heads=4, attention_types=(LOCAL, GLOBAL) * 13,
        query_pre_attn_scalar=256**-0.5, final_logit_softcap=30.0,
        attn_logits_soft_cap=50.0, sliding_window_size=4096,
        use_post_attn_norm=True, use_post_ffw_norm=True)

  @classmethod
  def _gemma3(cls, num_layers: int, embed_dim: int, hidden_dim: int,
              **kw) -> 'TransformerConfig':
    pattern = (LOCAL,) * 5 + (GLOBAL,)
    types = (pattern * (num_layers // 6 + 1))[:num_layers]
    base = dict(
        vocab_size=262_144, embed_dim=embed_dim, hidden_dim=hidden_dim,
        num_heads=4, head_dim=256, num_kv_heads=1, attention_types=types,
        query_pre_attn_scalar=256**-0.5, sliding_window_size=512,
        use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
        transpose_gating_einsum=True, local_rope_base=10_000.0,
        global_rope_base=1_000_000.0)
    return cls(**(base | kw))

  @classmethod
  def gemma3_270m(cls) -> 'TransformerConfig':
    return cls._gemma3(18, 640, 2048)

  @classmethod
  def gemma3_1b(cls) -> 'TransformerConfig':
    return cls._gemma3(26, 1152, 6 * 1152)

  @classmethod
  def gemma3_4b(cls) -> 'TransformerConfig':
    """Gemma 3 4B's text decoder (also TranslateGemma 4B)."""
    return cls._gemma3(34, 2560, 2560 * 4, num_heads=8, num_kv_heads=4,
                       sliding_window_size=1024, global_rope_scale=8.0)

  @classmethod
  def gemma3_12b(cls) -> 'TransformerConfig':
    """Gemma 3 12B's text decoder (also TranslateGemma 12B)."""
    return cls._gemma3(48, 3840, 3840 * 4, num_heads=16, num_kv_heads=8,
                       sliding_window_size=1024, global_rope_scale=8.0)

  @classmethod
  def gemma3_27b(cls) -> 'TransformerConfig':
    """Gemma 3 27B's text decoder (also TranslateGemma 27B): head dim 128,
    queries scaled by (embed_dim / num_heads) ** -0.5."""
    return cls._gemma3(62, 5376, 5376 * 4, num_heads=32, num_kv_heads=16,
                       head_dim=128, query_pre_attn_scalar=(5376 / 32)**-0.5,
                       sliding_window_size=1024, global_rope_scale=8.0)

  @classmethod
  def tiny(cls, vocab_size: int = 262_144, **kw) -> 'TransformerConfig':
    """A Gemma-3-shaped toy (2 local + 1 global layer) for tests."""
    base = cls._gemma3(3, 64, 128, vocab_size=vocab_size, num_heads=4,
                       num_kv_heads=2, head_dim=16, sliding_window_size=4,
                       query_pre_attn_scalar=16**-0.5,
                       attention_types=(LOCAL, LOCAL, GLOBAL))
    return base.replace(**kw)

  # --- The model protocol (`models.ModelConfig`) ---------------------------------
  def module(self, **kw) -> 'Transformer':
    return Transformer(self, **kw)

  def init_cache(self, batch_size: int, cache_len: int,
                 dtype=jnp.bfloat16) -> Cache:
    """An empty KV cache (`layers.empty_cache`): every layer owns its slots."""
    kv = (self.num_kv_heads, self.head_dim)
    return empty_cache({i: kv for i in range(self.num_layers)}, batch_size,
                       cache_len, dtype)

  def kv_bytes_per_token(self, itemsize: int = 2) -> int:
    """KV-cache bytes one token holds (keys and values of every layer)."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

  def matmul_params(self) -> int:
    """Weights one token multiplies through (the tied LM head included)."""
    return self.num_params(include_embedding=False) + self.vocab_size * self.embed_dim

  def attention_flops(self, context: int) -> float:
    """Forward FLOPs of one token's attention over `context` earlier tokens
    (sliding layers see at most their window)."""
    window = self.sliding_window_size or context
    ctx = sum(min(context, window) if t == LOCAL else context
              for t in self.attention_types)
    return 4.0 * self.num_heads * self.head_dim * ctx

  def hf_model_type(self) -> str:
    """transformers' model_type: gemma, gemma2 or gemma3_text."""
    if self.use_qk_norm:
      return 'gemma3_text'
    return 'gemma2' if self.use_post_attn_norm else 'gemma'


# --- Layers --------------------------------------------------------------------
class RMSNorm(nn.Module):
  """RMSNorm with a zero-centred scale (`x * (1 + scale)`), in float32."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.zeros_init(), (x.shape[-1],),
                       self.param_dtype)
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    out = xf * jax.lax.rsqrt(var + 1e-6) * (1 + scale.astype(jnp.float32))
    return out.astype(x.dtype)


class Attention(nn.Module):
  """Multi-/grouped-query attention with optional QK-norm, window, soft-cap."""

  config: TransformerConfig
  attn_type: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'einsum'
  fast_decode: bool = False

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               cache: Cache | None, end_index: Array | None):
    cfg = self.config
    N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    ein = lambda shape, name: Einsum(shape, self.dtype, self.param_dtype,
                                     name=name)
    if cfg.use_qkv_einsum:
      q, k, v = ein((3, N, D, H), 'qkv_einsum')('BTD,SNDH->SBTNH', x)
    else:
      q = ein((N, D, H), 'q_einsum')('BTD,NDH->BTNH', x)
      k, v = ein((2, K, D, H), 'kv_einsum')('BSD,CKDH->CBSKH', x)
    if cfg.use_qk_norm:
      q = RMSNorm(self.param_dtype, name='_query_norm')(q)
      k = RMSNorm(self.param_dtype, name='_key_norm')(k)
    local = self.attn_type == LOCAL
    base = cfg.local_rope_base if local else cfg.global_rope_base
    scale = cfg.local_rope_scale if local else cfg.global_rope_scale
    q = apply_rope(q, positions, base, scale)
    k = apply_rope(k, positions, base, scale)

    new_cache, kv_len, k_pos = None, None, positions
    if cache is not None:
      k, v, new_cache = write_cache(cache, k, v, end_index, self.dtype)
      k_pos = cache['positions']
      kv_len = end_index + x.shape[1]  # Per row, if end_index is.
    if local:
      mask = mask & sliding_mask(positions, k_pos, cfg.sliding_window_size)
    encoded = attention(q, k, v, mask, scale=cfg.query_pre_attn_scalar,
                        soft_cap=cfg.attn_logits_soft_cap,
                        impl=self.attention_impl, kv_len=kv_len,
                        decode_kernel=self.fast_decode)
    out = ein((N, H, D), 'attn_vec_einsum')('BTNH,NHD->BTD', encoded)
    return out, new_cache


class FeedForward(nn.Module):
  """Gated GeLU MLP; weights named and shaped as in the checkpoints."""

  config: TransformerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  batched_gate: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    D, F = cfg.embed_dim, cfg.hidden_dim
    init = nn.initializers.normal()
    if cfg.transpose_gating_einsum:
      w = self.param('gating_einsum', init, (2, F, D), self.param_dtype)
      gate = jnp.einsum('...D,NFD->...NF', x, w.astype(self.dtype))
      gate, up = gate[..., 0, :], gate[..., 1, :]
    else:
      w = self.param('gating_einsum', init, (2, D, F), self.param_dtype)
      if self.batched_gate:
        # N as a batch dim reads [2, D, F] as stored. The einsum below
        # wants it as [D, 2F], and XLA transposes the whole weight on every
        # call, inside a decode loop too (1.6 of a 2B step's 4.7 ms). The
        # default keeps the einsum that LoRA (qwix) adapts.
        gate, up = jnp.einsum('N...D,NDF->N...F',
                              jnp.broadcast_to(x, (2, *x.shape)),
                              w.astype(self.dtype))
      else:
        gate = jnp.einsum('...D,NDF->...NF', x, w.astype(self.dtype))
        gate, up = gate[..., 0, :], gate[..., 1, :]
    h = nn.gelu(gate) * up
    w_out = self.param('linear', init, (F, D), self.param_dtype)
    return jnp.einsum('...F,FD->...D', h, w_out.astype(self.dtype))


class Block(nn.Module):
  config: TransformerConfig
  attn_type: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'einsum'
  fast_decode: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, cache, end_index):
    cfg, pd = self.config, self.param_dtype
    h = RMSNorm(pd, name='pre_attention_norm')(x)
    h, new_cache = Attention(cfg, self.attn_type, self.dtype, pd,
                             self.attention_impl, self.fast_decode,
                             name='attn')(
                                 h, positions, mask, cache, end_index)
    if cfg.use_post_attn_norm:
      h = RMSNorm(pd, name='post_attention_norm')(h)
    x = x + h
    h = RMSNorm(pd, name='pre_ffw_norm')(x)
    h = FeedForward(cfg, self.dtype, pd, self.fast_decode, name='mlp')(h)
    if cfg.use_post_ffw_norm:
      h = RMSNorm(pd, name='post_ffw_norm')(h)
    return x + h, new_cache


class Embedder(nn.Module):
  """Holds the tied token embedding `embedder/input_embedding` [V, D]."""

  vocab_size: int
  embed_dim: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> Array:
    return self.param('input_embedding', nn.initializers.normal(),
                      (self.vocab_size, self.embed_dim), self.param_dtype)


class Transformer(nn.Module, TiedHead):
  """Gemma decoder. `__call__` returns `(logits or hidden, new_cache)`;
  `logits(hidden)` is the LM head alone (`layers.TiedHead`)."""

  config: TransformerConfig
  dtype: Any = jnp.float32        # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype of freshly initialised params
  attention_impl: str = 'einsum'  # 'einsum', 'jax' or 'cudnn' (no-cache path)
  remat: bool = False             # recompute each block in the backward pass
  fast_decode: bool = False       # sampling only: see the module docstring

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, attention_mask: Array,
               cache: Cache | None = None, *, return_hidden: bool = False):
    cfg = self.config
    embedder = Embedder(cfg.vocab_size, cfg.embed_dim, self.param_dtype,
                        name='embedder')
    table = embedder()
    x = table[tokens].astype(self.dtype)
    x = x * jnp.sqrt(cfg.embed_dim).astype(self.dtype)

    block_cls = nn.remat(Block, static_argnums=()) if self.remat else Block
    end_index = None if cache is None else cache['end_index']
    if cache is not None:
      cache = dict(cache)
      cache['positions'] = write_at(cache['positions'], positions, end_index)
    new_cache = None if cache is None else {
        'end_index': end_index + tokens.shape[1],
        'positions': cache['positions']}
    shared = {} if cache is None else {'positions': cache['positions']}
    for i, attn_type in enumerate(cfg.attention_types):
      layer_cache = None
      if cache is not None:
        layer_cache = dict(cache[f'layer_{i}'], **shared)
      x, c = block_cls(cfg, attn_type, self.dtype, self.param_dtype,
                       self.attention_impl, self.fast_decode,
                       name=f'layer_{i}')(
                           x, positions, attention_mask, layer_cache, end_index)
      if new_cache is not None:
        new_cache[f'layer_{i}'] = c
    x = RMSNorm(self.param_dtype, name='final_norm')(x)
    if return_hidden:
      return x, new_cache
    return self.logits_of(table, x), new_cache
