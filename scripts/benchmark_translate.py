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
import time
from pathlib import Path

import numpy as np

HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3


def load_sources(args) -> list[str]:
  from gemma_mt.data import read_mtnt_tsv
  pairs, _ = read_mtnt_tsv(Path(args.mtnt_dir) / 'valid' / 'valid.en-fr.tsv')
  return [s for s, _ in pairs]


def tutorial_sampler(cfg, params, tokenizer, cache_length):
  from gemma import modules as g_modules
  from gemma import sampler as sampler_lib
  from gemma import transformer as transformer_lib

  types = {'global': g_modules.AttentionType.GLOBAL,
           'local': g_modules.AttentionType.LOCAL_SLIDING}
  config = transformer_lib.TransformerConfig(
      num_layers=cfg.num_layers, num_embed=cfg.vocab_size,
      embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
      num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      num_kv_heads=cfg.num_kv_heads,
      final_logit_softcap=cfg.final_logit_softcap,
      use_post_attn_norm=cfg.use_post_attn_norm,
      use_post_ffw_norm=cfg.use_post_ffw_norm,
      attention_types=tuple(types[t] for t in cfg.attention_types),
      max_cache_length=None, attn_logits_soft_cap=cfg.attn_logits_soft_cap,
      sliding_window_size=cfg.sliding_window_size,
      transpose_gating_einsum=cfg.transpose_gating_einsum,
      use_qk_norm=cfg.use_qk_norm,
      local_base_frequency=int(cfg.local_rope_base),
      global_base_frequency=int(cfg.global_rope_base))
  return sampler_lib.Sampler(transformer=transformer_lib.Transformer(config),
                             vocab=tokenizer.processor, params=params,
                             cache_length=cache_length)


def run_ours(translator, sources, bs, max_new_tokens):
  from gemma_mt.data import format_prompt  # noqa: F401  (same prompt)
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
  p.add_argument('--mtnt_dir', default=str(Path(__file__).resolve().parents[2]
                                           / 'shared' / 'data' / 'mtnt'))
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
  p.add_argument('--out', default=None)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from gemma_mt import pretrained
  from gemma_mt.translate import Translator, stop_token_ids

  pt = pretrained.load(args.model, args.checkpoint)
  cfg, tok = pt.config, pt.tokenizer
  sources = load_sources(args)[:args.limit]
  stop = set(stop_token_ids(tok))
  param_bytes = cfg.num_params() * 2
  rows = []
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), pt.params)
  ours = Translator(cfg, bf16, tok, dtype=jnp.bfloat16,
                    batch_size=max(int(b) for b in args.batch_sizes.split(',')))
  for bs in [int(b) for b in args.batch_sizes.split(',')]:
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

  check = None
  if args.baseline and args.check_limit:
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), pt.params)
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
  if args.out:
    Path(args.out).write_text(json.dumps({'rows': rows, 'check': check,
                                          'device': jax.devices()[0].device_kind},
                                         indent=1))


if __name__ == '__main__':
  main()
