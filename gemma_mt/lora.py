"""LoRA and QLoRA adapters for the Gemma decoder, through qwix.

qwix intercepts the `jnp.einsum` calls of our linen `Transformer` and adds
`x @ A @ B * alpha / rank` to the projections picked by module-path rules, so
the model modules stay untouched and the base param tree keeps the official
layout.
The adapters live beside their weight: `layer_i/attn/q_einsum/w_lora_a`,
`..._lora_b`, `layer_i/mlp/gating_einsum_lora_a`, ...

Typical use (see `tests/test_lora.py`):

  lcfg = LoraConfig(rank=8)                    # quant='int8' for QLoRA
  lora_model = apply_lora(cfg.module(), lcfg)
  adapters = init_lora_params(lora_model, rng)
  base = quantize_base(lora_model, base) if lcfg.quant else base
  # train: grads w.r.t. `adapters` only; the base is a frozen argument
  logits, _ = lora_model.apply({'params': combine(base, adapters)}, ...)
  params = apply_adapters(base, adapters, lcfg)  # plain, merged tree

Adapter dirs on disk: `weights.save_adapters` / `weights.load_dir`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from qwix._src.providers import lora as qwix_lora
from qwix._src.providers import ptq as qwix_ptq
from qwix._src.utils import flax_util as qwix_flax

Params = dict[str, Any]

TARGETS = ('q', 'kv', 'o', 'gate_up', 'down')
_SUFFIXES = ('_lora_a', '_lora_b')
# Module-path regexes (below `layer_i/`) of each target. q and kv are fused
# into `qkv_einsum` when num_heads == num_kv_heads: either target adapts it.
_ATTN = {'q': ('q_einsum', 'qkv_einsum'),
         'kv': ('kv_einsum', 'qkv_einsum', 'k_einsum'),  # k_einsum: Gemma 4's
         'o': ('attn_vec_einsum',)}                       # keys-as-values
# gate/up (one stacked tensor) and down share the module `layer_i/mlp`, so a
# path rule cannot tell them apart: they are told apart by weight name.
_MLP = {'gate_up': 'gating_einsum', 'down': 'linear'}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get rank-`rank` adapters, scaled by `alpha / rank`.

  quant: None (LoRA), or 'int8' / 'int4' for QLoRA: the frozen base weights
  of all projections are held quantized (per-channel absmax; `tile_size`
  enables sub-channel scales along the contraction axis).
  dropout: on the adapter input; active only when `apply` is given a
  'dropout' rng, so evaluation without one is deterministic.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = TARGETS
  dropout: float = 0.0
  quant: str | None = None
  tile_size: int | None = None

  def __post_init__(self):
    object.__setattr__(self, 'targets', tuple(self.targets))
    unknown = set(self.targets) - set(TARGETS)
    if unknown or not self.targets:
      raise ValueError(f'LoRA targets must be a non-empty subset of {TARGETS}, '
                       f'got {self.targets}')
    if self.quant not in (None, 'int8', 'int4'):
      raise ValueError(f"quant must be None, 'int8' or 'int4': {self.quant!r}")
    if self.rank < 1:
      raise ValueError(f'rank must be >= 1, got {self.rank}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str) -> 'LoraConfig':
    return cls(**json.loads(text))


# --- The model -----------------------------------------------------------------
@flax.struct.dataclass
class _QWeight(qwix_ptq.WithAux):
  """A quantized weight whose `astype` works: qwix 0.1.8's `WithAux.astype`
  fails on a bare QArray, and our modules call `w.astype(dtype)`."""

  def astype(self, dtype):
    return self.replace(array=self.array.astype(dtype))


class _Provider(qwix.LoraProvider):
  """qwix's LoraProvider with its einsum path redone for our linen model.

  qwix 0.1.8 `LoraProvider.einsum` stores a debug string with `setattr` on
  the current module, which linen forbids outside `setup`
  (SetAttributeFrozenModuleError), so every linen einsum fails. This is the
  same computation without it, plus: skipping MLP weights that are not
  targeted, and dropout only when a 'dropout' rng is given. Quantized weights
  are handed to the model as `_QWeight`.
  """

  def __init__(self, rules, skip_weights=(), dropout=0.0):
    super().__init__(rules)
    self._skip = frozenset(skip_weights)
    self._dropout = dropout

  def nn_param(self, module, name, *args, **kwargs):
    p = super().nn_param(module, name, *args, **kwargs)
    if isinstance(p, qwix_ptq.WithAux) and not isinstance(p, _QWeight):
      p = _QWeight(p.array, p.how)
    return p

  def einsum(self, einsum_str, *operands, **kwargs):
    res = qwix.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
    rule, _ = self._get_current_rule_and_op_id('einsum', repeated_call=True)
    if not isinstance(rule, qwix.LoraRule) or len(operands) != 2:
      return res
    lhs, rhs = operands
    name = qwix_flax.find_param(rhs, qwix_ptq.WithAux)
    if name is None or name in self._skip:  # not a weight, or not targeted
      return res
    a_shape, b_shape, lora_str, a_tr, b_tr = (
        qwix_lora._parse_einsum_str_for_lora(  # pylint: disable=protected-access
            lhs.shape, rhs.shape, einsum_str, rule.rank))
    a, b = qwix_lora._get_or_create_lora_params(  # pylint: disable=protected-access
        name=name, rule=rule, a_shape=a_shape, b_shape=b_shape,
        a_sharding_transpose=a_tr, b_sharding_transpose=b_tr)
    module = qwix_flax.get_current_module()
    if self._dropout > 0 and module.has_rng('dropout'):
      keep = jax.random.bernoulli(module.make_rng('dropout'),
                                  1.0 - self._dropout, lhs.shape)
      lhs = jnp.where(keep, lhs / (1.0 - self._dropout), 0).astype(lhs.dtype)
    delta = jnp.einsum(lora_str, lhs, a.astype(lhs.dtype), b.astype(lhs.dtype),
                       **kwargs)
    return res + (delta * rule.alpha / rule.rank).astype(res.dtype)


def lora_rules(lora_config: LoraConfig) -> list[qwix.QuantizationRule]:
  """qwix rules: LoRA on the targets; with `quant`, every projection's weight
  (targeted or not) is quantized."""
  c = lora_config
  qtype = {None: None, 'int8': jnp.int8, 'int4': jnp.int4}[c.quant]
  attn = sorted({m for t in c.targets for m in _ATTN.get(t, ())})
  paths = [rf'layer_\d+/attn/({"|".join(attn)})'] if attn else []
  if {'gate_up', 'down'} & set(c.targets):
    # mlp2: Gemma 4 MoE's dense MLP (the experts themselves run through
    # ragged_dot, which qwix does not adapt: they stay frozen).
    paths.append(r'layer_\d+/mlp2?')
  rules = [qwix.LoraRule(module_path=p, rank=c.rank, alpha=c.alpha,
                         weight_qtype=qtype, tile_size=c.tile_size)
           for p in paths]
  if qtype is not None:  # quantize the untargeted projections too
    rules.append(qwix.QuantizationRule(
        module_path=r'layer_\d+/(attn/\w+_einsum|mlp)', weight_qtype=qtype,
        tile_size=c.tile_size))
  return rules


def apply_lora(model: nn.Module, lora_config: LoraConfig) -> nn.Module:
  """The same linen module with adapters (and, for QLoRA, quantized weights).

  Linen needs no sample inputs here: params are created by `init`.
  """
  skip = [w for t, w in _MLP.items() if t not in lora_config.targets]
  provider = _Provider(lora_rules(lora_config), skip, lora_config.dropout)
  return qwix.apply_lora_to_model(model, provider)


def _dummy_inputs():
  tokens = jnp.zeros((1, 1), jnp.int32)
  return tokens, tokens, jnp.ones((1, 1, 1), jnp.bool_)


def _abstract_params(lora_model: nn.Module) -> Params:
  """Shapes of the full LoRA param tree, nothing materialised."""
  return jax.eval_shape(lora_model.init, jax.random.key(0),
                        *_dummy_inputs())['params']


def init_lora_params(lora_model: nn.Module, rng: jax.Array,
                     dtype: Any = None) -> Params:
  """Fresh adapters only (A: he-uniform, B: zeros, so the model starts as the
  base). The base init is traced but dead code under jit: never materialised.

  dtype: defaults to the base weights' dtype (the quantization scale's for
  QLoRA); pass float32 to train bf16 base weights with float32 adapters.
  """
  def init(rng):
    params = lora_model.init(rng, *_dummy_inputs())['params']
    return split_params(nn.unbox(params))[1]
  adapters = jax.jit(init)(rng)
  if dtype is not None:
    adapters = jax.tree.map(lambda x: x.astype(dtype), adapters)
  return adapters


def quantize_base(lora_model: nn.Module, base_params: Params) -> Params:
  """QLoRA: the plain base tree with every projection weight replaced by
  qwix's quantized `WithAux(QArray)` (int8/int4 values + scales), as the
  `LoraConfig.quant` model expects it. Norms and embedding stay as they are.
  """
  abstract, _ = split_params(_abstract_params(lora_model))
  return qwix.quantize_params(base_params, abstract)


# --- Param trees -------------------------------------------------------------
def is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1].endswith(_SUFFIXES)


def _flat(params: Params) -> dict:
  # Stop at qwix's WithAux so a quantized weight stays one leaf.
  return flax.traverse_util.flatten_dict(
      flax.core.unfreeze(params),
      is_leaf=lambda _, x: not isinstance(x, dict))


def split_params(params: Params) -> tuple[Params, Params]:
  """(base, adapters): two disjoint sub-trees of a LoRA param tree."""
  flat = _flat(params)
  unflat = flax.traverse_util.unflatten_dict
  return (unflat({k: v for k, v in flat.items() if not is_adapter(k)}),
          unflat({k: v for k, v in flat.items() if is_adapter(k)}))


def combine(base: Params, adapters: Params) -> Params:
  """The full tree the LoRA model applies (inverse of `split_params`)."""
  return flax.traverse_util.unflatten_dict(_flat(base) | _flat(adapters))


def param_labels(params: Params) -> Params:
  """'lora' / 'frozen' per leaf, for `optax.multi_transform` on a full tree."""
  return flax.traverse_util.unflatten_dict(
      {k: 'lora' if is_adapter(k) else 'frozen' for k in _flat(params)})


def frozen_base_optimizer(tx: optax.GradientTransformation):
  """`tx` on the adapters of a full (float) tree, zero updates elsewhere.

  Prefer differentiating w.r.t. the adapters alone (`tx.init(adapters)`): it
  skips the base gradients entirely and is the only way with a QLoRA base.
  """
  return optax.multi_transform({'lora': tx, 'frozen': optax.set_to_zero()},
                               param_labels)


def count_params(tree: Params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- Merging -------------------------------------------------------------------
def _delta(w_shape: tuple[int, ...], a: jax.Array, b: jax.Array) -> jax.Array:
  """A @ B laid out as the weight. qwix puts the weight's input-side axes (in
  order) in A and the others (in order) in B; find which axes those are."""
  a_dims, b_dims = a.shape[:-1], b.shape[1:]
  fits = []
  for a_axes in itertools.combinations(range(len(w_shape)), len(a_dims)):
    rest = [i for i in range(len(w_shape)) if i not in a_axes]
    if (tuple(w_shape[i] for i in a_axes) == a_dims
        and tuple(w_shape[i] for i in rest) == b_dims):
      fits.append(list(a_axes) + rest)
  if len(fits) != 1:
    raise ValueError(f'cannot lay out LoRA A{a.shape} B{b.shape} as a weight '
                     f'of shape {w_shape} ({len(fits)} ways)')
  prod = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
  return jnp.transpose(prod, np.argsort(fits[0]))


def merge_lora(params: Params, lora_config: LoraConfig) -> Params:
  """Plain params of the official tree: W + alpha/rank * A @ B per adapted
  weight, adapters dropped. A QLoRA base is dequantized first; the merged
  weight keeps the base (or scale) dtype."""
  flat = _flat(params)
  out = {}
  for k, w in flat.items():
    if is_adapter(k):
      continue
    if isinstance(w, qwix_ptq.WithAux):
      w = qwix.dequantize(w.array)
    a = flat.get(k[:-1] + (k[-1] + '_lora_a',))
    if a is not None:
      b = flat[k[:-1] + (k[-1] + '_lora_b',)]
      w = (w.astype(jnp.float32)
           + lora_config.scale * _delta(w.shape, a, b)).astype(w.dtype)
    out[k] = w
  return flax.traverse_util.unflatten_dict(out)


def apply_adapters(base_params: Params, adapters: Params,
                   lora_config: LoraConfig) -> Params:
  """Base + adapters -> plain params for the plain `Transformer` (Translator)."""
  return merge_lora(combine(base_params, adapters), lora_config)
