"""Training checkpoints: params, optimizer state and the data position.

An orbax `CheckpointManager` under `workdir/checkpoints`; every
`checkpoint_every_n` steps a step dir with `state/` (params + optimizer
state leaves) and `meta/` (step, data step). Restores keep the shardings of
the state they are restored into, so a run resumes under any mesh.

Each saved step's files get CRC-32s in `workdir/checkpoints.crc/<step>.json`;
`restore_latest` checks them and falls back to the newest older step that
checks out and restores, naming the damaged one (renamed `<step>.damaged`).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from gemma_mt import fs
from gemma_mt.train.config import TrainingConfig
from gemma_mt.train.state import TrainState
from gemma_mt.weights import orbax_io

log = logging.getLogger(__name__)


def checkpoint_manager(config: TrainingConfig):
  # Synchronous saves: the next train step donates (overwrites) the buffers.
  # The workdir is locked (`fs.RunLock`), so a temp dir found at start is a
  # killed save's: orbax removes it.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=False, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      Path(config.workdir).absolute() / 'checkpoints', options=options)


def saved_steps(workdir) -> list[int]:
  """The steps whose checkpoint dirs are complete (orbax renames a finished
  save's temp dir to the bare step number)."""
  root = Path(workdir).absolute() / 'checkpoints'
  return sorted(int(p.name) for p in root.glob('*')
                if p.name.isdigit() and p.is_dir())


def save_checkpoint(mngr, step: int, state: TrainState) -> None:
  # Optimizer state as a leaf list: restores into any optax state structure.
  # The frozen LoRA base is not saved: it is the base model.
  tree = _saved_like(state)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree),
      meta=ocp.args.JsonSave({'step': step, 'data_step': step})))
  mngr.wait_until_finished()
  crc_dir = _crc_dir(mngr)
  crc_dir.mkdir(exist_ok=True)
  fs.atomic_write(crc_dir / f'{step}.json', json.dumps(
      file_crcs(Path(mngr.directory) / str(step))))
  kept = {str(s) for s in mngr.all_steps()}
  for f in crc_dir.glob('*.json'):  # Steps the manager has deleted.
    if f.stem not in kept:
      f.unlink(missing_ok=True)


def _crc_dir(mngr) -> Path:
  d = Path(mngr.directory)
  return d.with_name(d.name + '.crc')


def file_crcs(step_dir: Path) -> dict[str, list[int]]:
  """{relative path: [size, crc32]} of every file under `step_dir`."""
  out = {}
  for f in sorted(p for p in step_dir.rglob('*') if p.is_file()):
    crc = 0
    with f.open('rb') as fh:
      while chunk := fh.read(1 << 24):
        crc = zlib.crc32(chunk, crc)
    out[str(f.relative_to(step_dir))] = [f.stat().st_size, crc]
  return out


def verify(mngr, step: int) -> str | None:
  """What is wrong with checkpoint `step`'s files, or None if they match
  the CRCs recorded when it was saved (or none were recorded)."""
  path = _crc_dir(mngr) / f'{step}.json'
  if not path.is_file():
    return None
  want = json.loads(path.read_text())
  got = file_crcs(Path(mngr.directory) / str(step))
  for name, (size, crc) in want.items():
    if name not in got:
      return f'{name} is missing'
    if got[name][0] != size:
      return f'{name} has {got[name][0]} bytes, {size} were written'
    if got[name][1] != crc:
      return f'{name} does not match its checksum'
  return None


def restore_latest(mngr, state: TrainState) -> tuple[TrainState, int, int]:
  """(state, data_step, step) from the newest checkpoint that verifies and
  restores; a damaged newer one is renamed `<step>.damaged` with a warning.
  ValueError if none is usable."""
  directory = Path(mngr.directory)
  for step in sorted(mngr.all_steps(), reverse=True):
    problem = verify(mngr, step)
    if problem is None:
      check_tree(directory / str(step), state)
      try:
        restored, data_step = restore_checkpoint(mngr, step, state)
        return restored, data_step, step
      except Exception as e:  # Truncated, unreadable, wrong tree, ...
        problem = f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
    bad = directory / f'{step}.damaged'
    log.warning('checkpoint %s is damaged (%s); moved to %s, trying an older '
                'one', directory / str(step), problem, bad.name)
    os.replace(directory / str(step), bad)
    (_crc_dir(mngr) / f'{step}.json').unlink(missing_ok=True)
    mngr.reload()
  raise ValueError(f'no usable checkpoint in {directory} (damaged ones were '
                   'renamed *.damaged); drop --resume to start afresh')


def _saved_like(state: TrainState) -> dict:
  return {'params': state.params, 'opt_state': jax.tree.leaves(state.opt_state)}


def check_tree(step_dir: Path, state: TrainState) -> None:
  """ValueError naming the first array that differs between checkpoint and
  run (another model, optimizer or LoRA config): the checkpoint is fine, the
  run is not, so it is not moved aside."""
  try:
    saved = orbax_io.metadata_tree(step_dir / 'state')
  except Exception:  # noqa: BLE001  Unreadable metadata: restore decides.
    return
  if problem := orbax_io.tree_mismatch(saved, _saved_like(state)):
    raise ValueError(f'--resume: {step_dir} was written by another model, '
                     f'optimizer or LoRA config: {problem}')


def restore_checkpoint(mngr, step: int,
                       state: TrainState) -> tuple[TrainState, int]:
  """(state, data_step) from checkpoint `step`, in `state`'s shardings."""
  like = _saved_like(state)
  abstract = orbax_io.abstract_tree(like, jax.tree.map(lambda x: x.sharding,
                                                       like))
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  tree, meta = out['state'], out['meta']
  opt_state = jax.tree.unflatten(jax.tree.structure(state.opt_state),
                                 tree['opt_state'])
  return (state.replace(params=tree['params'], opt_state=opt_state),
          int(meta['data_step']))
