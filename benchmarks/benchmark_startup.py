"""What a user of the `evaluate` command feels: start-up against decoding.

On one checkpoint and split, `python -m gemma_mt.evaluate` runs as new
processes:

  cold       an empty compile cache: everything traced and compiled
  warm       a new process after it: XLA's cache and the compiled decoders
             (`decoding.executables`) as the first run left them
  store_miss the same with the decoders' store emptied (the first run
             after an upgrade): XLA's cache serves the small array ops, the
             decoders are compiled again, past it, and stored

then, in this process, one `Translator` evaluates the split three times
(the in-process path: nothing to load after the first). For each: the whole
command's wall time, the translating time `evaluate` reports, sentences/s,
generated tokens/s, and the decoders loaded vs compiled. `--random_init`
saves random weights of `--model` first (every row then runs the whole
`--max_new_tokens` budget), so only the tokenizer is needed.

  python -m benchmarks.benchmark_startup --random_init --model gemma3_270m --mtnt_dir DIR --max_new_tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

LOG = re.compile(r'compile cache: decoders (\d+) loaded, (\d+) compiled; '
                 r'XLA (\d+) hits, (\d+) compiled')


def cli_run(name, cmd, cache, out_dir, env):
  """One `evaluate` process: its wall time and what its summary says."""
  out = Path(out_dir) / name
  argv = cmd + ['--compile_cache_dir', str(cache), '--output',
                str(out / 'hyp.txt')]
  t0 = time.perf_counter()
  run = subprocess.run(argv, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - t0
  if run.returncode:
    raise SystemExit(f'{name}: evaluate failed:\n{run.stderr[-3000:]}')
  summary = json.loads((out / 'summary.json').read_text())
  m = LOG.search(run.stderr)
  loaded, built, hits, compiled = map(int, m.groups()) if m else (0,) * 4
  return row(name, wall, summary, loaded=loaded, decoders_compiled=built,
             xla_hits=hits, xla_compiled=compiled)


def row(name, wall, summary, **extra):
  secs = summary['seconds']
  return dict(run=name, wall_s=round(wall, 2), translating_s=secs,
              sentences_per_s=summary['sentences_per_second'],
              generated_tokens_per_s=round(summary['output_tokens'] / secs),
              bleu=summary.get('bleu'),
              # Where the wall time went: the backend and weights, decoders
              # loaded or compiled (within translating), scoring; the rest is
              # the interpreter, imports, reading data and writing outputs.
              setup_s=summary.get('setup_seconds'),
              decoders_ready_s=summary['decoders_ready_seconds'],
              scoring_s=summary['scoring_seconds'], **extra)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', default=None)
  p.add_argument('--random_init', action='store_true')
  p.add_argument('--model', default='gemma3_270m')
  p.add_argument('--mtnt_dir', required=True)
  p.add_argument('--split', default='valid')
  p.add_argument('--limit', type=int, default=None, help='first N pairs only')
  p.add_argument('--max_new_tokens', type=int, default=None)
  p.add_argument('--batch_size', type=int, default=None)
  p.add_argument('--no_guard', action='store_true',
                 help='decode only (random weights: every output is rejected)')
  p.add_argument('--in_process', type=int, default=3,
                 help='evaluations by one Translator (0: skip)')
  p.add_argument('--out', default=None, help='JSON results')
  args = p.parse_args()

  work = Path(tempfile.mkdtemp(prefix='startup-'))
  checkpoint = args.checkpoint
  if args.random_init:
    from benchmarks.benchmark_translate import load_model
    from gemma_mt import weights
    cfg, params, tokenizer = load_model(argparse.Namespace(
        random_init=True, checkpoint=None, model=args.model))
    checkpoint = str(weights.save(work / 'model', cfg, params, tokenizer))
  extra = ['--mtnt_dir', args.mtnt_dir, '--split', args.split]
  if args.limit:
    extra += ['--limit', str(args.limit)]
  if args.max_new_tokens:
    extra += ['--max_new_tokens', str(args.max_new_tokens)]
  if args.no_guard:
    extra += ['--guard', 'false']
  if args.batch_size:
    extra += ['--batch_size', str(args.batch_size)]
  cmd = [sys.executable, '-m', 'gemma_mt.evaluate', '--checkpoint',
         checkpoint, '--model', args.model] + extra
  env = dict(os.environ)
  cache = work / 'cache'
  rows = [cli_run('cold', cmd, cache, work, env),
          cli_run('warm', cmd, cache, work, env)]
  shutil.rmtree(cache / 'executables')
  rows.append(cli_run('store_miss', cmd, cache, work, env))
  common.write_json(args.out, {'rows': rows})

  if args.in_process:
    from gemma_mt.data import mtnt
    from gemma_mt.decoding.options import SamplingOptions
    from gemma_mt.eval import metrics
    from gemma_mt.translator import Translator
    pairs = mtnt.load_pairs(args.split, mtnt_dir=args.mtnt_dir)
    pairs = pairs[:args.limit] if args.limit else pairs
    tr = Translator.from_pretrained(args.model, checkpoint,
                                    **({'batch_size': args.batch_size}
                                       if args.batch_size else {}))
    opts = SamplingOptions(guard=not args.no_guard, **(
        {'max_new_tokens': args.max_new_tokens} if args.max_new_tokens else {}))
    for i in range(args.in_process):
      t0 = time.perf_counter()
      _, summary = metrics.evaluate(tr, pairs, opts)
      rows.append(row(f'in_process_{i + 1}', time.perf_counter() - t0, summary,
                      compiled=summary['num_compiles']))
  best = min((r['translating_s'] for r in rows if r['run'].startswith('in_')),
             default=None)
  print(f'\n{"run":<14}{"wall s":>8}{"transl. s":>10}{"sent/s":>9}'
        f'{"gen tok/s":>11}{"loaded":>8}{"xla hit":>8}{"compiled":>9}'
        f'{"vs in-proc":>11}')
  for r in rows:
    if r.get('setup_s') is not None:
      r['other_s'] = round(r['wall_s'] - r['setup_s'] - r['translating_s']
                           - r['scoring_s'], 2)
    ratio = f'{r["translating_s"] / best:.2f}x' if best else '-'
    print(f'{r["run"]:<14}{r["wall_s"]:>8.2f}{r["translating_s"]:>10.2f}'
          f'{r["sentences_per_s"]:>9.1f}{r["generated_tokens_per_s"]:>11}'
          f'{r.get("loaded", "-"):>8}{r.get("xla_hits", "-"):>8}'
          f'{r.get("decoders_compiled", 0) + r.get("xla_compiled", 0) if "xla_compiled" in r else r["compiled"]:>9}{ratio:>11}')
  print('\nwhere the time went (s): setup, decoders ready, decoding (the rest '
        'of translating), scoring, other')
  for r in rows:
    print(f'{r["run"]:<14}{r.get("setup_s") or 0:>8.2f}{r["decoders_ready_s"]:>8.2f}'
          f'{r["translating_s"] - r["decoders_ready_s"]:>8.2f}{r["scoring_s"]:>8.2f}'
          f'{r.get("other_s", 0):>8.2f}')
  common.write_json(args.out, {'rows': rows, 'args': vars(args)})


if __name__ == '__main__':
  main()
