"""The decoder families (`gemma`: Gemma 1-3, `gemma4`) and the protocol
they share, so decoding, training and weights never ask which one they hold.

    cfg = models.from_name('gemma3_270m')         # or from_dict / resolve
    model = cfg.module(dtype=jnp.bfloat16)        # a flax module
    hidden, cache = model.apply(v, tokens, positions, mask, cfg.init_cache(B, S),
                                return_hidden=True)
    logits = model.apply(v, hidden, method='logits')
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from gemma_mt.models.registry import (FAMILIES, NAMES, TINY, from_dict,
                                      from_name, param_shapes, resolve)

Cache = dict[str, Any]


class ModelConfig(Protocol):
  """What every family's config provides (`gemma.TransformerConfig`,
  `gemma4.Gemma4Config`).

  The module it builds is called as
  `apply({'params': p}, tokens [B, T], positions [B, T], mask [B, T, S],
  cache=None, *, return_hidden=False) -> (logits or hidden, new cache)`
  (the decode step when given a cache from `init_cache`), and has
  `logits(hidden)`, the LM head alone.
  """

  family: ClassVar[str]
  NAMES: ClassVar[tuple[str, ...]]
  norm_scale_init: ClassVar[float]     # a fresh norm's scale (0: 1 + scale)
  tokenizer_source: ClassVar[str | None]  # None: the embedded one fits

  vocab_size: int
  embed_dim: int
  final_logit_softcap: float | None
  attention_types: tuple[str, ...]

  @property
  def num_layers(self) -> int: ...
  def name(self) -> str | None: ...
  def to_dict(self) -> dict[str, Any]: ...
  def replace(self, **kw) -> 'ModelConfig': ...
  def module(self, **kw) -> Any: ...
  def init_cache(self, batch_size: int, cache_len: int, dtype=...) -> Cache: ...
  def num_params(self, include_embedding: bool = True) -> int: ...
  def matmul_params(self) -> int: ...
  def attention_flops(self, context: int) -> float: ...
  def kv_bytes_per_token(self, itemsize: int = 2) -> int: ...
  def hf_model_type(self) -> str: ...


def flops_per_token(config: ModelConfig, context: int,
                    training: bool = False) -> float:
  """Model FLOPs of one token seeing `context` tokens: 2 per weight it
  multiplies through plus attention, forward; x3 with the backward pass
  (the 6N convention)."""
  fwd = 2.0 * config.matmul_params() + config.attention_flops(context)
  return 3 * fwd if training else fwd


__all__ = ['Cache', 'FAMILIES', 'ModelConfig', 'NAMES', 'TINY',
           'flops_per_token', 'from_dict', 'from_name', 'param_shapes',
           'resolve']
