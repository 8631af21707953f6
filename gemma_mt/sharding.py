"""Data parallelism and FSDP over a 2-D device mesh ('data', 'fsdp').

One code path for every setup: a single device is the 1 x 1 mesh, N GPUs of
one host are `data=N` (replicated params) or `fsdp=N` (sharded params), and
several hosts are the same mesh over all their devices.

* Batches are split over both axes: FSDP is data parallelism too, it only
  additionally shards params, gradients and optimizer state.
* A param is FSDP-sharded along its largest axis divisible by the fsdp size
  (MaxText's rule of thumb: the big dimension, so every shard is a slab of
  the weight). For the Gemma tree that is V of `embedder/input_embedding`
  [V, D], D of the attention einsums and F of the MLP weights. Small params
  (norm scales, anything 1-D or below `min_size` elements) stay replicated.
  Gemma 4's expert weights (`mlp/gating_einsum/w` [E, 2, F, D],
  `mlp/linear/w` [E, F, D]) are sharded by expert when E divides: each
  device holds whole experts.
* XLA (GSPMD) inserts the all-gathers of weights and the reduce-scatters of
  gradients: the jitted train step itself is unchanged, it just receives
  sharded arrays (or `in_shardings`/`out_shardings` from `step_shardings`).

Multi-host: call `maybe_initialize_distributed()` first thing, let every
host read the same global batches and keep its rows (`host_local_batches`),
then `shard_batch` assembles the global array from the per-host slices.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # The batch dim is split over both.
MIN_SHARD_SIZE = 1024  # Params with fewer elements stay replicated.


# ----------------------------------------------------------------- the mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 on one axis means "all the remaining devices"."""

  data: int = -1
  fsdp: int = 1

  def resolve(self, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) with the -1 filled in; checks they use every device."""
    data, fsdp = self.data, self.fsdp
    if data == -1 and fsdp == -1:
      raise ValueError('at most one of mesh data/fsdp may be -1')
    for name, v in (('data', data), ('fsdp', fsdp)):
      if v == 0 or v < -1:
        raise ValueError(f'mesh {name} must be >= 1 or -1, got {v}')
    known = max(data, 1) * max(fsdp, 1)
    if num_devices % known:
      raise ValueError(f'mesh data={data} x fsdp={fsdp} does not divide '
                       f'{num_devices} devices')
    if data == -1:
      data = num_devices // known
    elif fsdp == -1:
      fsdp = num_devices // known
    if data * fsdp != num_devices:
      raise ValueError(f'mesh data={data} x fsdp={fsdp} = {data * fsdp} '
                       f'devices, but {num_devices} are available')
    return data, fsdp


def make_mesh(config: MeshConfig = MeshConfig(),
              devices: list | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all, on all hosts).

  Axis types are Auto (classic GSPMD propagation) on every jax version;
  jax >= 0.12 would otherwise default to Explicit sharding-in-types.
  Devices keep jax's global order (host-major on GPU), so each host owns a
  contiguous block of batch rows, the block `host_local_batches` gives it.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = config.resolve(len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ------------------------------------------------------------ params / state


def fsdp_spec(shape: tuple[int, ...], fsdp: int,
              min_size: int = MIN_SHARD_SIZE) -> P:
  """The PartitionSpec of one param of `shape` (see the module docstring).

  Largest axis divisible by `fsdp` (the first one on ties); replicated when
  fsdp is 1, the param is 1-D/scalar or small, or no axis divides.
  """
  if fsdp == 1 or len(shape) < 2 or int(np.prod(shape)) < min_size:
    return P()
  fits = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
  if not fits:
    return P()
  axis = max(fits, key=lambda i: shape[i])  # max() keeps the first on ties.
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return P(*spec)


def param_shardings(params_or_shapes: Any, mesh: Mesh,
                    min_size: int = MIN_SHARD_SIZE) -> Any:
  """Tree of NamedSharding for params (arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape['fsdp']

  def one(path, x):
    shape = np.shape(x)
    keys = tuple(getattr(k, 'key', None) for k in path[-3:])
    if (keys in (('mlp', 'gating_einsum', 'w'), ('mlp', 'linear', 'w'))
        and fsdp > 1 and shape[0] % fsdp == 0):
      return NamedSharding(mesh, P('fsdp', *[None] * (len(shape) - 1)))
    return NamedSharding(mesh, fsdp_spec(shape, fsdp, min_size))

  return jax.tree_util.tree_map_with_path(one, params_or_shapes)


def shard_params(params: Any, mesh: Mesh, shardings: Any = None) -> Any:
  """Places params on the mesh (host numpy or jax arrays on any devices).

  On several hosts every host must pass the same values (e.g. each loaded
  the same checkpoint); each then uploads only its own devices' shards.
  """
  if shardings is None:
    shardings = param_shardings(params, mesh)
  return jax.tree.map(put_global, params, shardings)


def put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """`jax.device_put`, also for a host-local value onto a multi-host mesh."""
  if jax.process_count() == 1 or (isinstance(x, jax.Array)
                                  and not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  x = np.asarray(jax.device_get(x))
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def opt_state_shardings(optimizer: Any, params: Any, mesh: Mesh,
                        params_shardings: Any = None) -> Any:
  """Shardings of `optimizer.init(params)`, following the params'.

  Sub-trees shaped like params (Adam's mu and nu, momentum) get the param
  shardings leaf for leaf; other leaves (step counts, Adafactor's factored
  rows/columns) get the same shape rule, so scalars and vectors replicate.
  """
  if params_shardings is None:
    params_shardings = param_shardings(params, mesh)
  abstract = jax.eval_shape(optimizer.init, params)
  params_def = jax.tree.structure(params)

  def like_params(x):
    return not _is_array(x) and jax.tree.structure(x) == params_def

  fsdp = mesh.shape['fsdp']

  def one(x):
    if like_params(x):
      return params_shardings
    return NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp))

  return jax.tree.map(one, abstract,
                      is_leaf=lambda x: _is_array(x) or like_params(x))


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def init_opt_state(optimizer: Any, params: Any, mesh: Mesh,
                   shardings: Any = None) -> Any:
  """`optimizer.init(params)` created directly sharded (never on one chip)."""
  if shardings is None:
    shardings = opt_state_shardings(optimizer, params, mesh)
  return jax.jit(optimizer.init, out_shardings=shardings)(params)


def step_shardings(mesh: Mesh, params_shardings: Any,
                   opt_shardings: Any) -> tuple[tuple, tuple]:
  """(in_shardings, out_shardings) for `train_step(params, opt, batch)`.

  Pins the step's outputs to the input layouts (donation then reuses the
  buffers) and the metrics to replicated.
  """
  return ((params_shardings, opt_shardings, batch_sharding(mesh)),
          (params_shardings, opt_shardings, replicated(mesh)))


# -------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """A tree of this host's numpy rows -> global batch-sharded jax arrays.

  Each host passes only its local rows (`host_local_batches`); with one
  host that is the whole batch. The global batch must divide into
  data x fsdp shards.
  """
  sharding = batch_sharding(mesh)
  n = num_batch_shards(mesh)

  def put(x):
    x = np.asarray(x)
    if (x.shape[0] * jax.process_count()) % n:
      raise ValueError(
          f'global batch of {x.shape[0] * jax.process_count()} rows does not '
          f'split over {n} devices (mesh {dict(mesh.shape)})')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


# ----------------------------------------------------------------- multi-host


def maybe_initialize_distributed() -> bool:
  """Joins the other hosts' processes, if this is a multi-host launch.

  Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. Otherwise jax's own detection for SLURM (srun, more than
  one task) and Open MPI (mpirun). Must run before anything touches the
  devices. Returns whether jax.distributed is initialized; a plain
  single-host launch is left alone (False).
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    num = env.get('JAX_NUM_PROCESSES')
    pid = env.get('JAX_PROCESS_ID')
    jax.distributed.initialize(
        coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
        num_processes=None if num is None else int(num),
        process_id=None if pid is None else int(pid))
    return True
  slurm = int(env.get('SLURM_NTASKS', env.get('SLURM_NPROCS', '1')) or 1)
  ompi = int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1)
  if (env.get('SLURM_JOB_ID') and env.get('SLURM_STEP_ID') is not None
      and slurm > 1) or ompi > 1:
    jax.distributed.initialize()  # jax reads the SLURM / Open MPI variables.
    return True
  return False


def host_shard(global_batch_size: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[int, int, int]:
  """(local_batch_size, process_index, process_count) of this host."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} not in [0, {count})')
  if global_batch_size % count:
    raise ValueError(f'global batch size {global_batch_size} does not split '
                     f'over {count} hosts')
  return global_batch_size // count, index, count


def host_local_batches(batches: Iterable[Any], process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[Any]:
  """Each global numpy batch (any tree) -> this host's contiguous rows.

  Host p keeps rows [p * local, (p + 1) * local): every row goes to exactly
  one host, and since the global iterator is a pure function of the step
  (`get_train_dataset(start_step=...)`), so is this one (resume works).
  Every host reads the whole global batch; cheap for MTNT-sized tokens.
  """
  for batch in batches:
    leaves = jax.tree.leaves(batch)
    local, index, _ = host_shard(len(leaves[0]), process_index, process_count)
    rows = slice(index * local, (index + 1) * local)
    yield jax.tree.map(lambda x: x[rows], batch)


# ---------------------------------------------------------- sampling / eval


def decode_sharding(batch_size: int, mesh: Mesh) -> NamedSharding:
  """Batch-sharded if `batch_size` splits over the mesh, else replicated.

  The sampler buckets batches to powers of two, so small last batches may
  not split; they then run replicated (correct, just not parallel).
  """
  if batch_size % num_batch_shards(mesh) == 0:
    return batch_sharding(mesh)
  return replicated(mesh)


def shard_decode_inputs(arrays: Any, mesh: Mesh) -> Any:
  """Per-row decode inputs (tokens [B, P], lengths [B], ...) onto the mesh.

  Arrays with a leading batch dim are split over the mesh; scalars are
  replicated. Single-host only (every row is on this host).
  """
  leaves = [x for x in jax.tree.leaves(arrays) if np.ndim(x) > 0]
  if not leaves:
    return jax.device_put(arrays, replicated(mesh))
  row_sharding = decode_sharding(np.shape(leaves[0])[0], mesh)
  return jax.tree.map(
      lambda x: jax.device_put(
          x, row_sharding if np.ndim(x) > 0 else replicated(mesh)), arrays)


def sampling_params(params: Any, mesh: Mesh, fsdp: bool | None = None) -> Any:
  """Params for decoding on `mesh`: replicated (fastest, if they fit) or
  FSDP-sharded like training (fsdp=None: whatever `mesh` has)."""
  if fsdp is None:
    fsdp = mesh.shape['fsdp'] > 1
  if fsdp:
    return shard_params(params, mesh)
  return jax.tree.map(lambda x: put_global(x, replicated(mesh)), params)
