"""Continuous batching equals static batching, whatever the slot order."""

import numpy as np
import pytest
from support.tiny import CFG, tiny_params

from gemma_mt.data import mtnt as data
from gemma_mt.decoding import continuous
from gemma_mt.decoding.sampler import Sampler
from gemma_mt.models import gemma as M
from gemma_mt.translator import Translator

STOP = [1, 106]


@pytest.fixture(scope='module')
def params():
  return tiny_params()


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(3, 300, rng.integers(1, 40)).astype(np.int32)
             for _ in range(n)]
  return prompts, rng.integers(1, 30, n)


class _sampler:
  """A Sampler whose generate is continuous or static."""

  def __init__(self, params, cont, batch_size=4, stop=STOP):
    self.cont = cont
    self.sampler = Sampler(M.Transformer(CFG), params, pad_id=0, stop_ids=stop,
                           batch_size=batch_size)

  def generate(self, prompts, **kw):
    if self.cont:
      return continuous.generate(self.sampler, prompts, **kw)
    return self.sampler.generate(prompts, **kw)


@pytest.mark.parametrize('kw', [{}, dict(temperature=1.0, top_k=20, seed=3),
                                dict(temperature=1.0, epsilon=0.02, seed=4,
                                     row_ids=[7919 * i % 1000 for i in range(23)])])
def test_continuous_equals_static(params, kw):
  """Bitwise. (Not top-p: it draws in sorted order, and the order of two
  logits equal but for the last bit can differ between batch shapes, in
  static batching too.)"""
  prompts, limits = _prompts(23)
  want = _sampler(params, False).generate(prompts, max_new_tokens=limits, **kw)
  got = _sampler(params, True).generate(prompts, max_new_tokens=limits, **kw)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)


def test_rows_that_stop_early_free_their_slot(params):
  """Stop ids that the model emits: rows end at different steps and their
  slots are refilled; outputs still equal static batching's."""
  prompts, limits = _prompts(30, seed=1)
  static = _sampler(params, False, stop=list(range(0, 262144, 7)))
  want = static.generate(prompts, max_new_tokens=limits)
  assert len({len(w) for w in want}) > 5  # Really different lengths.
  assert any(len(w) < l for w, l in zip(want, limits))  # Some stopped early.
  got = _sampler(params, True, stop=list(range(0, 262144, 7))).generate(
      prompts, max_new_tokens=limits)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)


def test_fast_decode_equals_static(params):
  """The Pallas kernel (interpreted on CPU) reading each row's own slots
  only, rows refilled: the same ids as static batching's einsum path."""
  prompts, limits = _prompts(11, seed=5)
  want = _sampler(params, False).generate(prompts, max_new_tokens=limits)
  fast = Sampler(M.Transformer(CFG, fast_decode=True), params, pad_id=0,
                 stop_ids=STOP, batch_size=3)
  got = continuous.generate(fast, prompts, max_new_tokens=limits)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)


def test_open_ended_decoder_inserts_per_bucket(params):
  """Without fixed prompt widths (the service), an insert takes its
  longest prompt's bucket; a prompt wider than the widest fixed width is
  refused."""
  sp = _sampler(params, True).sampler
  mode, sampling = sp.sampling_args()
  dec = continuous.ContinuousDecoder(sp, 4, mode, sampling, 16)
  out = {}
  for i, n in enumerate((5, 20, 40)):
    dec.add(np.arange(3, 3 + n, dtype=np.int32), 4, i,
            lambda ids, i=i: out.setdefault(i, ids))
    dec.step()
  while dec.busy:
    dec.step()
  assert sorted(out) == [0, 1, 2]
  widths = sorted(k[5] for k in sp.compiled_shapes if k[0] == 'insert')
  assert widths == [16, 32, 64]
  fixed = continuous.ContinuousDecoder(sp, 4, mode, sampling, 16,
                                       prompt_widths=(16, 32))
  assert fixed.fits(30, 16) and not fixed.fits(40, 16)
  with pytest.raises(ValueError, match='does not fit'):
    fixed.add(np.ones(40, np.int32), 4, 0, print)


def test_slot_count_and_order_do_not_change_outputs(params):
  prompts, limits = _prompts(13, seed=2)
  kw = dict(temperature=1.0, seed=11)
  a = _sampler(params, True, batch_size=2).generate(prompts, max_new_tokens=limits, **kw)
  b = _sampler(params, True, batch_size=5).generate(prompts, max_new_tokens=limits, **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  order = np.random.default_rng(0).permutation(len(prompts))
  g = _sampler(params, True, batch_size=3).generate(
      [prompts[i] for i in order], max_new_tokens=limits[order])
  want = _sampler(params, False).generate(prompts, max_new_tokens=limits)
  for j, i in enumerate(order):
    np.testing.assert_array_equal(g[j], want[i])


def test_a_whole_evaluation_compiles_a_fixed_set(params, tokenizer, mtnt_dir):
  """All 852 valid sentences: one empty state, one decode chunk and two
  inserts, though MTNT's prompts span 6 buckets (16 to 512 tokens): the
  90th percentile's bucket and the widest; a second call compiles
  nothing."""
  sources = [s for s, _ in data.load_pairs('valid', mtnt_dir=mtnt_dir)]
  tr = Translator(CFG, params, tokenizer, batch_size=16)
  widths = {next(b for b in (16, 32, 64, 128, 256, 512, 1024)
                 if b >= len(tr.prompt_tokens(s))) for s in sources}
  kw = dict(max_new_tokens=4, guard=False)  # The tiny model's are all rejected.
  tr.translate(sources, **kw)
  kinds = [k[0] for k in tr.compiled_shapes]
  assert kinds.count('chunk') == kinds.count('empty') == 1
  assert sorted(k[5] for k in tr.compiled_shapes if k[0] == 'insert') == [64, 512]
  assert len(widths) == 6
  n = tr.num_compiles
  tr.translate(sources[::-1], **kw)  # Other order, same shapes.
  assert tr.num_compiles == n


@pytest.mark.parametrize('alpha', [0.0, 0.6])
def test_beam_groups_equal_static_beam_search(params, alpha):
  """Groups refilled as beams end, in any order and any number of groups:
  the K hypotheses, log-probs and scores of static beam search (itself
  checked against brute force in test_beam)."""
  prompts, limits = _prompts(13, seed=1)
  sp = _sampler(params, False, stop=list(range(0, 262144, 7))).sampler
  kw = dict(beam_size=3, length_penalty=alpha)
  want = sp.beam_search(prompts, max_new_tokens=limits, batch_size=4, **kw)
  assert len({len(h.ids) for w in want for h in w}) > 5  # Ends vary.
  order = np.random.default_rng(int(10 * alpha)).permutation(len(prompts))
  for groups, idx in ((2, np.arange(len(prompts))), (5, order)):
    got = continuous.beam_search(sp, [prompts[i] for i in idx],
                                 max_new_tokens=limits[idx], groups=groups, **kw)
    for j, i in enumerate(idx):
      assert [h.ids.tolist() for h in got[j]] == [h.ids.tolist() for h in want[i]]
      np.testing.assert_allclose([h.score for h in got[j]],
                                 [h.score for h in want[i]], rtol=1e-5)
      np.testing.assert_allclose([h.logp for h in got[j]],
                                 [h.logp for h in want[i]], rtol=1e-5)


def test_translator_beam_search_refills_groups(params, tokenizer):
  """More sentences than groups: the Translator's beam search runs on
  refilled groups, with static batching's n-best."""
  sources = [f'sentence {i} ' + 'x ' * (i % 5) for i in range(7)]
  kw = dict(max_new_tokens=5, beam_size=2, guard=False, batch_size=3)
  static = Translator(CFG, params, tokenizer, continuous=False)
  tr = Translator(CFG, params, tokenizer)
  want, got = (t.generate(sources, **kw) for t in (static, tr))
  assert [[h.ids.tolist() for h in b] for b in got.nbest] == \
      [[h.ids.tolist() for h in b] for b in want.nbest]
  kinds = [k[0] for k in tr.compiled_shapes]
  assert kinds.count('beam_chunk') == kinds.count('beam_empty') == 1
  assert not any(k[0] == 'beam_chunk' for k in static.compiled_shapes)


def test_static_batching_is_still_there(params, tokenizer):
  tr = Translator(CFG, params, tokenizer, batch_size=2, continuous=False)
  tr.translate(['a', 'b', 'c'], max_new_tokens=3)
  assert all(isinstance(k[0], int) for k in tr.compiled_shapes)


@pytest.mark.slow
def test_real_270m_continuous_equals_static(tokenizer, mtnt_dir):
  from gemma_mt.weights.embedded import load_gemma3_270m
  cfg, weights = M.TransformerConfig.gemma3_270m(), load_gemma3_270m()
  sources = [s for s, _ in data.load_pairs('valid', mtnt_dir=mtnt_dir)[:10]]
  kw = dict(batch_size=4, max_new_tokens=24, guard=False)  # The decoders only.
  static = Translator(cfg, weights, tokenizer, continuous=False).translate(sources, **kw)
  cont = Translator(cfg, weights, tokenizer).translate(sources, **kw)
  assert cont == static
  assert continuous.MIN_CACHE_LEN >= 512
  kw = dict(kw, batch_size=2, beam_size=2, max_new_tokens=8)  # 2 groups of
  sources = sources[:5]  # 2 beams, refilled.
  static = Translator(cfg, weights, tokenizer, continuous=False).translate(sources, **kw)
  tr = Translator(cfg, weights, tokenizer)
  assert tr.translate(sources, **kw) == static
  assert any(k[0] == 'beam_chunk' for k in tr.compiled_shapes)
