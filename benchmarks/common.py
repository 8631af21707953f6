"""What the benchmarks share.

- `tutorial_transformer`: the tutorial's baseline model, gemma 2.0.8's old
  API (`gemma.transformer`), built from a Gemma 1-3 config (run with the
  2.0.8 wheel first on the path, e.g. PYTHONPATH=/tmp/g208:.). That API
  knows Gemma 1-3 only: `tutorial_refusal` says why a config has no
  baseline.
- `Budget`: a wall-clock budget (`--time_budget`) that runs check.
- `write_json`: atomic (re)writes, so results written after each part
  survive a timeout.
- `trace_summary`: where the GPU time of a `jax.profiler` trace went (per
  kernel category, top kernels, GPU idle fraction): the profile evidence
  behind the benchmark tables, printed without TensorBoard.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from pathlib import Path

from gemma_mt.fs import atomic_write

# ../shared/data/mtnt next to the checkout (the layout the project uses).
DEFAULT_MTNT_DIR = str(Path(__file__).resolve().parents[2] / 'shared' / 'data'
                       / 'mtnt')
# The config fields `tutorial_config` maps to gemma 2.0.8's API: those of a
# Gemma 1-3 config, no more (Gemma 4's per-layer inputs, KV sharing, ...
# have no place there) and no fewer.
TUTORIAL_FIELDS = frozenset((
    'vocab_size', 'embed_dim', 'hidden_dim', 'num_heads', 'head_dim',
    'num_kv_heads', 'attention_types', 'query_pre_attn_scalar',
    'final_logit_softcap', 'attn_logits_soft_cap', 'sliding_window_size',
    'use_post_attn_norm', 'use_post_ffw_norm', 'use_qk_norm',
    'transpose_gating_einsum', 'local_rope_base', 'global_rope_base',
    'local_rope_scale', 'global_rope_scale'))


def tutorial_refusal(cfg) -> str | None:
  """Why the tutorial baseline cannot run `cfg`; None if it can."""
  fields = set(cfg.to_dict()) - {'family'}
  if fields == TUTORIAL_FIELDS:
    return None
  odd = sorted(fields ^ TUTORIAL_FIELDS)
  odd = ', '.join(odd[:3] + ['...'] * (len(odd) > 3))
  return (f'the tutorial baseline (gemma 2.0.8) runs Gemma 1-3 only '
          f'({cfg.name() or "this model"} differs in {odd})')


def tutorial_config(cfg, max_cache_length: int | None = None):
  """gemma 2.0.8 `transformer.TransformerConfig` of a Gemma 1-3 config."""
  if why := tutorial_refusal(cfg):
    raise ValueError(why)
  from gemma import modules as g_modules
  from gemma import transformer as transformer_lib

  types = {'global': g_modules.AttentionType.GLOBAL,
           'local': g_modules.AttentionType.LOCAL_SLIDING}
  return transformer_lib.TransformerConfig(
      num_layers=cfg.num_layers, num_embed=cfg.vocab_size,
      embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
      num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      num_kv_heads=cfg.num_kv_heads,
      final_logit_softcap=cfg.final_logit_softcap,
      use_post_attn_norm=cfg.use_post_attn_norm,
      use_post_ffw_norm=cfg.use_post_ffw_norm,
      attention_types=tuple(types[t] for t in cfg.attention_types),
      max_cache_length=max_cache_length,
      attn_logits_soft_cap=cfg.attn_logits_soft_cap,
      sliding_window_size=cfg.sliding_window_size,
      transpose_gating_einsum=cfg.transpose_gating_einsum,
      use_qk_norm=cfg.use_qk_norm,
      local_base_frequency=int(cfg.local_rope_base),
      global_base_frequency=int(cfg.global_rope_base))


def tutorial_transformer(cfg):
  """The tutorial's `gemma.transformer.Transformer` for `cfg`."""
  from gemma import transformer as transformer_lib
  return transformer_lib.Transformer(tutorial_config(cfg))


class Budget:
  """`seconds` of wall clock from now; None = unlimited."""

  def __init__(self, seconds: float | None):
    self.deadline = None if seconds is None else time.time() + seconds

  def left(self) -> float | None:
    return None if self.deadline is None else self.deadline - time.time()

  def expired(self) -> bool:
    return self.deadline is not None and time.time() >= self.deadline


def write_json(path: str | os.PathLike | None, obj) -> None:
  """Writes `obj` to `path` atomically (no-op without a path)."""
  if not path:
    return
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  atomic_write(path, json.dumps(obj, indent=1))


# Kernel name -> category, first match wins (XLA names fusions after their
# root op; cuBLAS/cuDNN kernels carry the library's names).
KERNEL_CATEGORIES = (
    ('attention', re.compile(r'fmha|flash|cudnn|attention', re.I)),
    ('matmul', re.compile(r'gemm|nvjet|cutlass|xmma|cublas|matmul|dot', re.I)),
    ('memcpy/memset', re.compile(r'memcpy|memset', re.I)),
    ('reduce', re.compile(r'reduce|scatter|sort|gather', re.I)),
    ('elementwise', re.compile(r'.')),
)


def kernel_category(name: str) -> str:
  """The `KERNEL_CATEGORIES` category of a GPU kernel name."""
  return next(c for c, rx in KERNEL_CATEGORIES if rx.search(name))


def busy_ns(intervals) -> int:
  """Length of the union of [start, end) intervals."""
  busy, end = 0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      busy += e - s
      end = e
    elif e > end:
      busy += e - end
      end = e
  return busy


def trace_summary(trace_dir, steps: int, top: int = 20) -> dict:
  """GPU kernel time of a `jax.profiler.trace` of `steps` steps, per step.

  Reads the XSpace file with `jax.profiler.ProfileData` (no TensorBoard).
  Kernels are the events on the GPU planes' stream lines; `gpu_busy_ms` is
  the union of their intervals and `gpu_idle_frac` the rest of the span
  from the first kernel to the last.
  """
  from jax.profiler import ProfileData

  files = sorted(Path(trace_dir).rglob('*.xplane.pb'), key=os.path.getmtime)
  if not files:
    return {'error': f'no .xplane.pb under {trace_dir}'}
  data = ProfileData.from_file(str(files[-1]))
  per_kernel = collections.Counter()
  calls = collections.Counter()
  intervals = []
  for plane in data.planes:
    if not plane.name.startswith('/device:GPU'):
      continue
    lines = list(plane.lines)
    streams = [l for l in lines if l.name.startswith('Stream')] or [
        l for l in lines if not l.name.startswith(('XLA', 'Steps', 'Launch'))]
    for line in streams:
      for e in line.events:
        per_kernel[e.name] += e.duration_ns
        calls[e.name] += 1
        intervals.append((e.start_ns, e.end_ns))
  if not intervals:
    return {'error': 'no GPU kernels in the trace'}
  span = max(e for _, e in intervals) - min(s for s, _ in intervals)
  busy = busy_ns(intervals)
  cats = collections.Counter()
  for name, ns in per_kernel.items():
    cats[kernel_category(name)] += ns
  total = sum(per_kernel.values())
  ms = lambda ns: ns / 1e6 / steps  # noqa: E731  (per step)
  return {
      'steps': steps, 'gpu_span_ms': ms(span), 'gpu_busy_ms': ms(busy),
      'gpu_idle_frac': 1 - busy / span if span else None,
      'kernel_ms': ms(total), 'kernels_per_step': sum(calls.values()) / steps,
      'categories_ms': {c: ms(ns) for c, ns in cats.most_common()},
      'top_kernels': [{'name': n[:120], 'ms': ms(ns), 'calls': calls[n] / steps,
                       'category': kernel_category(n)}
                      for n, ns in per_kernel.most_common(top)],
  }


def print_trace_summary(label: str, s: dict) -> None:
  """A `trace_summary` in a few lines: per-step totals, then top kernels."""
  if 'error' in s:
    print(f'[{label}] profile: {s["error"]}')
    return
  cats = ', '.join(f'{c} {v:.1f}' for c, v in s['categories_ms'].items())
  print(f'[{label}] per step: GPU busy {s["gpu_busy_ms"]:.1f} ms of '
        f'{s["gpu_span_ms"]:.1f} (idle {100 * s["gpu_idle_frac"]:.1f}%), '
        f'{s["kernels_per_step"]:.0f} kernels; ms by category: {cats}')
  for k in s['top_kernels'][:12]:
    print(f'    {k["ms"]:7.2f} ms  x{k["calls"]:<5.0f} {k["category"]:12} '
          f'{k["name"][:90]}')
