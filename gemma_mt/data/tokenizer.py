"""Gemma's SentencePiece tokenizer with Gemma's conventions (BOS, EOS, pad).

Built from a `tokenizer.model` file or its bytes; the embedded model's comes
from its GGUF metadata (`weights.embedded.default_tokenizer`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm


class GemmaTokenizer:
  """Thin wrapper over `SentencePieceProcessor` with Gemma's conventions."""

  def __init__(self, processor: spm.SentencePieceProcessor):
    self._sp = processor
    if min(self.pad_id, self.bos_id, self.eos_id) < 0:
      # A -1 id would silently index the last embedding row.
      raise ValueError(
          'SentencePiece model lacks a <pad>/<bos>/<eos> id: '
          f'pad={self.pad_id} bos={self.bos_id} eos={self.eos_id}'
      )

  # Constructors.

  @classmethod
  def from_serialized(cls, model_proto: bytes) -> GemmaTokenizer:
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as e:
      raise ValueError(f'Invalid serialized SentencePiece model: {e}') from e
    return cls(sp)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> GemmaTokenizer:
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'Tokenizer model not found: {path}')
    try:
      return cls.from_serialized(path.read_bytes())
    except ValueError as e:
      raise ValueError(f'{path} is not a valid SentencePiece model: {e}') from e

  def serialized_model_proto(self) -> bytes:
    """The model as bytes; write it as `tokenizer.model` next to checkpoints."""
    return self._sp.serialized_model_proto()

  def save(self, path: str | os.PathLike) -> Path:
    from gemma_mt import fs
    return fs.atomic_write(path, self.serialized_model_proto())

  # Ids.

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    return self._sp

  # Encoding / decoding.

  def tokenize(
      self,
      text: str,
      prefix: str = '',
      suffix: str = '',
      add_bos: bool = True,
      add_eos: bool = True,
  ) -> np.ndarray:
    """`[BOS] + ids(prefix + text + suffix) + [EOS]` as int32."""
    ids = self._sp.EncodeAsIds(prefix + text + suffix)
    if add_bos:
      ids = [self.bos_id] + ids
    if add_eos:
      ids = ids + [self.eos_id]
    return np.asarray(ids, dtype=np.int32)

  def tokenize_batch(self, texts: Iterable[str], **kwargs) -> list[np.ndarray]:
    return [self.tokenize(t, **kwargs) for t in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` up to the first EOS, ignoring padding (and BOS)."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i != self.pad_id and i != self.bos_id:
        out.append(i)
    return self._sp.DecodeIds(out)

  def decode_batch(self, batch: Iterable[Sequence[int]] | np.ndarray) -> list[str]:
    return [self.decode(ids) for ids in batch]
