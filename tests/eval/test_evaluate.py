"""Evaluation: runaway detector, metrics, and `python -m gemma_mt.evaluate` end to end on a tiny model."""

import json
import os
import signal

from pathlib import Path

import pytest
from support.tiny import make_tiny_translator

from gemma_mt import cli
from gemma_mt import evaluate as E
from gemma_mt.decoding import postprocess
from gemma_mt.decoding.options import SamplingOptions
from gemma_mt.eval import metrics


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
  assert postprocess.repeats_itself(text) is expected


def test_runaway_by_length():
  assert not postprocess.is_runaway('x' * 30, 'y' * 10)
  assert postprocess.is_runaway('x' * 31, 'y' * 10)
  assert postprocess.is_runaway('xxxx', '')  # empty reference counts as length 1
  # Given the source, 3x a reference that is not 3x the source is the
  # reference's fault (a misaligned row), not the output's.
  assert not postprocess.is_runaway('x' * 31, 'y' * 10, 'z' * 11)
  assert postprocess.is_runaway('x' * 31, 'y' * 10, 'z' * 10)
  assert postprocess.is_runaway('a b c d ' * 3, 'y' * 10, 'a b c d ' * 3)  # Loops.


def test_score_fields_and_signatures():
  s = metrics.score(['Le chat est sur le tapis.'], ['Le chat est sur le tapis.'])
  assert s['bleu'] == s['bleu_intl'] == s['chrf'] == 100.0
  assert 'tok:13a' in s['bleu_signature'] and 'tok:intl' in s['bleu_intl_signature']
  assert s['chrf_signature'].startswith('nrefs:1')


def test_evaluate_cli_end_to_end(mtnt_dir, tokenizer, tmp_path, monkeypatch, capsys):
  tr = make_tiny_translator(tokenizer)
  monkeypatch.setattr(cli, 'build_translator', lambda args: tr)
  out = tmp_path / 'hyp.txt'
  rc = E.main(['--mtnt_dir', str(mtnt_dir), '--limit', '3', '--output',
               str(out), '--max_new_tokens', '6', '--batch_size', '4',
               '--guard', 'false'])  # One decoder: the guard's are counted too.
  assert rc == 0
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary == json.loads(capsys.readouterr().out)
  assert summary['num_sentences'] == 3 and summary['hypotheses'] == str(out)
  assert summary['data_parallel'] is False
  assert summary['data'].endswith('valid/valid.en-fr.tsv')
  assert 'tok:intl' in summary['bleu_intl_signature']
  assert summary['sentences_per_second'] > 0 and summary['num_compiles'] == 1
  assert summary['options']['max_new_tokens'] == 6
  hyps = out.read_text(encoding='utf-8').split('\n')
  assert len(hyps) == 4 and hyps[-1] == ''  # three lines, newline-terminated
  # The same hypotheses as translating directly, and the scores of those.
  from gemma_mt.data import mtnt as data
  pairs = data.load_pairs('valid', mtnt_dir=mtnt_dir)[:3]
  refs = [r for _, r in pairs]
  gen = tr.translate_detailed([s for s, _ in pairs], max_new_tokens=6,
                              max_length_ratio=3.0)
  assert hyps[:3] == [t.text for t in gen]
  assert {k: summary[k] for k in ('bleu', 'bleu_intl', 'chrf')} == {
      k: v for k, v in metrics.score(hyps[:3], refs).items()
      if not k.endswith('signature')}
  assert summary['runaway'] == sum(postprocess.is_runaway(h, r, s)
                                   for h, r, (s, _) in zip(hyps, refs, pairs))
  assert summary['reference_outliers'] == sum(
      postprocess.too_long(h, r) and not postprocess.is_runaway(h, r, s)
      for h, r, (s, _) in zip(hyps, refs, pairs))
  assert summary['output_tokens'] == sum(t.output_tokens for t in gen)


def test_evaluate_cli_errors(tmp_path, capsys):
  assert E.parse_args(['--tfds', '--data_parallel']).data_parallel
  assert E.main(['--limit', '3']) == 2  # no data source
  assert '--mtnt_dir' in capsys.readouterr().err
  assert E.main(['--tsv', 'x.tsv', '--limit', '0']) == 2


def test_report_html_and_tsv(mtnt_dir, tokenizer, tmp_path, monkeypatch):
  """--report with --compare_checkpoint: every sentence, both systems,
  sorted by the chrF difference; the HTML parses."""
  import html.parser

  from gemma_mt.eval import report
  trs = {None: make_tiny_translator(tokenizer),
         'other': make_tiny_translator(tokenizer, max_input_tokens=512)}
  trs['other'].set_params(__import__('support.tiny', fromlist=['tiny']).tiny_params(seed=1))
  other = tmp_path / 'other'
  other.mkdir()
  monkeypatch.setattr(cli, 'build_translator', lambda a: trs[
      a.checkpoint and Path(a.checkpoint).name])
  path = tmp_path / 'r.html'
  assert E.main(['--mtnt_dir', str(mtnt_dir), '--limit', '5', '--output',
                 str(tmp_path / 'h.txt'), '--max_new_tokens', '4',
                 '--report', str(path), '--compare_checkpoint', str(other)]) == 0

  class Cells(html.parser.HTMLParser):
    rows, cells, tags = 0, [], []
    def handle_starttag(self, tag, attrs):
      if tag in ('meta', 'br', 'link'):  # Void elements: no end tag.
        return
      self.tags.append(tag)
      self.rows += tag == 'tr'
    def handle_endtag(self, tag):
      assert self.tags.pop() == tag  # Well nested.
    def handle_data(self, data):
      if self.tags and self.tags[-1] == 'td':
        self.cells.append(data)

  p = Cells()
  p.feed(path.read_text(encoding='utf-8'))
  assert p.rows == 6 and not p.tags  # Header + 5 sentences, all closed.
  from gemma_mt.data import mtnt as data
  pairs = data.load_pairs('valid', mtnt_dir=mtnt_dir)[:5]
  assert {s for s, _ in pairs} <= set(p.cells)
  rows = report.rows(pairs, ['a'] * 5, [r for _, r in pairs])
  assert [r['delta'] for r in rows] == sorted((r['delta'] for r in rows),
                                              reverse=True)
  assert all(r['chrf_b'] == 100.0 for r in rows)
  tsv = report.to_tsv(rows).splitlines()
  assert len(tsv) == 6 and tsv[0].split('\t')[:3] == ['line', 'source', 'reference']


def test_unwritable_outputs_fail_before_translating(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(cli, 'build_translator', lambda a: pytest.fail('loaded'))
  (tmp_path / 'dir').mkdir()
  tsv = tmp_path / 'x.tsv'
  tsv.write_text('1\tHello\tBonjour\n')
  assert E.main(['--tsv', str(tsv), '--output', str(tmp_path / 'dir')]) == 2
  assert 'error: --output' in capsys.readouterr().err
  assert E.main(['--tsv', str(tsv), '--output', str(tmp_path / 'o.txt'),
                 '--report', str(tmp_path / 'dir')]) == 2
  assert 'error: --report' in capsys.readouterr().err


def test_killed_evaluation_keeps_the_chunks_it_translated(mtnt_dir, tokenizer,
                                                          tmp_path, monkeypatch,
                                                          capsys):
  tr = make_tiny_translator(tokenizer)
  real, calls = tr.translate_detailed, []

  def dies_on_third_chunk(sources, *a, **kw):
    calls.append(len(sources))
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(sources, *a, **kw)

  monkeypatch.setattr(tr, 'translate_detailed', dies_on_third_chunk)
  monkeypatch.setattr(cli, 'build_translator', lambda args: tr)
  from gemma_mt import translator as translator_lib
  from gemma_mt.eval import metrics
  monkeypatch.setattr(metrics, 'CHUNK', 2)
  monkeypatch.setattr(translator_lib, 'BATCHES_PER_CHUNK', 0)
  out = tmp_path / 'hyp.txt'
  assert E.main(['--mtnt_dir', str(mtnt_dir), '--limit', '5', '--output',
                 str(out), '--max_new_tokens', '4']) == 130
  err = capsys.readouterr().err
  assert f'interrupted: the hypotheses translated so far are in {out}.partial' in err
  assert calls == [2, 2, 1] and not out.exists()
  kept = (tmp_path / 'hyp.txt.partial').read_text(encoding='utf-8').splitlines()
  from gemma_mt.data import mtnt as data
  sources = [s for s, _ in data.load_pairs('valid', mtnt_dir=mtnt_dir)[:4]]
  assert kept == [t.text for t in real(sources, max_new_tokens=4)]


# (what is patched, which call): a signal while loading, translating, loading
# the compared checkpoint, or writing the outputs.
EVAL_SIGNAL_POINTS = {
    'loading the model': ('build_translator', 1),
    'translating chunk 2': ('translate_detailed', 2),
    'loading --compare_checkpoint': ('build_translator', 2),
    'writing the report': ('report', 1),
}


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize('point', EVAL_SIGNAL_POINTS)
def test_a_signal_anywhere_leaves_the_earlier_outputs(
    point, signum, mtnt_dir, tokenizer, tmp_path, monkeypatch, capsys, default_sigint):
  """Before the outputs are written, a signal is exit 130 in one line and
  every earlier output is byte-for-byte as it was; once they are being
  written, it waits, and all of them are new."""
  from gemma_mt.eval import report
  tr = make_tiny_translator(tokenizer)
  what, at = EVAL_SIGNAL_POINTS[point]
  calls = {'build_translator': 0, 'translate_detailed': 0, 'report': 0}

  def hook(name, real):
    def call(*a, **kw):
      calls[name] += 1
      if name == what and calls[name] == at:
        os.kill(os.getpid(), signum)
      return real(*a, **kw)
    return call

  monkeypatch.setattr(cli, 'build_translator',
                      hook('build_translator', lambda args: tr))
  monkeypatch.setattr(tr, 'translate_detailed',
                      hook('translate_detailed', tr.translate_detailed))
  monkeypatch.setattr(report, 'write', hook('report', report.write))
  from gemma_mt import translator as translator_lib
  from gemma_mt.eval import metrics
  monkeypatch.setattr(metrics, 'CHUNK', 2)
  monkeypatch.setattr(translator_lib, 'BATCHES_PER_CHUNK', 0)
  (tmp_path / 'other').mkdir()
  outs = {'--output': tmp_path / 'hyp.txt', '--summary': tmp_path / 's.json',
          '--report': tmp_path / 'r.tsv'}
  for p in outs.values():
    p.write_text(f'earlier {p.name}\n')
  argv = ['--mtnt_dir', str(mtnt_dir), '--limit', '5', '--max_new_tokens', '4',
          '--compare_checkpoint', str(tmp_path / 'other')]
  argv += [x for flag, p in outs.items() for x in (flag, str(p))]
  code = E.main(argv)
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  changed = {p.name for p in outs.values()
             if p.read_text() != f'earlier {p.name}\n'}
  if point == 'writing the report':
    assert code == 0 and changed == {'hyp.txt', 's.json', 'r.tsv'}
    return
  assert code == 130 and not changed
  lines = [l for l in err.splitlines() if l.startswith('interrupted')]
  assert len(lines) == 1, err
  assert not list(tmp_path.glob('.*tmp*'))


def test_summary_counts_untranslated_outputs(mtnt_dir, tokenizer, monkeypatch):
  """`copied` and `off_target` in the summary, recomputed here from the
  hypotheses; and the report marks those rows."""
  from gemma_mt import language
  from gemma_mt.data import mtnt as data
  from gemma_mt.eval import report
  tr = make_tiny_translator(tokenizer)
  pairs = data.load_pairs('valid', mtnt_dir=mtnt_dir)[:6]
  real = tr.translate_detailed

  def some_untranslated(sources, *a, **kw):  # Copies and English, as a
    out = real(sources, *a, **kw)             # weak model writes them.
    for k, t in enumerate(out):
      if k % 3 == 0:
        t.text = sources[k]
      elif k % 3 == 1:
        t.text = 'This is an English sentence about the thread.'
    return out

  monkeypatch.setattr(tr, 'translate_detailed', some_untranslated)
  hyps, summary = metrics.evaluate(tr, pairs, SamplingOptions(guard=False))
  verdicts = [language.judge(h, s) for h, (s, _) in zip(hyps, pairs)]
  assert summary['copied'] == sum(v.copied for v in verdicts) >= 1
  assert summary['off_target'] == sum(v.off_target for v in verdicts) >= 1
  rows = report.rows(pairs, hyps)
  marked = [r['line'] - 1 for r in rows if r['failure']]
  assert marked == [i for i, v in enumerate(verdicts) if not v.ok] or any(
      'runaway' in r['failure'] for r in rows)
