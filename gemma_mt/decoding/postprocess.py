"""From generated ids to one clean line of translation, and runaway checks.

The decode loop stops on EOS, `<end_of_turn>` and every newline piece
(`stop_token_ids`). The text is then cut at a custom stop sequence and where
it starts looping (`cut_repetition`), and a chatty preamble ("Here is the
translation:") and quotes wrapping the whole output are dropped
(`clean_translation`). Evaluation counts what is left as a runaway if it is
far longer than both the reference and the source, or still repeats a
phrase (`is_runaway`).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

RUNAWAY_LENGTH_RATIO = 3.0
REPEAT_N, REPEAT_COUNT = 4, 3

_PREAMBLES = [re.compile(p, re.IGNORECASE) for p in (
    r"^(?:sure[,!.]?\s*)?(?:here(?:'s| is)|this is)\s+(?:the|your|a|my)?\s*"
    r"(?:french\s+)?translation(?:\s+(?:in|into|to)\s+french)?\s*[:：]\s*",
    r"^voici\s+(?:la|une|ma|votre)\s+traduction(?:\s+en\s+français)?\s*[:：]\s*",
    r"^(?:translation|traduction|french|français)\s*[:：]\s*",
)]
_QUOTES = {'"': '"', '“': '”', '«': '»', "'": "'", '‘': '’'}


def _strip_quotes(text: str, source: str) -> str:
  text = text.strip()
  if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
    if source.strip()[:1] not in _QUOTES:  # A quoted source stays quoted.
      inner = text[1:-1].strip()
      if text[0] not in inner:  # '"a" and "b"' is not one quoted whole.
        return inner
  return text


def _find_loop(words: list[str], min_words: int = 6,
               max_unit: int = 24) -> tuple[int, int] | None:
  """(start, unit length) of a phrase repeating back to back, or None.

  A loop is a unit of u words repeated at least max(3, ceil(min_words / u))
  times in a row: "de prise de poids, de prise de poids, de prise de poids,"
  is one; "très très" or "ha ha ha" is not.
  """
  for i in range(len(words)):
    for u in range(1, max_unit + 1):
      reps = max(3, -(-min_words // u))
      if i + u * reps > len(words):
        break
      unit = words[i:i + u]
      if all(words[i + k * u:i + (k + 1) * u] == unit for k in range(1, reps)):
        return i, u
  return None


def cut_repetition(text: str, source: str = '') -> str:
  """Keeps one copy of a phrase the model loops on, and drops the rest.

  Small models sometimes fall into a loop instead of ending the sentence
  (the line never ends, so no stop rule fires until the token budget).
  The translation ends where the loop starts. A source that loops itself
  is left alone.
  """
  words = text.split(' ')
  loop = _find_loop(words)
  if loop is None or _find_loop(source.split(' ')) is not None:
    return text
  start, unit = loop
  return ' '.join(words[:start + unit]).rstrip(' ,;')


def clean_translation(text: str, source: str = '',
                      stop_sequences: Sequence[str] = ()) -> tuple[str, bool]:
  """(one-line translation, whether a stop sequence cut it).

  Keeps the first line, cuts at the earliest stop sequence (on the raw
  text, before any other clean-up) and where the text starts looping
  (`cut_repetition`), drops a chatty preamble and quotes around the whole
  output, and strips whitespace.
  """
  lines = text.splitlines()  # '\r' and U+2028 end a line too.
  text = lines[0] if lines else ''
  hits = [i for i in (text.find(s) for s in stop_sequences if s) if i >= 0]
  if hits:
    text = text[:min(hits)]
  text = cut_repetition(text, source)
  for _ in range(2):  # "Sure! Here is the translation: « ... »"
    for pattern in _PREAMBLES:
      text = pattern.sub('', text.strip(), count=1)
    text = _strip_quotes(text, source)
  return text.strip(), bool(hits)


def stop_token_ids(tokenizer) -> list[int]:
  """EOS, <end_of_turn> if the vocabulary has it, and every newline piece."""
  sp = tokenizer.processor
  ids = {tokenizer.eos_id}
  for piece in ('<end_of_turn>', '<turn|>', '<0x0A>'):
    i = sp.PieceToId(piece)
    if i != sp.unk_id():
      ids.add(i)
  ids.update(i for i in range(sp.GetPieceSize()) if '\n' in sp.IdToPiece(i))
  return sorted(ids)


def newline_ids(tokenizer, ids) -> set[int]:
  """The ids among `ids` whose piece holds a newline."""
  sp = tokenizer.processor
  return {i for i in ids if '\n' in sp.IdToPiece(i) or sp.IdToPiece(i) == '<0x0A>'}


def repeats_itself(text: str, n: int = REPEAT_N,
                   min_count: int = REPEAT_COUNT) -> bool:
  """True if some word n-gram occurs at least `min_count` times.

  The evaluation's detector: `cut_repetition` already ends back-to-back
  loops, this also catches a phrase that comes back with text between.
  """
  words = text.split()
  grams = collections.Counter(tuple(words[i:i + n])
                              for i in range(len(words) - n + 1))
  return bool(grams) and max(grams.values()) >= min_count


def too_long(hyp: str, ref: str, ratio: float = RUNAWAY_LENGTH_RATIO) -> bool:
  return len(hyp) > ratio * max(len(ref), 1)


def is_runaway(hyp: str, ref: str, source: str | None = None) -> bool:
  """A looping phrase, or more than 3x the reference's length and, given
  the source, 3x the source's too.

  With the source, a reference that is not a translation of it (MTNT's
  valid split has such misaligned rows: a 90-character source whose
  "reference" is "Hellish Flames : Cool concept !") no longer makes a
  faithful translation count as a runaway: no translation is 3x its
  source, and a runaway is 3x both."""
  long_ = too_long(hyp, ref) and (source is None or too_long(hyp, source))
  return long_ or repeats_itself(hyp)
