"""Token-level decoding: KV-cache greedy == repeated full forwards, stop rules, sampling, buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt.decoding import sampler as S
from gemma_mt.decoding import sampling
from gemma_mt.models import gemma as M
from gemma_mt.models import layers  # noqa: E402

V = 512
CFG = M.TransformerConfig.tiny(vocab_size=V)
MODEL = M.Transformer(CFG)


@pytest.fixture(scope='module')
def params():
  tokens = jnp.ones((1, 4), jnp.int32)
  mask = jnp.ones((1, 4), bool)
  p = MODEL.init(jax.random.key(0), tokens, layers.positions_from_mask(mask),
                 layers.causal_mask(mask))['params']
  # Larger weights: peaked, input-dependent logits (not one constant argmax).
  return jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x + 0.1, p)


@pytest.fixture(scope='module')
def sampler(params):
  # No pad-ratio splits: these tiny prompts would otherwise split batches.
  return S.Sampler(MODEL, params, pad_id=0, stop_ids=[], batch_size=4,
                   max_pad_ratio=None)


PROMPTS = [np.random.default_rng(0).integers(2, V, n).astype(np.int32)
           for n in (3, 17, 8)]  # 17 > 16: a 32-wide prompt bucket


@pytest.fixture(scope='module')
def greedy(sampler):
  return sampler.generate(PROMPTS, max_new_tokens=10)


def full_forward_greedy(params, prompt, steps):
  """No cache: the whole sequence again for every token (right-padded to 32)."""
  apply = jax.jit(MODEL.apply)
  seq = list(prompt)
  for _ in range(steps):
    L = len(seq)
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :L] = seq
    mask = jnp.arange(32)[None] < L
    logits, _ = apply({'params': params}, tokens, layers.positions_from_mask(mask),
                      layers.causal_mask(mask))
    seq.append(int(jnp.argmax(logits[0, L - 1])))
  return seq[len(prompt):]


def test_greedy_with_cache_equals_full_forward_argmax(params, greedy):
  for prompt, out in zip(PROMPTS, greedy):
    assert len(out) == 10
    assert out.tolist() == full_forward_greedy(params, prompt, 10)
  assert len({tuple(o) for o in greedy}) == 3  # Not a degenerate model.


def test_stop_tokens_end_rows_independently(params, greedy):
  # Make the 4th generated token of row 0 a stop token: row 0 ends there,
  # the others end at their own first occurrence of it, or run to the limit.
  stop = int(greedy[0][3])
  s = S.Sampler(MODEL, params, pad_id=0, stop_ids=[stop], batch_size=4,
                max_pad_ratio=None)
  out = s.generate(PROMPTS, max_new_tokens=10)
  for full, got in zip(greedy, out):
    hits = np.flatnonzero(full == stop)
    end = hits[0] + 1 if len(hits) else 10
    assert got.tolist() == full[:end].tolist()  # Stop token included.


def test_max_new_tokens_and_budget_bucket(sampler, greedy):
  out = sampler.generate(PROMPTS, max_new_tokens=3)  # same 16-token budget
  assert [o.tolist() for o in out] == [g[:3].tolist() for g in greedy]
  batches, steps = sampler.batches_run, sampler.loop_steps
  out = sampler.generate(PROMPTS, max_new_tokens=[2, 10, 5])  # per row
  assert [o.tolist() for o in out] == [g[:n].tolist()
                                       for g, n in zip(greedy, (2, 10, 5))]
  # One device batch whose loop ran as long as its longest row.
  assert (sampler.batches_run - batches, sampler.loop_steps - steps) == (1, 10)


def test_bucketing_reuses_compiled_shapes(sampler, greedy):
  n = sampler.num_compiles
  assert (4, 32, 16) in [k[:3] for k in sampler.compiled_shapes]
  # 4 rows of widths <= 32 and a budget <= 16: the same executable.
  out = sampler.generate(PROMPTS + [PROMPTS[0]], max_new_tokens=7)
  assert sampler.num_compiles == n
  assert out[3].tolist() == out[0].tolist() == greedy[0][:7].tolist()
  sampler.generate(PROMPTS[:1], max_new_tokens=5)      # B=1, P=16: new
  sampler.generate(PROMPTS[2:], max_new_tokens=9)      # same bucket
  assert sampler.num_compiles == n + 1
  assert sampler.compiled_shapes[-1][:3] == (1, 16, 16)


def test_top_k_1_equals_greedy_and_seeds(sampler, greedy):
  top1 = sampler.generate(PROMPTS, max_new_tokens=10, temperature=0.7, top_k=1)
  assert [o.tolist() for o in top1] == [g.tolist() for g in greedy]
  kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95)
  a = sampler.generate(PROMPTS, seed=1, **kw)
  b = sampler.generate(PROMPTS, seed=1, **kw)
  c = sampler.generate(PROMPTS, seed=2, **kw)
  assert [x.tolist() for x in a] == [x.tolist() for x in b]
  assert [x.tolist() for x in a] != [x.tolist() for x in c]
  # A row's sample depends on (seed, input index, step), not on batch mates.
  more = sampler.generate(PROMPTS + [PROMPTS[1]], seed=1, **kw)
  assert [x.tolist() for x in more[:3]] == [x.tolist() for x in a]
  assert more[3].tolist() != a[1].tolist()  # Same prompt, other index.


def test_sample_logits_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 2000)
  def draw(top_k, top_p):
    mode = sampling.SamplingMode.of(1.0, top_k, top_p, 4)
    sp = sampling.SamplingParams.of(1.0, top_k, top_p)
    out = sampling.sample_logits(logits, keys, sp, mode)
    return np.bincount(np.asarray(out), minlength=4) / 2000
  assert set(np.flatnonzero(draw(2, None))) == {0, 1}
  assert set(np.flatnonzero(draw(3, None))) == {0, 1, 2}   # k_cap 4 > k
  assert set(np.flatnonzero(draw(None, 0.7))) == {0, 1}    # 0.5 + 0.3 >= 0.7
  assert set(np.flatnonzero(draw(None, 0.1))) == {0}       # best always kept
  assert set(np.flatnonzero(draw(None, None))) == {0, 1, 2, 3}
  np.testing.assert_allclose(draw(None, None), [0.5, 0.3, 0.15, 0.05], atol=0.04)


@pytest.mark.parametrize('top_k', [None, 8])
def test_epsilon_sampling_never_draws_below_epsilon(top_k):
  """Over 4,096 draws from logits whose probabilities straddle epsilon: no
  token below it is ever drawn, every token above it is, the most likely
  one is kept even when all are below, and one seed gives one answer."""
  eps = 0.05
  probs = np.array([0.3, 0.2, 0.12, 0.1, 0.08, 0.06, 0.049, 0.04, 0.03,
                    0.021], np.float32)
  logits = jnp.log(jnp.asarray(np.tile(probs, (4096, 1))))
  mode = sampling.SamplingMode.of(1.0, top_k, None, 10, eps)
  sp = sampling.SamplingParams.of(1.0, top_k, None, 0, eps)
  keys = sampling.row_keys(7, jnp.arange(4096), 0)
  drawn = np.asarray(sampling.sample_logits(logits, keys, sp, mode))
  assert set(drawn.tolist()) == set(np.flatnonzero(probs >= eps).tolist())
  again = np.asarray(sampling.sample_logits(logits, keys, sp, mode))
  np.testing.assert_array_equal(drawn, again)
  other = sampling.row_keys(8, jnp.arange(4096), 0)
  assert np.any(np.asarray(sampling.sample_logits(logits, other, sp, mode))
                != drawn)
  flat = jnp.zeros((16, 100))  # Every token at 1% < epsilon.
  out = sampling.sample_logits(flat.at[:, 42].add(1e-3), keys[:16], sp,
                               sampling.SamplingMode.of(1.0, top_k, None, 100,
                                                        eps))
  assert set(np.asarray(out).tolist()) == {42}


def test_row_ids_make_a_sample_independent_of_its_call(sampler):
  """A row's draw follows its row id: the same prompt and id give the same
  tokens alone and among other rows, wherever it sits."""
  p = np.array([2, 100, 200, 300], np.int32)
  q = np.array([2, 7, 8], np.int32)
  kw = dict(max_new_tokens=6, temperature=1.0, seed=5)
  alone = sampler.generate([p], row_ids=[41], **kw)[0]
  mixed = sampler.generate([q, p, q], row_ids=[3, 41, 9], **kw)[1]
  np.testing.assert_array_equal(alone, mixed)
  other = sampler.generate([p] * 8, row_ids=list(range(8)), **kw)
  assert len({tuple(o.tolist()) for o in other}) > 1


def test_buckets():
  assert [sampling.next_pow2(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
  assert [S.batch_bucket(n, 12) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]


def test_split_batches():
  # Sorted by length, at most 3 per batch; input order is restored by the caller.
  assert S.split_batches([5, 1, 4, 2, 3], 3, None) == [[1, 3, 4], [2, 0]]
  # 31 short prompts and a long one: with a pad ratio, the long one is not
  # padded together; by default it is (one decode loop).
  lengths = [20] * 31 + [250]
  assert S.split_batches(lengths, 32, 4.0) == [list(range(31)), [31]]
  assert S.split_batches(lengths, 32) == [list(range(32))]
  assert S.split_batches([10, 20, 40, 60], 32, 4.0) == [[0, 1, 2, 3]]
  assert S.split_batches([], 4) == []


def test_bad_inputs(params):
  with pytest.raises(ValueError, match='outside the vocabulary'):
    S.Sampler(MODEL, params, pad_id=0, stop_ids=[V])
  s = S.Sampler(MODEL, params, pad_id=0, stop_ids=[])
  with pytest.raises(ValueError, match='empty prompt'):
    s.generate([np.zeros(0, np.int32)], max_new_tokens=2)


def test_rows_for_memory():
  """The largest power of two whose KV caches and logits fit half the free
  memory, counted by hand for the 270M; 32 on a CPU, 256 at most."""
  cfg = M.TransformerConfig.gemma3_270m()
  model = M.Transformer(cfg, dtype=jnp.bfloat16)
  S_ = 1280
  per_row = (cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * S_ * 2
             + S_ * 4 + 4 + 16 * cfg.vocab_size)  # k, v; positions; end.
  assert S.rows_for_memory(model, S_, None) == S.CPU_ROWS == 32
  assert S.rows_for_memory(model, S_, 10**12) == S.MAX_ROWS == 256
  for fit, rows in ((37, 32), (64, 64), (63, 32), (1, 1), (0, 1)):
    free = int(fit * per_row / S.MEMORY_SHARE)
    assert S.rows_for_memory(model, S_, free) == rows, fit
  f32 = M.Transformer(cfg, dtype=jnp.float32)  # Wider cache: fewer rows.
  assert S.rows_for_memory(f32, S_, int(64 * per_row / S.MEMORY_SHARE)) == 32
  assert S.free_device_bytes(jax.devices('cpu')[0]) is None
