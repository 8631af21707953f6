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
