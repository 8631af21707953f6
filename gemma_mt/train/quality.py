"""Translation quality during training: BLEU/chrF on valid, and `best/`.

Every `eval_bleu_every_n` steps the current weights translate a fixed
subset of the validation split (greedy, the CLI's runaway cap) and are
scored like `gemma_mt.evaluate` (BLEU 13a and intl, chrF, runaways). The
checkpoint with the best `select_by` value is kept in `workdir/best`, with
its scores in `workdir/best.json`; a resumed run reads that record back, so
it keeps the same best. `early_stop_patience` evaluations without a new
best stop the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from gemma_mt import fs, weights
from gemma_mt.decoding.options import DEFAULT_MAX_LENGTH_RATIO, SamplingOptions
from gemma_mt.eval.metrics import evaluate
from gemma_mt.train.config import TrainingConfig
from gemma_mt.translator import Translator

BEST_DIR, BEST_FILE = 'best', 'best.json'

log = logging.getLogger(__name__)


class QualityTracker:
  """Scores the weights it is given and keeps the best of them on disk."""

  def __init__(self, config: TrainingConfig, model_config, tokenizer,
               pairs: list[tuple[str, str]], arch: str, params: Any):
    self.config, self.arch, self.tokenizer = config, arch, tokenizer
    self.pairs = pairs[:config.eval_bleu_sentences]
    self.workdir = Path(config.workdir).absolute()
    self.options = SamplingOptions(max_length_ratio=DEFAULT_MAX_LENGTH_RATIO)
    self.translator = Translator(
        model_config, params, tokenizer, lang_pair=config.lang_pair,
        dtype=jnp.dtype(config.dtype), batch_size=config.eval_bleu_batch_size,
        prompt_format=config.prompt_format)
    self.best = self._read_best()
    self.since_best = 0

  def _read_best(self) -> dict | None:
    """The record of a resumed run's best, if best/ is still what it says:
    present and matching its checksums. Else the record is forgotten, with
    a warning, and the next evaluation sets a new best."""
    path = self.workdir / BEST_FILE
    if not (self.config.resume and path.is_file()):
      return None
    best = self.workdir / BEST_DIR
    try:
      record = json.loads(path.read_text())
      if not best.is_dir():
        raise fs.DamagedError(f'{best} is missing')
      fs.verify_dir(best)
      record[self.config.select_by]  # noqa: B018 (a KeyError if another key)
    except (ValueError, KeyError, OSError) as e:
      log.warning('forgetting the best record of %s: %s; the next evaluation '
                  'sets a new best', path, e)
      return None
    return record

  def score(self, params) -> dict:
    """Scores of `params` (plain, merged weights) on the subset."""
    self.translator.set_params(params)
    _, summary = evaluate(self.translator, self.pairs, self.options)
    keys = ('bleu', 'bleu_intl', 'chrf', 'runaway', 'copied', 'off_target',
            'seconds')
    return {k: summary[k] for k in keys}

  def update(self, step: int, params, scores: dict) -> bool:
    """Keeps `params` as best/ if `scores` beat the best; True if so."""
    key = self.config.select_by
    if self.best is not None and scores[key] <= self.best[key]:
      self.since_best += 1
      return False
    weights.save(self.workdir / BEST_DIR, self.arch, params, self.tokenizer,
                 overwrite=True, prompt_format=self.config.prompt_format)
    self.best = {'step': step, 'select_by': key, **scores}
    fs.atomic_write(self.workdir / BEST_FILE,  # best/ first, then
                    json.dumps(self.best, indent=2) + '\n')  # its record.
    self.since_best = 0
    return True

  def should_stop(self) -> bool:
    p = self.config.early_stop_patience
    return bool(p) and self.since_best >= p
