"""What training updates (`TrainState`) and how a run builds it (`init_train`).

Full fine-tune: `params` are all weights and `frozen` is None. LoRA:
`params` are the adapters (float32, the only thing in the optimizer state
and the checkpoints) and `frozen` the base weights in the compute dtype
(int8/int4 for QLoRA: never updated, so no float32 master copy).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemma_mt import lora, models, sharding, weights
from gemma_mt.train.config import TrainingConfig
from gemma_mt.train.optimizer import make_optimizer
from gemma_mt.weights.embedded import default_tokenizer


@flax.struct.dataclass
class TrainState:
  params: Any            # what trains: all weights, or LoRA's adapters
  opt_state: Any
  frozen: Any = None     # LoRA: the base weights (maybe quantized)


@dataclasses.dataclass
class Model:
  """A model to train: its decoder module, params, tokenizer (None for
  speed runs on random tokens) and architecture (a name, or a config)."""

  module: Any
  params: Any
  tokenizer: Any = None
  arch: Any = None


@dataclasses.dataclass
class TrainSetup:
  """A run's model, optimizer and initial state, placed on the mesh."""

  model: Any             # the Transformer (LoRA: the adapted module)
  optimizer: optax.GradientTransformation
  state: TrainState
  step_shardings: tuple  # (in_shardings, out_shardings) of the jitted step
  tokenizer: Any
  arch: str


def random_params(module, seed: int = 0) -> Any:
  """The model's init (N(0, 0.01) weights, identity norms and scales:
  Gemma 1-3 norms multiply by 1 + scale, Gemma 4's by scale), from numpy.

  Shapes come from `eval_shape`; compiling `module.init` instead takes the
  better part of a minute on a small CPU for a model that trains in seconds.
  """
  shapes = models.param_shapes(module)
  rng = np.random.default_rng(seed)
  one = module.config.norm_scale_init

  def init(path, s):
    if jax.tree_util.keystr(path[-1:]).endswith("scale']"):
      return jnp.full(s.shape, one, s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.01,
                       s.dtype)

  return jax.tree_util.tree_map_with_path(init, shapes)


def init_model(config: TrainingConfig) -> Model:
  """The model the config asks for (weights loaded or random).

  Under LoRA the base is frozen, so it is held in the compute dtype (no
  float32 master copy); else in `param_dtype`.
  """
  param_dtype = jnp.dtype(config.dtype if config.lora_rank > 0
                          else config.param_dtype)
  if config.init == 'pretrained':
    pre = weights.load(config.model, config.checkpoint, dtype=param_dtype)
    cfg, params, tokenizer, arch = (pre.config, pre.params, pre.tokenizer,
                                    pre.arch)
  else:
    tokenizer = default_tokenizer()
    arch = config.model if config.model == 'tiny' else weights.spec(
        config.model).arch
    cfg = models.from_name(arch)
    if cfg.vocab_size != tokenizer.vocab_size:
      raise ValueError(f'{arch} has vocab {cfg.vocab_size}, the tokenizer '
                       f'{tokenizer.vocab_size}')
    params = None
  module = cfg.module(dtype=jnp.dtype(config.dtype), param_dtype=param_dtype,
                      attention_impl=config.attention_impl, remat=config.remat)
  if params is None:
    params = random_params(module, config.seed)
  return Model(module, params, tokenizer, arch)


def lora_base_dir(config: TrainingConfig) -> Path | None:
  """The base model dir the adapters belong to (None: the named model)."""
  if config.init == 'random':
    return Path(config.workdir).absolute() / 'base'
  return None if config.checkpoint is None else Path(config.checkpoint)


def init_train(config: TrainingConfig, mesh, total_steps: int = 1,
               model: Model | None = None) -> TrainSetup:
  """Model, optimizer and state of `config`, sharded over `mesh`.

  `model`: `init_model(config)` if already loaded, or the caller's own
  (e.g. a benchmark's random weights; tokenizer None). `total_steps`: where
  a decaying schedule ends.
  """
  lcfg = config.lora_config()
  model = model or init_model(config)
  module, params, tokenizer, arch = (model.module, model.params,
                                     model.tokenizer, model.arch)
  frozen = None
  if lcfg is not None:
    if config.init == 'random' and tokenizer is not None:
      base_dir = lora_base_dir(config)  # The adapters' base must reload.
      if not base_dir.exists():
        weights.save(base_dir, arch, params, tokenizer)
    module = lora.apply_lora(module, lcfg)
    frozen = lora.quantize_base(module, params) if lcfg.quant else params
    params = lora.init_lora_params(module, jax.random.key(config.seed),
                                   dtype=jnp.dtype(config.param_dtype))
  optimizer = make_optimizer(config, total_steps)
  p_sh = sharding.param_shardings(params, mesh)
  params = sharding.shard_params(params, mesh, p_sh)
  o_sh = sharding.opt_state_shardings(optimizer, params, mesh, p_sh)
  opt_state = sharding.init_opt_state(optimizer, params, mesh, o_sh)
  in_sh, out_sh = sharding.step_shardings(mesh, p_sh, o_sh)
  if frozen is not None:
    f_sh = sharding.param_shardings(frozen, mesh)
    frozen = sharding.shard_params(frozen, mesh, f_sh)
    in_sh = (*in_sh, f_sh)
  return TrainSetup(module, optimizer, TrainState(params, opt_state, frozen),
                    (in_sh, out_sh), tokenizer, arch)
