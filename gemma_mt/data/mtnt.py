"""MTNT translation pairs as padded, masked token batches (numpy only).

An example is `[BOS] + format_prompt(src) + dst + <end>` (`prompts`: the end
is EOS for the plain format, `<end_of_turn>` for the turn formats), padded
with the pad id to `max_seq_len`. `target_mask` is aligned with
`input_tokens`: it is True on the `dst` tokens and the end marker, so the loss for predicting token t (from
position t - 1) is counted where `target_mask[t]` is True; the prompt and the
padding never are.

Pairs come from TFDS (`mtnt/<pair>`: TFDS's own builder, which downloads
`MTNT.1.1.tar.gz` or takes a local copy through `place_mtnt_archive`; needs
the `tfds` extra, TensorFlow) or from an
extracted MTNT directory (`<dir>/<split>/<split>.<pair>.tsv`, columns: comment
id, source, target), read with plain Python so that no TensorFlow is needed.
Real MTNT files contain bad rows (CRLF endings, a row with an extra column,
empty texts); those are skipped with a warning naming file and line, and
counted in `stats`, rather than crashing or shifting columns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gemma_mt import fs
from gemma_mt.data import prompts
from gemma_mt.data.prompts import LANG_PAIRS, LANGUAGE_NAMES, format_prompt  # noqa: F401

log = logging.getLogger(__name__)

SPLITS = ('train', 'valid', 'test')
TFDS_LANG_PAIRS = ('en-fr', 'en-ja', 'fr-en')  # The configs TFDS provides.
_LAYOUT = (
    'expected layout: <mtnt_dir>/<split>/<split>.<pair>.tsv with three '
    'tab-separated columns (comment id, source, target)'
)
_check_pair = prompts.check_pair


class TrainingInput(NamedTuple):
  input_tokens: np.ndarray  # [B, L] int32, pad id after the end marker.
  target_mask: np.ndarray  # [B, L] bool, True on dst tokens and the end marker.


@dataclasses.dataclass
class SplitStats:
  """What happened to the rows of one split."""

  kept: int = 0
  dropped_too_long: int = 0
  truncated: int = 0  # Included in `kept`.
  malformed: int = 0


# Reading raw pairs.


def _clean(src, dst) -> tuple[str, str] | str:
  """(src, dst) stripped, or the reason the row is unusable."""
  try:
    if isinstance(src, bytes):
      src = src.decode('utf-8')
    if isinstance(dst, bytes):
      dst = dst.decode('utf-8')
  except UnicodeDecodeError as e:
    return f'invalid UTF-8 ({e.reason} at byte {e.start})'
  src, dst = src.strip(), dst.strip()
  if not src or not dst:
    return 'empty source' if not src else 'empty target'
  return src, dst


def read_mtnt_tsv(path: str | os.PathLike) -> tuple[list[tuple[str, str]], int]:
  """(source, target) pairs of an MTNT .tsv file, and the count of bad rows.

  Lines are split on b'\\n' (not `splitlines`, which also breaks on Unicode
  separators that can occur inside Reddit text) and decoded one by one, so a
  bad byte costs one row. A row must have exactly three columns; anything
  else is skipped rather than guessed at, so columns never shift.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'MTNT file not found: {path} ({_LAYOUT})')
  lines = path.read_bytes().split(b'\n')
  if lines and not lines[-1]:
    lines.pop()  # The file's final newline.
  pairs, malformed = [], 0
  for lineno, line in enumerate(lines, start=1):
    cols = line.removesuffix(b'\r').split(b'\t')
    if len(cols) != 3:
      result = f'{len(cols)} columns, expected 3'
    else:
      result = _clean(cols[1], cols[2])
    if isinstance(result, str):
      log.warning('%s:%d: skipped malformed row: %s', path, lineno, result)
      malformed += 1
    else:
      pairs.append(result)
  return pairs, malformed


def reverse_pair(lang_pair: str) -> str:
  """'en-fr' -> 'fr-en'."""
  src, dst = lang_pair.split('-')
  return f'{dst}-{src}'


def tsv_path(mtnt_dir: str | os.PathLike, split: str, lang_pair: str = 'en-fr') -> Path:
  """`<dir>/<split>/<split>.<pair>.tsv`; `<dir>/MTNT/...` (the tarball root) works too."""
  _check_pair(lang_pair)
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; one of {SPLITS}')
  root = Path(mtnt_dir)
  if not (root / split).is_dir() and (root / 'MTNT').is_dir():
    root = root / 'MTNT'
  return root / split / f'{split}.{lang_pair}.tsv'


def _check_tfds_pair(lang_pair: str) -> None:
  if lang_pair not in TFDS_LANG_PAIRS:
    raise ValueError(f"TFDS has no mtnt/{lang_pair}; use a local MTNT dir (source='dir')")


TFDS_INSTALL = "pip install 'gemma_mt[tfds]'"
MTNT_ARCHIVE = 'MTNT.1.1.tar.gz'


def _tfds_mtnt():
  """TFDS's own MTNT builder module; TFDS extracts and reads with TensorFlow."""
  try:
    import tensorflow  # noqa: F401  (extraction and tfrecord reading)
    from tensorflow_datasets.translate.mtnt import mtnt
  except ImportError as e:
    raise ValueError(
        f'the TFDS source needs TensorFlow Datasets and TensorFlow ({e}); '
        f'{TFDS_INSTALL}, or give --mtnt_dir DIR (an extracted {MTNT_ARCHIVE})') from e
  return mtnt


def tfds_builder(lang_pair: str = 'en-fr', data_dir=None):
  _check_tfds_pair(lang_pair)
  return _tfds_mtnt().Mtnt(config=lang_pair, data_dir=data_dir)


def place_mtnt_archive(archive: str | os.PathLike, lang_pair: str = 'en-fr',
                       data_dir=None) -> Path:
  """Puts a local MTNT.1.1.tar.gz where TFDS's download manager finds it.

  For machines that cannot reach the release URL: TFDS then extracts and
  prepares it exactly as it would its own download (same cache file, same
  INFO record), so `tfds_data_dir` works offline.
  """
  from tensorflow_datasets.core.download import checksums, resource

  archive = Path(archive)
  if not archive.is_file():
    raise ValueError(f'--mtnt_archive {archive}: no such file (want {MTNT_ARCHIVE})')
  builder = tfds_builder(lang_pair, data_dir)
  url = _tfds_mtnt().URL_1_1
  dest = Path(builder.data_dir_root) / 'downloads' / resource.get_dl_fname(url)
  fs.atomic_write(dest, archive.read_bytes())
  resource.write_info_file(url=url, path=dest, dataset_name='mtnt',
                           original_fname=MTNT_ARCHIVE,
                           url_info=checksums.compute_url_info(dest))
  return dest


def _read_tfds(split: str, lang_pair: str, data_dir=None) -> tuple[list[tuple[str, str]], int]:
  builder = tfds_builder(lang_pair, data_dir)  # Fails first if TFDS is missing.
  import tensorflow_datasets as tfds
  try:
    builder.download_and_prepare()
  except Exception as e:  # noqa: BLE001  (requests, tfds and tf errors alike)
    raise ValueError(
        f'TFDS could not prepare mtnt/{lang_pair} in {builder.data_dir_root}: '
        f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}. Offline, give '
        f'--mtnt_dir DIR (an extracted {MTNT_ARCHIVE}) or --mtnt_archive '
        f'{MTNT_ARCHIVE}') from e
  ds = builder.as_dataset(split=split, shuffle_files=False)
  pairs, malformed = [], 0
  for i, ex in enumerate(tfds.as_numpy(ds)):
    result = _clean(ex['src'], ex['dst'])
    if isinstance(result, str):
      log.warning('mtnt/%s[%s] example %d: skipped malformed row: %s', lang_pair, split, i, result)
      malformed += 1
    else:
      pairs.append(result)
  return pairs, malformed


def _resolve_source(source: str | None, mtnt_dir) -> str:
  source = source or ('dir' if mtnt_dir is not None else 'tfds')
  if source not in ('tfds', 'dir'):
    raise ValueError(f"source must be 'tfds' or 'dir', got {source!r}")
  if source == 'dir' and mtnt_dir is None:
    raise ValueError(f"source='dir' needs mtnt_dir ({_LAYOUT})")
  return source


def _load(split, source, mtnt_dir, lang_pair, tfds_data_dir=None):
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; one of {SPLITS}')
  if _resolve_source(source, mtnt_dir) == 'dir':
    return read_mtnt_tsv(tsv_path(mtnt_dir, split, lang_pair))
  return _read_tfds(split, lang_pair, tfds_data_dir)


def load_pairs(
    split: str,
    *,
    source: str | None = None,
    mtnt_dir: str | os.PathLike | None = None,
    lang_pair: str = 'en-fr',
    tfds_data_dir: str | None = None,
) -> list[tuple[str, str]]:
  """Raw (source, target) pairs of a split, bad rows skipped.

  `source` defaults to 'dir' when `mtnt_dir` is given, else 'tfds'.
  """
  return _load(split, source, mtnt_dir, lang_pair, tfds_data_dir)[0]


# Tokenized batches.


class MTNTDatasetBuilder:
  """Tokenizes MTNT splits once and serves numpy `TrainingInput` batches.

  Pairs whose full sequence exceeds `max_seq_len` are dropped (counted in
  `stats[split].dropped_too_long`), or with `truncate=True` their target is
  cut to fit. A cut target gets no EOS: the translation is incomplete, and
  teaching the model to stop mid-sentence would be wrong. Pairs whose prompt
  alone leaves no room for a target token are dropped even then.
  """

  def __init__(
      self,
      tokenizer,
      max_seq_len: int,
      *,
      source: str | None = None,
      mtnt_dir: str | os.PathLike | None = None,
      lang_pair: str = 'en-fr',
      seed: int = 0,
      truncate: bool = False,
      tfds_data_dir: str | None = None,
      prompt_format: str = prompts.DEFAULT,
      both_directions: bool = False,
  ):
    _check_pair(lang_pair)
    if both_directions:
      _check_pair(reverse_pair(lang_pair))
    self.prompt_format = prompts.check(prompt_format)
    self.tokenizer = tokenizer
    self.max_seq_len = max_seq_len
    self.source = _resolve_source(source, mtnt_dir)
    if self.source == 'tfds':
      _check_tfds_pair(lang_pair)
    self.mtnt_dir = mtnt_dir
    self.lang_pair = lang_pair
    self.seed = seed
    self.truncate = truncate
    self.tfds_data_dir = tfds_data_dir
    self.both_directions = both_directions
    self.stats: dict[str, SplitStats] = {}  # Filled as splits are encoded.
    self._encoded: dict[str, TrainingInput] = {}

  def load_pairs(self, split: str) -> list[tuple[str, str]]:
    return self._load_counted(split)[0]

  def _load_counted(self, split):
    return _load(split, self.source, self.mtnt_dir, self.lang_pair, self.tfds_data_dir)

  def encode_pair(self, src: str, dst: str, lang_pair: str | None = None
                  ) -> tuple[np.ndarray, int] | None:
    """(tokens, prompt length) of one example, unpadded; None if it must be dropped."""
    prompt = prompts.prompt_ids(self.tokenizer, src, lang_pair or self.lang_pair,
                                self.prompt_format)
    target = prompts.answer_ids(self.tokenizer, dst, self.prompt_format)
    room = self.max_seq_len - len(prompt)
    if len(target) > room:
      if not self.truncate or room < 1:
        return None
      target = target[:room]
    return np.concatenate([prompt, target]), len(prompt)

  def encode_split(self, split: str) -> TrainingInput:
    """All kept examples of `split` as one [N, max_seq_len] `TrainingInput`."""
    if split in self._encoded:
      return self._encoded[split]
    pairs, malformed = self._load_counted(split)
    stats = SplitStats(malformed=malformed)
    examples = [(s, d, self.lang_pair) for s, d in pairs]
    if self.both_directions and split == 'train':
      # Each pair also as the reverse task, right after it (so that a
      # shuffled epoch holds both); validation stays the one direction.
      back = reverse_pair(self.lang_pair)
      examples = [x for s, d in pairs
                  for x in ((s, d, self.lang_pair), (d, s, back))]
    end_id = prompts.answer_ids(self.tokenizer, '', self.prompt_format)[-1]
    L = self.max_seq_len
    tokens = np.full((len(examples), L), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(examples), L), bool)
    n = 0
    for src, dst, pair in examples:
      encoded = self.encode_pair(src, dst, pair)
      if encoded is None:
        stats.dropped_too_long += 1
        continue
      seq, prompt_len = encoded
      stats.truncated += int(seq[-1] != end_id)
      tokens[n, : len(seq)] = seq
      mask[n, prompt_len : len(seq)] = True
      n += 1
    stats.kept = n
    level = logging.WARNING if stats.dropped_too_long else logging.INFO
    log.log(level, 'MTNT %s %s (max_seq_len=%d): %s', self.lang_pair, split, L, stats)
    self.stats[split] = stats
    self._encoded[split] = TrainingInput(tokens[:n], mask[:n])
    return self._encoded[split]

  def steps_per_epoch(self, batch_size: int, split: str = 'train') -> int:
    return len(self.encode_split(split).input_tokens) // batch_size

  def _permutation(self, n: int, epoch: int) -> np.ndarray:
    # Depends only on (seed, epoch): any step's batch can be recomputed.
    return np.random.default_rng([self.seed, epoch]).permutation(n)

  def get_train_dataset(
      self,
      batch_size: int,
      num_epochs: int | None = 1,
      *,
      start_step: int = 0,
      split: str = 'train',
  ) -> Iterator[TrainingInput]:
    """Shuffled full batches (remainder dropped), epoch after epoch.

    Each epoch is a fresh seeded permutation, so starting at `start_step`
    yields exactly what a fresh iterator yields from that step on (training
    resume). `num_epochs=None` repeats forever.
    """
    data = self.encode_split(split)
    n = len(data.input_tokens)
    spe = n // batch_size
    if spe == 0:
      raise ValueError(f'{split} has {n} examples, fewer than batch_size={batch_size}')
    total = None if num_epochs is None else spe * num_epochs

    def batches():
      step, epoch_seen, perm = start_step, None, None
      while total is None or step < total:
        epoch, b = divmod(step, spe)
        if epoch != epoch_seen:
          epoch_seen, perm = epoch, self._permutation(n, epoch)
        idx = perm[b * batch_size : (b + 1) * batch_size]
        yield TrainingInput(data.input_tokens[idx], data.target_mask[idx])
        step += 1

    return batches()

  def get_validation_dataset(
      self, batch_size: int, split: str = 'valid', *, pad_last: bool = True
  ) -> Iterator[TrainingInput]:
    """Every example once, in file order.

    The last partial batch is filled up with all-pad rows (mask all False,
    so they add nothing to a masked loss) to keep shapes static under jit;
    `pad_last=False` yields it smaller instead.
    """
    data = self.encode_split(split)
    n = len(data.input_tokens)

    def batches():
      for start in range(0, n, batch_size):
        tokens = data.input_tokens[start : start + batch_size]
        mask = data.target_mask[start : start + batch_size]
        short = batch_size - len(tokens)
        if pad_last and short:
          tokens = np.concatenate(
              [tokens, np.full((short, self.max_seq_len), self.tokenizer.pad_id, np.int32)]
          )
          mask = np.concatenate([mask, np.zeros((short, self.max_seq_len), bool)])
        yield TrainingInput(tokens, mask)

    return batches()


def prefetch_to_device(iterator, put, size: int = 2):
  """Yields `put(batch)` (a host->device copy) from a background thread.

  Host-side batching (numpy, packing) and the copy overlap with the device
  step, `size` batches ahead, so the accelerator does not wait for data.
  """
  import queue
  import threading

  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def produce():
    try:
      for batch in iterator:
        q.put(put(batch))
    except BaseException as e:  # Re-raised in the consumer.
      q.put(e)
    q.put(done)

  threading.Thread(target=produce, daemon=True).start()
  while (item := q.get()) is not done:
    if isinstance(item, BaseException):
      raise item
    yield item
