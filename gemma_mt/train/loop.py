"""The training loop: data, steps, validation, checkpoints, the final model.

As in Google's tutorial: validation loss before the first step, then train
and validation loss every `eval_every_n` steps. On top: metrics in
`workdir/metrics.jsonl` and TensorBoard, a loss-curve PNG, orbax checkpoints
every `checkpoint_every_n` steps that `--resume` continues from with the
same data order (so a killed and resumed run ends with the same params as an
uninterrupted one), a stop with the step number on a NaN/inf loss, and the
final params in `workdir/final` in the format the translation tools load.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from gemma_mt import fs, lora, sharding, signals, weights
from gemma_mt.data import packing
from gemma_mt.data.mtnt import (MTNTDatasetBuilder, place_mtnt_archive,
                                prefetch_to_device)
from gemma_mt.train import checkpoints, metrics, steps
from gemma_mt.train import averaging
from gemma_mt.train.config import TrainingConfig
from gemma_mt.train.quality import BEST_DIR, QualityTracker
from gemma_mt.train.state import TrainState, init_model, init_train, lora_base_dir

log = logging.getLogger(__name__)

DATA_KEY = 'train_data_sha256'  # beside the config fields in config.json


class TrainingDivergedError(FloatingPointError):
  """A non-finite loss or gradient; the last good checkpoint is kept."""


def make_data(config: TrainingConfig, tokenizer):
  """(builder, train iterator factory(start_step), total steps)."""
  if config.mtnt_archive:
    place_mtnt_archive(config.mtnt_archive, config.lang_pair, config.tfds_data_dir)
  builder = MTNTDatasetBuilder(
      tokenizer, config.max_seq_len, source=config.source,
      mtnt_dir=config.mtnt_dir, lang_pair=config.lang_pair, seed=config.seed,
      truncate=config.truncate, tfds_data_dir=config.tfds_data_dir,
      prompt_format=config.prompt_format,
      both_directions=config.both_directions)
  if config.packing:
    data = builder.encode_split('train')
    kw = dict(pad_id=tokenizer.pad_id, seed=config.seed)
    plans = [packing.epoch_plan(data, config.batch_size, config.max_seq_len,
                                epoch=e, **kw)
             for e in range(config.num_epochs)]
    total = sum(map(len, plans))
    train = lambda start: packing.packed_batches(
        data, config.batch_size, config.max_seq_len,
        num_epochs=config.num_epochs, start_step=start, plans=plans, **kw)
  else:
    total = builder.steps_per_epoch(config.batch_size) * config.num_epochs
    train = lambda start: builder.get_train_dataset(
        config.batch_size, config.num_epochs, start_step=start)
  if config.max_steps is not None:
    total = min(total, config.max_steps)
  return builder, train, total


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


def validation_loss(validation_step, state: TrainState, batches) -> float:
  """Validation loss per target token over `batches`."""
  loss_sum, count = 0.0, 0
  for batch in batches:
    aux = jax.device_get(validation_step(state, batch))
    loss_sum += float(aux['loss_sum'])
    count += int(aux['num_target_tokens'])
  return loss_sum / max(count, 1)


# The params' global norm may grow this many times its initial value before
# the run counts as diverged (fine-tuning moves weights by a few percent).
MAX_PARAM_GROWTH = 100.0


def check_finite(step: int, m: dict, last_good: int | None,
                 ckpt_dir: Path, max_param_norm: float) -> None:
  """Raises TrainingDivergedError on a non-finite loss or gradient, or
  params that are non-finite or blew up: such a state is never saved, so
  every checkpoint written is one whose loss and params were sane."""
  loss, gnorm = float(m['loss']), float(m['grad_norm'])
  pnorm = float(m['param_norm'])
  if (math.isfinite(loss) and math.isfinite(gnorm) and math.isfinite(pnorm)
      and pnorm <= max_param_norm):
    return
  kept = (f'last good checkpoint: step {last_good} in {ckpt_dir} '
          '(resume with --resume, at a lower --learning_rate)'
          if last_good is not None else 'no checkpoint was written')
  raise TrainingDivergedError(
      f'training diverged at step {step} (loss={loss:.4g}, grad_norm='
      f'{gnorm:.4g}, param_norm={pnorm:.4g}, limit {max_param_norm:.4g}); '
      f'stopped without saving this state; {kept}')


class _Window:
  """Train metrics since the last log line: loss per target token,
  tokens/s, and the fraction of time spent waiting for the input pipeline
  (prefetch keeps it near zero; if it grows, the device starves)."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.loss_sum, self.targets, self.tokens, self.wait = 0.0, 0, 0, 0.0
    self.t0 = time.time()

  def add(self, m: dict):
    self.loss_sum += float(m['loss']) * int(m['num_target_tokens'])
    self.targets += int(m['num_target_tokens'])
    self.tokens += int(m['num_tokens'])

  def summary(self, m: dict) -> dict:
    dt = max(time.time() - self.t0, 1e-9)
    return dict(loss=self.loss_sum / max(self.targets, 1),
                grad_norm=float(m['grad_norm']), tokens_per_s=self.tokens / dt,
                input_wait_frac=self.wait / dt)


# What a checkpoint's tree depends on, and what the data order depends on.
_STATE_FIELDS = ('model', 'optimizer', 'lora_rank', 'lora_targets', 'lora_quant',
                 'param_dtype', 'ema_decay')  # (average_last_k is not saved)
_DATA_FIELDS = ('batch_size', 'grad_accum_steps', 'max_seq_len', 'packing',
                'both_directions',
                'truncate', 'seed', 'lang_pair', 'source', 'mtnt_dir',
                'prompt_format')


def check_resume(config: TrainingConfig, saved_config: Path) -> None:
  """ValueError naming a setting that differs from the run being resumed:
  the model, optimizer and LoRA settings always (the checkpoint cannot be
  restored into another state), the data settings unless --force_resume
  (the run would not continue where it stopped)."""
  try:
    saved = json.loads(saved_config.read_text())
  except (OSError, ValueError):
    return  # No record to compare with (an older run); restore decides.
  def diff(fields):
    return [f'--{f} {saved[f]!r} → {getattr(config, f)!r}' for f in fields
            if f in saved and saved[f] != getattr(config, f)]
  if changed := diff(_STATE_FIELDS):
    raise ValueError(f'--resume: the run in {saved_config.parent} was trained '
                     f'with other settings ({", ".join(changed)}); its '
                     'checkpoints cannot continue under these')
  if (changed := diff(_DATA_FIELDS)) and not config.force_resume:
    raise ValueError(f'--resume: data settings differ from the run in '
                     f'{saved_config.parent} ({", ".join(changed)}); the data '
                     'order would not continue where it stopped. Pass '
                     '--force_resume to go on anyway')


def data_fingerprint(builder: MTNTDatasetBuilder) -> str:
  """SHA-256 of the training pairs as read: a resumed run must see the same
  data, or its data order (and what it learned) would not continue."""
  h = hashlib.sha256()
  for src, dst in builder.load_pairs('train'):
    h.update(json.dumps([src, dst], ensure_ascii=False).encode())
  return h.hexdigest()


def check_data(config: TrainingConfig, saved_config: Path,
               fingerprint: str) -> None:
  """Refuses to resume on other training data unless --force_resume."""
  try:
    saved = json.loads(saved_config.read_text()).get(DATA_KEY)
  except (OSError, ValueError, AttributeError):
    return
  if saved is None or saved == fingerprint:
    return
  if not config.force_resume:
    raise ValueError(f'--resume: the training data changed since the run in '
                     f'{saved_config.parent} started (sha256 {saved[:12]}… → '
                     f'{fingerprint[:12]}…); pass --force_resume to go on '
                     'anyway')
  log.warning('--force_resume: training on changed data (sha256 %s… → %s…)',
              saved[:12], fingerprint[:12])


def train_loop(config: TrainingConfig) -> Any:
  """Runs (or resumes) training; returns the final params.

  The workdir is held by a `fs.RunLock` for the whole run: a second process
  on it is refused in one line, before it touches any file there.
  """
  config.check()
  workdir = Path(config.workdir).absolute()
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f'--workdir {workdir} is a file')
  created = not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  # One lock per run: in a multi-process run, process 0 holds it for all.
  lock = (fs.RunLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  try:
    with lock:
      return _train_locked(config, workdir)
  except BaseException:
    # A run that never started (no config.json) leaves no new workdir.
    if created and not (workdir / 'config.json').exists():
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def _train_locked(config: TrainingConfig, workdir: Path) -> Any:
  # The dirs written at the end (or at evaluations) are replaced only if this
  # package wrote them: refused now, not after the training.
  for name in ('final', BEST_DIR, 'adapters'):
    fs.check_replaceable(workdir / name, overwrite=True,
                         flag=f'--workdir {workdir}: {name}/')
  mngr = checkpoints.checkpoint_manager(config)
  ckpt_dir = workdir / 'checkpoints'
  latest = mngr.latest_step()
  # Refuse before loading anything, and before touching the run's files.
  if latest is not None and not config.resume:
    mngr.close()
    raise ValueError(f'{ckpt_dir} already holds checkpoints (latest step '
                     f'{latest}); pass --resume or use another --workdir')
  if latest is None and config.resume:
    mngr.close()
    raise ValueError(f'--resume: no checkpoint in {ckpt_dir}; drop --resume '
                     'to start a new run there')
  if latest is not None:
    try:
      check_resume(config, workdir / 'config.json')
    except ValueError:
      mngr.close()
      raise

  try:  # Until config.json is written, a failure leaves no new files.
    mesh = sharding.make_mesh(sharding.MeshConfig(config.mesh_data,
                                                   config.mesh_fsdp))
    check_mesh(config, mesh)
    loaded = init_model(config)
    tokenizer, arch = loaded.tokenizer, loaded.arch
    builder, train_data, total = make_data(config, tokenizer)
    fingerprint = data_fingerprint(builder)
    if latest is not None:
      check_data(config, workdir / 'config.json', fingerprint)
    setup = init_train(config, mesh, total, loaded)  # Schedule ends at total.
    state = setup.state
    start = 0
    if latest is not None:
      state, start, latest = checkpoints.restore_latest(mngr, state)
      log.info('resumed from step %d', start)
    # Written once the run really starts or resumes.
    fs.atomic_write(workdir / 'config.json', json.dumps(
        {**dataclasses.asdict(config), DATA_KEY: fingerprint}, indent=2) + '\n')
  except BaseException:
    mngr.close()
    raise
  last_good = latest
  # Until the loop ends, whatever stops the run closes what it opened (an
  # open metrics writer would print a traceback at exit).
  stop = signals.StopRequest()
  writer = bar = None
  try:
    eval_bs = config.eval_batch_size or config.batch_size
    valid = list(_take(builder.get_validation_dataset(eval_bs),
                       config.eval_max_batches))
    kw = dict(pad_id=tokenizer.pad_id, chunk_size=config.loss_chunk_size)
    in_sh, out_sh = setup.step_shardings
    train_step = steps.make_train_step(
        setup.model, setup.optimizer, grad_accum_steps=config.grad_accum_steps,
        in_shardings=in_sh, out_shardings=out_sh, mesh=mesh,
        label_smoothing=config.label_smoothing, **kw)
    validation_step = steps.make_validation_step(setup.model, **kw)
    put = lambda batch: sharding.shard_batch(batch, mesh)
    valid = [put(b) for b in sharding.host_local_batches(valid)]
    writer = metrics.MetricsWriter(workdir)
    what = (f'LoRA adapters ({lora.count_params(state.params) / 1e6:.2f}M '
            f'params)' if state.frozen is not None else 'all params')
    log.info('training %s (%s) on %d device(s), mesh %s: %s, %d steps from '
             'step %d', config.model, arch, mesh.size, dict(mesh.shape), what,
             total, start)

    def run_eval(step):
      loss = validation_loss(validation_step, state, valid)
      writer.write('valid', step, loss=loss)
      log.info('step %d: validation loss %.4f', step, loss)

    quality = None
    if config.eval_bleu_every_n > 0:
      quality = QualityTracker(config, loaded.module.config, tokenizer,
                               builder.load_pairs('valid'), arch,
                               plain_params(state, config))

    # The params of the last K evaluations, for their mean (on the host; not
    # checkpointed: after a resume the mean starts again).
    recent = (collections.deque(maxlen=config.average_last_k)
              if config.average_last_k > 1 else None)

    def run_quality(step) -> bool:
      """Scores the weights (and their averages, if kept), keeps the best of
      them as best/ if it beats the best; True when it is time to stop."""
      params = plain_params(state, config)  # LoRA: merged once per evaluation.
      scores = quality.score(params)
      writer.write('valid_translation', step, **scores)
      candidates = [('params', params, scores)]
      ema = averaging.ema_params(state.opt_state, state.params)
      if ema is not None:
        ema = plain_params(state.replace(params=ema), config)
        candidates.append(('ema', ema, quality.score(ema)))
      if recent is not None:
        recent.append(jax.device_get(params))
        if len(recent) > 1:
          mean = averaging.mean_params(list(recent))
          candidates.append((f'last_{len(recent)}', mean, quality.score(mean)))
      for name, _, s in candidates[1:]:
        split = 'valid_translation_' + ('ema' if name == 'ema' else 'last_k')
        writer.write(split, step, **s)
        log.info('step %d: %s scores BLEU %.2f, chrF %.2f', step, name,
                 s['bleu'], s['chrf'])
      if ema is not None or recent is not None:  # The first best wins ties.
        name, params, scores = max(candidates,
                                   key=lambda c: c[2][config.select_by])
        scores = {**scores, 'weights': name}
      new = quality.update(step, params, scores)
      log.info('step %d: BLEU %.2f, chrF %.2f, %d runaways, %d copied, %d '
               'off-target%s%s', step, scores['bleu'], scores['chrf'],
               scores['runaway'], scores['copied'], scores['off_target'],
               f' ({scores["weights"]})' if 'weights' in scores else '',
               ' (new best)' if new else '')
      return quality.should_stop()

    if start == 0 and config.eval_every_n > 0:
      run_eval(0)
    if start == 0 and quality is not None:
      run_quality(0)

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, disable=not config.progress,
               unit='step', dynamic_ncols=True)
    window = _Window()
    max_param_norm = MAX_PARAM_GROWTH * max(
        float(steps.global_norm(state.params)), 1.0)
    pending = None  # (step, device metrics): checked one step late, no stall.

    def flush():
      nonlocal pending
      if pending is None:
        return
      step, m = pending[0], jax.device_get(pending[1])
      pending = None
      check_finite(step, m, last_good, ckpt_dir, max_param_norm)
      window.add(m)
      bar.update(1)
      if step % config.log_every_n == 0 or step == total:
        values = window.summary(m)
        writer.write('train', step, **values)
        bar.set_postfix(loss=f'{values["loss"]:.3f}',
                        tok_s=f'{values["tokens_per_s"]:.0f}')
        window.reset()

    stop.__enter__()
    it = prefetch_to_device(
        sharding.host_local_batches(train_data(start)), put)
    for step in range(start + 1, total + 1):
      t_wait = time.perf_counter()
      batch = next(it)
      window.wait += time.perf_counter() - t_wait
      state, m = train_step(state, batch)
      flush()  # The previous step's metrics, while this one runs.
      pending = (step, m)
      if step % config.checkpoint_every_n == 0 or step == total:
        flush()
        checkpoints.save_checkpoint(mngr, step, state)
        last_good = step
      if config.eval_every_n > 0 and (step % config.eval_every_n == 0
                                      or step == total):
        flush()
        run_eval(step)
      if quality is not None and (step % config.eval_bleu_every_n == 0
                                  or step == total):
        flush()
        if run_quality(step):
          log.info('early stop at step %d: no new best %s in %d evaluations '
                   '(best: step %d)', step, config.select_by,
                   config.early_stop_patience, quality.best['step'])
          if step % config.checkpoint_every_n:
            checkpoints.save_checkpoint(mngr, step, state)
          break
      if stop.requested and step < total:  # At the step boundary.
        flush()
        if last_good != step:
          checkpoints.save_checkpoint(mngr, step, state)
        raise signals.Interrupted(
            f'{signals.name(stop.signum)} at step {step}: checkpoint saved in '
            f'{ckpt_dir}')
    flush()
  finally:
    stop.__exit__()
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
    mngr.close()

  if state.frozen is not None:
    adapters = weights.save_adapters(
        workdir / 'adapters', arch, state.params, config.lora_config(),
        base_model=config.model, base_checkpoint=lora_base_dir(config),
        overwrite=True, prompt_format=config.prompt_format)
    log.info('adapters in %s', adapters)
  params = plain_params(state, config)
  final = weights.save(workdir / 'final', arch, params, tokenizer,
                       overwrite=True, prompt_format=config.prompt_format)
  metrics.plot_losses(writer.path, workdir / 'loss.png')
  best = workdir / BEST_DIR
  log.info('final params in %s%s', final, '' if quality is None or
           quality.best is None or not best.is_dir() else
           f'; best ({config.select_by} {quality.best[config.select_by]:.2f} '
           f'at step {quality.best["step"]}) in {best}')
  return params


def plain_params(state: TrainState, config: TrainingConfig):
  """The model's weights as one plain tree (LoRA: adapters merged)."""
  if state.frozen is None:
    return state.params
  return lora.merge_lora(lora.combine(state.frozen, state.params),
                         config.lora_config())


def _take(it, n):
  for i, x in enumerate(it):
    if n is not None and i >= n:
      return
    yield x
