"""Optimizers and the jitted train / validation steps.

`make_train_step` returns `step(params, opt_state, batch) -> (params,
opt_state, metrics)`, jitted with params and optimizer state donated (the
update happens in place, so peak memory is one copy of each). It only calls
`jax.jit`: shardings can be passed through, or the inputs can simply arrive
already sharded (a data/FSDP mesh) and jit follows them.

Gradient accumulation is a `lax.scan` over micro-batches inside the step,
each micro-batch's summed loss divided by the target-token count of the
whole batch: the result is the gradient of the big batch (not an average of
per-micro-batch means, which `optax.MultiSteps` would give when micro-batches
hold different numbers of target tokens). Gradients accumulate in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gemma_mt import loss as loss_lib

OPTIMIZERS = ('sgd', 'adamw', 'adafactor')


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """From a `TrainingConfig` (or anything with its optimizer fields).

  Default: plain SGD at `learning_rate` (the tutorial's 1e-4). `grad_clip`
  > 0 adds global-norm clipping first; `warmup_steps` a linear warm-up.
  """
  name = getattr(config, 'optimizer', 'sgd')
  lr = getattr(config, 'learning_rate', 1e-4)
  warmup = getattr(config, 'warmup_steps', 0) or 0
  if warmup:
    lr = optax.linear_schedule(0.0, lr, warmup)
  wd = getattr(config, 'weight_decay', 0.0) or 0.0
  if name == 'sgd':
    opt = optax.sgd(lr)
    if wd:
      opt = optax.chain(optax.add_decayed_weights(wd), opt)
  elif name == 'adamw':
    opt = optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=wd)
  elif name == 'adafactor':
    opt = optax.adafactor(lr, weight_decay_rate=wd or None)
  else:
    raise ValueError(f'unknown optimizer {name!r}; choose one of {OPTIMIZERS}')
  clip = getattr(config, 'grad_clip', None)
  if clip:
    opt = optax.chain(optax.clip_by_global_norm(clip), opt)
  return opt


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
  from gemma_mt import lora
  return lora.combine(frozen, params)


def make_grad_fn(model, *, grad_accum_steps: int = 1, pad_id: int = 0,
                 chunk_size: int = loss_lib.DEFAULT_CHUNK_SIZE, mesh=None):
  """`grad_fn(params, batch, frozen=None) -> (loss, aux, grads)`.

  The loss of the whole batch and its gradient w.r.t. `params`. `frozen`
  (LoRA: the base weights, possibly quantized) joins `params` in the forward
  pass but gets no gradient. `mesh`: the mesh the batch is sharded over
  (the loss then sums its table gradient once per step, not per chunk).
  """

  def grad_fn(params, batch, frozen=None):
    batch = {k: jnp.asarray(v) for k, v in loss_lib.as_batch(batch).items()}
    denom = jnp.maximum(loss_lib.num_target_tokens(batch), 1)

    def micro_loss(p, mb):
      loss_sum, aux = loss_lib.loss_sum_fn(full_params(p, frozen), model, mb,
                                           pad_id=pad_id, chunk_size=chunk_size,
                                           mesh=mesh)
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
                    chunk_size: int = loss_lib.DEFAULT_CHUNK_SIZE,
                    in_shardings=None, out_shardings=None, donate: bool = True,
                    mesh=None):
  """Jitted `train_step(params, opt_state, batch, frozen=None)`.

  params and opt_state are donated. For LoRA, `params` are the adapters and
  `frozen` the base weights (not donated, never updated). metrics: loss
  (mean over the batch's target tokens, before the update), grad_norm,
  num_target_tokens, num_tokens.
  """
  grad_fn = make_grad_fn(model, grad_accum_steps=grad_accum_steps,
                         pad_id=pad_id, chunk_size=chunk_size, mesh=mesh)

  def train_step(params, opt_state, batch, frozen=None):
    loss, aux, grads = grad_fn(params, batch, frozen)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, 'grad_norm': global_norm(grads),
               'num_target_tokens': aux['num_target_tokens'],
               'num_tokens': aux['num_tokens']}
    return params, opt_state, metrics

  return _jit(train_step, (0, 1) if donate else (), in_shardings,
              out_shardings)


def make_validation_step(model, *, pad_id: int = 0,
                         chunk_size: int = loss_lib.DEFAULT_CHUNK_SIZE,
                         in_shardings=None, out_shardings=None):
  """Jitted `validation_step(params, batch, frozen=None) -> aux`.

  aux holds loss_sum and the token counts.

  Sum `loss_sum` and `num_target_tokens` over batches, then divide: the
  validation loss is per target token over the whole split.
  """

  def validation_step(params, batch, frozen=None):
    return loss_lib.loss_sum_fn(full_params(params, frozen), model, batch,
                                pad_id=pad_id, chunk_size=chunk_size)[1]

  return _jit(validation_step, (), in_shardings, out_shardings)
