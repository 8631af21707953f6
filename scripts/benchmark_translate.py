"""Translation throughput: gemma_mt's Translator vs the tutorial's `Sampler`.

Both translate MTNT `valid.en-fr.tsv` with the same params and prompts
(`[BOS] + "Translate this into French:\\n" + src + "\\n"`), greedy:

  ours      `gemma_mt.translate.Translator`: prefill + on-device while loop,
            bucketed shapes, stops each row at EOS / end of line
  tutorial  gemma 2.0.8's `gemma.sampler.Sampler`, called as the tutorial
            does (`total_generation_steps`, default `return_logits=True`):
            feeds the prompt one token per step, runs to the budget

Reported: sentences/s and generated tokens/s per batch size, the decode step
time against the memory-bandwidth floor (params + KV cache read once per
step), and whether greedy outputs agree (ours must be a prefix of the
tutorial's, which does not stop at the end of the line), checked in float32.

  python scripts/benchmark_translate.py --checkpoint runs/x/final --batch_sizes 1,8,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402  (scripts/)

HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3


def load_sources(args) -> list[str]:
  from gemma_mt.data import read_mtnt_tsv
  pairs, _ = read_mtnt_tsv(Path(args.mtnt_dir) / 'valid' / 'valid.en-fr.tsv')
  return [s for s, _ in pairs]


def tutorial_sampler(cfg, params, tokenizer, cache_length):
  from gemma import sampler as sampler_lib
  return sampler_lib.Sampler(
      transformer=bench_common.tutorial_transformer(cfg),
      vocab=tokenizer.processor, params=params, cache_length=cache_length)


def load_model(args):
  """(config, params, tokenizer); a `--model` that is an architecture but no
  released model (e.g. `tiny`) gets random weights, for smoke tests."""
  from gemma_mt import pretrained
  if args.checkpoint is None and args.model not in pretrained.MODELS:
    import jax
    import jax.numpy as jnp

    from gemma_mt import model as model_lib
    from gemma_mt.tokenizer import default_tokenizer
    cfg = model_lib.TransformerConfig.from_name(args.model)
    tok = jnp.ones((1, 1), jnp.int32)
    params = jax.jit(model_lib.Transformer(cfg).init)(
        jax.random.key(0), tok, tok, model_lib.causal_mask(tok != 0))['params']
    return cfg, params, default_tokenizer()
  pt = pretrained.load(args.model, args.checkpoint)
  return pt.config, pt.params, pt.tokenizer


def run_ours(translator, sources, bs, max_new_tokens):
  ids = []
  t0 = time.perf_counter()
  for i in range(0, len(sources), bs):
    gen = translator.generate(sources[i:i + bs], max_new_tokens=max_new_tokens,
                              batch_size=bs)
    ids += gen.token_ids
  dt = time.perf_counter() - t0
  # The device loop runs as many steps as the longest row of each batch.
  steps = sum(max(len(x) for x in ids[i:i + bs]) for i in range(0, len(ids), bs))
  return ids, dt, steps


def run_tutorial(sampler, tokenizer, sources, bs, max_new_tokens, return_logits=True):
  from gemma_mt.data import format_prompt
  ids = []
  t0 = time.perf_counter()
  for i in range(0, len(sources), bs):
    prompts = [format_prompt(s.strip()) for s in sources[i:i + bs]]
    out = sampler(prompts, total_generation_steps=max_new_tokens,
                  return_logits=return_logits)
    ids += [np.asarray(t) for t in out.tokens]
  return ids, time.perf_counter() - t0


def cut(ids, stop_ids):
  """Tutorial output up to and including the first stop token (EOS/newline)."""
  ids = [int(x) for x in ids]
  for j, t in enumerate(ids):
    if t in stop_ids:
      return ids[:j + 1]
  return ids


def kv_bytes_per_step(cfg, bs, cache_len, itemsize):
  return 2 * cfg.num_layers * bs * cache_len * cfg.num_kv_heads * cfg.head_dim * itemsize


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='gemma3_270m')
  p.add_argument('--checkpoint', default=None)
  p.add_argument('--mtnt_dir', default=bench_common.DEFAULT_MTNT_DIR)
  p.add_argument('--batch_sizes', default='1,8,64')
  p.add_argument('--bs1_limit', type=int, default=64, help='sentences for batch 1')
  p.add_argument('--limit', type=int, default=None, help='sentences per run')
  p.add_argument('--max_new_tokens', type=int, default=128)
  p.add_argument('--baseline', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument('--baseline_limit', type=int, default=128,
                 help='sentences the tutorial sampler translates per batch size')
  p.add_argument('--baseline_bs1_limit', type=int, default=16)
  p.add_argument('--check_limit', type=int, default=64,
                 help='sentences for the float32 greedy-equality check')
  p.add_argument('--out', default=None,
                 help='JSON results, rewritten after each batch size')
  p.add_argument('--time_budget', type=float, default=None,
                 help='seconds: no new batch size (or check) starts after it')
  args = p.parse_args()
  budget = bench_common.Budget(args.time_budget)

  import jax
  import jax.numpy as jnp

  from gemma_mt.translate import Translator, stop_token_ids

  cfg, params, tok = load_model(args)
  device = jax.devices()[0].device_kind
  sources = load_sources(args)[:args.limit]
  stop = set(stop_token_ids(tok))
  param_bytes = cfg.num_params() * 2
  rows = []
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  ours = Translator(cfg, bf16, tok, dtype=jnp.bfloat16,
                    batch_size=max(int(b) for b in args.batch_sizes.split(',')))
  skipped = []
  for bs in [int(b) for b in args.batch_sizes.split(',')]:
    if budget.expired():
      skipped.append(bs)
      continue
    src = sources[:args.bs1_limit] if bs == 1 else sources
    run_ours(ours, src[:bs * 2], bs, args.max_new_tokens)  # compile buckets
    run_ours(ours, src, bs, args.max_new_tokens)
    ids, dt, steps = run_ours(ours, src, bs, args.max_new_tokens)
    gen = sum(len(x) for x in ids)
    step_s = dt / max(steps, 1)
    floor = (param_bytes + kv_bytes_per_step(cfg, bs, 512, 2)) / HBM_BYTES_PER_S
    row = {'impl': 'ours', 'batch_size': bs, 'sentences': len(src),
           'sentences_per_s': len(src) / dt, 'gen_tokens_per_s': gen / dt,
           'decode_step_ms': 1e3 * step_s, 'bandwidth_floor_ms': 1e3 * floor,
           'compiles': ours.num_compiles}
    rows.append(row)
    if args.baseline:
      sampler = tutorial_sampler(cfg, bf16, tok, cache_length=1024)
      limit = args.baseline_bs1_limit if bs == 1 else args.baseline_limit
      bsrc = src[:max(bs, min(len(src), limit))]
      # The tutorial's sampler recompiles for every new prompt length: warm
      # it on the same batches first, so both sides are timed compiled.
      run_tutorial(sampler, tok, bsrc, bs, args.max_new_tokens)
      tids, tdt = run_tutorial(sampler, tok, bsrc, bs, args.max_new_tokens)
      rows.append({'impl': 'tutorial', 'batch_size': bs, 'sentences': len(bsrc),
                   'sentences_per_s': len(bsrc) / tdt,
                   'gen_tokens_per_s': sum(len(x) for x in tids) / tdt})
      row['speedup_vs_tutorial'] = row['sentences_per_s'] / rows[-1]['sentences_per_s']
    print(json.dumps(rows[-2:] if args.baseline else rows[-1:]), flush=True)
    bench_common.write_json(args.out, {'rows': rows, 'check': None,
                                       'device': device, 'complete': False})

  check = None
  if args.baseline and args.check_limit and not budget.expired():
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    src = sources[:args.check_limit]
    a, _, _ = run_ours(Translator(cfg, f32, tok, dtype=jnp.float32, batch_size=16),
                       src, 16, args.max_new_tokens)
    b, _ = run_tutorial(tutorial_sampler(cfg, f32, tok, 1024), tok, src, 16,
                        args.max_new_tokens, return_logits=False)
    same = [list(map(int, x)) == cut(y, stop)[:len(x)] for x, y in zip(a, b)]
    check = {'sentences': len(src), 'identical_greedy': int(sum(same))}

  print(f"\n{'impl':9} {'B':>3} {'sent':>5} {'sent/s':>8} {'gen tok/s':>10} "
        f"{'step ms':>8} {'floor ms':>9} {'vs tutorial':>11}")
  for r in rows:
    print(f"{r['impl']:9} {r['batch_size']:3d} {r['sentences']:5d} "
          f"{r['sentences_per_s']:8.2f} {r['gen_tokens_per_s']:10.0f} "
          f"{r.get('decode_step_ms', float('nan')):8.2f} "
          f"{r.get('bandwidth_floor_ms', float('nan')):9.3f} "
          f"{r.get('speedup_vs_tutorial', float('nan')):10.1f}x")
  if check:
    print(f"greedy outputs identical (float32, ours a prefix of the tutorial's): "
          f"{check['identical_greedy']}/{check['sentences']}")
  if skipped:
    print(f'time budget spent: batch sizes {skipped} not run')
  bench_common.write_json(args.out, {'rows': rows, 'check': check,
                                     'device': device, 'complete': True,
                                     'skipped_batch_sizes': skipped})


if __name__ == '__main__':
  main()
