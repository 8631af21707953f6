"""Prompt formats: how a source sentence is put to the model, and how the
answer ends. One definition serves the dataset builder (prompt, then the
answer the loss is counted on) and translation (the prompt alone).

* `plain`: the tutorial's `Translate this into French:\\n<src>\\n`; the answer
  ends with EOS.
* `chat`: Gemma's turn format around the plain instruction; the answer ends
  with `<end_of_turn>`.
* `translategemma`: TranslateGemma's user turn (its chat template's text);
  the answer ends with `<end_of_turn>`.

`<start_of_turn>` / `<end_of_turn>` are control pieces that SentencePiece
never produces from text, so `encode` splits them out and inserts their ids
(Gemma 4's tokenizer spells them `<|turn>` / `<turn|>`: same roles).
"""

from __future__ import annotations

import re

import numpy as np

FORMATS = ('plain', 'chat', 'translategemma')
DEFAULT = 'plain'
START_OF_TURN, END_OF_TURN = '<start_of_turn>', '<end_of_turn>'
LANGUAGE_NAMES = {'en': 'English', 'fr': 'French', 'ja': 'Japanese'}
LANG_PAIRS = ('en-fr', 'fr-en', 'en-ja', 'ja-en')

_TRANSLATEGEMMA = (
    'You are a professional {src} ({s}) to {dst} ({d}) translator. Your goal '
    'is to accurately convey the meaning and nuances of the original {src} '
    'text while adhering to {dst} grammar, vocabulary, and cultural '
    'sensitivities.\nProduce only the {dst} translation, without any '
    'additional explanations or commentary. Please translate the following '
    '{src} text into {dst}:\n\n\n')
_SPECIAL = re.compile(f'({re.escape(START_OF_TURN)}|{re.escape(END_OF_TURN)})')
_GEMMA4_PIECES = {START_OF_TURN: '<|turn>', END_OF_TURN: '<turn|>'}


def marker_id(tokenizer, marker: str) -> int:
  """The id of a turn marker in this tokenizer (Gemma 1-3 or 4 spelling)."""
  sp = tokenizer.processor
  for piece in (marker, _GEMMA4_PIECES[marker]):
    i = sp.PieceToId(piece)
    if i != sp.unk_id():
      return i
  raise ValueError(f'the tokenizer has no {marker} piece')


def check(prompt_format: str) -> str:
  if prompt_format not in FORMATS:
    raise ValueError(f'unknown prompt format {prompt_format!r}; one of '
                     f'{", ".join(FORMATS)}')
  return prompt_format


def check_pair(lang_pair: str) -> tuple[str, str]:
  if lang_pair not in LANG_PAIRS:
    raise ValueError(f'Unsupported lang_pair {lang_pair!r}; one of {LANG_PAIRS}')
  src, dst = lang_pair.split('-')
  return src, dst


def format_prompt(src: str, lang_pair: str = 'en-fr',
                  prompt_format: str = DEFAULT) -> str:
  """The text before the answer (no BOS); the model continues with dst."""
  s, d = check_pair(lang_pair)
  plain = f'Translate this into {LANGUAGE_NAMES[d]}:\n{src}\n'
  if check(prompt_format) == 'plain':
    return plain
  if prompt_format == 'chat':
    user = plain.removesuffix('\n')
  else:
    user = _TRANSLATEGEMMA.format(src=LANGUAGE_NAMES[s], dst=LANGUAGE_NAMES[d],
                                  s=s, d=d) + src
  return f'{START_OF_TURN}user\n{user}{END_OF_TURN}\n{START_OF_TURN}model\n'


def answer_end(prompt_format: str) -> str:
  """What closes the answer after the translation: '' = EOS alone."""
  return '' if check(prompt_format) == 'plain' else END_OF_TURN


def encode(tokenizer, text: str) -> list[int]:
  """SentencePiece ids of `text`, turn markers as their control ids."""
  sp, ids = tokenizer.processor, []
  for part in _SPECIAL.split(text):
    if part in (START_OF_TURN, END_OF_TURN):
      ids.append(marker_id(tokenizer, part))
    elif part:
      ids.extend(sp.EncodeAsIds(part))
  return ids


def prompt_ids(tokenizer, src: str, lang_pair: str = 'en-fr',
               prompt_format: str = DEFAULT) -> np.ndarray:
  """`[BOS] + prompt`, int32."""
  ids = encode(tokenizer, format_prompt(src, lang_pair, prompt_format))
  return np.asarray([tokenizer.bos_id] + ids, np.int32)


def answer_ids(tokenizer, dst: str, prompt_format: str = DEFAULT) -> np.ndarray:
  """The tokens the loss is counted on: dst and its end marker (EOS for
  `plain`, `<end_of_turn>` for the turn formats)."""
  end = answer_end(prompt_format)
  ids = encode(tokenizer, dst + end)
  return np.asarray(ids + ([] if end else [tokenizer.eos_id]), np.int32)


def chat_template(prompt_format: str, lang_pair: str = 'en-fr') -> str | None:
  """A jinja chat template rendering a one-message conversation (the user
  message = the source) exactly as `format_prompt`; None for `plain`."""
  if check(prompt_format) == 'plain':
    return None
  head, tail = format_prompt('\x00', lang_pair, prompt_format).split('\x00')
  lit = lambda s: "'" + s.replace('\\', '\\\\').replace("'", "\\'").replace(
      '\n', '\\n') + "'"
  return ('{{ bos_token }}{% for m in messages %}{% if m.role == \'user\' %}'
          f'{{{{ {lit(head)} + m.content + {lit(tail)} }}}}'
          '{% else %}{{ m.content + \'' + END_OF_TURN + '\\n\' }}'
          '{% endif %}{% endfor %}')
