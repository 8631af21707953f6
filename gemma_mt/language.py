"""Is an output a translation? Copies of the source and off-target text.

A fine-tuned 270M sometimes answers with the English source unchanged, or
with English that is not the source. Both score near zero, and beam search
makes them more frequent (a copy is a very likely sequence). This module
says which outputs fail that way; `evaluate` and in-training BLEU count them
(`copied`, `off_target`), and the `Translator`'s guard avoids them.

Language ID is py3langid (a maintained, pure-Python port of langid.py, 4.5 MB)
restricted to seven languages. Chosen over lingua (292 MB) and pycld2
(unreliable on short text) by accuracy on MTNT's short Reddit lines: among
852 English sources and 852 French references of valid.en-fr it calls 0.2%
of the English French and misses 3.5% of the French (lingua: 0.2% / 3.2%;
pycld2: 0% / 10.4%), and it made the fewest errors on 3,814 train texts
(83, lingua 115, pycld2 228). An output counts as off-target only when the
identifier is at least `CONFIDENCE` sure of another language: that flags 2
of the 852 references (both English left as is) and 802 of the sources.

Some sources need no translation: a URL, a subreddit, a number, or a few
capitalised words the identifier cannot place (a name, "Donald Trump").
Their copies are legitimate, so `needs_translation` is False for them and a
copy of one is neither counted nor avoided. A short capitalised English
phrase the identifier recognises ("Happy Birthday!") still needs one.
"""

from __future__ import annotations

import dataclasses
import functools
import re

LANGUAGES = ('en', 'fr', 'es', 'de', 'it', 'pt', 'nl')
CONFIDENCE = 0.8  # Off-target only when another language is this likely.
NAME_WORDS = 4    # At most this many capitalised words may be a name.

_NOT_WORDS = re.compile(r'https?://\S+|www\.\S+|(?<!\w)/?[ru]/\w+|@\w+')
_WORD = re.compile(r'[^\W\d_]{2,}')


@functools.cache
def _identifier():
  # Built once per process (loading the model takes about a second).
  from py3langid.langid import MODEL_FILE, LanguageIdentifier
  lid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
  lid.set_languages(list(LANGUAGES))
  return lid


def identify(text: str) -> tuple[str, float]:
  """(language code among LANGUAGES, its probability)."""
  lang, prob = _identifier().classify(text)
  return lang, float(prob)


def words(text: str) -> list[str]:
  """Words of two or more letters, URLs, subreddits and handles left out."""
  return _WORD.findall(_NOT_WORDS.sub(' ', text))


def normalize(text: str) -> str:
  """For comparing with the source: case and whitespace ignored."""
  return ' '.join(text.casefold().split())


def needs_translation(source: str, source_lang: str = 'en') -> bool:
  """False for a source with no words, or only a few capitalised words that
  the identifier does not take for `source_lang` (a name)."""
  ws = words(source)
  if not ws:
    return False
  if len(ws) <= NAME_WORDS and all(w[0].isupper() for w in ws):
    lang, prob = identify(source)
    return lang == source_lang and prob >= CONFIDENCE
  return True


def is_copy(output: str, source: str) -> bool:
  """The output is the source, up to case and whitespace."""
  return bool(normalize(output)) and normalize(output) == normalize(source)


def is_off_target(output: str, target: str) -> bool:
  """The output has words, and is confidently in another language."""
  if not words(output):
    return False
  lang, prob = identify(output)
  return lang != target and prob >= CONFIDENCE


@dataclasses.dataclass(frozen=True)
class Verdict:
  """How an output fails to be a translation (both False: it does not)."""

  copied: bool
  off_target: bool

  @property
  def ok(self) -> bool:
    return not (self.copied or self.off_target)


@functools.lru_cache(maxsize=2**16)
def judge(output: str, source: str, lang_pair: str = 'en-fr') -> Verdict:
  """Copied / off-target, for a source that needs translation; a source that
  needs none passes whatever the output (its copy is correct). Cached: the
  guard and the choice among candidates ask about the same texts."""
  src, dst = lang_pair.split('-')
  if not needs_translation(source, src):
    return Verdict(False, False)
  copied = is_copy(output, source)
  return Verdict(copied, not copied and is_off_target(output, dst))
