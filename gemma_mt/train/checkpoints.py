"""Training checkpoints: params, optimizer state and the data position.

An orbax `CheckpointManager` under `workdir/checkpoints`; every
`checkpoint_every_n` steps a step dir with `state/` (params + optimizer
state leaves) and `meta/` (step, data step). Restores keep the shardings of
the state they are restored into, so a run resumes under any mesh.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from gemma_mt.train.config import TrainingConfig
from gemma_mt.train.state import TrainState
from gemma_mt.weights import orbax_io


def checkpoint_manager(config: TrainingConfig):
  # Synchronous saves: the next train step donates (overwrites) the buffers.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      Path(config.workdir).absolute() / 'checkpoints', options=options)


def save_checkpoint(mngr, step: int, state: TrainState) -> None:
  # Optimizer state as a leaf list: restores into any optax state structure.
  # The frozen LoRA base is not saved: it is the base model.
  tree = {'params': state.params, 'opt_state': jax.tree.leaves(state.opt_state)}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(tree),
      meta=ocp.args.JsonSave({'step': step, 'data_step': step})))
  mngr.wait_until_finished()


def restore_checkpoint(mngr, step: int,
                       state: TrainState) -> tuple[TrainState, int]:
  """(state, data_step) from checkpoint `step`, in `state`'s shardings."""
  like = {'params': state.params, 'opt_state': jax.tree.leaves(state.opt_state)}
  abstract = orbax_io.abstract_tree(like, jax.tree.map(lambda x: x.sharding,
                                                       like))
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  tree, meta = out['state'], out['meta']
  opt_state = jax.tree.unflatten(jax.tree.structure(state.opt_state),
                                 tree['opt_state'])
  return (state.replace(params=tree['params'], opt_state=opt_state),
          int(meta['data_step']))
