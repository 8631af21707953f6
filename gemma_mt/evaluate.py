"""`python -m gemma_mt.evaluate`: translate a test split and score it
(`eval.metrics`): sacreBLEU BLEU, BLEU intl, chrF.

BLEU is reported with sacreBLEU's default tokenizer (13a) and with
`tokenize='intl'`, the MTNT paper's setting; chrF with its defaults; each with
its signature. Also: sentences/s (wall time of the translate calls, compiles
included, their count reported) and runaway outputs, i.e. hypotheses that

* are more than 3x the length of both the reference and the source in
  characters (a reference that is not a translation of its source, as in
  some MTNT rows, is counted apart: `reference_outliers`), or
* repeat themselves: some word 4-gram occurs 3 or more times (whitespace
  words, case-sensitive; `postprocess.is_runaway`);

and untranslated outputs: `copied` (the source, up to case and whitespace)
and `off_target` (confidently another language; `gemma_mt.language`).

Writes hypotheses (one per line, in input order) and a JSON summary. Default
paths are `workdir/eval/<timestamp>-<pid>/{hypotheses.txt,summary.json}`;
they never derive from the data.

`--data_parallel` (as in `gemma_mt.translate`) decodes each batch split over
all local devices (greedy output as on one device, up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from gemma_mt import cli, fs, signals
from gemma_mt.data import mtnt as data
from gemma_mt.eval import report
from gemma_mt.eval.metrics import evaluate

log = logging.getLogger(__name__)

def default_output_dir() -> Path:
  return Path('workdir') / 'eval' / f'{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}'


def parse_args(argv=None):
  p = cli.ArgumentParser(prog='python -m gemma_mt.evaluate',
                         description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument('--mtnt_dir', default=None,
                   help='extracted MTNT dir (<dir>/<split>/<split>.<pair>.tsv)')
  src.add_argument('--tfds', action='store_true',
                   help='read mtnt/<pair> from TensorFlow Datasets')
  src.add_argument('--tsv', default=None,
                   help='any MTNT-layout file (id, source, target)')
  p.add_argument('--tfds_data_dir', default=None,
                 help='TFDS data dir (default ~/tensorflow_datasets)')
  p.add_argument('--mtnt_archive', default=None, metavar='FILE',
                 help=f'local {data.MTNT_ARCHIVE} for --tfds when offline')
  p.add_argument('--split', default='valid', choices=data.SPLITS)
  p.add_argument('--limit', type=int, default=None,
                 help='only the first N pairs')
  p.add_argument('--output', default=None,
                 help='hypotheses file (default: workdir/eval/<time>/hypotheses.txt)')
  p.add_argument('--summary', default=None,
                 help='JSON summary (default: summary.json beside --output)')
  p.add_argument('--report', default=None, metavar='FILE',
                 help='per-sentence report: .html (opens in a browser) or .tsv')
  p.add_argument('--compare_checkpoint', default=None, metavar='DIR',
                 help='also translate with this checkpoint; the report shows '
                      'both, sorted by the sentence chrF difference')
  cli.add_model_args(p)
  cli.add_sampling_args(p)
  args = p.parse_args(argv)
  if not (args.mtnt_dir or args.tfds or args.tsv):
    p.error('give --mtnt_dir DIR, --tfds or --tsv FILE')
  if (args.tfds_data_dir or args.mtnt_archive) and not args.tfds:
    p.error('--tfds_data_dir and --mtnt_archive go with --tfds')
  if args.limit is not None and args.limit < 1:
    p.error('--limit must be >= 1')
  for flag in ('tsv', 'mtnt_archive'):
    if getattr(args, flag) and not Path(getattr(args, flag)).is_file():
      p.error(f'--{flag} {getattr(args, flag)}: no such file')
  for flag in ('mtnt_dir', 'compare_checkpoint'):
    if getattr(args, flag) and not Path(getattr(args, flag)).is_dir():
      p.error(f'--{flag} {getattr(args, flag)}: no such directory')
  args.options = cli.sampling_options(args)
  cli.check_model_args(args)
  return args


def load_eval_pairs(args) -> tuple[list[tuple[str, str]], str]:
  """(pairs, a description of where they came from)."""
  if args.tsv:
    pairs, bad = data.read_mtnt_tsv(args.tsv)
    where = str(args.tsv)
  else:
    if args.mtnt_archive:
      data.place_mtnt_archive(args.mtnt_archive, args.lang_pair, args.tfds_data_dir)
    pairs = data.load_pairs(args.split, source='tfds' if args.tfds else 'dir',
                            mtnt_dir=args.mtnt_dir, lang_pair=args.lang_pair,
                            tfds_data_dir=args.tfds_data_dir)
    where = (f'tfds:mtnt/{args.lang_pair}/{args.split}' if args.tfds else
             str(data.tsv_path(args.mtnt_dir, args.split, args.lang_pair)))
  return pairs[:args.limit] if args.limit else pairs, where


def run(argv=None) -> int:
  args = parse_args(argv)
  pairs, where = load_eval_pairs(args)
  if not pairs:
    raise ValueError(f'no usable pairs in {where}')
  output = Path(args.output) if args.output else (
      default_output_dir() / 'hypotheses.txt')
  summary_path = Path(args.summary) if args.summary else (
      output.with_name('summary.json'))
  outputs = {'--output': output, '--summary': summary_path,
             '--report': args.report}
  fs.check_outputs(outputs, {
      '--tsv': args.tsv, '--mtnt_dir': args.mtnt_dir,
      '--checkpoint': args.checkpoint,
      '--compare_checkpoint': args.compare_checkpoint,
      '--tfds_data_dir': args.tfds_data_dir, '--mtnt_archive': args.mtnt_archive})
  for flag, path in outputs.items():  # Before hours of translating, not after.
    if path is not None:
      fs.check_file_output(path, flag)
  with fs.RunLock(output, for_output=True):
    return _evaluate(args, pairs, where, output, summary_path)


def _evaluate(args, pairs, where, output: Path, summary_path: Path) -> int:
  t0 = time.perf_counter()
  translator = cli.build_translator(args)
  setup = time.perf_counter() - t0  # The backend, the weights, their placing.
  translator_rows = translator.sampler.batch_size
  log.info('translating %d pairs from %s, %d rows at a time', len(pairs),
           where, translator_rows)
  partial = fs.partial_path(output)
  hyps_b = None
  try:
    hyps, summary = evaluate(translator, pairs, args.options,
                             batch_size=args.batch_size, partial=partial)
    if args.compare_checkpoint:
      del translator
      args_b = argparse.Namespace(**{**vars(args),
                                     'checkpoint': args.compare_checkpoint})
      hyps_b, summary_b = evaluate(cli.build_translator(args_b), pairs,
                                   args.options, batch_size=args.batch_size)
  except KeyboardInterrupt:
    raise signals.Interrupted(
        f'the hypotheses translated so far are in {partial}; the earlier '
        'outputs are unchanged') from None
  summary = {'data': where, 'lang_pair': args.lang_pair,
             'model': args.model, 'checkpoint': args.checkpoint,
             'batch_size': translator_rows,
             'data_parallel': args.data_parallel,
             'setup_seconds': round(setup, 3), **summary,
             'hypotheses': str(output)}
  if hyps_b is not None:
    summary['compare'] = {'checkpoint': args.compare_checkpoint,
                          **{k: summary_b[k] for k in (
                              'bleu', 'bleu_intl', 'chrf', 'runaway', 'copied',
                              'off_target')}}
  if args.report:
    summary['report'] = args.report
  # The outputs change together: a signal now waits until all are written.
  with signals.StopRequest():
    if args.report:
      names = (args.checkpoint or args.model, args.compare_checkpoint)
      report.write(Path(args.report), report.rows(pairs, hyps, hyps_b,
                                                        args.lang_pair),
                   f'{where}: {len(pairs)} sentences', names)
    os.replace(partial, output)  # Complete: the partial file is the output.
    fs.atomic_write(summary_path, json.dumps(summary, indent=2,
                                            ensure_ascii=False) + '\n')
  log.info('hypotheses: %s; summary: %s', output, summary_path)
  print(json.dumps(summary, indent=2, ensure_ascii=False))
  return 0


def main(argv=None) -> int:
  return cli.main_guard(run, argv)


if __name__ == '__main__':
  sys.exit(main())
