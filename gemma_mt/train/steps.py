"""Optimizers and the jitted train / validation steps.

`make_train_step` returns `step(state, batch) -> (state, metrics)` over a
`TrainState`, jitted with params and optimizer state donated (the update
happens in place, so peak memory is one copy of each); LoRA's frozen base
rides along in the state, never donated or updated. It only calls
`jax.jit`: shardings can be passed through, or the inputs can simply arrive
already sharded (a data/FSDP mesh) and jit follows them.

Gradient accumulation is a `lax.scan` over micro-batches inside the step,
each micro-batch's summed loss divided by the target-token count of the
whole batch: the result is the gradient of the big batch (not an average of
per-micro-batch means, which `optax.MultiSteps` would give when micro-batches
hold different numbers of target tokens). Gradients accumulate in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gemma_mt import lora
from gemma_mt.train import loss as loss_lib
from gemma_mt.train.state import TrainState


def global_norm(tree) -> jax.Array:
  """L2 norm of all leaves together, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def _jit(fn, donate_argnums, in_shardings, out_shardings):
  kw = {}
  if in_shardings is not None:
    kw['in_shardings'] = in_shardings
  if out_shardings is not None:
    kw['out_shardings'] = out_shardings
  return jax.jit(fn, donate_argnums=donate_argnums, **kw)


def _split(batch: dict, k: int) -> dict:
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into '
                       f'{k} micro-batches')
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])
  return jax.tree.map(split, batch)


def full_params(params, frozen=None):
  """The tree the model applies: `params`, plus the frozen part if any."""
  if frozen is None:
    return params
  return lora.combine(frozen, params)


def make_grad_fn(model, *, grad_accum_steps: int = 1, pad_id: int = 0,
                 chunk_size: int = loss_lib.DEFAULT_CHUNK_SIZE, mesh=None,
                 label_smoothing: float = 0.0):
  """`grad_fn(params, batch, frozen=None) -> (loss, aux, grads)`.

  The loss of the whole batch and its gradient w.r.t. `params`. `frozen`
  (LoRA: the base weights, possibly quantized) joins `params` in the forward
  pass but gets no gradient. `mesh`: the mesh the batch is sharded over
  (the loss then sums its table gradient once per step, not per chunk).
  `label_smoothing`: see `loss.chunked_cross_entropy` (training only: the
  validation loss stays the plain NLL, comparable across recipes).
  """

  def grad_fn(params, batch, frozen=None):
    batch = {k: jnp.asarray(v) for k, v in loss_lib.as_batch(batch).items()}
    denom = jnp.maximum(loss_lib.num_target_tokens(batch), 1)

    def micro_loss(p, mb):
      loss_sum, aux = loss_lib.loss_sum_fn(full_params(p, frozen), model, mb,
                                           pad_id=pad_id, chunk_size=chunk_size,
                                           mesh=mesh,
                                           label_smoothing=label_smoothing)
      return loss_sum / denom, aux

    vg = jax.value_and_grad(micro_loss, has_aux=True)
    if grad_accum_steps == 1:
      (loss, aux), grads = vg(params, batch)
      return loss, aux, grads

    def body(carry, mb):
      g_acc, l_acc = carry
      (l, aux), g = vg(params, mb)
      g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
      return (g_acc, l_acc + l), aux

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, loss), auxs = jax.lax.scan(
        body, (zeros, jnp.float32(0)), _split(batch, grad_accum_steps))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, jax.tree.map(lambda x: x.sum(0), auxs), grads

  return grad_fn


def make_train_step(model, optimizer: optax.GradientTransformation, *,
                    grad_accum_steps: int = 1, pad_id: int = 0,
                    chunk_size: int | None = None, in_shardings=None,
                    out_shardings=None, donate: bool = True, mesh=None,
                    label_smoothing: float = 0.0):
  """`train_step(state, batch) -> (state, metrics)`.

  The jitted core is `train_step.jitted(params, opt_state, batch, frozen)`
  (params and opt_state donated; `in_shardings` / `out_shardings` are its
  own). For LoRA, `state.params` are the adapters and `state.frozen` the
  base weights. metrics: loss (mean over the batch's target tokens, before
  the update), grad_norm, param_norm (after the update), num_target_tokens,
  num_tokens.
  """
  grad_fn = make_grad_fn(model, grad_accum_steps=grad_accum_steps,
                         pad_id=pad_id,
                         chunk_size=chunk_size or loss_lib.DEFAULT_CHUNK_SIZE,
                         mesh=mesh, label_smoothing=label_smoothing)

  def step(params, opt_state, batch, frozen=None):
    loss, aux, grads = grad_fn(params, batch, frozen)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, 'grad_norm': global_norm(grads),
               'param_norm': global_norm(params),  # After the update.
               'num_target_tokens': aux['num_target_tokens'],
               'num_tokens': aux['num_tokens']}
    return params, opt_state, metrics

  jitted = _jit(step, (0, 1) if donate else (), in_shardings, out_shardings)

  def train_step(state: TrainState, batch):
    frozen = () if state.frozen is None else (state.frozen,)
    params, opt_state, metrics = jitted(state.params, state.opt_state, batch,
                                        *frozen)
    return state.replace(params=params, opt_state=opt_state), metrics

  train_step.jitted = jitted
  return train_step


def make_validation_step(model, *, pad_id: int = 0,
                         chunk_size: int | None = None):
  """`validation_step(state, batch) -> aux` (loss_sum and token counts).

  Sum `loss_sum` and `num_target_tokens` over batches, then divide: the
  validation loss is per target token over the whole split.
  """
  chunk_size = chunk_size or loss_lib.DEFAULT_CHUNK_SIZE

  @jax.jit
  def jitted(params, batch, frozen=None):
    return loss_lib.loss_sum_fn(full_params(params, frozen), model, batch,
                                pad_id=pad_id, chunk_size=chunk_size)[1]

  def validation_step(state: TrainState, batch):
    return jitted(state.params, batch, state.frozen)

  return validation_step
