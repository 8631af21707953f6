"""Gemma's SentencePiece tokenizer, loadable from a `tokenizer.model` or a GGUF.

The embedded checkpoint is a GGUF file with no `tokenizer.model` beside it, so
`from_gguf` rebuilds the SentencePiece model from the GGUF metadata (the recipe
and its pitfalls are in shared/notes/gguf-gemma3-270m.md). Parsing the GGUF
takes ~25 s, hence `default_tokenizer` caches the rebuilt model on disk.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from gemma_mt import gguf_file

TOKENIZER_FILENAME = 'tokenizer.model'


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

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> GemmaTokenizer:
    return cls.from_serialized(model_proto_from_gguf(path))

  def serialized_model_proto(self) -> bytes:
    """The model as bytes; write it as `tokenizer.model` next to checkpoints."""
    return self._sp.serialized_model_proto()

  def save(self, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(self.serialized_model_proto())
    return path

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


def model_proto_from_gguf(path: str | os.PathLike) -> bytes:
  """Rebuild Gemma's SentencePiece ModelProto from GGUF tokenizer metadata."""
  import gguf  # Lazy: only the GGUF path needs it.
  from sentencepiece import sentencepiece_model_pb2 as pb

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'GGUF file not found: {path}')
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # gguf raises bare ValueErrors/struct errors.
    raise ValueError(f'{path} is not a readable GGUF file: {e}') from e

  def field(name):
    f = reader.fields.get(name)
    if f is None:
      raise ValueError(f'{path} has no GGUF metadata key {name!r}')
    return f

  def scalar(name):
    f = field(name)
    return f.parts[f.data[0]].tolist()[0]

  model = bytes(field('tokenizer.ggml.model').parts[-1]).decode()
  if model != 'llama':
    raise ValueError(f'{path}: tokenizer.ggml.model is {model!r}, not SentencePiece')
  tokens_f = field('tokenizer.ggml.tokens')
  tokens = [bytes(tokens_f.parts[i]).decode('utf-8') for i in tokens_f.data]
  scores_f = field('tokenizer.ggml.scores')
  scores = np.concatenate([scores_f.parts[i] for i in scores_f.data]).tolist()
  types_f = field('tokenizer.ggml.token_type')
  types = np.concatenate([types_f.parts[i] for i in types_f.data]).tolist()
  bos, eos = scalar('tokenizer.ggml.bos_token_id'), scalar('tokenizer.ggml.eos_token_id')
  unk = scalar('tokenizer.ggml.unknown_token_id')
  pad = scalar('tokenizer.ggml.padding_token_id')

  proto = pb.ModelProto()
  for i, (piece, score, type_) in enumerate(zip(tokens, scores, types)):
    p = proto.pieces.add()
    p.piece, p.score = piece, score
    # GGUF token types use SentencePiece's enum values (1 normal, 3 control,
    # 4 user-defined, 6 byte); none is marked unknown, but SentencePiece
    # refuses a model without one.
    p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else type_
  ts = proto.trainer_spec
  ts.model_type = pb.TrainerSpec.BPE
  ts.vocab_size = len(tokens)
  ts.byte_fallback = True
  ts.split_digits = True
  # Without the piece names bos_id()/eos_id() return -1.
  ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk, bos, eos, pad
  ts.unk_piece, ts.bos_piece = tokens[unk], tokens[bos]
  ts.eos_piece, ts.pad_piece = tokens[eos], tokens[pad]
  ns = proto.normalizer_spec
  ns.name = 'identity'
  ns.add_dummy_prefix = False
  ns.remove_extra_whitespaces = False
  ns.escape_whitespaces = True
  return proto.SerializeToString()


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(cache_dir: Path) -> GemmaTokenizer:
  path = cache_dir / TOKENIZER_FILENAME
  if not path.exists():
    proto = model_proto_from_gguf(gguf_file.embedded_gguf_path(cache_dir))
    tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
    tmp.write_bytes(proto)
    os.replace(tmp, path)  # Atomic: a half-written model is never seen.
  return GemmaTokenizer.from_file(path)


def default_tokenizer(cache_dir: str | os.PathLike | None = None) -> GemmaTokenizer:
  """The embedded Gemma 3 tokenizer; built from the GGUF once, then cached.

  The cache is `cache_dir`, else $GEMMA_MT_CACHE, else ~/.cache/gemma_mt.
  """
  return _cached_tokenizer(gguf_file.default_cache_dir(cache_dir).resolve())
