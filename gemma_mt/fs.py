"""Writing files and directories so that a reader, or a killed writer,
never sees half of one: every format the package writes (model dirs,
exports, checkpoints' records, caches) goes through here."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
  """Yields a sibling temp path to fill; renamed to `path` on success.

  A killed or failed write never leaves a half-written dir at `path`.
  """
  path = Path(path).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    yield tmp
    if overwrite and path.exists():
      shutil.rmtree(path)
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes a file through a sibling temp file and a rename: readers see
  the old file or the whole new one, never a half-written one."""
  path = Path(path)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  try:
    if isinstance(data, str):
      tmp.write_text(data, encoding='utf-8')
    else:
      tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
