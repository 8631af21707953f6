"""Evaluation: runaway detector, metrics, and `python -m gemma_mt.evaluate` end to end on a tiny model."""

import json

import pytest

from gemma_mt import evaluate as E
from gemma_mt import translate as T
from test_translate import make_tiny_translator


@pytest.mark.parametrize('text,expected', [
    ("C'est Bonjour, mon nom est Morgane.C'est Bonjour, mon nom est "
     "Morgane.C'est Bonjour, mon nom est Morgane.", True),
    ('a b c d a b c d a b c d', True),
    ('a b c d a b c d', False),                # only twice
    ('la la la la la la', True),               # (la la la la) x3
    ('Je suis là, je suis là, tu es là.', False),
    ('', False),
])
def test_repeats_itself(text, expected):
  assert E.repeats_itself(text) is expected


def test_runaway_by_length():
  assert not E.is_runaway('x' * 30, 'y' * 10)
  assert E.is_runaway('x' * 31, 'y' * 10)
  assert E.is_runaway('xxxx', '')  # empty reference counts as length 1


def test_score_fields_and_signatures():
  s = E.score(['Le chat est sur le tapis.'], ['Le chat est sur le tapis.'])
  assert s['bleu'] == s['bleu_intl'] == s['chrf'] == 100.0
  assert 'tok:13a' in s['bleu_signature'] and 'tok:intl' in s['bleu_intl_signature']
  assert s['chrf_signature'].startswith('nrefs:1')


def test_evaluate_cli_end_to_end(mtnt_dir, tokenizer, tmp_path, monkeypatch, capsys):
  tr = make_tiny_translator(tokenizer)
  monkeypatch.setattr(T, 'build_translator', lambda args: tr)
  out = tmp_path / 'hyp.txt'
  rc = E.main(['--mtnt_dir', str(mtnt_dir), '--limit', '3', '--output',
               str(out), '--max_new_tokens', '6', '--batch_size', '4'])
  assert rc == 0
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary == json.loads(capsys.readouterr().out)
  assert summary['num_sentences'] == 3 and summary['hypotheses'] == str(out)
  assert summary['data_parallel'] is False
  assert summary['data'].endswith('valid/valid.en-fr.tsv')
  for key in ('bleu', 'bleu_intl', 'chrf'):
    assert 0 <= summary[key] <= 100
  assert 'tok:intl' in summary['bleu_intl_signature']
  assert summary['sentences_per_second'] > 0 and summary['num_compiles'] == 1
  assert 0 <= summary['runaway'] <= 3
  assert 0 < summary['output_tokens'] <= 18
  hyps = out.read_text(encoding='utf-8').split('\n')
  assert len(hyps) == 4 and hyps[-1] == ''  # three lines, newline-terminated
  # The same hypotheses as translating directly.
  from gemma_mt import data
  pairs = data.load_pairs('valid', mtnt_dir=mtnt_dir)[:3]
  assert hyps[:3] == tr.translate([s for s, _ in pairs], max_new_tokens=6)


def test_evaluate_cli_errors(tmp_path, capsys):
  assert E.parse_args(['--tfds', '--data_parallel']).data_parallel
  with pytest.raises(SystemExit):
    E.main(['--limit', '3'])  # no data source
  assert '--mtnt_dir' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    E.main(['--tsv', 'x.tsv', '--limit', '0'])
