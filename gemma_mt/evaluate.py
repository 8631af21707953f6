"""Translate a test split and score it: sacreBLEU BLEU, BLEU intl, chrF.

BLEU is reported with sacreBLEU's default tokenizer (13a) and with
`tokenize='intl'`, the MTNT paper's setting; chrF with its defaults; each with
its signature. Also: sentences/s (wall time of the translate calls, compiles
included, their count reported) and runaway outputs, i.e. hypotheses that

* are more than 3x the reference's length in characters, or
* repeat themselves: some word 4-gram occurs 3 or more times (whitespace
  words, case-sensitive). This catches loops like "C'est Bonjour, mon nom
  est Morgane.C'est Bonjour, mon nom est ..." while an ordinary sentence
  almost never repeats a 4-word phrase three times.

Writes hypotheses (one per line, in input order) and a JSON summary. Default
paths are `workdir/eval/<timestamp>-<pid>/{hypotheses.txt,summary.json}`;
they never derive from the data.

`--data_parallel` (as in `gemma_mt.translate`) decodes each batch split over
all local devices (greedy output as on one device, up to float rounding).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from gemma_mt import data

log = logging.getLogger(__name__)

RUNAWAY_LENGTH_RATIO = 3.0
REPEAT_N, REPEAT_COUNT = 4, 3


def repeats_itself(text: str, n: int = REPEAT_N,
                   min_count: int = REPEAT_COUNT) -> bool:
  """True if some word n-gram occurs at least `min_count` times."""
  words = text.split()
  grams = collections.Counter(tuple(words[i:i + n])
                              for i in range(len(words) - n + 1))
  return bool(grams) and max(grams.values()) >= min_count


def too_long(hyp: str, ref: str, ratio: float = RUNAWAY_LENGTH_RATIO) -> bool:
  return len(hyp) > ratio * max(len(ref), 1)


def is_runaway(hyp: str, ref: str) -> bool:
  return too_long(hyp, ref) or repeats_itself(hyp)


def score(hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """Corpus BLEU (13a and intl) and chrF, with signatures."""
  out = {}
  for name, metric in (('bleu', BLEU()), ('bleu_intl', BLEU(tokenize='intl')),
                       ('chrf', CHRF())):
    out[name] = round(metric.corpus_score(list(hyps), [list(refs)]).score, 4)
    out[f'{name}_signature'] = str(metric.get_signature())
  return out


def evaluate(translator, pairs: Sequence[tuple[str, str]], *,
             batch_size: int | None = None, max_new_tokens: int = 256,
             max_length_ratio: float | None = None
             ) -> tuple[list[str], dict]:
  """(hypotheses, summary) of greedy translations of `pairs`."""
  sources = [s for s, _ in pairs]
  refs = [r for _, r in pairs]
  compiles = translator.num_compiles
  t0 = time.perf_counter()
  results = translator.translate_detailed(
      sources, max_new_tokens=max_new_tokens, batch_size=batch_size,
      max_length_ratio=max_length_ratio)
  seconds = time.perf_counter() - t0
  hyps = [r.text for r in results]
  long_ = [too_long(h, r) for h, r in zip(hyps, refs)]
  loops = [repeats_itself(h) for h in hyps]
  summary = {
      'num_sentences': len(pairs),
      **score(hyps, refs),
      'seconds': round(seconds, 3),
      'sentences_per_second': round(len(pairs) / seconds, 3) if seconds else None,
      'num_compiles': translator.num_compiles - compiles,
      'runaway': sum(a or b for a, b in zip(long_, loops)),
      'runaway_too_long': sum(long_),
      'runaway_repeating': sum(loops),
      'hit_max_new_tokens': sum(r.stop_reason == 'max_tokens' for r in results),
      'input_tokens': sum(r.input_tokens for r in results),
      'output_tokens': sum(r.output_tokens for r in results),
      'max_new_tokens': max_new_tokens,
      'max_length_ratio': max_length_ratio,
  }
  return hyps, summary


def default_output_dir() -> Path:
  return Path('workdir') / 'eval' / f'{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}'


def write_hypotheses(path: Path, hyps: Sequence[str]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  # One line each, whatever the text: the file aligns with the references.
  path.write_text(''.join(' '.join(h.splitlines()) + '\n' for h in hyps),
                  encoding='utf-8')


def parse_args(argv=None) -> argparse.Namespace:
  from gemma_mt.translate import add_model_args
  p = argparse.ArgumentParser(prog='python -m gemma_mt.evaluate',
                              description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument('--mtnt_dir', default=None,
                   help='extracted MTNT dir (<dir>/<split>/<split>.<pair>.tsv)')
  src.add_argument('--tfds', action='store_true',
                   help='read mtnt/<pair> from TensorFlow Datasets')
  src.add_argument('--tsv', default=None,
                   help='any MTNT-layout file (id, source, target)')
  p.add_argument('--split', default='valid', choices=data.SPLITS)
  p.add_argument('--limit', type=int, default=None,
                 help='only the first N pairs')
  p.add_argument('--output', default=None,
                 help='hypotheses file (default: workdir/eval/<time>/hypotheses.txt)')
  p.add_argument('--summary', default=None,
                 help='JSON summary (default: summary.json beside --output)')
  add_model_args(p)
  args = p.parse_args(argv)
  if not (args.mtnt_dir or args.tfds or args.tsv):
    p.error('give --mtnt_dir DIR, --tfds or --tsv FILE')
  if args.limit is not None and args.limit < 1:
    p.error('--limit must be >= 1')
  return args


def load_eval_pairs(args) -> tuple[list[tuple[str, str]], str]:
  """(pairs, a description of where they came from)."""
  if args.tsv:
    pairs, bad = data.read_mtnt_tsv(args.tsv)
    where = str(args.tsv)
  else:
    pairs = data.load_pairs(args.split, source='tfds' if args.tfds else 'dir',
                            mtnt_dir=args.mtnt_dir, lang_pair=args.lang_pair)
    where = (f'tfds:mtnt/{args.lang_pair}/{args.split}' if args.tfds else
             str(data.tsv_path(args.mtnt_dir, args.split, args.lang_pair)))
  return pairs[:args.limit] if args.limit else pairs, where


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format='%(asctime)s %(name)s: %(message)s')
  from gemma_mt.translate import build_translator
  args = parse_args(argv)
  pairs, where = load_eval_pairs(args)
  if not pairs:
    log.error('no usable pairs in %s', where)
    return 2
  output = Path(args.output) if args.output else (
      default_output_dir() / 'hypotheses.txt')
  summary_path = Path(args.summary) if args.summary else (
      output.with_name('summary.json'))
  if summary_path.resolve() == output.resolve():
    log.error('--summary and --output must differ')
    return 2
  translator = build_translator(args)
  log.info('translating %d pairs from %s', len(pairs), where)
  try:
    hyps, summary = evaluate(translator, pairs, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens,
                             max_length_ratio=args.max_length_ratio or None)
  except ValueError as e:
    log.error('%s', e)
    return 2
  summary = {'data': where, 'lang_pair': args.lang_pair,
             'model': args.model, 'checkpoint': args.checkpoint,
             'batch_size': args.batch_size,
             'data_parallel': args.data_parallel, **summary,
             'hypotheses': str(output)}
  write_hypotheses(output, hyps)
  summary_path.parent.mkdir(parents=True, exist_ok=True)
  summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False)
                          + '\n', encoding='utf-8')
  log.info('hypotheses: %s; summary: %s', output, summary_path)
  print(json.dumps(summary, indent=2, ensure_ascii=False))
  return 0


if __name__ == '__main__':
  sys.exit(main())
