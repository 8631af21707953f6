"""Compiled decoders kept on disk, so that a new process neither traces,
lowers nor compiles them again.

JAX's persistent compilation cache skips only XLA's compile: each new
process still traces and lowers every decoder executable, 0.7-0.9 s apiece
for the 270M (on an H200 a warm `evaluate` spent 6.6 of its 7.5 s there).
Here the compiled executable itself is serialised
(`jax.experimental.serialize_executable`), under a digest of everything
that decides what it computes:

* what the caller closes over (its key, the model's repr: config, dtypes,
  kernels; pad id, mesh), passed in as `static`;
* the arguments' tree, shapes, dtypes and shardings;
* the gemma_mt sources, jax/jaxlib/flax/qwix versions, the devices (ids
  included), XLA_FLAGS and the jax settings that change a trace (x64,
  matmul precision, PRNG, debug checks, default device).

So a change to the code, the model, the inputs' layout or those settings
misses and compiles afresh. A file is written atomically and carries the
SHA-256 of its body; one that does not verify (damaged, truncated) is
removed, and one that does not load is compiled again and replaced. The
store is an optimisation: a full disk or a read-only cache only costs the
compile. It is never pruned: delete the directory to reclaim its space.

Loading unpickles, which can run code: only files the current user owns
are read, in the user's own cache directory (the trust JAX gives its
cache directory).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import threading
from pathlib import Path

import jax
import numpy as np

from gemma_mt import fs

log = logging.getLogger(__name__)

MAGIC = b'gemma_mt-executable-1\n'
SUFFIX = '.exe'


@functools.cache
def source_digest() -> str:
  """SHA-256 of every gemma_mt source file: a new version never loads an
  executable an older one compiled."""
  root = Path(__file__).resolve().parents[1]
  h = hashlib.sha256()
  for p in sorted(root.rglob('*.py')):
    h.update(str(p.relative_to(root)).encode() + b'\0' + p.read_bytes() + b'\0')
  return h.hexdigest()


def environment() -> str:
  """The jax/jaxlib versions, the devices executables are built for, and
  the settings that change what a trace or a compile produces."""
  import jaxlib
  devices = jax.devices()
  client = devices[0].client
  settings = [os.environ.get(k, '') for k in ('XLA_FLAGS', 'LIBTPU_INIT_ARGS')]
  settings += [str(getattr(jax.config, k, None)) for k in (
      'jax_enable_x64', 'jax_default_matmul_precision', 'jax_default_prng_impl',
      'jax_threefry_partitionable', 'jax_random_seed_offset',
      'jax_debug_nans', 'jax_debug_infs', 'jax_default_device')]
  settings += [f'{m}={_version(m)}' for m in ('flax', 'qwix')]  # They trace.
  return '|'.join([jax.__version__, jaxlib.__version__, client.platform,
                   client.platform_version,
                   ','.join(sorted({d.device_kind for d in devices})),
                   str(len(devices)), str(jax.process_count()), *settings])


@functools.cache  # Reads package metadata from disk; fixed for a process.
def _version(dist: str) -> str:
  from importlib import metadata
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return ''


def signature(args) -> str:
  """The arguments' tree, and each leaf's shape, dtype and placement."""
  leaves, tree = jax.tree.flatten(args)

  def leaf(x):
    weak = (isinstance(x, (bool, int, float, complex)) or
            bool(getattr(x, 'weak_type', False)))
    dtype = getattr(x, 'dtype', None) or np.asarray(x).dtype
    sharding = getattr(x, 'sharding', None)  # Its repr omits the devices.
    devices = sorted(d.id for d in getattr(sharding, 'device_set', ()))
    return f'{dtype}{np.shape(x)}:{weak}:{sharding!r}:{devices}'

  return f'{tree}|' + ';'.join(map(leaf, leaves))


class ExecutableStore:
  """Serialised executables in one directory (module docstring)."""

  def __init__(self, directory: str | Path):
    self.directory = Path(directory).expanduser()
    self.loaded = 0    # executables read back, neither traced nor compiled
    self.compiled = 0  # compiled here (then written, where they can be)
    self.written = 0
    self._warned = False
    self._lock = threading.Lock()  # Counts: executables load side by side.

  def _count(self, name: str) -> None:
    with self._lock:
      setattr(self, name, getattr(self, name) + 1)

  def path(self, static: str, args, donate: tuple[int, ...] = ()) -> Path:
    """Where the executable of (`static`, `args`, `donate`) lives."""
    text = '\n'.join([static, signature(args), repr(tuple(donate)),
                      environment(), source_digest()])
    return self.directory / (hashlib.sha256(text.encode()).hexdigest() + SUFFIX)

  def load(self, path: Path) -> jax.stages.Compiled | None:
    """The executable at `path`, or None if it is absent or does not
    verify or load (the caller then compiles)."""
    try:
      if path.stat().st_uid != os.getuid():
        return None  # Unpickling runs code: only files this user wrote.
      data = path.read_bytes()
    except OSError:
      return None
    head = len(MAGIC) + 64
    body = data[head:]
    if (data[:len(MAGIC)] != MAGIC or
        data[len(MAGIC):head].decode('ascii', 'replace') !=
        hashlib.sha256(body).hexdigest()):
      log.info('executable %s does not verify: compiling it again', path.name)
      with contextlib.suppress(OSError):  # Never read again (if we may).
        path.unlink()
      return None
    from jax.experimental import serialize_executable
    try:
      payload, in_tree, out_tree = pickle.loads(body)
      exe = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception as e:  # noqa: BLE001 - any failure means: compile it.
      log.info('executable %s does not load (%s): compiling it again',
               path.name, e)
      return None
    self._count('loaded')
    return exe

  def compile(self, lowered: jax.stages.Lowered
              ) -> tuple[jax.stages.Compiled, bool]:
    """(`lowered` compiled, whether the store may keep it).

    Compiled past XLA's persistent cache: an executable that cache returns
    serialises without its code on the CPU (the next process fails with
    'Function ... not found'), and after an upgrade the cache would answer
    for every decoder, so the store would never fill again. JAX has no
    public switch for one compile; where its private one is gone, the
    store keeps only compiles the cache did not answer."""
    hits = _hits_here()
    with past_xla_cache():
      exe = lowered.compile()
    self._count('compiled')
    return exe, _hits_here() == hits

  def save(self, path: Path, exe: jax.stages.Compiled) -> bool:
    """Writes `exe` to `path`; False (and one warning) if it cannot be."""
    from jax.experimental import serialize_executable
    with contextlib.suppress(OSError):
      if path.stat().st_uid != os.getuid():
        return False  # Another user's file: not ours to replace.
    try:
      body = pickle.dumps(serialize_executable.serialize(exe))
      data = MAGIC + hashlib.sha256(body).hexdigest().encode() + body
      self.directory.mkdir(parents=True, exist_ok=True)
      fs.atomic_write(path, data, flag='executable store')
    except Exception as e:  # noqa: BLE001 - the store is an optimisation:
      # not serialisable here, disk full, a read-only or odd cache dir.
      if not self._warned:
        log.warning('compiled executables not kept in %s: %s',
                    self.directory, e)
        self._warned = True
      return False
    self._count('written')
    return True


_past = {'depth': 0, 'before': None}  # Compiles inside `past_xla_cache`.
_past_lock = threading.Lock()


@contextlib.contextmanager
def past_xla_cache():
  """Within the block, compiles neither read nor write XLA's persistent
  cache (private jax state; absent: no effect). Blocks may overlap (the
  decoders of a call compile side by side): the first one in switches the
  cache off, the last one out restores it."""
  try:
    from jax._src import compilation_cache as cc
    lock = cc._cache_initialized_mutex
    cc._cache_checked, cc._cache_used  # noqa: B018 - both must exist.
  except (ImportError, AttributeError):
    yield
    return
  with _past_lock:
    if not _past['depth']:
      with lock:
        _past['before'] = cc._cache_checked, cc._cache_used
        cc._cache_checked, cc._cache_used = True, False
    _past['depth'] += 1
  try:
    yield
  finally:
    with _past_lock:
      _past['depth'] -= 1
      if not _past['depth']:
        with lock:
          cc._cache_checked, cc._cache_used = _past['before']


_default: ExecutableStore | None = None
_xla_cache_hits = threading.local()  # Per thread: compiles run side by side.


def _hits_here() -> int:
  """XLA cache hits of this thread's compiles so far (events fire in the
  compiling thread)."""
  return getattr(_xla_cache_hits, 'n', 0)


def _count_hits(event: str, **kw) -> None:
  if event == '/jax/compilation_cache/cache_hits':
    _xla_cache_hits.n = _hits_here() + 1


jax.monitoring.register_event_listener(_count_hits)


def default() -> ExecutableStore | None:
  """The store new `Sampler`s use (None: none; see `using`)."""
  return _default


@contextlib.contextmanager
def using(directory: str | Path | None):
  """Within the block, new `Sampler`s keep their executables in
  `directory` (None: nowhere). Yields the store."""
  global _default
  before = _default
  _default = None if directory is None else ExecutableStore(directory)
  try:
    yield _default
  finally:
    _default = before

