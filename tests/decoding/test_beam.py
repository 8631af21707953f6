"""Beam search against greedy, brute force and the model's own log-probs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt.decoding import continuous
from gemma_mt.decoding import sampler as S
from gemma_mt.models import gemma as M
from gemma_mt.models import layers  # noqa: E402

V = 6           # A vocabulary small enough to enumerate every output.
STOP = 5
CFG = M.TransformerConfig.tiny(vocab_size=V)


@pytest.fixture(scope='module')
def setup():
  model = M.Transformer(CFG, dtype=jnp.float32)
  tokens = jnp.ones((1, 4), jnp.int32)
  mask = jnp.ones((1, 4), bool)
  params = model.init(jax.random.key(3), tokens, layers.positions_from_mask(mask),
                      layers.causal_mask(mask))['params']
  # Larger weights: peaked, varied next-token distributions.
  params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
  return model, params


def sampler(setup, **kw):
  model, params = setup
  return S.Sampler(model, params, pad_id=0, stop_ids=[STOP], **kw)


def search(s, engine, prompts, **kw):
  """Static batches, or refilled groups (one group: every prompt after the
  first is a refill)."""
  if engine == 'static':
    return s.beam_search(prompts, **kw)
  return continuous.beam_search(s, prompts, groups=1, **kw)


ENGINES = pytest.mark.parametrize('engine', ['static', 'continuous'])
def exhaustive(setup, k, limit, alpha):
  """Every output of PROMPTS[k] (ending at the first STOP, or cut at the
  limit) with its length-penalised score, best first."""
  outs = {tuple(seq[:seq.index(STOP) + 1] if STOP in seq else seq)
          for seq in itertools.product(range(V), repeat=limit)}
  return sorted(((seq_logp(setup, PROMPTS[k], np.array(o)) / penalty(len(o), alpha), o)
                 for o in outs), reverse=True)


PROMPTS = [np.array([1, 2, 3, 4], np.int32), np.array([1, 4], np.int32),
           np.array([1, 3, 3, 2, 4, 1], np.int32)]


def seq_logp(setup, prompt, ids) -> float:
  """log p(ids | prompt) by one full forward pass."""
  model, params = setup
  x = jnp.asarray(np.concatenate([prompt, ids])[None], jnp.int32)
  mask = jnp.ones_like(x, bool)
  with jax.default_matmul_precision('float32'):
    logits, _ = model.apply({'params': params}, x, layers.positions_from_mask(mask),
                            layers.causal_mask(mask))
  logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)
  P = len(prompt)
  return float(sum(logp[P - 1 + j, t] for j, t in enumerate(ids)))


def penalty(n, alpha):
  return ((5 + n) / 6) ** alpha


def test_beam_1_is_greedy(setup):
  s = sampler(setup)
  greedy = s.generate(PROMPTS, max_new_tokens=6)
  beam = s.beam_search(PROMPTS, max_new_tokens=6, beam_size=1)
  assert [b[0].ids.tolist() for b in beam] == [g.tolist() for g in greedy]


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_beam_equals_brute_force(setup, alpha):
  """With K >= every possible output, beam search is exhaustive search, on
  static batches and on refilled groups alike."""
  limit = 3
  s = sampler(setup)
  want = [exhaustive(setup, k, limit, alpha) for k in range(2)]
  for engine in ('static', 'continuous'):
    beams = search(s, engine, PROMPTS[:2], max_new_tokens=limit, beam_size=64,
                   length_penalty=alpha)
    for scored, nbest in zip(want, beams):
      assert tuple(nbest[0].ids.tolist()) == scored[0][1], engine
      got = [h.score for h in nbest]
      np.testing.assert_allclose(got, [sc for sc, _ in scored[:64]], rtol=1e-4)


@ENGINES
def test_scores_are_the_models_log_probs_and_sorted(setup, engine):
  s = sampler(setup)
  beams = search(s, engine, PROMPTS, max_new_tokens=5, beam_size=4,
                 length_penalty=0.6)
  for prompt, nbest in zip(PROMPTS, beams):
    scores = [h.score for h in nbest]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(h.ids.tolist()) for h in nbest}) == 4  # distinct
    for h in nbest:
      np.testing.assert_allclose(h.logp, seq_logp(setup, prompt, h.ids),
                                 rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(h.score, h.logp / penalty(len(h.ids), 0.6),
                                 rtol=1e-6)
      # Stop rules hold for every beam: STOP only at the end, length capped.
      assert STOP not in h.ids[:-1].tolist() and 1 <= len(h.ids) <= 5


def test_batched_equals_one_at_a_time(setup):
  s = sampler(setup)
  together = s.beam_search(PROMPTS, max_new_tokens=[4, 6, 5], beam_size=3)
  for i, p in enumerate(PROMPTS):
    alone = s.beam_search([p], max_new_tokens=[4, 6, 5][i], beam_size=3)[0]
    assert [h.ids.tolist() for h in alone] == [h.ids.tolist() for h in together[i]]
    np.testing.assert_allclose([h.logp for h in alone],
                               [h.logp for h in together[i]], rtol=1e-5)
