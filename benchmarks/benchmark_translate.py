"""Translation throughput: gemma_mt's Translator vs the tutorial's `Sampler`.

Both translate MTNT `valid.en-fr.tsv` with the same params and prompts
(`[BOS] + "Translate this into French:\\n" + src + "\\n"`), greedy:

  ours      `gemma_mt.translator.Translator`: prefill + on-device while loop,
            bucketed shapes, stops each row at EOS / end of line
  tutorial  gemma 2.0.8's `gemma.sampler.Sampler` with `total_generation_steps`
            as the tutorial calls it, but `return_logits=False` (its default,
            True, keeps a [B, steps, vocab] float32 buffer and is far slower;
            `--tutorial_return_logits` times that): feeds the prompt one token
            per step, runs to EOS or the budget

Reported per batch size: ours on the whole split, and both on the same
sentences (the tutorial's first `--baseline_batches` batches; it recompiles
for every prompt length, so it cannot afford the whole split): sentences/s,
generated tokens/s, the decode step time against the memory-bandwidth floor
(params + KV cache read once per step), the ratio, and whether greedy
outputs agree (ours must be a prefix of the tutorial's, which does not stop
at the end of the line): in bf16 on the timed batches, and in float32 on
`--check_limit` sentences. The tutorial's sampler knows Gemma 1-3 only:
for another family the baseline is skipped, with a note.

  python -m benchmarks.benchmark_translate --checkpoint runs/x/final --batch_sizes 1,8,64,256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import common

HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3


def load_sources(args) -> list[str]:
  from gemma_mt.data.mtnt import read_mtnt_tsv
  pairs, _ = read_mtnt_tsv(Path(args.mtnt_dir) / 'valid' / 'valid.en-fr.tsv')
  return [s for s, _ in pairs]


def tutorial_sampler(cfg, params, tokenizer, cache_length):
  from gemma import sampler as sampler_lib
  return sampler_lib.Sampler(
      transformer=common.tutorial_transformer(cfg),
      vocab=tokenizer.processor, params=params, cache_length=cache_length)


def load_model(args):
  """(config, params, tokenizer); `--random_init`, or a `--model` that is an
  architecture but no released model (e.g. `tiny`), gets random weights:
  speed only (outputs run to the token budget), or smoke tests."""
  from gemma_mt import models, weights
  if args.random_init or (args.checkpoint is None
                          and args.model not in weights.MODELS):
    from gemma_mt.train.state import random_params
    from gemma_mt.weights.embedded import default_tokenizer
    arch = (args.model if args.model not in weights.MODELS
            else weights.spec(args.model).arch)
    cfg = models.from_name(arch)
    tokenizer = default_tokenizer()
    if tokenizer.vocab_size > cfg.vocab_size:
      # Gemma 1's own tokenizer is not available offline; the Gemma 3 one
      # needs a 2% larger vocabulary for gemma_2b.
      print(f'random init: vocab {cfg.vocab_size} -> {tokenizer.vocab_size} '
            'to fit the Gemma 3 tokenizer', flush=True)
      cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    return cfg, random_params(cfg.module()), tokenizer
  pt = weights.load(args.model, args.checkpoint)
  return pt.config, pt.params, pt.tokenizer


def run_ours(translator, sources, bs, max_new_tokens, max_length_ratio=None):
  """(ids, seconds, steps): steps are the tokens of the longest row of each
  device batch (prefill + decode loop), summed over the batches run."""
  ids = []
  steps0 = translator.sampler.loop_steps
  t0 = time.perf_counter()
  for i in range(0, len(sources), bs):
    gen = translator.generate(sources[i:i + bs], max_new_tokens=max_new_tokens,
                              batch_size=bs, max_length_ratio=max_length_ratio)
    ids += gen.token_ids
  dt = time.perf_counter() - t0
  return ids, dt, translator.sampler.loop_steps - steps0


def run_tutorial(sampler, tokenizer, sources, bs, max_new_tokens, return_logits=True):
  from gemma_mt.data.prompts import format_prompt
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
  return bs * cache_len * cfg.kv_bytes_per_token(itemsize)


def timed_ours(translator, sources, bs, max_new_tokens, max_length_ratio=None):
  """One warm pass (compiles every bucket), then the timed one."""
  run_ours(translator, sources, bs, max_new_tokens, max_length_ratio)
  return run_ours(translator, sources, bs, max_new_tokens, max_length_ratio)


def profile_decode(translator, sources, bs, max_new_tokens):
  """Kernel time per decode step of one compiled batch (prefill included)."""
  import tempfile

  import jax
  run_ours(translator, sources, bs, max_new_tokens)  # Compile outside.
  with tempfile.TemporaryDirectory() as tdir:
    with jax.profiler.trace(tdir):
      _, _, steps = run_ours(translator, sources, bs, max_new_tokens)
    return common.trace_summary(tdir, steps=max(steps, 1))


def agreement(ours_ids, tutorial_ids, stop):
  """Rows where ours equals the tutorial's output cut at its first stop."""
  return int(sum(list(map(int, x)) == cut(y, stop)[:len(x)]
                 for x, y in zip(ours_ids, tutorial_ids)))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='gemma3_270m')
  p.add_argument('--checkpoint', default=None)
  p.add_argument('--mtnt_dir', default=common.DEFAULT_MTNT_DIR)
  p.add_argument('--batch_sizes', default='1,8,64,256')
  p.add_argument('--bs1_limit', type=int, default=32, help='sentences for batch 1')
  p.add_argument('--limit', type=int, default=None, help='sentences per run')
  p.add_argument('--max_new_tokens', type=int, default=128)
  p.add_argument('--baseline', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument('--baseline_batches', type=int, default=1,
                 help='batches the tutorial sampler translates per batch size '
                      '(it compiles once per prompt length, ~20 s each)')
  p.add_argument('--baseline_max_batch', type=int, default=64,
                 help='no tutorial run above this batch size')
  p.add_argument('--baseline_min_batch', type=int, default=8,
                 help='no tutorial run below this batch size (batch 1 '
                      'recompiles for every sentence)')
  p.add_argument('--tutorial_return_logits', action='store_true',
                 help="time the tutorial's default call (return_logits=True: "
                      'a [B, steps, vocab] float32 buffer); far slower')
  p.add_argument('--max_length_ratio', type=float, default=None,
                 help='also time ours with this per-row cap (new tokens <= '
                      'ratio x prompt tokens; the CLI default is 3): a '
                      'runaway row then stops early instead of holding its '
                      'batch to --max_new_tokens')
  p.add_argument('--random_init', action='store_true',
                 help='random weights of --model (speed only; e.g. gemma_2b); '
                      'ours then stops at EOS only, as the tutorial does')
  p.add_argument('--profile', type=int, default=0, metavar='B',
                 help='trace one batch of B sentences with jax.profiler and '
                      'print where the GPU time of a decode step goes')
  p.add_argument('--check_limit', type=int, default=32,
                 help='sentences (one batch) for the float32 greedy check')
  p.add_argument('--out', default=None,
                 help='JSON results, rewritten after each batch size')
  p.add_argument('--time_budget', type=float, default=None,
                 help='seconds: no new batch size (or check) starts after it')
  args = p.parse_args()
  budget = common.Budget(args.time_budget)

  import jax
  import jax.numpy as jnp

  from gemma_mt.decoding.postprocess import stop_token_ids
  from gemma_mt.translator import Translator

  cfg, params, tok = load_model(args)
  if args.baseline and (why := common.tutorial_refusal(cfg)):
    print(f'no baseline: {why}', flush=True)
    args.baseline = False
  device = jax.devices()[0].device_kind
  sources = load_sources(args)[:args.limit]
  stop = set(stop_token_ids(tok))
  param_bytes = cfg.matmul_params() * 2  # What a step reads (tables: by row).
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  rows, skipped, check = [], [], None
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  ours = Translator(cfg, bf16, tok, dtype=jnp.bfloat16,
                    batch_size=max(batch_sizes))
  if args.random_init:
    # Random weights emit newline pieces at any point: stop at EOS only,
    # the tutorial's rule, so that both run the same steps.
    from gemma_mt.decoding.sampler import Sampler
    stop = {tok.eos_id}
    ours.sampler = Sampler(ours.model, ours.sampler.params, pad_id=tok.pad_id,
                           stop_ids=sorted(stop), batch_size=max(batch_sizes))

  def save(complete):
    common.write_json(args.out, {
        'rows': rows, 'check': check, 'device': device, 'complete': complete,
        'skipped_batch_sizes': skipped, 'max_new_tokens': args.max_new_tokens})

  def row(impl, bs, ids, dt, steps=None, **kw):
    r = {'impl': impl, 'batch_size': bs, 'sentences': len(ids),
         'seconds': dt, 'sentences_per_s': len(ids) / dt,
         'gen_tokens_per_s': sum(len(x) for x in ids) / dt, **kw}
    if steps:  # Decode steps the device loop ran (longest row per batch).
      floor = (param_bytes + kv_bytes_per_step(cfg, bs, 512, 2)) / HBM_BYTES_PER_S
      r.update(decode_step_ms=1e3 * dt / steps, bandwidth_floor_ms=1e3 * floor)
    rows.append(r)
    print(json.dumps(r), flush=True)
    return r

  for bs in batch_sizes:
    if budget.expired():
      skipped.append(bs)
      continue
    src = sources[:args.bs1_limit] if bs == 1 else sources
    ids, dt, steps = timed_ours(ours, src, bs, args.max_new_tokens)
    full = row('ours', bs, ids, dt, steps, compiles=ours.num_compiles)
    capped = None
    if args.max_length_ratio:
      cids, cdt, csteps = timed_ours(ours, src, bs, args.max_new_tokens,
                                     args.max_length_ratio)
      capped = row('ours_length_cap', bs, cids, cdt, csteps,
                   max_length_ratio=args.max_length_ratio,
                   prefix_of_uncapped=agreement(cids, ids, set()))
    if not (args.baseline and
            args.baseline_min_batch <= bs <= args.baseline_max_batch):
      save(False)
      continue
    # Same sentences, same batches on both sides; both timed compiled (the
    # tutorial's sampler compiles once per prompt length: warm it first).
    bsrc = src[:bs * args.baseline_batches]
    sampler = tutorial_sampler(cfg, bf16, tok, cache_length=1024)
    call = lambda: run_tutorial(sampler, tok, bsrc, bs, args.max_new_tokens,
                                return_logits=args.tutorial_return_logits)
    call()
    tids, tdt = call()
    oids, odt, osteps = timed_ours(ours, bsrc, bs, args.max_new_tokens)
    same = agreement(oids, tids, stop)
    tut = row('tutorial', bs, tids, tdt,
              return_logits=args.tutorial_return_logits)
    sub = row('ours_same_sentences', bs, oids, odt, osteps,
              identical_greedy_bf16=same)
    sub['speedup_vs_tutorial'] = sub['sentences_per_s'] / tut['sentences_per_s']
    for r in (full, capped):
      if r is not None:
        r['speedup_vs_tutorial'] = r['sentences_per_s'] / tut['sentences_per_s']
    save(False)

  if args.profile and not budget.expired():
    profile = profile_decode(ours, sources[:args.profile], args.profile,
                             args.max_new_tokens)
    common.print_trace_summary(f'ours B{args.profile} decode', profile)
    rows.append({'impl': 'ours_profile', 'batch_size': args.profile,
                 'sentences': args.profile, 'profile': profile})
    save(False)

  if args.baseline and args.check_limit and not budget.expired():
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    src, n = sources[:args.check_limit], args.check_limit
    # Full float32 matmuls: on Hopper XLA's default f32 precision is TF32,
    # whose rounding differs between the two implementations.
    with jax.default_matmul_precision('highest'):
      a, _, _ = run_ours(Translator(cfg, f32, tok, dtype=jnp.float32,
                                    batch_size=n), src, n, args.max_new_tokens)
      b, _ = run_tutorial(tutorial_sampler(cfg, f32, tok, 1024), tok, src, n,
                          args.max_new_tokens, return_logits=False)
    check = {'sentences': len(src), 'identical_greedy': agreement(a, b, stop)}

  print(f"\n{'impl':20} {'B':>3} {'sent':>5} {'sent/s':>8} {'gen tok/s':>10} "
        f"{'step ms':>8} {'floor ms':>9} {'vs tutorial':>11}")
  for r in rows:
    if 'sentences_per_s' not in r:
      continue
    print(f"{r['impl']:20} {r['batch_size']:3d} {r['sentences']:5d} "
          f"{r['sentences_per_s']:8.2f} {r['gen_tokens_per_s']:10.0f} "
          f"{r.get('decode_step_ms', float('nan')):8.2f} "
          f"{r.get('bandwidth_floor_ms', float('nan')):9.3f} "
          f"{r.get('speedup_vs_tutorial', float('nan')):10.1f}x")
  if check:
    print(f"greedy outputs identical (float32, ours a prefix of the tutorial's): "
          f"{check['identical_greedy']}/{check['sentences']}")
  if skipped:
    print(f'time budget spent: batch sizes {skipped} not run')
  save(True)


if __name__ == '__main__':
  main()
