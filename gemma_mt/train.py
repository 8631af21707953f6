"""Fine-tune Gemma on MTNT: the training loop and its CLI.

    python -m gemma_mt.train --config configs/mtnt_gemma3_270m.py \\
        --mtnt_dir ../shared/data/mtnt --max_steps 20 --eval_max_batches 4

As in Google's tutorial: validation loss before the first step, then train
and validation loss every `eval_every_n` steps. On top: metrics in
`workdir/metrics.jsonl` and TensorBoard, a loss-curve PNG, orbax checkpoints
(params, optimizer state, step) every `checkpoint_every_n` steps that
`--resume` continues from with the same data order (so a killed and resumed
run ends with the same params as an uninterrupted one), a stop with the step
number on a NaN/inf loss, and the final params in `workdir/final` in the
format the translation tools load (`pretrained.load_dir`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mt import lora as lora_lib
from gemma_mt import pretrained, sharding, steps
from gemma_mt.data import MTNTDatasetBuilder, prefetch_to_device
from gemma_mt.model import Transformer, TransformerConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingConfig:
  """Everything a run needs; every field can be overridden with --field=value."""

  # Model.
  model: str = 'gemma3_270m'        # a pretrained.MODELS name, or 'tiny'
  checkpoint: str | None = None     # init from this dir instead of `model`
  init: str = 'pretrained'          # 'pretrained' or 'random' (tests, smoke)
  dtype: str = 'bfloat16'           # compute dtype
  param_dtype: str = 'float32'      # master weights; 'bfloat16' = pure bf16
  attention_impl: str = 'einsum'    # 'einsum', 'jax' or 'cudnn'
  remat: bool = False               # recompute blocks in the backward pass
  # LoRA / QLoRA (lora_rank > 0): the base is frozen, adapters train.
  lora_rank: int = 0                # 0 = full fine-tune
  lora_alpha: float = 16.0
  lora_targets: str = 'q,kv,o,gate_up,down'  # subset of lora.TARGETS
  lora_quant: str | None = None     # QLoRA: 'int8' or 'int4' frozen base
  # Devices: a ('data', 'fsdp') mesh over all devices; -1 = the rest.
  mesh_data: int = -1
  mesh_fsdp: int = 1
  # Data.
  source: str | None = None         # 'tfds' or 'dir'; default from mtnt_dir
  mtnt_dir: str | None = None
  lang_pair: str = 'en-fr'
  max_seq_len: int = 128
  truncate: bool = False
  packing: bool = False             # several pairs per row (segment ids)
  batch_size: int = 4               # rows per optimizer update
  eval_batch_size: int | None = None  # default: batch_size
  num_epochs: int = 1
  max_steps: int | None = None
  # Optimizer.
  optimizer: str = 'sgd'            # 'sgd', 'adamw' or 'adafactor'
  learning_rate: float = 1e-4
  warmup_steps: int = 0
  weight_decay: float = 0.0
  grad_clip: float | None = None    # global-norm clipping
  grad_accum_steps: int = 1         # micro-batches per update (same math)
  loss_chunk_size: int = 512        # rows of [rows, vocab] logits at a time
  # Loop and outputs.
  workdir: str = 'runs/mtnt'
  eval_every_n: int = 20
  eval_max_batches: int | None = None
  log_every_n: int = 10
  checkpoint_every_n: int = 100
  keep_checkpoints: int = 2
  resume: bool = False
  seed: int = 0
  progress: bool = True

  def lora_config(self) -> lora_lib.LoraConfig | None:
    if self.lora_rank <= 0:
      return None
    targets = tuple(t.strip() for t in self.lora_targets.split(',') if t.strip())
    return lora_lib.LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha,
                               targets=targets, quant=self.lora_quant)


class TrainingDivergedError(FloatingPointError):
  """A non-finite loss or gradient; the last good checkpoint is kept."""


# --------------------------------------------------------------- setup


def init_model(config: TrainingConfig, param_dtype: str | None = None):
  """(module, params, tokenizer, arch) as the config asks."""
  param_dtype = jnp.dtype(param_dtype or config.param_dtype)
  if config.init == 'pretrained':
    pre = pretrained.load(config.model, config.checkpoint, dtype=param_dtype)
    cfg, params, tokenizer, arch = (pre.config, pre.params, pre.tokenizer,
                                    pre.arch)
  elif config.init == 'random':
    from gemma_mt.tokenizer import default_tokenizer
    tokenizer = default_tokenizer()
    arch = config.model if config.model == 'tiny' else pretrained.spec(
        config.model).arch
    cfg = TransformerConfig.from_name(arch)
    if cfg.vocab_size != tokenizer.vocab_size:
      raise ValueError(f'{arch} has vocab {cfg.vocab_size}, the tokenizer '
                       f'{tokenizer.vocab_size}')
    params = None
  else:
    raise ValueError(f"init must be 'pretrained' or 'random', got {config.init!r}")
  module = Transformer(cfg, dtype=jnp.dtype(config.dtype),
                       param_dtype=param_dtype,
                       attention_impl=config.attention_impl, remat=config.remat)
  if params is None:
    params = random_params(module, config.seed)
  return module, params, tokenizer, arch


def lora_base_dir(config: TrainingConfig) -> Path | None:
  """The base model dir the adapters belong to (None: the named model)."""
  if config.init == 'random':
    return Path(config.workdir).absolute() / 'base'
  return None if config.checkpoint is None else Path(config.checkpoint)


@dataclasses.dataclass
class TrainState:
  """What the steps need, placed on the mesh.

  Full fine-tune: `params` are all weights and `frozen` is None. LoRA:
  `model` is the adapted module, `params` the adapters (float32, the only
  thing in the optimizer state and the checkpoints), `frozen` the base
  weights in the compute dtype (int8/int4 for QLoRA: never updated, so no
  float32 master copy).
  """

  model: Any
  params: Any
  frozen: Any
  optimizer: Any
  opt_state: Any
  step_shardings: tuple  # (in_shardings, out_shardings) of train_step
  tokenizer: Any
  arch: str


def init_state(config: TrainingConfig, mesh) -> TrainState:
  lcfg = config.lora_config()
  module, params, tokenizer, arch = init_model(
      config, param_dtype=config.dtype if lcfg else None)
  frozen = None
  if lcfg is not None:
    if config.init == 'random':  # The adapters' base must be reloadable.
      base_dir = lora_base_dir(config)
      if not base_dir.exists():
        pretrained.save(base_dir, arch, params, tokenizer)
    module = lora_lib.apply_lora(module, lcfg)
    frozen = lora_lib.quantize_base(module, params) if lcfg.quant else params
    params = lora_lib.init_lora_params(module, jax.random.key(config.seed),
                                       dtype=jnp.dtype(config.param_dtype))
  optimizer = steps.make_optimizer(config)
  p_sh = sharding.param_shardings(params, mesh)
  params = sharding.shard_params(params, mesh, p_sh)
  o_sh = sharding.opt_state_shardings(optimizer, params, mesh, p_sh)
  opt_state = sharding.init_opt_state(optimizer, params, mesh, o_sh)
  in_sh, out_sh = sharding.step_shardings(mesh, p_sh, o_sh)
  if frozen is not None:
    f_sh = sharding.param_shardings(frozen, mesh)
    frozen = sharding.shard_params(frozen, mesh, f_sh)
    in_sh = (*in_sh, f_sh)
  return TrainState(module, params, frozen, optimizer, opt_state,
                    (in_sh, out_sh), tokenizer, arch)


def random_params(module: Transformer, seed: int = 0) -> Any:
  """The model's init (N(0, 0.01) weights, zero norm scales), from numpy.

  Shapes come from `eval_shape`; compiling `module.init` instead takes the
  better part of a minute on a small CPU for a model that trains in seconds.
  """
  x = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x, x,
                          jnp.ones((1, 1, 1), bool))['params']
  rng = np.random.default_rng(seed)

  def init(path, s):
    if jax.tree_util.keystr(path[-1:]).endswith("'scale']"):
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.01,
                       s.dtype)

  return jax.tree_util.tree_map_with_path(init, shapes)


def make_data(config: TrainingConfig, tokenizer):
  """(builder, train iterator factory(start_step), total steps)."""
  builder = MTNTDatasetBuilder(
      tokenizer, config.max_seq_len, source=config.source,
      mtnt_dir=config.mtnt_dir, lang_pair=config.lang_pair, seed=config.seed,
      truncate=config.truncate)
  if config.packing:
    from gemma_mt import packing
    data = builder.encode_split('train')
    per_epoch = [len(packing.pack_rows(
        data, np.random.default_rng([config.seed, e]).permutation(
            len(data.input_tokens)), config.batch_size, config.max_seq_len,
        tokenizer.pad_id)) for e in range(config.num_epochs)]
    total = sum(per_epoch)
    train = lambda start: packing.packed_batches(
        data, config.batch_size, config.max_seq_len, pad_id=tokenizer.pad_id,
        seed=config.seed, num_epochs=config.num_epochs, start_step=start)
  else:
    total = builder.steps_per_epoch(config.batch_size) * config.num_epochs
    train = lambda start: builder.get_train_dataset(
        config.batch_size, config.num_epochs, start_step=start)
  if config.max_steps is not None:
    total = min(total, config.max_steps)
  return builder, train, total


def check_config(config: TrainingConfig) -> None:
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f'batch_size={config.batch_size} is not a multiple of '
                     f'grad_accum_steps={config.grad_accum_steps}')
  if config.lora_quant and config.lora_rank <= 0:
    raise ValueError('lora_quant needs lora_rank > 0')
  config.lora_config()  # Raises on bad targets / quant.
  if config.optimizer not in steps.OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {steps.OPTIMIZERS}')
  for name in ('dtype', 'param_dtype'):
    jnp.dtype(getattr(config, name))  # Raises on an unknown dtype name.


def check_mesh(config: TrainingConfig, mesh) -> None:
  """Every batch (and micro-batch) must split evenly over the devices."""
  n = sharding.num_batch_shards(mesh)
  micro = config.batch_size // config.grad_accum_steps
  eval_bs = config.eval_batch_size or config.batch_size
  for name, rows in (('batch_size / grad_accum_steps', micro),
                     ('eval_batch_size', eval_bs)):
    if rows % n:
      raise ValueError(f'{name} = {rows} rows does not split over the {n} '
                       f'devices of mesh {dict(mesh.shape)}')


# ---------------------------------------------------------- checkpoints


def checkpoint_manager(config: TrainingConfig):
  import orbax.checkpoint as ocp
  # Synchronous saves: the next train step donates (overwrites) the buffers.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      Path(config.workdir).absolute() / 'checkpoints', options=options)


def save_checkpoint(mngr, step: int, params, opt_state) -> None:
  import orbax.checkpoint as ocp
  # Optimizer state as a leaf list: restores into any optax state structure.
  state = {'params': params, 'opt_state': jax.tree.leaves(opt_state)}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({'step': step, 'data_step': step})))
  mngr.wait_until_finished()


def restore_checkpoint(mngr, step: int, params, opt_state):
  """(params, opt_state, data_step) from checkpoint `step`; shardings kept."""
  import orbax.checkpoint as ocp
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {'params': params, 'opt_state': jax.tree.leaves(opt_state)})
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  state, meta = out['state'], out['meta']
  opt_state = jax.tree.unflatten(jax.tree.structure(opt_state),
                                 state['opt_state'])
  return state['params'], opt_state, int(meta['data_step'])


# -------------------------------------------------------------- metrics


class MetricsWriter:
  """Appends JSON lines to workdir/metrics.jsonl and mirrors to TensorBoard."""

  def __init__(self, workdir: Path):
    self.path = workdir / 'metrics.jsonl'
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / 'tensorboard'))
    except Exception as e:  # TensorBoard is a nicety, never a crash.
      log.warning('no TensorBoard logging: %s', e)
      self.tb = None

  def write(self, split: str, step: int, **values) -> None:
    record = {'split': split, 'step': step, 'time': time.time(), **values}
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(f'{split}/{k}', v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def plot_losses(metrics_path: Path, out: Path) -> Path:
  """Train and validation loss vs step, from metrics.jsonl (all runs)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  curves: dict[str, dict[int, float]] = {}
  for line in metrics_path.read_text().splitlines():
    r = json.loads(line)
    if 'loss' in r:
      curves.setdefault(r['split'], {})[r['step']] = r['loss']
  fig, ax = plt.subplots(figsize=(7, 4))
  for split, points in sorted(curves.items()):
    xs = sorted(points)
    ax.plot(xs, [points[x] for x in xs], marker='o' if len(xs) < 50 else None,
            label=split)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats / target token)')
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


# ----------------------------------------------------------------- loop


def evaluate(validation_step, params, batches, *frozen) -> float:
  """Validation loss per target token; `frozen`: LoRA's base weights."""
  loss_sum, count = 0.0, 0
  for batch in batches:
    aux = jax.device_get(validation_step(params, batch, *frozen))
    loss_sum += float(aux['loss_sum'])
    count += int(aux['num_target_tokens'])
  return loss_sum / max(count, 1)


def _check_finite(step: int, metrics: dict, last_good: int | None,
                  ckpt_dir: Path) -> None:
  loss, gnorm = float(metrics['loss']), float(metrics['grad_norm'])
  if not (math.isfinite(loss) and math.isfinite(gnorm)):
    kept = (f'last good checkpoint: step {last_good} in {ckpt_dir} '
            '(resume with --resume)' if last_good is not None
            else 'no checkpoint was written')
    raise TrainingDivergedError(
        f'non-finite training loss at step {step} (loss={loss}, '
        f'grad_norm={gnorm}); stopped without saving this state; {kept}')


def train_loop(config: TrainingConfig) -> Any:
  """Runs (or resumes) training; returns the final params."""
  check_config(config)
  workdir = Path(config.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(
      json.dumps(dataclasses.asdict(config), indent=2) + '\n')

  mesh = sharding.make_mesh(sharding.MeshConfig(config.mesh_data,
                                                 config.mesh_fsdp))
  check_mesh(config, mesh)
  state = init_state(config, mesh)
  params, opt_state, frozen = state.params, state.opt_state, state.frozen
  tokenizer, arch = state.tokenizer, state.arch
  mngr = checkpoint_manager(config)
  ckpt_dir = workdir / 'checkpoints'
  start = 0
  latest = mngr.latest_step()
  if latest is not None:
    if not config.resume:
      raise ValueError(f'{ckpt_dir} already holds checkpoints (latest step '
                       f'{latest}); pass --resume or use another --workdir')
    params, opt_state, start = restore_checkpoint(mngr, latest, params,
                                                  opt_state)
    log.info('resumed from step %d', start)
  last_good = latest

  builder, train_data, total = make_data(config, tokenizer)
  eval_bs = config.eval_batch_size or config.batch_size
  valid = list(_take(builder.get_validation_dataset(eval_bs),
                     config.eval_max_batches))
  kw = dict(pad_id=tokenizer.pad_id, chunk_size=config.loss_chunk_size)
  in_sh, out_sh = state.step_shardings
  train_step = steps.make_train_step(
      state.model, state.optimizer, grad_accum_steps=config.grad_accum_steps,
      in_shardings=in_sh, out_shardings=out_sh, mesh=mesh, **kw)
  validation_step = steps.make_validation_step(state.model, **kw)
  frozen_arg = () if frozen is None else (frozen,)  # LoRA's 4th argument.
  put = lambda batch: sharding.shard_batch(batch, mesh)
  valid = [put(b) for b in sharding.host_local_batches(valid)]
  writer = MetricsWriter(workdir)
  what = (f'LoRA adapters ({lora_lib.count_params(params) / 1e6:.2f}M '
          f'params)' if frozen is not None else 'all params')
  log.info('training %s (%s) on %d device(s), mesh %s: %s, %d steps from '
           'step %d', config.model, arch, mesh.size, dict(mesh.shape), what,
           total, start)

  def run_eval(step):
    loss = evaluate(validation_step, params, valid, *frozen_arg)
    writer.write('valid', step, loss=loss)
    log.info('step %d: validation loss %.4f', step, loss)
    return loss

  if start == 0 and config.eval_every_n > 0:
    run_eval(0)

  from tqdm.auto import tqdm
  bar = tqdm(total=total, initial=start, disable=not config.progress,
             unit='step', dynamic_ncols=True)
  pending = None  # (step, device metrics): checked one step late, no stall.
  # wait: seconds the loop blocked on the input pipeline (prefetch keeps it
  # near zero; if it grows, the accelerator is starved of data).
  window = {'loss_sum': 0.0, 'targets': 0, 'tokens': 0, 'wait': 0.0,
            't0': time.time()}

  def consume(step, metrics):
    m = jax.device_get(metrics)
    _check_finite(step, m, last_good, ckpt_dir)
    window['loss_sum'] += float(m['loss']) * int(m['num_target_tokens'])
    window['targets'] += int(m['num_target_tokens'])
    window['tokens'] += int(m['num_tokens'])
    bar.update(1)
    if step % config.log_every_n == 0 or step == total:
      dt = max(time.time() - window['t0'], 1e-9)
      loss = window['loss_sum'] / max(window['targets'], 1)
      tps = window['tokens'] / dt
      writer.write('train', step, loss=loss, grad_norm=float(m['grad_norm']),
                   tokens_per_s=tps, input_wait_frac=window['wait'] / dt)
      bar.set_postfix(loss=f'{loss:.3f}', tok_s=f'{tps:.0f}')
      window.update(loss_sum=0.0, targets=0, tokens=0, wait=0.0,
                    t0=time.time())

  def flush():
    nonlocal pending
    if pending is not None:
      consume(*pending)
      pending = None

  try:
    it = prefetch_to_device(
        sharding.host_local_batches(train_data(start)), put)
    for step in range(start + 1, total + 1):
      t_wait = time.perf_counter()
      batch = next(it)
      window['wait'] += time.perf_counter() - t_wait
      params, opt_state, metrics = train_step(params, opt_state, batch,
                                              *frozen_arg)
      flush()  # The previous step's metrics, while this one runs.
      pending = (step, metrics)
      if step % config.checkpoint_every_n == 0 or step == total:
        flush()
        save_checkpoint(mngr, step, params, opt_state)
        last_good = step
      if config.eval_every_n > 0 and (step % config.eval_every_n == 0
                                      or step == total):
        flush()
        run_eval(step)
    flush()
  finally:
    bar.close()
    writer.close()
    mngr.close()

  if frozen is not None:
    lcfg = config.lora_config()
    adapters = pretrained.save_adapters(
        workdir / 'adapters', arch, params, lcfg,
        base_model=config.model, base_checkpoint=lora_base_dir(config),
        overwrite=True)
    log.info('adapters in %s', adapters)
    params = lora_lib.merge_lora(lora_lib.combine(frozen, params), lcfg)
  final = pretrained.save(workdir / 'final', arch, params, tokenizer,
                          overwrite=True)
  plot_losses(writer.path, workdir / 'loss.png')
  log.info('final params in %s', final)
  return params


def _take(it, n):
  for i, x in enumerate(it):
    if n is not None and i >= n:
      return
    yield x


# ------------------------------------------------------------------ CLI


def load_config_file(path: str | Path) -> TrainingConfig:
  """A python file with `get_config() -> TrainingConfig`."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path} defines no get_config()')
  return module.get_config()


def _parse_value(name: str, text: str, tp) -> Any:
  """`text` as the field type: int, float, bool, str, or `X | None`."""
  args = typing.get_args(tp)
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    if text.lower() in ('none', 'null', ''):
      return None
    tp = next(a for a in args if a is not type(None))
  if tp is bool:
    if text.lower() in ('1', 'true', 'yes', 'on'):
      return True
    if text.lower() in ('0', 'false', 'no', 'off'):
      return False
    raise ValueError(f'--{name} expects true/false, got {text!r}')
  try:
    return tp(text)
  except ValueError:
    raise ValueError(f'--{name} expects {tp.__name__}, got {text!r}') from None


def parse_args(argv: list[str]) -> TrainingConfig:
  """`--config FILE` then `--field=value` / `--field value` / `--flag`."""
  hints = typing.get_type_hints(TrainingConfig)
  pairs, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith('--'):
      raise ValueError(f'unexpected argument {arg!r}; use --field=value')
    key, eq, value = arg[2:].partition('=')
    key = key.replace('-', '_')
    if not eq:
      nxt = argv[i + 1] if i + 1 < len(argv) else None
      if key != 'config' and hints.get(key) is bool and (
          nxt is None or nxt.startswith('--')):
        value = 'true'
      elif nxt is None:
        raise ValueError(f'--{key} needs a value')
      else:
        value, i = nxt, i + 1
    pairs.append((key, value))
    i += 1
  config_files = [v for k, v in pairs if k == 'config']
  config = (load_config_file(config_files[-1]) if config_files
            else TrainingConfig())
  overrides = {}
  for key, value in pairs:
    if key == 'config':
      continue
    if key not in hints:
      raise ValueError(f'unknown option --{key}; valid options: --config, '
                       + ', '.join(f'--{k}' for k in hints))
    overrides[key] = _parse_value(key, value, hints[key])
  return dataclasses.replace(config, **overrides)


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO,
                      format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                      force=True)
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax is chatty.
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] in ('-h', '--help'):
    print(__doc__)
    print('Options (TrainingConfig fields):')
    for f in dataclasses.fields(TrainingConfig):
      print(f'  --{f.name}={f.default!r}')
    return 0
  try:
    config = parse_args(argv)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  sharding.maybe_initialize_distributed()  # Before anything touches devices.
  try:
    train_loop(config)
  except (TrainingDivergedError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
