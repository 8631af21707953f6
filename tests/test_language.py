"""Language ID and the copied / off-target verdicts, on known strings."""

import pytest

from gemma_mt import language

ENGLISH = ['Where is the nearest train station?',
           'I think this is the best thread on reddit today.',
           'Thanks for the help, it worked!']
FRENCH = ['Où est la gare la plus proche ?',
          'Je pense que c\'est le meilleur fil de reddit aujourd\'hui.',
          'Merci pour ton aide, ça a marché !']


def test_identify_known_english_and_french():
  for text in ENGLISH:
    assert language.identify(text)[0] == 'en', text
  for text in FRENCH:
    lang, prob = language.identify(text)
    assert lang == 'fr' and prob >= language.CONFIDENCE, text


def test_mixed_text_goes_to_its_majority():
  mixed = 'Je pense que le nouveau patch est vraiment cool, lol'
  assert language.identify(mixed)[0] == 'fr'
  assert not language.is_off_target(mixed, 'fr')


@pytest.mark.parametrize('source', [
    'https://imgur.com/a/x7Yz2', 'r/france', '/u/spez', '42', '2018-10-03 !!',
    'Donald Trump', '@jack', ':)'])
def test_sources_without_words_to_translate(source):
  assert not language.needs_translation(source)
  assert language.judge(source, source).ok  # Its copy is right.


@pytest.mark.parametrize('source', ENGLISH + ['Happy Birthday!', 'Yes, lol'])
def test_sources_that_need_translation(source):
  assert language.needs_translation(source)


def test_copies_ignore_case_and_whitespace():
  src = 'Where is the nearest train station?'
  for out in (src, src.upper(), '  where is the   nearest train station?\n'):
    v = language.judge(out, src)
    assert v.copied and not v.off_target and not v.ok
  assert not language.is_copy('', '')
  assert not language.judge('Where is the station?', src).copied


def test_off_target_and_on_target():
  src = ENGLISH[0]
  v = language.judge('Where can I find a train station near here?', src)
  assert v.off_target and not v.copied
  v = language.judge('¿Dónde está la estación de tren más cercana?', src)
  assert v.off_target
  assert language.judge(FRENCH[0], src).ok
  # Empty and symbol-only outputs are not judged off-target (no words).
  assert language.judge('', src).ok and language.judge('?!', src).ok
  # The target comes from the pair.
  assert language.judge(FRENCH[0], src, 'en-fr').ok
  assert language.judge('Where is the station?', FRENCH[0], 'fr-en').ok
