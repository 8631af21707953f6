"""Packing keeps every example intact, once per epoch, and is resumable."""

import numpy as np
import pytest

from gemma_mt.data.mtnt import TrainingInput
from gemma_mt.data.packing import pack_rows, packed_batches, packing_efficiency


def fake_examples(n=200, L=32, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, L + 1, n)
  tokens = np.zeros((n, L), np.int32)
  mask = np.zeros((n, L), bool)
  for i, k in enumerate(lengths):
    tokens[i, :k] = rng.integers(1, 1000, k)
    mask[i, k // 2:k] = True
  return TrainingInput(tokens, mask), lengths


def unpack(batch):
  """The examples of a packed batch, as (tokens, mask) tuples."""
  out = []
  for r in range(batch.input_tokens.shape[0]):
    for s in np.unique(batch.segment_ids[r]):
      if s == 0:
        continue
      sel = batch.segment_ids[r] == s
      idx = np.flatnonzero(sel)
      assert np.all(np.diff(idx) == 1)  # contiguous
      np.testing.assert_array_equal(batch.positions[r, sel], np.arange(sel.sum()))
      out.append((tuple(batch.input_tokens[r, sel]), tuple(batch.target_mask[r, sel])))
  return out


def test_examples_intact_and_at_most_once_per_epoch():
  data, lengths = fake_examples()
  batches = list(packed_batches(data, batch_size=4, seq_len=64, seed=1))
  seen = [ex for b in batches for ex in unpack(b)]
  originals = {(tuple(data.input_tokens[i, :k]), tuple(data.target_mask[i, :k]))
               for i, k in enumerate(lengths)}
  assert len(seen) == len(set(seen))
  assert set(seen) <= originals
  # Only the last, incomplete batch of the epoch is dropped.
  assert len(seen) > 0.9 * len(originals)
  assert all(b.input_tokens.shape == (4, 64) for b in batches)
  # Padding carries no loss and segment 0.
  for b in batches:
    assert not b.target_mask[b.segment_ids == 0].any()
    assert (b.input_tokens[b.segment_ids == 0] == 0).all()


def test_packing_beats_padding():
  data, _ = fake_examples()
  batch = next(packed_batches(data, batch_size=4, seq_len=128))
  assert packing_efficiency(batch) > 0.85
  assert packing_efficiency(TrainingInput(data.input_tokens, data.target_mask)) < 0.6


def test_deterministic_and_resumable():
  data, _ = fake_examples()
  full = list(packed_batches(data, 4, 64, seed=3, num_epochs=2))
  again = list(packed_batches(data, 4, 64, seed=3, num_epochs=2))
  resumed = list(packed_batches(data, 4, 64, seed=3, num_epochs=2, start_step=5))
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a.input_tokens, b.input_tokens)
  assert len(resumed) == len(full) - 5
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a.input_tokens, b.input_tokens)
  epoch_len = len(full) // 2
  assert not np.array_equal(full[0].input_tokens, full[epoch_len].input_tokens)


def test_too_long_example_is_an_error():
  data, _ = fake_examples(L=32)
  with pytest.raises(ValueError, match='seq_len=16'):
    pack_rows(data, np.arange(10), 2, 16, 0)
