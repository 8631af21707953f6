"""Scores as the field reports them, and the evaluation loop shared by the
evaluate CLI and in-training BLEU (`train.quality`).

BLEU with sacreBLEU's default tokenizer (13a) and with `tokenize='intl'`
(the MTNT paper's setting), chrF with its defaults, each with its
signature; beside them the outputs that fail outright: runaways
(`postprocess.is_runaway`), copies of the source and off-target text
(`language.judge`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from gemma_mt import fs, language
from gemma_mt.decoding import postprocess
from gemma_mt.decoding.options import SamplingOptions


def score(hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """Corpus BLEU (13a and intl) and chrF, with signatures."""
  out = {}
  for name, metric in (('bleu', BLEU()), ('bleu_intl', BLEU(tokenize='intl')),
                       ('chrf', CHRF())):
    out[name] = round(metric.corpus_score(list(hyps), [list(refs)]).score, 4)
    out[f'{name}_signature'] = str(metric.get_signature())
  return out


CHUNK = 512  # Sentences translated between two writes of the hypotheses, at least.


def failures(pairs: Sequence[tuple[str, str]], hyps: Sequence[str],
             lang_pair: str = 'en-fr') -> dict[str, list[int]]:
  """Indices of the outputs that are runaways, copies of their source, or
  in another language than the target (a copy is not also off-target)."""
  out = {'runaway': [], 'copied': [], 'off_target': []}
  for i, ((src, ref), hyp) in enumerate(zip(pairs, hyps)):
    if postprocess.is_runaway(hyp, ref, src):
      out['runaway'].append(i)
    verdict = language.judge(hyp, src, lang_pair)
    if verdict.copied:
      out['copied'].append(i)
    if verdict.off_target:
      out['off_target'].append(i)
  return out


def evaluate(translator, pairs: Sequence[tuple[str, str]],
             options: SamplingOptions | None = None, *,
             batch_size: int | None = None,
             partial: Path | None = None) -> tuple[list[str], dict]:
  """(hypotheses, summary) of translations of `pairs` (greedy by default).

  `partial`: hypotheses are appended there every CHUNK sentences, so a
  killed evaluation keeps what it translated.
  """
  options = options or SamplingOptions()
  sources = [s for s, _ in pairs]
  refs = [r for _, r in pairs]
  compiles = translator.num_compiles
  ready = translator.sampler.ready_seconds
  t0 = time.perf_counter()
  results = []
  if partial is not None:
    fs.atomic_write(partial, '')
  size = translator.chunk_size(CHUNK)
  for start in range(0, len(sources), size):
    chunk = translator.translate_detailed(sources[start:start + size], options,
                                          batch_size=batch_size)
    results += chunk
    if partial is not None:
      try:
        with partial.open('a', encoding='utf-8') as f:
          f.write(hypothesis_lines(r.text for r in chunk))
      except OSError as e:
        raise fs.failed(partial, e) from e
  seconds = time.perf_counter() - t0
  ready = translator.sampler.ready_seconds - ready
  hyps = [r.text for r in results]
  t1 = time.perf_counter()
  scores = score(hyps, refs)
  by_ref = [postprocess.too_long(h, r) for h, r in zip(hyps, refs)]
  long_ = [b and postprocess.too_long(h, s)
           for h, s, b in zip(hyps, sources, by_ref)]
  loops = [postprocess.repeats_itself(h) for h in hyps]
  failed = failures(pairs, hyps, translator.lang_pair)
  summary = {
      'num_sentences': len(pairs),
      **scores,
      'seconds': round(seconds, 3),
      'sentences_per_second': round(len(pairs) / seconds, 3) if seconds else None,
      'num_compiles': translator.num_compiles - compiles,
      # Of `seconds`: getting decoders ready (loaded from the store, or
      # compiled); the rest is decoding, the guard and detokenising.
      'decoders_ready_seconds': round(ready, 3),
      'runaway': len(failed['runaway']),
      'runaway_too_long': sum(long_),
      'runaway_repeating': sum(loops),
      # 3x the reference but not 3x the source: mostly a reference that is
      # not a translation of its source (misaligned rows), not a runaway.
      'reference_outliers': sum(b and not l and not r
                                for b, l, r in zip(by_ref, long_, loops)),
      'copied': len(failed['copied']),
      'off_target': len(failed['off_target']),
      'hit_max_new_tokens': sum(r.stop_reason == 'max_tokens' for r in results),
      'input_tokens': sum(r.input_tokens for r in results),
      'output_tokens': sum(r.output_tokens for r in results),
      'options': dataclasses.asdict(options),
  }
  summary['scoring_seconds'] = round(time.perf_counter() - t1, 3)
  return hyps, summary


def hypothesis_lines(hyps) -> str:
  # One line each, whatever the text: the file aligns with the references.
  return ''.join(' '.join(h.splitlines()) + '\n' for h in hyps)
