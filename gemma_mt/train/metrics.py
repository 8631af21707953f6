"""Run metrics: JSON lines in workdir/metrics.jsonl, TensorBoard, a plot."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

from gemma_mt import fs

log = logging.getLogger(__name__)


class MetricsWriter:
  """Appends JSON lines to workdir/metrics.jsonl and mirrors to TensorBoard."""

  def __init__(self, workdir: Path):
    self.path = workdir / 'metrics.jsonl'
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / 'tensorboard'))
    except Exception as e:  # TensorBoard is a nicety, never a crash.
      log.warning('no TensorBoard logging: %s', e)
      self.tb = None

  def write(self, split: str, step: int, **values) -> None:
    record = {'split': split, 'step': step, 'time': time.time(), **values}
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(f'{split}/{k}', v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def plot_losses(metrics_path: Path, out: Path) -> Path:
  """Train and validation loss vs step, and validation chrF / BLEU when the
  run translated (`eval_bleu_every_n`), from metrics.jsonl (all runs)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  curves: dict[str, dict[int, float]] = {}
  for line in metrics_path.read_text().splitlines():
    r = json.loads(line)
    for key in ('loss', 'chrf', 'bleu'):
      if key in r:
        name = r['split'] if key == 'loss' else key
        curves.setdefault(name, {})[r['step']] = r[key]
  quality = [k for k in ('chrf', 'bleu') if k in curves]
  fig, axes = plt.subplots(1, 1 + bool(quality), figsize=(7 + 5 * bool(quality), 4),
                           squeeze=False)
  panels = [(axes[0, 0], [k for k in curves if k not in quality],
             'loss (nats / target token)')]
  if quality:
    panels.append((axes[0, 1], quality, 'valid score (sacreBLEU)'))
  for ax, names, ylabel in panels:
    for name in sorted(names):
      points = curves[name]
      xs = sorted(points)
      ax.plot(xs, [points[x] for x in xs],
              marker='o' if len(xs) < 50 else None, label=name)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  fs.atomic_write(out, png.getvalue())
  return out
