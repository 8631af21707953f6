"""The one layer through which the package writes the user's disk.

Every file and directory gemma_mt writes (model dirs, exports, hypotheses,
summaries, reports, records) goes through here, so that these hold for all
of them at once:

* Writes are atomic: a sibling temporary, renamed into place. A reader, or a
  killed writer, never sees half of an output; temporaries are removed on
  every exception, and those of killed processes are swept later.
* Nothing the package did not write is deleted or replaced. A directory is
  replaced only when it carries the package's manifest (`MANIFEST`) and holds
  nothing the manifest does not name; never the working directory or one
  above it.
* An output is never an input: `check_outputs` refuses, before any work, an
  output that is, holds or replaces any input of the command.
* Model dirs carry checksums (the manifest); `verify_dir` names the damaged
  file on every load.
* One process per output: `RunLock` (an flock record of pid, host, start).
* A disk-full or permission error is one line naming the path, and what was
  there before is intact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = 'gemma_mt.files.json'  # marker and checksums of a written dir
LOCK_FILE = '.gemma_mt.lock'
_CHUNK = 1 << 22

PathLike = str | os.PathLike


class UnsafeOutputError(ValueError):
  """An output that would overwrite an input or what the package did not write."""


class DamagedError(ValueError):
  """A model dir whose files do not match their recorded checksums."""


class RunLockedError(RuntimeError):
  """Another live process holds the lock of this output."""


def _abs(path: PathLike) -> Path:
  return Path(os.path.abspath(Path(path).expanduser()))


def _resolved(path: PathLike) -> Path:
  return Path(path).expanduser().resolve()


class WriteError(OSError):
  """A write that failed (disk full, permissions): one line naming the path."""

  def __str__(self) -> str:
    return self.strerror


# The errors of writing itself, as opposed to those of reading an input.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                 errno.EPERM, errno.EFBIG}


def failed(path: PathLike, e: OSError) -> WriteError:
  """`e` as one line that names the path, for the CLI's error line."""
  if isinstance(e, WriteError):
    return e
  what = e.strerror or str(e)
  if e.errno == errno.ENOSPC:
    what = 'no space left on the device'
  return WriteError(e.errno, f'cannot write {path}: {what}')


@contextlib.contextmanager
def _writing(path: Path, body: bool = False):
  """OSErrors raised inside become `WriteError`s naming `path`; inside a
  caller's body, only those of writing (disk full, permissions)."""
  try:
    yield
  except OSError as e:
    if body and e.errno not in _WRITE_ERRNOS:
      raise
    raise failed(path, e) from e


# --------------------------------------------------------------- inputs/outputs

def _within(inner: Path, outer: Path) -> bool:
  return inner == outer or outer in inner.parents


def _same_file(a: Path, b: Path) -> bool:
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def _check_not_cwd(flag: str, path: Path) -> None:
  if _within(_resolved(Path.cwd()), _resolved(path)):
    raise UnsafeOutputError(f'{flag} {path}: is the working directory or '
                            'above it; choose a new path')


def check_outputs(outputs: Mapping[str, PathLike | None],
                  inputs: Mapping[str, PathLike | None]) -> None:
  """Refuses, before any work, outputs that would overwrite an input.

  `outputs` and `inputs` map a flag (as the user wrote it) to a path, or None
  when not given. An output may not be an input (through links too), hold
  one, or replace a file inside an input dir; nor be the working directory
  or one above it; two outputs may not be the same path.
  """
  outs = {k: _resolved(v) for k, v in outputs.items() if v is not None}
  ins = {k: _resolved(v) for k, v in inputs.items() if v is not None}
  for flag, out in outs.items():
    _check_not_cwd(flag, out)
    for in_flag, inp in ins.items():
      if inp == out or _same_file(inp, out):
        what = 'is'
      elif _within(inp, out):
        what = 'holds'
      elif _within(out, inp) and os.path.lexists(out):
        what = 'is a file of'  # A new file beside the inputs replaces none.
      else:
        continue
      raise UnsafeOutputError(f'{flag} {out}: {what} the input {in_flag} '
                              f'{inp}; choose another output')
  seen: dict[Path, str] = {}
  for flag, out in outs.items():
    if out in seen:
      raise UnsafeOutputError(f'{flag} and {seen[out]} are the same path {out}')
    seen[out] = flag


# What model dirs written before manifests hold at their top level: orbax's
# files, ours, an HF export's, LoRA adapters'.
_LEGACY = re.compile(
    r'_CHECKPOINT_METADATA|_METADATA|_sharding|array_metadatas|d|'
    r'manifest\.ocdbt|ocdbt\.process_\d+|commit_success\.txt|'
    r'tokenizer\.model|gemma_mt\.json|lora\.json|adapters|config\.json|'
    r'generation_config\.json|tokenizer_config\.json|special_tokens_map\.json|'
    r'model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json')
_LEGACY_MARKERS = ('gemma_mt.json', 'lora.json')


def written_by_us(path: PathLike) -> bool:
  """A dir the package wrote: it has a manifest naming every file in it, or
  (written before manifests) our marker and nothing but what we write."""
  path = Path(path)
  try:
    names = set(json.loads((path / MANIFEST).read_text())['files'])
  except FileNotFoundError:
    try:
      entries = [e.name for e in path.iterdir()]
    except OSError:
      return False
    return (any(m in entries for m in _LEGACY_MARKERS)
            and all(_LEGACY.fullmatch(n) for n in entries))
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return set(_walk(path)) <= names | {MANIFEST, LOCK_FILE}


def check_replaceable(path: PathLike, overwrite: bool, flag: str = 'output',
                      directory: bool = True) -> None:
  """Refuses to replace `path` unless `overwrite` and the package wrote it.

  A file output (`directory=False`) may replace a regular file; a dir output
  only a dir with the package's manifest and nothing else in it.
  """
  path = _abs(path)
  if not os.path.lexists(path):
    return
  if not overwrite:
    raise FileExistsError(f'{flag} {path} exists; pass --overwrite to '
                          'replace it')
  _check_not_cwd(flag, path)
  if path.is_symlink():
    raise UnsafeOutputError(f'{flag} {path} is a link; not replaced')
  if directory:
    if not path.is_dir():
      raise UnsafeOutputError(f'{flag} {path} is a file, not a dir this '
                              'package wrote; not replaced')
    if not written_by_us(path):
      raise UnsafeOutputError(
          f'{flag} {path} was not written by gemma_mt (no {MANIFEST}, or files '
          'it does not list); not replaced. Remove it yourself or choose '
          'another path')
  elif not path.is_file():
    raise UnsafeOutputError(f'{flag} {path} is not a regular file; not '
                            'replaced')


def check_file_output(path: PathLike, flag: str = 'output',
                      overwrite: bool = True) -> None:
  """Before the work that ends in writing the file `path`: refuses one that
  could not be written (a dir, an unwritable parent or file) or replaced
  (`check_replaceable`); nothing is written."""
  path = _abs(path)
  if path.is_dir():
    raise UnsafeOutputError(f'{flag} {path}: is a directory')
  parent = next(p for p in (path.parent, *path.parent.parents) if p.exists())
  if not parent.is_dir() or not os.access(parent, os.W_OK):
    raise ValueError(f'{flag} {path}: cannot write under {parent}')
  if path.exists() and not os.access(path, os.W_OK):
    raise ValueError(f'{flag} {path}: not writable')
  check_replaceable(path, overwrite, flag, directory=False)


# ------------------------------------------------------------------- temps

def _host() -> str:
  return re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())


def temp_path(path: PathLike, kind: str = 'tmp', pid: int | None = None) -> Path:
  """.NAME.tmp-HOST-PID: the host, so that on a disk shared between hosts a
  sweep judges only the pids of its own."""
  path = Path(path)
  return path.with_name(f'.{path.name}.{kind}-{_host()}-{pid or os.getpid()}')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):  # Another user's, or not a pid.
    return True
  return True


def sweep_stale(path: PathLike) -> list[Path]:
  """Removes temporaries of `path` left by killed processes (logged)."""
  path = _abs(path)
  gone = []
  prefix = f'.{path.name}.'
  try:
    entries = list(path.parent.iterdir())
  except OSError:
    return gone
  # .NAME.tmp-PID, and what writers derive from it (.NAME.tmp-PID.orbax-…).
  pattern = re.compile(re.escape(prefix) + r'(tmp|old)-' + re.escape(_host())
                       + r'-(\d+)(\..*)?')
  for e in entries:
    m = pattern.fullmatch(e.name)
    if not m or _pid_alive(int(m[2])):
      continue
    kind, pid = m[1], m[2]
    if kind == 'old' and not os.path.lexists(path):
      # A swap was cut between its two renames: put the earlier one back.
      log.warning('restoring %s from %s, left by a killed process %s', path,
                  e, pid)
      os.rename(e, path)
      continue
    log.warning('removing %s, left by a killed process %s', e, pid)
    _remove(e)
    gone.append(e)
  return gone


def _remove(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      p.unlink()


# ------------------------------------------------------------------ writing

def _walk(root: Path) -> Iterator[str]:
  for dirpath, _, files in os.walk(root):
    for f in files:
      yield os.path.relpath(os.path.join(dirpath, f), root)


def file_crc(path: PathLike) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(root: PathLike) -> None:
  """Records size and CRC-32 of every file under `root`."""
  root = Path(root)
  files = {}
  for rel in sorted(_walk(root)):
    if rel in (MANIFEST, LOCK_FILE):
      continue
    p = root / rel
    files[rel] = {'size': p.stat().st_size, 'crc32': file_crc(p)}
  (root / MANIFEST).write_text(json.dumps({'files': files}, indent=1) + '\n')


def verify_dir(root: PathLike) -> bool:
  """Checks every file the manifest names; False when there is no manifest
  (a dir from an older version, or another tool). Raises `DamagedError`
  naming the first file that is missing, truncated or changed."""
  root = Path(root)
  if not (root / MANIFEST).is_file():
    return False
  try:
    files = json.loads((root / MANIFEST).read_text())['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DamagedError(f'{root / MANIFEST}: unreadable ({e})') from None
  for rel, rec in files.items():
    p = root / rel
    try:
      size = p.stat().st_size
    except OSError:
      raise DamagedError(f'{p}: missing (recorded in {root / MANIFEST})') from None
    if size != rec['size']:
      raise DamagedError(f'{p}: {size} bytes, {rec["size"]} were written')
    if file_crc(p) != rec['crc32']:
      raise DamagedError(f'{p}: its contents changed since it was written '
                         '(checksum mismatch)')
  return True


def _mode_for(path: Path) -> int:
  """The mode of the file `path` replaces, else what the umask gives a new
  file (a temp file's own mode may be tighter)."""
  if path.exists():
    return stat.S_IMODE(path.stat().st_mode)
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False, flag: str = 'output'
               ) -> Iterator[Path]:
  """Yields a sibling temp path to fill (the writer creates the dir); it
  becomes `path`, with a manifest.

  An existing `path` is replaced only under `overwrite` and only if the
  package wrote it (`check_replaceable`); the swap renames it aside first,
  so a failure at any point leaves the earlier dir in place.
  """
  path = _abs(path)
  check_replaceable(path, overwrite, flag)
  sweep_stale(path)
  tmp, old = temp_path(path, 'tmp'), temp_path(path, 'old')
  try:
    with _writing(path):
      path.parent.mkdir(parents=True, exist_ok=True)
      _remove(tmp)
    with _writing(path, body=True):
      yield tmp  # Not created: writers such as orbax create it themselves.
    with _writing(path):
      write_manifest(tmp)
      check_replaceable(path, overwrite, flag)  # Again: it may have appeared.
      if os.path.lexists(path):
        os.rename(path, old)
        try:
          os.rename(tmp, path)
        except BaseException:
          os.rename(old, path)
          raise
        _remove(old)
      else:
        os.rename(tmp, path)
  finally:
    remove_temps(tmp)


def remove_temps(tmp: Path) -> None:
  """`tmp` and what a writer derived from its name (orbax's own temp)."""
  for p in [tmp, *tmp.parent.glob(glob.escape(tmp.name) + '.*')]:
    if os.path.lexists(p):
      _remove(p)


@contextlib.contextmanager
def atomic_path(path: PathLike, overwrite: bool = True, flag: str = 'output'
                ) -> Iterator[Path]:
  """Yields a sibling temp path for a writer that takes a path (GGUF); it
  becomes `path` (with the mode of the file it replaces, else the umask's)
  when the block ends without an exception, and is removed otherwise."""
  path = _abs(path)
  check_replaceable(path, overwrite, flag, directory=False)
  sweep_stale(path)
  tmp = temp_path(path, 'tmp')
  try:
    with _writing(path):
      mode = _mode_for(path)
      path.parent.mkdir(parents=True, exist_ok=True)
    with _writing(path, body=True):
      yield tmp
    with _writing(path):
      os.chmod(tmp, mode)
      os.replace(tmp, path)
  finally:
    _remove(tmp)


def atomic_write(path: PathLike, data: bytes | str, overwrite: bool = True,
                 flag: str = 'output') -> Path:
  """Writes a file through a sibling temp file and a rename: readers see
  the old file or the whole new one, never a half-written one."""
  with atomic_path(path, overwrite, flag) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
  return _abs(path)


def partial_path(path: PathLike) -> Path:
  path = Path(path)
  return path.with_name(path.name + '.partial')


# -------------------------------------------------------------------- locks

class RunLock:
  """One process per workdir or output at a time.

  An `flock` on `LOCK_FILE` in `dir` (or, for a file output, `.NAME.lock`
  beside it) with a record of pid, host and start. The kernel drops the
  lock when its holder dies, so a killed holder's record is taken over with
  a warning; a live one is a `RunLockedError` naming it.
  """

  def __init__(self, path: PathLike, for_output: bool = False):
    path = _abs(path)
    self.file = (path.with_name(f'.{path.name}.lock') if for_output
                 else path / LOCK_FILE)
    self.for_output = for_output
    self._fd: int | None = None

  def __enter__(self) -> 'RunLock':
    self.file.parent.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        held = os.read(fd, 4096).decode('utf-8', 'replace').strip()
        os.close(fd)
        who = _describe(held)
        raise RunLockedError(f'{self.file.parent} is in use by {who}; wait '
                             'for it to end, or stop it') from None
      try:  # The file a releasing holder unlinked is no lock: open anew.
        if os.stat(self.file).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    stale = os.read(fd, 4096).decode('utf-8', 'replace').strip()
    if stale:
      log.warning('taking over the lock of %s, which is no longer running',
                  _describe(stale))
    record = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                         'since': time.strftime('%Y-%m-%d %H:%M:%S')})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode() + b'\n', 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    with contextlib.suppress(OSError):
      os.ftruncate(fd, 0)  # A clean end: the next holder has nothing to take over.
      if self.for_output:
        self.file.unlink()
    os.close(fd)


def _describe(record: str) -> str:
  try:
    r = json.loads(record)
    return f'pid {r["pid"]} on {r["host"]} (since {r["since"]})'
  except (ValueError, KeyError, TypeError):
    return 'another process'
