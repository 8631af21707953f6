"""MBR selection on hand-made candidate sets with known answers."""

import pytest

from gemma_mt.decoding import mbr


def test_single_candidate():
  assert mbr.mbr_select(['only one']) == 0


def test_the_consensus_wins():
  cands = ['le chat noir dort', 'un chien rouge court vite',
           'le chat noir dort ici', 'le chat noir dort là']
  # The first is nearly contained in the other chat-noir candidates.
  for utility in mbr.UTILITIES:
    u = mbr.expected_utilities(cands, utility)
    assert u.index(min(u)) == 1  # The outlier has the lowest utility.
    assert mbr.mbr_select(cands, utility) in (0, 2, 3)
  # A candidate that appears twice agrees fully with its copy: it wins.
  assert mbr.mbr_select(['x y z', 'le chat', 'le chat', 'q r s']) == 1
  assert mbr.expected_utilities(['le chat', 'le chat'], 'chrf') == [100.0, 100.0]


def test_ties_go_to_the_first_and_errors():
  assert mbr.mbr_select(['same', 'same', 'same']) == 0
  with pytest.raises(ValueError):
    mbr.mbr_select([])
  with pytest.raises(ValueError, match='utility'):
    mbr.mbr_select(['a', 'b'], 'ter')


CANDIDATES = ['le chat noir dort', 'le chat noir dort', 'un chien court',
              'le chat dort ici', 'Le chat noir dort.', 'le chat noir dort']


@pytest.mark.parametrize('utility', mbr.UTILITIES)
def test_expected_utilities_equal_brute_force_with_repeats(utility):
  """Against sacreBLEU's own sentence scores, pair by pair: the cached
  n-grams and the counting of repeated samples change nothing."""
  from sacrebleu.metrics import BLEU, CHRF
  chrf, bleu = CHRF(), BLEU(effective_order=True)
  u = {'chrf': lambda h, r: chrf.sentence_score(h, [r]).score,
       'bleu': lambda h, r: bleu.sentence_score(h, [r]).score}
  u['chrf+bleu'] = lambda h, r: (u['chrf'](h, r) + u['bleu'](h, r)) / 2
  n = len(CANDIDATES)
  want = [sum(u[utility](h, r) for j, r in enumerate(CANDIDATES) if j != i)
          / (n - 1) for i, h in enumerate(CANDIDATES)]
  got = mbr.expected_utilities(CANDIDATES, utility)
  assert got == pytest.approx(want, abs=1e-9)


def test_allowed_restricts_the_choice_and_the_references():
  """The rejected candidates neither win nor vote: the choice is the MBR
  choice of the allowed ones alone."""
  free = mbr.mbr_select(CANDIDATES)
  assert CANDIDATES[free] == 'le chat noir dort'
  allowed = [c != 'le chat noir dort' for c in CANDIDATES]
  kept = [c for c, a in zip(CANDIDATES, allowed) if a]
  pick = mbr.mbr_select(CANDIDATES, allowed=allowed)
  assert allowed[pick] and CANDIDATES[pick] == kept[mbr.mbr_select(kept)]
  # The reviewer's case: copies of the source pull an unrestricted vote
  # towards English-looking French.
  cands = ['Where is the train station?'] * 4 + [
      'Où est la gare ?', 'Où est la gare ?', 'Où se trouve la gare ?',
      'Where est la train station ?']
  ok = [False] * 4 + [True] * 4
  assert cands[mbr.mbr_select(cands, allowed=ok)] == 'Où est la gare ?'
  # Nothing allowed: the unrestricted choice.
  assert mbr.mbr_select(CANDIDATES, allowed=[False] * 6) == free
