"""Decode-step time of one compiled bucket, XLA path vs `fast_decode`.

Random bf16 weights of `--model`, `--batch` random prompts of P/2..P tokens
and an EOS-only stop, so that every row runs `--new_tokens` steps: the time
per step is then a property of the shapes, not of the weights. Both
variants run on the same prompts, best of `--repeats` after a compiling
run. `--profile` traces one more run of the `fast_decode` variant and prints
where the GPU time of a step goes (kernels per step, busy vs idle, top
kernels; see `common.trace_summary`).

  python -m benchmarks.benchmark_decode_step --model gemma3_270m --batch 64 --prompt 64 --new_tokens 128 --profile
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks import common


def time_generate(sampler, prompts, new_tokens, repeats):
  """(best seconds, loop steps per run, outputs); the first run compiles."""
  outs = sampler.generate(prompts, max_new_tokens=new_tokens)
  best, steps = float('inf'), 0
  for _ in range(repeats):
    before = sampler.loop_steps
    t0 = time.perf_counter()
    outs = sampler.generate(prompts, max_new_tokens=new_tokens)
    best = min(best, time.perf_counter() - t0)
    steps = sampler.loop_steps - before
  return best, steps, outs


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='gemma3_270m',
                 help='an architecture of gemma_mt.models (NAMES, TINY)')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--prompt', type=int, default=64, help='prompt bucket P')
  p.add_argument('--new_tokens', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--profile', action='store_true')
  p.add_argument('--out', default=None, help='JSON results')
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from gemma_mt import models
  from gemma_mt.decoding.sampler import Sampler
  from gemma_mt.train.state import random_params

  cfg = models.from_name(args.model)
  params = random_params(cfg.module(param_dtype=jnp.bfloat16))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, min(1000, cfg.vocab_size),
                          rng.integers(args.prompt // 2 + 1, args.prompt + 1))
             for _ in range(args.batch)]
  res = {'device': jax.devices()[0].device_kind, 'model': args.model,
         'batch': args.batch, 'prompt_bucket': args.prompt,
         'new_tokens': args.new_tokens, 'variants': {}}
  outs = {}
  for fast in (False, True):
    sampler = Sampler(cfg.module(dtype=jnp.bfloat16, fast_decode=fast),
                      params, pad_id=0, stop_ids=[1], batch_size=args.batch)
    best, steps, outs[fast] = time_generate(sampler, prompts, args.new_tokens,
                                            args.repeats)
    res['variants'][f'fast_decode={fast}'] = {
        'seconds': best, 'steps': steps, 'ms_per_step': 1e3 * best / steps}
    print(f'{args.model} B{args.batch} P{args.prompt} +{args.new_tokens} '
          f'fast_decode={fast}: {1e3 * best:.1f} ms, {steps} steps, '
          f'{1e3 * best / steps:.3f} ms/step', flush=True)
  # Random weights give near-tied logits: bf16 outputs may part late on.
  res['identical_bf16_outputs'] = sum(
      a.tolist() == b.tolist() for a, b in zip(outs[False], outs[True]))
  print(f"identical bf16 outputs: {res['identical_bf16_outputs']}/{args.batch}")
  if args.profile:
    with tempfile.TemporaryDirectory() as tdir:
      with jax.profiler.trace(tdir):
        sampler.generate(prompts, max_new_tokens=args.new_tokens)
      res['profile_fast_decode'] = common.trace_summary(tdir, steps=steps,
                                                        top=60)
    common.print_trace_summary('fast_decode step', res['profile_fast_decode'])
  common.write_json(args.out, res)


if __name__ == '__main__':
  main()
