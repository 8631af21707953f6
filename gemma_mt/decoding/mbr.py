"""Minimum-Bayes-risk selection: the candidate the others agree with most.

Given N candidate translations of one source, MBR returns the one with the
highest expected utility, the mean of its sentence chrF (or BLEU) against
each other candidate taken as a pseudo-reference. Utilities are
sacreBLEU's own sentence scores.

The candidates are the n-best of one beam search of width N
(`SamplingOptions(mbr=N)`): deterministic (no seed decides the answer),
one search per sentence, and the n-best already holds the model's most
likely alternatives. Sampled candidates (epsilon / nucleus sampling, which
the literature prefers for large N) are not offered yet.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

UTILITIES = ('chrf', 'bleu')


def _metric(utility: str):
  if utility == 'chrf':
    return CHRF()
  if utility == 'bleu':
    return BLEU(effective_order=True)  # Sentence-level: smoothed orders.
  raise ValueError(f'mbr utility must be one of {UTILITIES}, got {utility!r}')


def expected_utilities(candidates: Sequence[str],
                       utility: str = 'chrf') -> list[float]:
  """Mean utility of each candidate against every other one."""
  metric = _metric(utility)
  n = len(candidates)
  if n == 1:
    return [0.0]
  cache: dict[tuple[str, str], float] = {}
  out = []
  for i, h in enumerate(candidates):
    total = 0.0
    for j, r in enumerate(candidates):
      if i != j:
        if (h, r) not in cache:
          cache[h, r] = metric.sentence_score(h, [r]).score
        total += cache[h, r]
    out.append(total / (n - 1))
  return out


def mbr_select(candidates: Sequence[str], utility: str = 'chrf') -> int:
  """Index of the MBR choice (the first one on ties: the best-scored)."""
  if not candidates:
    raise ValueError('mbr_select needs at least one candidate')
  u = expected_utilities(candidates, utility)
  return max(range(len(u)), key=lambda i: (u[i], -i))
