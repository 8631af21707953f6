"""Averaged weights: an EMA of the params, or the mean of the last K evaluated.

Both are scored at every in-training evaluation beside the params
themselves, and whichever scores best by `select_by` becomes `best/`
(`train.loop`). Averages of nearby points of one run often generalize better
than any of them (Polyak averaging; checkpoint averaging in NMT, Vaswani et
al. 2017), but on a small train split whether they do is measured, not
assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ParamEMAState(NamedTuple):
  inner: Any
  ema: Any  # float32, shaped like the params


def with_param_ema(inner: optax.GradientTransformation,
                   decay: float) -> optax.GradientTransformation:
  """`inner`, also keeping an exponential moving average of the params it
  produces: ema <- decay * ema + (1 - decay) * params after each update.

  Kept in the optimizer state, it is checkpointed, sharded (like the
  params) and restored with it, with no change to the train state. Float32
  whatever the params' dtype: a bf16 average would lose updates smaller
  than its rounding, which at decay 0.99 are most of them. It starts at
  the initial (pretrained) params.
  """
  def init(params):
    return ParamEMAState(inner.init(params),
                         jax.tree.map(lambda p: p.astype(jnp.float32), params))

  def update(updates, state, params=None):
    updates, inner_state = inner.update(updates, state.inner, params)
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p.astype(e.dtype),
                       state.ema, new)
    return updates, ParamEMAState(inner_state, ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state, like) -> Any | None:
  """The averaged params of a `with_param_ema` state, in `like`'s dtypes;
  None if the optimizer keeps no average."""
  if not isinstance(opt_state, ParamEMAState):
    return None
  return jax.tree.map(lambda e, p: e.astype(p.dtype), opt_state.ema, like)


def mean_params(trees: Sequence[Any]) -> Any:
  """The element-wise mean of params trees (accumulated in float32), in the
  first tree's dtypes."""
  if not trees:
    raise ValueError('mean_params needs at least one tree')
  total = jax.tree.map(lambda x: np.asarray(x, np.float32), trees[0])
  for t in trees[1:]:
    total = jax.tree.map(lambda a, x: a + np.asarray(x, np.float32), total, t)
  return jax.tree.map(lambda a, x: (a / len(trees)).astype(x.dtype), total,
                      trees[0])
