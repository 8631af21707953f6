"""A per-sentence evaluation report: what people look at to judge a system.

Rows hold source, reference, hypothesis, its sentence chrF (sacreBLEU) and
what it fails at, if anything (`failure`: runaway, copied, off-target);
with a second system, both hypotheses and the chrF difference, sorted by it
(biggest wins of the second system first, its biggest losses last). Written
as TSV or as one self-contained HTML file (no scripts, no network).
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path

from sacrebleu.metrics import CHRF

from gemma_mt import fs
from gemma_mt.eval.metrics import failures


def _failure_names(pairs, hyps, lang_pair) -> list[str]:
  names = [[] for _ in hyps]
  for kind, rows_ in failures(pairs, hyps, lang_pair).items():
    for i in rows_:
      names[i].append(kind.replace('_', '-'))
  return [', '.join(n) for n in names]


def rows(pairs: Sequence[tuple[str, str]], hyps: Sequence[str],
         hyps_b: Sequence[str] | None = None, lang_pair: str = 'en-fr'
         ) -> list[dict]:
  """One dict per sentence (line number from 1), sorted by chrF delta if
  two systems are given, else in input order."""
  chrf = CHRF()
  fail = _failure_names(pairs, hyps, lang_pair)
  fail_b = None if hyps_b is None else _failure_names(pairs, hyps_b, lang_pair)
  out = []
  for i, ((src, ref), hyp) in enumerate(zip(pairs, hyps), start=1):
    r = {'line': i, 'source': src, 'reference': ref, 'hypothesis': hyp,
         'chrf': round(chrf.sentence_score(hyp, [ref]).score, 2),
         'failure': fail[i - 1]}
    if hyps_b is not None:
      hb = hyps_b[i - 1]
      r['hypothesis_b'] = hb
      r['chrf_b'] = round(chrf.sentence_score(hb, [ref]).score, 2)
      r['failure_b'] = fail_b[i - 1]
      r['delta'] = round(r['chrf_b'] - r['chrf'], 2)
    out.append(r)
  if hyps_b is not None:
    out.sort(key=lambda r: (-r['delta'], r['line']))
  return out


def to_tsv(report: list[dict]) -> str:
  buf = io.StringIO()
  if report:
    w = csv.DictWriter(buf, fieldnames=list(report[0]), delimiter='\t',
                       lineterminator='\n', quoting=csv.QUOTE_MINIMAL)
    w.writeheader()
    w.writerows(report)
  return buf.getvalue()


_CSS = ('body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}'
        'td,th{border:1px solid #ccc;padding:4px;vertical-align:top}'
        'th{background:#eee;position:sticky;top:0}.pos{background:#e6ffe6}'
        '.neg{background:#ffe6e6}.fail{background:#fff3d6}'
        'td.n{text-align:right}')


def to_html(report: list[dict], title: str, names=('A', 'B')) -> str:
  cols = list(report[0]) if report else ['line']
  label = {'hypothesis': f'hypothesis ({names[0]})',
           'hypothesis_b': f'hypothesis ({names[1]})',
           'chrf': f'chrF ({names[0]})', 'chrf_b': f'chrF ({names[1]})',
           'failure': f'failure ({names[0]})',
           'failure_b': f'failure ({names[1]})',
           'delta': f'chrF {names[1]} - {names[0]}'}
  e = html.escape
  head = ''.join(f'<th>{e(label.get(c, c))}</th>' for c in cols)
  body = []
  for r in report:
    cls = ''
    if 'delta' in r and r['delta']:
      cls = ' class="pos"' if r['delta'] > 0 else ' class="neg"'
    elif r.get('failure'):
      cls = ' class="fail"'
    cells = ''.join(
        f'<td class="n">{r[c]}</td>' if isinstance(r[c], (int, float))
        else f'<td>{e(str(r[c]))}</td>' for c in cols)
    body.append(f'<tr{cls}>{cells}</tr>')
  return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
          f'<title>{e(title)}</title><style>{_CSS}</style></head><body>'
          f'<h1>{e(title)}</h1><p>{len(report)} sentences</p>'
          f'<table><thead><tr>{head}</tr></thead><tbody>\n'
          + '\n'.join(body) + '\n</tbody></table></body></html>\n')


def write(path: Path, report: list[dict], title: str, names=('A', 'B')) -> None:
  """`.html` or `.tsv` by the file name."""
  path = Path(path)
  text = (to_html(report, title, names) if path.suffix.lower() in ('.html', '.htm')
          else to_tsv(report))
  fs.atomic_write(path, text)
