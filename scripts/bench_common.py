"""Shared by benchmark_train.py and benchmark_translate.py.

- `tutorial_transformer`: the tutorial's baseline model, gemma 2.0.8's old
  API (`gemma.transformer`), built from a `gemma_mt` `TransformerConfig`
  (run with the 2.0.8 wheel first on the path, e.g. PYTHONPATH=/tmp/g208:.).
- `Budget`: a wall-clock budget (`--time_budget`) that runs check.
- `write_json`: atomic (re)writes, so results written after each part
  survive a timeout.

The scripts run as `python scripts/benchmark_*.py`: Python puts scripts/ on
sys.path, so `import bench_common` works from the repo root.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# ../shared/data/mtnt next to the checkout (the layout the project uses).
DEFAULT_MTNT_DIR = str(Path(__file__).resolve().parents[2] / 'shared' / 'data'
                       / 'mtnt')


def tutorial_config(cfg, max_cache_length: int | None = None):
  """gemma 2.0.8 `transformer.TransformerConfig` of a gemma_mt config."""
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
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)
