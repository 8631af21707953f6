"""Minimum-Bayes-risk selection: the candidate the others agree with most.

Given N candidate translations of one source, MBR returns the one with the
highest expected utility: the mean of its sentence chrF, BLEU, or their mean
against each other candidate taken as a pseudo-reference. Utilities are
sacreBLEU's sentence scores.

Candidates (`SamplingOptions.mbr_candidates`) are the n-best of a beam of N
(deterministic), N epsilon samples (Freitag et al. 2023: the better pool for
large N; one seed gives one answer), or both pooled. Samples repeat, so the
expected utilities are computed over the distinct candidates, weighted by
how often each was drawn: |distinct|^2 utility calls instead of N^2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.helpers import extract_all_char_ngrams

UTILITIES = ('chrf', 'bleu', 'chrf+bleu')


class _ChrF:
  """Sentence chrF (sacreBLEU's defaults) with each string's character
  n-grams extracted once, not once per pair: with N candidates that is N
  extractions instead of N^2. The match statistics and F-score are
  sacreBLEU's own (tests compare against `CHRF.sentence_score`)."""

  def __init__(self):
    self.metric = CHRF()
    self._ngrams: dict[str, list[Counter]] = {}

  def _grams(self, text: str) -> list[Counter]:
    if text not in self._ngrams:
      self._ngrams[text] = extract_all_char_ngrams(
          text, self.metric.char_order, self.metric.whitespace)
    return self._ngrams[text]

  def __call__(self, hyp: str, ref: str) -> float:
    stats = []
    for h, r in zip(self._grams(hyp), self._grams(ref)):
      stats.extend(self.metric._get_match_statistics(h, r))
    return self.metric._compute_f_score(stats)


class _BLEU:
  def __init__(self):
    self.metric = BLEU(effective_order=True)  # Sentence-level: smoothed orders.

  def __call__(self, hyp: str, ref: str) -> float:
    return self.metric.sentence_score(hyp, [ref]).score


def _utility(name: str):
  if name == 'chrf':
    return _ChrF()
  if name == 'bleu':
    return _BLEU()
  if name == 'chrf+bleu':
    chrf, bleu = _ChrF(), _BLEU()
    return lambda h, r: (chrf(h, r) + bleu(h, r)) / 2
  raise ValueError(f'mbr utility must be one of {UTILITIES}, got {name!r}')


def expected_utilities(candidates: Sequence[str],
                       utility: str = 'chrf') -> list[float]:
  """Mean utility of each candidate against every other one (each draw of
  a repeated candidate counts as one pseudo-reference)."""
  u = _utility(utility)
  n = len(candidates)
  if n == 1:
    return [0.0]
  counts = Counter(candidates)
  distinct = list(counts)
  by_text = {}
  for h in distinct:
    total = sum(m * u(h, r) for r, m in counts.items() if r != h)
    total += (counts[h] - 1) * u(h, h)  # The other draws of h itself.
    by_text[h] = total / (n - 1)
  return [by_text[c] for c in candidates]


def mbr_select(candidates: Sequence[str], utility: str = 'chrf',
               allowed: Sequence[bool] | None = None) -> int:
  """Index of the MBR choice (the first one on ties: the best-scored).

  `allowed`: only these are chosen from and serve as pseudo-references
  (the guard's verdicts: copies of the source would pull the choice towards
  the source). None, or none allowed: all of them.
  """
  if not candidates:
    raise ValueError('mbr_select needs at least one candidate')
  pool = [i for i in range(len(candidates)) if allowed is None or allowed[i]]
  pool = pool or list(range(len(candidates)))
  u = expected_utilities([candidates[i] for i in pool], utility)
  return pool[max(range(len(pool)), key=lambda k: (u[k], -k))]
