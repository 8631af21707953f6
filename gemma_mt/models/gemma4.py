"""The Gemma 4 text decoder (E2B, E4B, 31B, 26B-A4B), in Flax linen.

The parameter tree is name-for-name the text part of `gemma.gm.nn.Gemma4_*`.
What differs from Gemma 1-3 (`gemma.py`), and why it is its own module:

* norms multiply by `scale` (initialised to ones), not by `1 + scale`;
  queries and keys are RMS-normed and not scaled; values are RMS-normed
  (no scale); each block ends with a learnt `skip_scale`;
* global layers may have their own KV head count and key size (512), keys
  that are also the values (`k_eq_v_global`), and RoPE on a part of the
  head (`rope_proportion`);
* per-layer inputs (E2B/E4B): a `[vocab, layers, dim]` table plus a
  projection of the embeddings, one slice gated into each block;
* KV sharing (E2B/E4B): the last layers attend with the keys/values of the
  last unshared layer of their type (a wider FFW in E2B's shared layers);
* a mixture-of-experts FFW beside a dense one (26B-A4B): top-k routing,
  renormalised weights, experts run grouped with `jax.lax.ragged_dot`.

Called as every family is (`models.ModelConfig`): `apply({'params': p},
tokens, positions, attention_mask, cache=None)` -> (logits, new cache); the
cache (`Gemma4Config.init_cache`) holds only the layers that own their
keys/values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_mt.models.config import FamilyConfig
from gemma_mt.models.layers import (GLOBAL, LOCAL, Array, Einsum, TiedHead,
                                    apply_rope, attention, empty_cache,
                                    param_shapes, sliding_mask, write_at,
                                    write_cache)


@dataclasses.dataclass(frozen=True)
class Gemma4Config(FamilyConfig):
  """Gemma 4 hyper-parameters; implements `models.ModelConfig`."""

  family: ClassVar[str] = 'gemma4'
  NAMES: ClassVar[tuple[str, ...]] = (
      'gemma4_e2b', 'gemma4_e4b', 'gemma4_31b', 'gemma4_26b_a4b')
  norm_scale_init: ClassVar[float] = 1.0  # norms multiply by scale
  tokenizer_source: ClassVar[str | None] = (
      'gs://gemma-data/tokenizers/tokenizer_gemma4.model')

  vocab_size: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  head_dim: int
  num_kv_heads: int
  attention_types: tuple[str, ...]
  sliding_window_size: int
  final_logit_softcap: float | None = 30.0
  num_global_kv_heads: int | None = None
  global_key_size: int | None = 512
  k_eq_v_global: bool = False
  global_rope_proportion: float = 0.25
  local_rope_proportion: float = 1.0
  local_rope_base: float = 10_000.0
  global_rope_base: float = 1_000_000.0
  per_layer_input_dim: int = 0
  frac_shared_layers: float = 0.0  # the last layers share KV (both types)
  shared_hidden_dim: int | None = None  # FFW width of KV-sharing layers
  num_experts: int = 0                # > 0: MoE FFW beside the dense one
  expert_dim: int = 0
  top_k_experts: int = 0

  # --- The model protocol (`models.ModelConfig`) ---------------------------------
  def module(self, **kw) -> 'Gemma4':
    return Gemma4(self, **kw)

  def init_cache(self, batch_size: int, cache_len: int,
                 dtype=jnp.bfloat16) -> dict:
    """An empty KV cache (`layers.empty_cache`): only layers with their own
    keys/values get slots (a KV-sharing layer reads its source's), each of
    its type's KV heads and key size."""
    return empty_cache(
        {i: self.attn_dims(t)[:2] for i, t in enumerate(self.attention_types)
         if self.kv_source(i) == i}, batch_size, cache_len, dtype)

  def kv_bytes_per_token(self, itemsize: int = 2) -> int:
    """KV-cache bytes one token holds (owning layers only; keys-as-values
    layers still keep both, as the cache layout does)."""
    return sum(2 * math.prod(self.attn_dims(t)[:2]) * itemsize
               for i, t in enumerate(self.attention_types)
               if self.kv_source(i) == i)

  def num_params(self, include_embedding: bool = True) -> int:
    """Parameters of the text decoder (traced shapes, nothing computed)."""
    shapes = param_shapes(self.module())
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    if not include_embedding:
      emb = shapes['embedder']
      total -= math.prod(emb['input_embedding'].shape)
      if 'per_layer_embeddings' in emb:
        total -= math.prod(emb['per_layer_embeddings'].shape)
    return total

  def matmul_params(self) -> int:
    """Weights one token multiplies through: the tied LM head included, the
    per-layer lookup table not, and only the top-k of the MoE experts."""
    n = self.num_params(include_embedding=False) + self.vocab_size * self.embed_dim
    if self.num_experts:
      per_expert = 3 * self.expert_dim * self.embed_dim
      n -= self.num_layers * (self.num_experts - self.top_k_experts) * per_expert
    return n

  def attention_flops(self, context: int) -> float:
    """Forward FLOPs of one token's attention over `context` earlier tokens
    (sliding layers see at most their window; global keys may be wider)."""
    total = 0.0
    for t in self.attention_types:
      ctx = min(context, self.sliding_window_size) if t == LOCAL else context
      total += 4.0 * self.num_heads * self.attn_dims(t)[1] * ctx
    return total

  def hf_model_type(self) -> str:
    raise ValueError('HF and GGUF export cover Gemma 1-3; not Gemma 4 yet')

  def kv_source(self, i: int) -> int:
    """The layer whose keys/values layer `i` attends with (itself if unshared),
    as `gemma4._config.create_kv_cache_sharing_patterns` defines it."""
    n = self.num_layers
    unshared = int(n - self.frac_shared_layers * n)
    if self.frac_shared_layers <= 0 or i < unshared:
      return i
    return unshared - 1 if self.attention_types[i] == GLOBAL else unshared - 2

  def layer_hidden_dim(self, i: int) -> int:
    if self.kv_source(i) != i and self.shared_hidden_dim is not None:
      return self.shared_hidden_dim
    return self.hidden_dim

  def attn_dims(self, attn_type: str) -> tuple[int, int, bool, float, float]:
    """(kv heads, key size, k_eq_v, rope proportion, rope base) of a type."""
    if attn_type == GLOBAL:
      return (self.num_global_kv_heads or self.num_kv_heads,
              self.global_key_size or self.head_dim, self.k_eq_v_global,
              self.global_rope_proportion, self.global_rope_base)
    return (self.num_kv_heads, self.head_dim, False,
            self.local_rope_proportion, self.local_rope_base)

  # --- Released models ---------------------------------------------------------
  @classmethod
  def _make(cls, num_layers, pattern_len, embed_dim, **kw) -> 'Gemma4Config':
    pattern = (LOCAL,) * (pattern_len - 1) + (GLOBAL,)
    types = (pattern * (num_layers // pattern_len + 1))[:num_layers]
    return cls(vocab_size=262_144, embed_dim=embed_dim,
               hidden_dim=embed_dim * 4, head_dim=256, attention_types=types,
               **kw)

  @classmethod
  def tiny(cls, vocab_size: int = 262_144, **kw) -> 'Gemma4Config':
    """An E2B-shaped toy for tests and CPU smoke runs: per-layer inputs, KV
    sharing (the last 2 of 5 layers), wider global keys."""
    base = cls(vocab_size=vocab_size, embed_dim=64, hidden_dim=128,
               num_heads=4, head_dim=16, num_kv_heads=1,
               attention_types=(LOCAL, LOCAL, GLOBAL, LOCAL, GLOBAL),
               sliding_window_size=4, global_key_size=32,
               per_layer_input_dim=16, frac_shared_layers=2 / 5,
               shared_hidden_dim=256)
    return base.replace(**kw)

  @classmethod
  def gemma4_e2b(cls) -> 'Gemma4Config':
    return cls._make(35, 5, 1536, num_heads=8, num_kv_heads=1,
                     sliding_window_size=512, per_layer_input_dim=256,
                     frac_shared_layers=20.0 / 35, shared_hidden_dim=1536 * 8)

  @classmethod
  def gemma4_e4b(cls) -> 'Gemma4Config':
    return cls._make(42, 6, 2560, num_heads=8, num_kv_heads=2,
                     sliding_window_size=512, per_layer_input_dim=256,
                     frac_shared_layers=18.0 / 42)

  @classmethod
  def gemma4_31b(cls) -> 'Gemma4Config':
    return cls._make(60, 6, 5376, num_heads=32, num_kv_heads=16,
                     num_global_kv_heads=4, sliding_window_size=1024,
                     k_eq_v_global=True)

  @classmethod
  def gemma4_26b_a4b(cls) -> 'Gemma4Config':
    return cls._make(30, 6, 2816, num_heads=16, num_kv_heads=8,
                     num_global_kv_heads=2, sliding_window_size=1024,
                     k_eq_v_global=True, num_experts=128, expert_dim=704,
                     top_k_experts=8).replace(hidden_dim=2112)


class RMSNorm(nn.Module):
  """`x / rms(x) * scale` (scale from ones), or without a scale."""

  with_scale: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    out = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + 1e-6)
    if self.with_scale:
      scale = self.param('scale', nn.initializers.ones, (x.shape[-1],),
                         self.param_dtype)
      out = out * scale.astype(jnp.float32)
    return out.astype(x.dtype)


class Attention(nn.Module):
  config: Gemma4Config
  attn_type: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'einsum'
  fast_decode: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, shared_kv, cache, end_index, k_pos,
               kv_len):
    cfg = self.config
    N, D = cfg.num_heads, cfg.embed_dim
    K, H, k_eq_v, proportion, base = cfg.attn_dims(self.attn_type)
    ein = lambda shape, name: Einsum(shape, self.dtype, self.param_dtype,
                                     name=name)
    q = ein((N, D, H), 'q_einsum')('BTD,NDH->BTNH', x)
    q = apply_rope(RMSNorm(param_dtype=self.param_dtype, name='query_norm')(q),
                   positions, base, proportion=proportion)
    if k_eq_v:
      k = v = ein((K, D, H), 'k_einsum')('BSD,KDH->BSKH', x)
    else:
      k, v = ein((2, K, D, H), 'kv_einsum')('BSD,CKDH->CBSKH', x)
    k = RMSNorm(param_dtype=self.param_dtype, name='key_norm')(k)
    v = RMSNorm(with_scale=False, name='value_norm')(v)
    new_cache = None
    if shared_kv is not None:  # A KV-sharing layer: its own k, v unused.
      k, v = shared_kv
    else:
      k = apply_rope(k, positions, base, proportion=proportion)
      if cache is not None:  # Written at end_index; attend over the cache.
        k, v, new_cache = write_cache(cache, k, v, end_index, self.dtype)
    if self.attn_type == LOCAL:
      mask = mask & sliding_mask(positions, k_pos, cfg.sliding_window_size)
    encoded = attention(q, k, v, mask, scale=1.0, impl=self.attention_impl,
                        kv_len=kv_len, decode_kernel=self.fast_decode)
    out = ein((N, H, D), 'attn_vec_einsum')('BTNH,NHD->BTD', encoded)
    return out, (k, v), new_cache


class FeedForward(nn.Module):
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    D, F = x.shape[-1], self.hidden_dim
    w = self.param('gating_einsum', nn.initializers.normal(), (2, F, D),
                   self.param_dtype).astype(self.dtype)
    gate = jnp.einsum('...D,NFD->...NF', x, w)
    h = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    w_out = self.param('linear', nn.initializers.normal(), (F, D),
                       self.param_dtype).astype(self.dtype)
    return jnp.einsum('...F,FD->...D', h, w_out)


class MoE(nn.Module):
  """Top-k routed experts: softmax router over RMS-normed, scaled inputs;
  the chosen experts' weights renormalised to sum to 1; each expert a gated
  GeLU MLP with a learnt output scale."""

  config: Gemma4Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    E, F, D, k = cfg.num_experts, cfg.expert_dim, cfg.embed_dim, cfg.top_k_experts
    p = lambda name, shape, init=nn.initializers.normal(): self.param(
        name, init, shape, self.param_dtype).astype(self.dtype)
    router_in = RMSNorm(with_scale=False, name='router_norm')(x)
    router_in = router_in * jax.lax.rsqrt(jnp.asarray(D, router_in.dtype))
    router_in = router_in * p('router_scale', (D,), nn.initializers.ones)
    logits = Einsum((D, E), self.dtype, self.param_dtype, name='router_logits')(
        '...D,DE->...E', router_in).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    _, choices = jax.lax.top_k(logits, k)                    # [..., k]
    weights = jnp.take_along_axis(probs, choices, axis=-1)
    weights = weights / jnp.sum(weights, -1, keepdims=True)  # [..., k]
    w_gate = self._weight('gating_einsum', (E, 2, F, D))
    w_out = self._weight('linear', (E, F, D))
    flat, slots = x.reshape(-1, D), choices.reshape(-1)
    order = jnp.argsort(slots)                               # token-slots by expert
    rows = jnp.repeat(jnp.arange(flat.shape[0]), k)[order]
    sizes = jnp.bincount(slots, length=E)
    w_gate = jnp.transpose(w_gate, (0, 3, 1, 2)).reshape(E, D, 2 * F)
    h = jax.lax.ragged_dot(flat[rows], w_gate, group_sizes=sizes)
    h = h.reshape(-1, 2, F)
    y = jax.lax.ragged_dot(nn.gelu(h[:, 0]) * h[:, 1], w_out, group_sizes=sizes)
    y = y * p('per_expert_scale', (E,), nn.initializers.ones)[slots[order]][:, None]
    y = y[jnp.argsort(order)].reshape(*choices.shape, D)     # back to [..., k, D]
    return jnp.einsum('...kD,...k->...D', y, weights.astype(y.dtype))

  def _weight(self, name: str, shape: tuple[int, ...]) -> Array:
    """A weight stored as `<name>/w` (the official `_Weight` sub-module)."""
    return _Weight(shape, self.param_dtype, name=name)().astype(self.dtype)


class _Weight(nn.Module):
  shape: tuple[int, ...]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> Array:
    return self.param('w', nn.initializers.normal(), self.shape,
                      self.param_dtype)


class Block(nn.Module):
  config: Gemma4Config
  index: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'einsum'
  fast_decode: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, per_layer_input, shared_kv, cache,
               end_index, k_pos, kv_len):
    cfg, pd, dt = self.config, self.param_dtype, self.dtype
    norm = lambda name: RMSNorm(param_dtype=pd, name=name)
    skip_scale = self.param('skip_scale', nn.initializers.ones, (1,), pd)
    h, kv, new_cache = Attention(cfg, cfg.attention_types[self.index], dt, pd,
                                 self.attention_impl, self.fast_decode,
                                 name='attn')(
        norm('pre_attention_norm')(x), positions, mask, shared_kv, cache,
        end_index, k_pos, kv_len)
    x = x + norm('post_attention_norm')(h)
    if cfg.num_experts:
      dense = FeedForward(cfg.hidden_dim, dt, pd, name='mlp2')(
          norm('pre_ffw2_norm')(x))
      moe = MoE(cfg, dt, pd, name='mlp')(norm('pre_ffw_norm')(x))
      h = norm('post_ffw2_norm')(dense) + norm('post_ffw1_norm')(moe)
    else:
      h = FeedForward(cfg.layer_hidden_dim(self.index), dt, pd, name='mlp')(
          norm('pre_ffw_norm')(x))
    x = x + norm('post_ffw_norm')(h)
    if cfg.per_layer_input_dim:
      P, D = cfg.per_layer_input_dim, cfg.embed_dim
      g = Einsum((D, P), dt, pd, name='per_layer_input_gate')('...D,DP->...P', x)
      g = Einsum((P, D), dt, pd, name='per_layer_projection')(
          '...P,PD->...D', nn.gelu(g) * per_layer_input)
      x = x + norm('post_per_layer_input_norm')(g)
    return x * skip_scale.astype(x.dtype), kv, new_cache


class Gemma4(nn.Module, TiedHead):
  """Gemma 4 text decoder; `__call__` returns `(logits or hidden, cache)`;
  `logits(hidden)` is the LM head alone. `attention_impl` and `fast_decode`
  pick the attention kernels as in `gemma.Transformer` (`layers.attention`)."""

  config: Gemma4Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'einsum'  # 'einsum', 'jax' or 'cudnn' (no-cache path)
  remat: bool = False
  fast_decode: bool = False       # one-token steps: the Pallas decode kernel

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, attention_mask: Array,
               cache: Any = None, *, return_hidden: bool = False):
    cfg, pd, dt = self.config, self.param_dtype, self.dtype
    end_index, k_pos, new_cache, kv_len = None, positions, None, None
    if cache is not None:
      end_index = cache['end_index']
      kv_len = end_index + tokens.shape[1]  # Per row, if end_index is.
      k_pos = write_at(cache['positions'], positions, end_index)
      new_cache = {'end_index': end_index + tokens.shape[1], 'positions': k_pos}
    D, L, P = cfg.embed_dim, cfg.num_layers, cfg.per_layer_input_dim
    emb = _Embedder(cfg, pd, dt, name='embedder')
    table = emb.table()
    x = table[tokens].astype(dt) * jnp.sqrt(D).astype(dt)
    per_layer = None
    if P:
      per_layer = emb.per_layer_inputs(x, tokens)
    block_cls = nn.remat(Block, static_argnums=()) if self.remat else Block
    kvs: dict[int, tuple[Array, Array]] = {}
    for i in range(L):
      src = cfg.kv_source(i)
      layer_cache = None if cache is None or src != i else cache[f'layer_{i}']
      x, kvs[i], c = block_cls(cfg, i, dt, pd, self.attention_impl,
                               self.fast_decode, name=f'layer_{i}')(
          x, positions, attention_mask,
          None if per_layer is None else per_layer[..., i, :],
          kvs[src] if src != i else None, layer_cache, end_index, k_pos,
          kv_len)
      if c is not None:
        new_cache[f'layer_{i}'] = c
    x = RMSNorm(param_dtype=pd, name='final_norm')(x)
    if return_hidden:
      return x, new_cache
    return self.logits_of(table, x), new_cache


class _Embedder(nn.Module):
  config: Gemma4Config
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.input_embedding = self.param(
        'input_embedding', nn.initializers.normal(),
        (cfg.vocab_size, cfg.embed_dim), self.param_dtype)
    if cfg.per_layer_input_dim:
      L, P, D = cfg.num_layers, cfg.per_layer_input_dim, cfg.embed_dim
      self.per_layer_embeddings = self.param(
          'per_layer_embeddings', nn.initializers.normal(),
          (cfg.vocab_size, L, P), self.param_dtype)
      self.per_layer_model_projection = Einsum(
          (D, L, P), self.dtype, self.param_dtype, w_scale=D**-0.5)
      self.per_layer_projection_norm = RMSNorm(param_dtype=self.param_dtype)

  def table(self) -> Array:
    return self.input_embedding

  def per_layer_inputs(self, x: Array, tokens: Array) -> Array:
    """[B, T, layers, P]: the projected embeddings (normed) and the per-layer
    table's rows, averaged (times sqrt 2)."""
    P = self.config.per_layer_input_dim
    dtype = self.dtype
    proj = self.per_layer_model_projection('...TD,DLP->...TLP', x)
    proj = self.per_layer_projection_norm(proj)
    rows = self.per_layer_embeddings[tokens].astype(dtype) * jnp.sqrt(P).astype(dtype)
    return (proj + rows) * jax.lax.rsqrt(2.0).astype(dtype)
