"""The optimizer and learning-rate schedule of a `TrainingConfig` (optax)."""

from __future__ import annotations

import optax

from gemma_mt.train.averaging import with_param_ema
from gemma_mt.train.config import OPTIMIZERS, TrainingConfig


def learning_rate_schedule(config: TrainingConfig, total_steps: int):
  """Linear warm-up, then constant / cosine / linear decay to 0 at the end."""
  lr, warmup = config.learning_rate, config.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  after = {'constant': optax.constant_schedule(lr),
           'cosine': optax.cosine_decay_schedule(lr, decay_steps),
           'linear': optax.linear_schedule(lr, 0.0, decay_steps)}[
               config.lr_schedule]
  if not warmup:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config: TrainingConfig,
                   total_steps: int = 1) -> optax.GradientTransformation:
  """The optimizer of `config` (the tutorial's default: SGD at 1e-4).

  `grad_clip` > 0 adds global-norm clipping first; `total_steps` is where
  a decaying `lr_schedule` reaches 0.
  """
  lr = learning_rate_schedule(config, total_steps)
  wd = config.weight_decay
  if config.optimizer == 'sgd':
    opt = optax.sgd(lr)
    if wd:
      opt = optax.chain(optax.add_decayed_weights(wd), opt)
  elif config.optimizer == 'adamw':
    opt = optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=wd)
  elif config.optimizer == 'adafactor':
    opt = optax.adafactor(lr, weight_decay_rate=wd or None)
  else:
    raise ValueError(f'unknown optimizer {config.optimizer!r}; choose one of '
                     f'{OPTIMIZERS}')
  if config.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
  if config.ema_decay:
    opt = with_param_ema(opt, config.ema_decay)
  return opt
