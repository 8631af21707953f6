"""MTNT reading, masking, padding, shuffling/resume, bad rows, the TFDS path."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma_mt.data import mtnt as data
from gemma_mt.data.mtnt import MTNTDatasetBuilder, TrainingInput, format_prompt

ROOT = Path(__file__).resolve().parents[2]


def _write_tsv(root: Path, split: str, pair: str, content: bytes) -> Path:
  path = root / split / f'{split}.{pair}.tsv'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  return path


def _rows(pairs):
  return ''.join(f'{i}\t{s}\t{t}\n' for i, (s, t) in enumerate(pairs)).encode()


SMALL = [(f'Sentence number {i}.', f'Phrase numéro {i}.') for i in range(10)]


@pytest.fixture
def small_dir(tmp_path):
  _write_tsv(tmp_path, 'train', 'en-fr', _rows(SMALL))
  _write_tsv(tmp_path, 'valid', 'en-fr', _rows(SMALL[:7]))
  return tmp_path


def test_format_prompt():
  assert format_prompt('Hello') == 'Translate this into French:\nHello\n'
  assert format_prompt('Bonjour', 'fr-en') == 'Translate this into English:\nBonjour\n'
  assert format_prompt('Hi', 'en-ja').startswith('Translate this into Japanese:\n')
  with pytest.raises(ValueError, match='de-fr'):
    format_prompt('Hallo', 'de-fr')


def _check_examples(tokenizer, batch: TrainingInput, pairs, lang_pair='en-fr'):
  """Each row is [BOS] prompt dst [EOS] pad...; the mask covers exactly dst + EOS."""
  for tokens, mask, (src, dst) in zip(batch.input_tokens, batch.target_mask, pairs):
    n = int((tokens != tokenizer.pad_id).sum())
    assert (tokens[n:] == tokenizer.pad_id).all() and not mask[n:].any()
    assert tokens[0] == tokenizer.bos_id and (tokens == tokenizer.bos_id).sum() == 1
    assert tokens[n - 1] == tokenizer.eos_id and mask[n - 1]
    assert tokenizer.decode(tokens[mask]) == dst
    assert tokenizer.decode(tokens[mask][:-1]) == dst  # EOS is the last masked token.
    prompt = tokens[:n][~mask[:n]]
    assert tokenizer.decode(prompt) == format_prompt(src, lang_pair)
    assert mask[len(prompt) : n].all()  # One contiguous target span after the prompt.


def test_masks_line_up_on_mtnt_valid(tokenizer, mtnt_dir):
  builder = MTNTDatasetBuilder(tokenizer, 256, source='dir', mtnt_dir=mtnt_dir)
  pairs = builder.load_pairs('valid')
  batches = list(builder.get_validation_dataset(64))
  st = builder.stats['valid']
  assert st.kept + st.dropped_too_long + st.malformed == 852 and st.truncated == 0
  assert st.kept > 800
  kept = [p for p in pairs if builder.encode_pair(*p) is not None]
  tokens = np.concatenate([b.input_tokens for b in batches])
  mask = np.concatenate([b.target_mask for b in batches])
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape[1] == 256
  _check_examples(tokenizer, TrainingInput(tokens[: len(kept)], mask[: len(kept)]), kept)


def test_other_lang_pair(tokenizer, mtnt_dir):
  builder = MTNTDatasetBuilder(tokenizer, 256, mtnt_dir=mtnt_dir, lang_pair='fr-en')
  batch = next(builder.get_validation_dataset(4))
  pairs = builder.load_pairs('valid')[:4]
  assert pairs[0][0].startswith('Une Perpignanaise')  # fr-en source is French.
  _check_examples(tokenizer, batch, pairs, 'fr-en')
  with pytest.raises(ValueError, match='mtnt/ja-en'):
    MTNTDatasetBuilder(tokenizer, 64, source='tfds', lang_pair='ja-en')


def test_both_directions_adds_the_reverse_task(tokenizer, small_dir):
  """Train holds each pair twice, en->fr then fr->en with its own prompt;
  validation keeps the one direction."""
  one = MTNTDatasetBuilder(tokenizer, 64, mtnt_dir=small_dir)
  both = MTNTDatasetBuilder(tokenizer, 64, mtnt_dir=small_dir,
                            both_directions=True)
  pairs = both.load_pairs('train')
  train = both.encode_split('train')
  assert len(train.input_tokens) == 2 * len(one.encode_split('train').input_tokens)
  forward = TrainingInput(train.input_tokens[0::2], train.target_mask[0::2])
  backward = TrainingInput(train.input_tokens[1::2], train.target_mask[1::2])
  _check_examples(tokenizer, forward, pairs)
  _check_examples(tokenizer, backward, [(d, s) for s, d in pairs], 'fr-en')
  valid = both.encode_split('valid')
  np.testing.assert_array_equal(valid.input_tokens,
                                one.encode_split('valid').input_tokens)


def test_padding_and_drop_counts(tokenizer, tmp_path):
  pairs = [('Hi.', 'Salut.'), ('Thanks a lot.', 'Merci beaucoup.'), ('Long ' * 40, 'Long ' * 40)]
  _write_tsv(tmp_path, 'train', 'en-fr', _rows(pairs))
  builder = MTNTDatasetBuilder(tokenizer, 32, mtnt_dir=tmp_path)
  lengths = [len(builder.encode_pair(*p)[0]) for p in pairs[:2]]
  batch = next(builder.get_validation_dataset(4, split='train'))
  assert builder.stats['train'] == data.SplitStats(kept=2, dropped_too_long=1)
  assert batch.input_tokens.shape == (4, 32)
  for row, n in zip(batch.input_tokens, lengths):
    assert (row[n:] == tokenizer.pad_id).all() and (row[:n] != tokenizer.pad_id).all()
  assert (batch.input_tokens[2:] == tokenizer.pad_id).all() and not batch.target_mask[2:].any()
  # Exactly at the limit is kept; one over is dropped.
  assert MTNTDatasetBuilder(tokenizer, lengths[1], mtnt_dir=tmp_path).encode_pair(*pairs[1]) is not None
  assert MTNTDatasetBuilder(tokenizer, lengths[1] - 1, mtnt_dir=tmp_path).encode_pair(*pairs[1]) is None


def test_truncate_cuts_target_without_eos(tokenizer, tmp_path):
  pairs = [('Short.', 'Court.'), ('A long one.', 'Une phrase ' * 30)]
  _write_tsv(tmp_path, 'train', 'en-fr', _rows(pairs))
  builder = MTNTDatasetBuilder(tokenizer, 40, mtnt_dir=tmp_path, truncate=True)
  enc = builder.encode_split('train')
  assert builder.stats['train'] == data.SplitStats(kept=2, truncated=1)
  long_tokens, long_mask = enc.input_tokens[1], enc.target_mask[1]
  assert (long_tokens != tokenizer.pad_id).all()  # Fills the sequence.
  assert tokenizer.eos_id not in long_tokens.tolist()
  assert 'Une phrase Une' in tokenizer.decode(long_tokens[long_mask])
  # No room for any target token: dropped even with truncate.
  tiny = MTNTDatasetBuilder(tokenizer, 8, mtnt_dir=tmp_path, truncate=True)
  tiny.encode_split('train')
  assert tiny.stats['train'].dropped_too_long == 2


def _order(builder, batch_size, num_epochs, **kw):
  return [b.input_tokens for b in builder.get_train_dataset(batch_size, num_epochs, **kw)]


def test_shuffle_is_seeded_and_resumable(tokenizer, small_dir):
  b0 = MTNTDatasetBuilder(tokenizer, 32, mtnt_dir=small_dir, seed=0)
  b0_again = MTNTDatasetBuilder(tokenizer, 32, mtnt_dir=small_dir, seed=0)
  b1 = MTNTDatasetBuilder(tokenizer, 32, mtnt_dir=small_dir, seed=1)
  first = _order(b0, 3, 3)
  assert len(first) == 9 and b0.steps_per_epoch(3) == 3  # 10 // 3, remainder dropped.
  assert all(b.shape == (3, 32) for b in first)
  assert all(np.array_equal(a, b) for a, b in zip(first, _order(b0_again, 3, 3)))
  assert not all(np.array_equal(a, b) for a, b in zip(first, _order(b1, 3, 3)))
  # Epochs are different permutations, each without repeats.
  epochs = [np.concatenate(first[i : i + 3]) for i in (0, 3, 6)]
  for e in epochs:
    assert len({r.tobytes() for r in e}) == 9
  assert not np.array_equal(epochs[0], epochs[1])
  # Resume from any step gives the remaining batches of a fresh run.
  for k in (1, 3, 7):
    resumed = _order(b0_again, 3, 3, start_step=k)
    assert len(resumed) == 9 - k
    assert all(np.array_equal(a, b) for a, b in zip(first[k:], resumed))
  # Unbounded epochs continue the same sequence.
  forever = b0.get_train_dataset(3, None, start_step=8)
  assert np.array_equal(next(forever).input_tokens, first[8])
  assert next(forever).input_tokens.shape == (3, 32)
  with pytest.raises(ValueError, match='batch_size'):
    b0.get_train_dataset(11, 1)


def test_validation_is_complete_and_ordered(tokenizer, small_dir):
  builder = MTNTDatasetBuilder(tokenizer, 32, mtnt_dir=small_dir)
  padded = list(builder.get_validation_dataset(3))
  assert [b.input_tokens.shape[0] for b in padded] == [3, 3, 3]
  texts = tokenizer.decode_batch(np.concatenate([b.input_tokens for b in padded]))
  assert texts[:7] == [format_prompt(s) + t for s, t in SMALL[:7]]
  assert texts[7:] == ['', '']
  unpadded = list(builder.get_validation_dataset(3, pad_last=False))
  assert [b.input_tokens.shape[0] for b in unpadded] == [3, 3, 1]


def test_real_test_file_malformed_rows(mtnt_dir, caplog):
  path = mtnt_dir / 'test' / 'test.fr-en.tsv'
  with caplog.at_level(logging.WARNING):
    pairs, malformed = data.read_mtnt_tsv(path)
  assert malformed == 1 and len(pairs) == 1021
  assert any('test.fr-en.tsv:987' in r.getMessage() for r in caplog.records)
  assert all('\r' not in s + t and '\t' not in s + t for s, t in pairs)
  # Rows with an empty comment id are still good rows, columns in place.
  assert pairs[6][0].startswith('Même les chèvres') and pairs[6][1].startswith('Even the goats')
  # Independent check against no column shift: the README's train.en-fr is
  # valid.fr-en + test.fr-en with columns swapped and CR / bad row removed.
  valid, _ = data.read_mtnt_tsv(mtnt_dir / 'valid' / 'valid.fr-en.tsv')
  train = data.load_pairs('train', mtnt_dir=mtnt_dir)
  assert [(t, s) for s, t in valid + pairs] == train


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
  content = (
      b'1\tGood one.\tBonne.\r\n'
      b'2\tBad \xff\xfe bytes.\tMauvais.\n'
      b'3\t\tCible sans source.\n'
      b'4\tSource without target.\t   \n'
      b'5\tNo tab here. Pas de tabulation.\n'
      b'6\tExtra\tcolumns\there\n'
      b'\n'
      b'\t Good, no id. \tBonne, sans id.\n'
      b'8\tLast \xc3\xa9 line\tDerni\xc3\xa8re ligne'  # No final newline.
  )
  path = _write_tsv(tmp_path, 'valid', 'en-fr', content)
  with caplog.at_level(logging.WARNING):
    pairs, malformed = data.read_mtnt_tsv(path)
  assert pairs == [('Good one.', 'Bonne.'), ('Good, no id.', 'Bonne, sans id.'),
                   ('Last é line', 'Dernière ligne')]
  assert malformed == 6
  lines = sorted(int(r.getMessage().split(':')[1]) for r in caplog.records if str(path) in r.getMessage())
  assert lines == [2, 3, 4, 5, 6, 7]
  assert any('UTF-8' in r.getMessage() for r in caplog.records)


def test_stats_count_malformed(tokenizer, tmp_path):
  _write_tsv(tmp_path, 'test', 'en-fr', b'1\tOk.\tOk.\n2\tbroken\n3\t\xff\tx\n')
  builder = MTNTDatasetBuilder(tokenizer, 64, mtnt_dir=tmp_path)
  builder.encode_split('test')
  assert builder.stats['test'] == data.SplitStats(kept=1, malformed=2)


def test_missing_file_names_path_and_layout(tokenizer, tmp_path):
  builder = MTNTDatasetBuilder(tokenizer, 64, mtnt_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match=r'valid\.en-fr\.tsv.*<split>/<split>\.<pair>\.tsv'):
    builder.get_validation_dataset(8)
  with pytest.raises(ValueError, match='mtnt_dir'):
    MTNTDatasetBuilder(tokenizer, 64, source='dir')
  with pytest.raises(ValueError, match='split'):
    data.load_pairs('dev', mtnt_dir=tmp_path)


def test_tarball_root_is_accepted(tmp_path):
  _write_tsv(tmp_path / 'MTNT', 'valid', 'en-fr', _rows(SMALL[:2]))
  assert data.load_pairs('valid', mtnt_dir=tmp_path) == SMALL[:2]


def _mtnt_archive(mtnt_dir, dest: Path) -> Path:
  """An MTNT.1.1.tar.gz-shaped archive: MTNT/<split>/<split>.en-fr.tsv.

  The en-fr test split is not on this machine; a few valid rows stand in so
  that the TFDS builder, which reads all three splits, can prepare.
  """
  import tarfile
  valid = (mtnt_dir / 'valid' / 'valid.en-fr.tsv').read_bytes()
  files = {'train': (mtnt_dir / 'train' / 'train.en-fr.tsv').read_bytes(),
           'valid': valid, 'test': b''.join(valid.splitlines(True)[:10])}
  dest.mkdir(parents=True)
  archive = dest / data.MTNT_ARCHIVE
  with tarfile.open(archive, 'w:gz') as tar:
    for split, content in files.items():
      path = dest / 'MTNT' / split / f'{split}.en-fr.tsv'
      path.parent.mkdir(parents=True)
      path.write_bytes(content)
      tar.add(path, arcname=f'MTNT/{split}/{split}.en-fr.tsv')
  return archive


def test_tfds_builder_prepares_a_local_archive(tokenizer, mtnt_dir, tmp_path, monkeypatch):
  """TFDS's own MTNT builder and download manager, offline, on a local archive."""
  pytest.importorskip('tensorflow')
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv('HTTPS_PROXY', 'http://127.0.0.1:9')  # Any download fails at once.
  archive = _mtnt_archive(mtnt_dir, tmp_path / 'release')
  tfds_dir = tmp_path / 'tfds'
  cached = data.place_mtnt_archive(archive, data_dir=tfds_dir)
  assert cached.read_bytes() == archive.read_bytes()

  builder = MTNTDatasetBuilder(tokenizer, 128, tfds_data_dir=str(tfds_dir))
  assert builder.source == 'tfds'
  valid = builder.load_pairs('valid')
  builder.encode_split('valid')
  stats = builder.stats['valid']
  prepared = data.tfds_builder('en-fr', str(tfds_dir)).info.splits
  assert len(valid) + stats.malformed == prepared['valid'].num_examples == 811
  # TFDS's csv reader joins quoted rows, so it keeps 811 of 852 rows; the rows
  # it keeps are the same pairs our own reader gives.
  ours = set(data.load_pairs('valid', mtnt_dir=mtnt_dir))
  assert len(set(valid) & ours) >= 0.9 * len(ours)
  batch = next(builder.get_train_dataset(4, num_epochs=1))
  assert batch.input_tokens.shape == (4, 128)
  train = set(data.load_pairs('train', mtnt_dir=mtnt_dir))
  for row, mask in zip(batch.input_tokens, batch.target_mask):
    target = tokenizer.decode([int(t) for t in row[mask] if t != tokenizer.eos_id])
    assert any(dst == target for _, dst in train)


def test_tfds_offline_without_archive_says_what_to_do(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow')
  pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv('HTTPS_PROXY', 'http://127.0.0.1:9')
  from tensorflow_datasets.core.download import downloader
  monkeypatch.setattr(downloader, 'MAX_RETRIES', 0)  # TFDS retries ~200 s.
  with pytest.raises(ValueError, match=r'TFDS could not prepare mtnt/en-fr in .*'
                     r'--mtnt_dir DIR .*--mtnt_archive MTNT.1.1.tar.gz'):
    data.load_pairs('valid', tfds_data_dir=str(tmp_path))


def test_tfds_missing_says_which_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets.translate.mtnt', None)
  with pytest.raises(ValueError, match=r"gemma_mt\[tfds\].*--mtnt_dir DIR"):
    MTNTDatasetBuilder(None, 64).load_pairs('valid')


def test_core_modules_do_not_import_tensorflow_or_gemma():
  code = (
      'import sys, gemma_mt.data.tokenizer, gemma_mt.data.mtnt, gemma_mt.data.packing, gemma_mt.weights, gemma_mt.translator, gemma_mt.train.loop\n'
      "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'gemma', "
      "'tensorflow_datasets')]\n"
      'assert not bad, bad\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


@pytest.mark.parametrize('fmt', ['chat', 'translategemma'])
def test_turn_formats_mask_the_answer_and_its_end_of_turn(tokenizer, small_dir, fmt):
  """Turn formats: [BOS] <start_of_turn>user … <end_of_turn>\\n<start_of_turn>
  model\\n, then the answer and <end_of_turn> (no EOS), which the mask covers
  exactly; the control pieces are their ids, not spelled out."""
  from gemma_mt.data import prompts
  builder = MTNTDatasetBuilder(tokenizer, 160, mtnt_dir=small_dir, prompt_format=fmt)
  batch = builder.encode_split('valid')
  sot, eot = (tokenizer.processor.PieceToId(p) for p in ('<start_of_turn>', '<end_of_turn>'))
  for tokens, mask, (src, dst) in zip(batch.input_tokens, batch.target_mask, SMALL):
    n = int((tokens != tokenizer.pad_id).sum())
    assert tokens[0] == tokenizer.bos_id and tokens[1] == sot
    assert tokens[n - 1] == eot and tokenizer.eos_id not in tokens
    assert tokenizer.decode(tokens[mask][:-1]) == dst  # answer, then <end_of_turn>
    prompt = tokens[:n][~mask[:n]]
    assert list(tokens[mask]) == list(tokens[len(prompt):n])  # one span
    assert prompt.tolist() == prompts.prompt_ids(tokenizer, src, 'en-fr', fmt).tolist()
    assert (prompt == sot).sum() == 2 and (prompt == eot).sum() == 1
    assert prompt[-3:].tolist() == [sot] + tokenizer.processor.EncodeAsIds('model\n')
  text = prompts.format_prompt('Hi!', 'en-fr', fmt)
  assert text.endswith('Hi!<end_of_turn>\n<start_of_turn>model\n')
  if fmt == 'translategemma':
    assert 'professional English (en) to French (fr) translator' in text
    assert text.split('<end_of_turn>')[0].endswith('into French:\n\n\nHi!')
  with pytest.raises(ValueError, match='unknown prompt format'):
    prompts.format_prompt('Hi', 'en-fr', 'alpaca')
