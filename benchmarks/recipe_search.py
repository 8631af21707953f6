"""Recipe search and decoding table: train a grid, select by dev chrF, decode.

    python -m benchmarks.recipe_search --config configs/mtnt_gemma3_270m.py \
        --mtnt_dir ../shared/data/mtnt --grid grid.json --out results.json

`--grid` is a JSON list of runs, each {"name": ..., **TrainingConfig
overrides}; every run trains with `--eval_bleu_every_n` and keeps its
`best/` by chrF on valid. The winner (best chrF) and the extra `--decode`
checkpoints (names -> dirs, "base" = the untuned model) are then decoded on
all of valid.en-fr with greedy, beam 4, beam 4 + each `--length_penalties`
value, beam MBR `--mbr`, and sampled / pooled MBR at each `--sampled_mbr`,
each with and without the guard against untranslated output. One process: the persistent compilation cache and
in-process executables are shared by all runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import jax

from gemma_mt.decoding.options import DEFAULT_MAX_NEW_TOKENS


def train_grid(base, grid, root: Path, winner: dict | None,
               budget_s: float | None = None) -> list[dict]:
  """Trains each run; one with "inherit": true starts from `winner`'s
  overrides (an earlier grid's best run) and changes what it names."""
  from gemma_mt.train.loop import train_loop
  rows = []
  t0 = time.time()
  for run in grid:
    run = dict(run)
    name = run.pop('name')
    if budget_s is not None and time.time() - t0 > budget_s:
      rows.append({'name': name, 'skipped': f'over --budget_s {budget_s}'})
      print(json.dumps(rows[-1]), flush=True)
      continue
    if run.pop('inherit', False):
      if winner is None:
        raise ValueError(f'{name}: "inherit" needs --previous results')
      run = {**winner['overrides'], **run}
    cfg = dataclasses.replace(base, workdir=str(root / name), **run)
    t1 = time.time()
    try:
      train_loop(cfg)
    except Exception as e:  # One failed run must not lose the others.
      rows.append({'name': name, 'overrides': run,
                   'error': f'{type(e).__name__}: {e}'[:2000]})
      print(json.dumps(rows[-1]), flush=True)
      continue
    best = json.loads((root / name / 'best.json').read_text())
    curve = [json.loads(x) for x in
             (root / name / 'metrics.jsonl').read_text().splitlines()]
    rows.append({'name': name, 'overrides': run, 'best': best,
                 'seconds': round(time.time() - t1, 1),
                 'chrf_curve': [(r['step'], r['chrf']) for r in curve
                                if r['split'] == 'valid_translation']})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def decode_table(checkpoints: dict[str, str | None], pairs, lps, mbr: int,
                 batch_size: int, max_new_tokens: int,
                 sampled: tuple[int, ...] = (16, 32),
                 pooled: tuple[int, ...] = (16, 32)) -> list[dict]:
  """Every checkpoint x decoding, each with and without the guard.

  One decode serves both rows: the guard only re-chooses among candidates
  (and adds epsilon samples to the rows whose candidates it all rejects),
  so `Translator.guard` + `finish` run on the unguarded generation.
  """
  from gemma_mt.decoding.options import DEFAULT_MAX_LENGTH_RATIO, SamplingOptions
  from gemma_mt.eval.metrics import failures, score
  from gemma_mt.translator import Translator
  base = SamplingOptions(max_new_tokens=max_new_tokens, guard=False,
                         max_length_ratio=DEFAULT_MAX_LENGTH_RATIO)
  decodes = [('greedy', base), ('beam4', base.replace(beam_size=4))]
  decodes += [(f'beam4_lp{a}', base.replace(beam_size=4, length_penalty=a))
              for a in lps]
  decodes += [(f'beam_mbr{mbr}', base.replace(mbr=mbr))]
  decodes += [(f'sampled_mbr{n}', base.replace(mbr=n, mbr_candidates='sample'))
              for n in sampled]
  decodes += [(f'pooled_mbr{n}', base.replace(mbr=n, mbr_candidates='both'))
              for n in pooled]
  sources, refs = [s for s, _ in pairs], [r for _, r in pairs]
  rows = []
  for name, ckpt in checkpoints.items():
    tr = Translator.from_pretrained('gemma3_270m', ckpt, batch_size=batch_size)
    for label, opts in decodes:
      try:
        t0 = time.perf_counter()
        prep = tr.prepare(sources, opts)
        gen = tr.decode(prep)
        seconds = time.perf_counter() - t0
        for guard in (False, True):
          t1 = time.perf_counter()
          p = tr.prepare(sources, opts.replace(guard=guard))
          hyps = [t.text for t in tr.finish(p, tr.guard(p, gen))]
          took = seconds + time.perf_counter() - t1
          failed = failures(pairs, hyps, tr.lang_pair)
          rows.append({'checkpoint': name, 'decode': label, 'guard': guard,
                       **score(hyps, refs),
                       **{k: len(v) for k, v in failed.items()},
                       'seconds': round(took, 2),
                       'sentences_per_second': round(len(pairs) / took, 1)})
          print(json.dumps(rows[-1]), flush=True)
      except Exception as e:  # Keep the rest of the table.
        rows.append({'checkpoint': name, 'decode': label,
                     'error': f'{type(e).__name__}: {e}'[:2000]})
        print(json.dumps(rows[-1]), flush=True)
  return rows


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(',') if x)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True)
  p.add_argument('--mtnt_dir', required=True)
  p.add_argument('--grid', default=None, help='JSON file: list of runs')
  p.add_argument('--workdir', default='runs/recipe')
  p.add_argument('--decode', default='{}',
                 help='JSON {name: checkpoint dir or null for the base}')
  p.add_argument('--decode_winner', action='store_true',
                 help='also decode the best run best/ (this grid and --previous)')
  p.add_argument('--previous', action='append', default=[],
                 help='results JSON of an earlier grid (same --workdir): its '
                      'runs compete for the winner; "inherit" runs start '
                      'from its winner')
  p.add_argument('--length_penalties', default='0.6,1.0')
  p.add_argument('--mbr', type=int, default=8, help='beam MBR candidates')
  p.add_argument('--sampled_mbr', default='16,32',
                 help='sampled MBR candidate counts')
  p.add_argument('--pooled_mbr', default='16,32',
                 help='pooled MBR candidate counts (a beam of N/2 + N/2 samples)')
  p.add_argument('--decode_limit', type=int, default=None,
                 help='decode only the first N valid pairs')
  p.add_argument('--batch_size', type=int, default=None,
                 help='decode rows (default: sized by the device memory)')
  p.add_argument('--max_new_tokens', type=int, default=DEFAULT_MAX_NEW_TOKENS,
                 help='decoding budget per sentence (also capped at 3x the '
                      'prompt tokens)')
  p.add_argument('--overrides', default='{}',
                 help='JSON TrainingConfig overrides for every run')
  p.add_argument('--budget_s', type=float, default=None,
                 help='start no new run after this many seconds')
  p.add_argument('--out', required=True)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  cache = Path(args.workdir) / 'xla_cache'
  jax.config.update('jax_compilation_cache_dir', str(cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

  from gemma_mt.data import mtnt as data
  from gemma_mt.train.config import load_config_file
  base = dataclasses.replace(load_config_file(args.config),
                             mtnt_dir=args.mtnt_dir, progress=False,
                             **json.loads(args.overrides))
  root = Path(args.workdir).absolute()
  out = {'device': str(jax.devices()[0].device_kind),
         'jax': jax.__version__, 'base_config': dataclasses.asdict(base)}
  t0 = time.time()
  best = lambda rows: max((r for r in rows if 'best' in r),
                          key=lambda r: r['best']['chrf'])
  earlier = [r for f in args.previous
             for r in json.loads(Path(f).read_text()).get('grid', [])]
  out['grid'] = []
  if args.grid:
    out['grid'] = train_grid(base, json.loads(Path(args.grid).read_text()),
                             root, best(earlier) if earlier else None,
                             args.budget_s)
  if earlier or out['grid']:
    out['winner'] = best(earlier + out['grid'])['name']
  checkpoints = json.loads(args.decode)
  if args.decode_winner:
    checkpoints[f'winner:{out["winner"]}'] = str(root / out['winner'] / 'best')
  if checkpoints:
    root_s = str(root)
    checkpoints = {k: v and v.replace('$ROOT', root_s)
                   for k, v in checkpoints.items()}
    pairs = data.load_pairs('valid', mtnt_dir=args.mtnt_dir)[:args.decode_limit]
    lps = [float(x) for x in args.length_penalties.split(',') if x]
    out['decoding'] = decode_table(checkpoints, pairs, lps, args.mbr,
                                   args.batch_size, args.max_new_tokens,
                                   _ints(args.sampled_mbr), _ints(args.pooled_mbr))
  out['seconds'] = round(time.time() - t0, 1)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
