"""GemmaTokenizer: ids from the notes, round trips on MTNT, decoding, errors, caching."""

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as pb

from gemma_mt.data.tokenizer import GemmaTokenizer
from gemma_mt.weights import embedded, gguf

PROMPT = 'Translate this into French:\nHello, my name is Morgane.\n'
PROMPT_IDS = [40414, 672, 1131, 7830, 236787, 107, 9259, 236764, 1041, 1463, 563, 23570,
              236744, 236761, 107]


def test_special_ids_and_vocab(tokenizer):
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
  assert tokenizer.vocab_size == 262_144
  sp = tokenizer.processor
  assert [sp.PieceToId(p) for p in ('<start_of_turn>', '<end_of_turn>')] == [105, 106]


def test_known_ids(tokenizer):
  ids = tokenizer.tokenize(PROMPT, add_bos=False, add_eos=False)
  assert ids.dtype == np.int32
  assert ids.tolist() == PROMPT_IDS
  full = tokenizer.tokenize('Hello, my name is Morgane.', prefix='Translate this into French:\n',
                            suffix='\n')
  assert full.tolist() == [2] + PROMPT_IDS + [1]


def test_tokenize_batch(tokenizer):
  out = tokenizer.tokenize_batch(['a b', 'Bonjour'], add_eos=False)
  assert [o[0] for o in out] == [2, 2]
  assert [tokenizer.decode(o) for o in out] == ['a b', 'Bonjour']


def _raw_texts(mtnt_dir):
  """Every text column of the valid files, as in the file (no stripping)."""
  texts = []
  for path in sorted((mtnt_dir / 'valid').glob('*.tsv')):
    for line in path.read_text(encoding='utf-8').split('\n'):
      cols = line.rstrip('\r').split('\t')
      if len(cols) == 3:
        texts += cols[1:]
  return texts


def test_round_trip_on_mtnt_valid(tokenizer, mtnt_dir):
  texts = _raw_texts(mtnt_dir)
  assert len(texts) > 3000
  bad = [t for t in texts if tokenizer.decode(tokenizer.tokenize(t)) != t]
  assert bad == []


@pytest.mark.parametrize('text', ['  runs  of   spaces ', 'tab\there', 'émoji 🙂 ✓', '3.14159', '\n\n'])
def test_round_trip_odd_text(tokenizer, text):
  ids = tokenizer.tokenize(text)
  assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
  assert tokenizer.decode(ids) == text


def test_decode_stops_at_eos_and_skips_pad(tokenizer):
  hello = tokenizer.tokenize('Hello', add_bos=False, add_eos=False).tolist()
  world = tokenizer.tokenize(' world', add_bos=False, add_eos=False).tolist()
  assert tokenizer.decode([0, 2] + hello + [0] + world + [1] + hello + [0, 0]) == 'Hello world'
  batch = np.array([[2] + hello + [1, 0], [2] + world + [0, 0]], np.int32)
  assert tokenizer.decode_batch(batch) == ['Hello', ' world']
  assert tokenizer.decode([1] + hello) == ''


def test_serialized_model_follows_recipe(tokenizer):
  proto = pb.ModelProto.FromString(tokenizer.serialized_model_proto())
  assert proto.trainer_spec.model_type == pb.TrainerSpec.BPE
  assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
  ns = proto.normalizer_spec
  assert (ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces) == ('identity', False, False)
  assert proto.pieces[3].piece == '<unk>'
  assert proto.pieces[3].type == pb.ModelProto.SentencePiece.UNKNOWN
  again = GemmaTokenizer.from_serialized(tokenizer.serialized_model_proto())
  assert again.tokenize(PROMPT, add_bos=False, add_eos=False).tolist() == PROMPT_IDS


def test_save_and_from_file(tokenizer, tmp_path):
  path = tokenizer.save(tmp_path / 'ckpt' / 'tokenizer.model')
  loaded = GemmaTokenizer.from_file(path)
  assert loaded.tokenize(PROMPT).tolist() == tokenizer.tokenize(PROMPT).tolist()


def test_missing_and_invalid_files_name_the_path(tmp_path):
  missing = tmp_path / 'nope' / 'tokenizer.model'
  with pytest.raises(FileNotFoundError, match='nope'):
    GemmaTokenizer.from_file(missing)
  with pytest.raises(gguf.GGUFError, match='nope'):
    gguf.tokenizer_from_gguf(tmp_path / 'nope.gguf')
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'not a sentencepiece model')
  with pytest.raises(ValueError, match='garbage.model'):
    GemmaTokenizer.from_file(garbage)
  with pytest.raises(gguf.GGUFError, match='garbage.model'):
    gguf.tokenizer_from_gguf(garbage)
  with pytest.raises(ValueError):
    GemmaTokenizer.from_serialized(b'\x00\x01junk')


def test_default_tokenizer_reads_the_cache(tokenizer, tmp_path, monkeypatch):
  tokenizer.save(tmp_path / 'tokenizer.model')

  def no_gguf(*args, **kwargs):
    raise AssertionError('the GGUF must not be parsed when the cache exists')

  monkeypatch.setattr(embedded, 'embedded_gguf_path', no_gguf)
  monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
  cached = embedded.default_tokenizer()
  assert cached.tokenize(PROMPT).tolist() == tokenizer.tokenize(PROMPT).tolist()
  assert embedded.default_tokenizer(tmp_path) is cached  # Same dir, same object.


def test_cache_dir_resolution(tmp_path, monkeypatch):
  monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / 'env'))
  assert embedded.default_cache_dir() == tmp_path / 'env'
  assert embedded.default_cache_dir(tmp_path / 'arg') == tmp_path / 'arg'
  assert (tmp_path / 'arg').is_dir()


def test_embedded_gguf_path_is_assembled_and_verified(tokenizer):
  # The `tokenizer` fixture has already assembled the file into the cache.
  path = embedded.embedded_gguf_path()
  assert path.is_file() and path.stat().st_size > 200_000_000
  with path.open('rb') as f:
    assert f.read(4) == b'GGUF'
  assert not list(path.parent.glob('*.tmp-*'))
