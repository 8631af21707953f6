"""Loss and train-step math on a tiny random model (float32, small vocab)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt.models.gemma import Transformer, TransformerConfig
from gemma_mt.train import loss as loss_lib
from gemma_mt.train import steps
from gemma_mt.train.config import TrainingConfig
from gemma_mt.train.optimizer import learning_rate_schedule, make_optimizer
from gemma_mt.train.state import TrainState, random_params

V, L, B = 97, 12, 4


@pytest.fixture(scope='module')
def tiny():
  # One local (window 4) and one global layer: every code path, fast compile.
  cfg = TransformerConfig.tiny(vocab_size=V, final_logit_softcap=30.0,
                               attention_types=('local', 'global'))
  model = Transformer(cfg)
  params = random_params(model, seed=0)
  # Larger weights than the 0.01-std init, so the loss is far from log(V).
  params = jax.tree.map(lambda p: p * 30.0 if p.ndim > 1 else p, params)
  return model, params


def make_batch(seed=0, b=B):
  """Rows: [BOS] prompt target EOS pad...; target_mask on target + EOS."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((b, L), np.int32)
  mask = np.zeros((b, L), bool)
  for i in range(b):
    n = rng.integers(5, L + 1)
    p = rng.integers(2, n - 1)
    tokens[i, :n] = rng.integers(3, V, n)
    tokens[i, 0] = 2
    mask[i, p:n] = True
  if b > 1:
    tokens[-1] = 0  # An all-pad row (as the last validation batch has).
    mask[-1] = False
  return {'input_tokens': tokens, 'target_mask': mask}


def numpy_loss(model, params, batch):
  tokens, positions, attn, _ = loss_lib.model_inputs(batch)
  logits, _ = model.apply({'params': params}, tokens, positions, attn)
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  toks, mask = batch['input_tokens'], batch['target_mask']
  total, count = 0.0, 0
  for b in range(toks.shape[0]):
    for t in range(1, toks.shape[1]):
      if mask[b, t]:
        total -= logp[b, t - 1, toks[b, t]]
        count += 1
  return total / count, count


def naive_ce(hidden, table, labels, weights, softcap):
  from gemma_mt.models.layers import logits_from_hidden
  logits = logits_from_hidden(table, hidden, softcap)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, labels[..., None], -1)[..., 0]
  return jnp.sum(jnp.where(weights, nll, 0.0))


def test_loss_matches_numpy_reference(tiny):
  model, params = tiny
  batch = make_batch()
  ref, count = numpy_loss(model, params, batch)
  for chunk in (1, 5, 512):
    loss, aux = loss_lib.forward_and_loss_fn(params, model, batch,
                                             chunk_size=chunk)
    np.testing.assert_allclose(loss, ref, rtol=2e-5)
    assert int(aux['num_target_tokens']) == count
    assert int(aux['num_tokens']) == int((batch['input_tokens'] != 0).sum())
    np.testing.assert_allclose(aux['loss_sum'], ref * count, rtol=2e-5)
  assert ref > 1.0  # Not a degenerate model.


def test_training_input_namedtuple_accepted(tiny):
  from gemma_mt.data.mtnt import TrainingInput
  model, params = tiny
  batch = make_batch()
  a, _ = loss_lib.forward_and_loss_fn(params, model, batch)
  b, _ = loss_lib.forward_and_loss_fn(params, model, TrainingInput(**batch))
  assert float(a) == float(b)


def test_labels_outside_mask_do_not_matter(tiny):
  model, params = tiny
  batch = make_batch()
  before, aux = loss_lib.forward_and_loss_fn(params, model, batch)
  # Tokens after the EOS (pads) are labels with mask False; make them real
  # tokens: causality keeps earlier positions blind to them.
  toks = batch['input_tokens'].copy()
  tail = (toks == 0) & ~batch['target_mask']
  tail[-1] = False  # Keep the all-pad row empty.
  noise = np.random.default_rng(1).integers(3, V, toks.shape)
  changed = {'input_tokens': np.where(tail, noise, toks),
             'target_mask': batch['target_mask']}
  after, aux2 = loss_lib.forward_and_loss_fn(params, model, changed)
  assert int(aux2['num_tokens']) > int(aux['num_tokens'])
  np.testing.assert_allclose(after, before, rtol=1e-6)
  # At the CE level: any label where the weight is False is ignored exactly.
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(V, 8)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, V, 20))
  w = jnp.asarray(rng.random(20) < 0.5)
  other = jnp.where(w, labels, jnp.asarray(rng.integers(0, V, 20)))
  a = loss_lib.chunked_cross_entropy(h, table, labels, w, None, 7)
  b = loss_lib.chunked_cross_entropy(h, table, other, w, None, 7)
  assert float(a) == float(b)


def random_ce_inputs(seed, b, n, d, v, p):
  """hidden [b, n, d], table [v, d], labels [b, n], weights (True w.p. p)."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(v, d)), jnp.float32),
          jnp.asarray(rng.integers(0, v, (b, n))),
          jnp.asarray(rng.random((b, n)) < p))


def test_chunked_ce_matches_naive_values_and_grads():
  n = 37
  h, table, labels, w = random_ce_inputs(0, 3, n, 16, 53, 0.4)
  w = w.at[2, n // 2:].set(False)  # Rows with different target counts.
  for softcap in (None, 5.0):
    ref_fn = lambda h, t: naive_ce(h, t, labels, w, softcap)
    ref, ref_g = jax.value_and_grad(ref_fn, (0, 1))(h, table)
    for chunk in (12, 111, 1000):  # c = 4, 37, T per row.
      fn = lambda h, t: loss_lib.chunked_cross_entropy(h, t, labels, w,
                                                       softcap, chunk)
      val, g = jax.jit(jax.value_and_grad(fn, (0, 1)))(h, table)
      np.testing.assert_allclose(val, ref, rtol=1e-5)
      np.testing.assert_allclose(g[0], ref_g[0], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(g[1], ref_g[1], rtol=1e-4, atol=1e-6)


def test_label_smoothing_matches_optax_and_zero_is_the_plain_loss():
  """Against optax's smoothed-label cross-entropy (values and both
  gradients, with and without the soft-cap); 0 is today's loss exactly."""
  import optax
  h, table, labels, w = random_ce_inputs(3, 2, 19, 16, 41, 0.6)
  plain = lambda h, t: loss_lib.chunked_cross_entropy(h, t, labels, w, None, 8)
  zero = lambda h, t: loss_lib.chunked_cross_entropy(h, t, labels, w, None, 8,
                                                     label_smoothing=0.0)
  assert float(plain(h, table)) == float(zero(h, table))
  for softcap in (None, 5.0):
    for a in (0.1, 0.5):
      def ref_fn(h, t):
        from gemma_mt.models.layers import logits_from_hidden
        logits = logits_from_hidden(t, h, softcap)
        q = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), a)
        ce = optax.softmax_cross_entropy(logits, q)
        return jnp.sum(jnp.where(w, ce, 0.0))
      fn = lambda h, t: loss_lib.chunked_cross_entropy(
          h, t, labels, w, softcap, 8, label_smoothing=a)
      ref, ref_g = jax.value_and_grad(ref_fn, (0, 1))(h, table)
      val, g = jax.jit(jax.value_and_grad(fn, (0, 1)))(h, table)
      np.testing.assert_allclose(val, ref, rtol=1e-5)
      for x, y in zip(g, ref_g):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_fused_ce_frozen_table_empty_batch_and_bf16():
  h, table, labels, w = random_ce_inputs(1, 4, 29, 16, 61, 0.5)
  w = w.at[1].set(False)  # A row without targets.
  ref_fn = lambda h, t, w: naive_ce(h, t, labels, w, None)
  fn = lambda h, t, w: loss_lib.chunked_cross_entropy(h, t, labels, w,
                                                      None, 8)
  # The table frozen (LoRA): its gradient is skipped, hidden's still exact;
  # and a chunk size below the batch size (one position per row per chunk).
  g = jax.jit(jax.grad(fn))(h, table, w)
  np.testing.assert_allclose(g, jax.grad(ref_fn)(h, table, w), rtol=1e-4,
                             atol=1e-6)
  for chunk in (1, 3):
    got = loss_lib.chunked_cross_entropy(h, table, labels, w, None, chunk)
    np.testing.assert_allclose(got, ref_fn(h, table, w), rtol=1e-5)
  # No target at all: zero loss and zero gradients, no NaN.
  none = jnp.zeros_like(w)
  val, (gh, gt) = jax.value_and_grad(fn, (0, 1))(h, table, none)
  assert float(val) == 0.0
  assert not np.any(np.asarray(gh)) and not np.any(np.asarray(gt))
  # bfloat16 hidden states (the training dtype), float32 table (the param):
  # loss and gradients close to the float32 math, table grad stays float32.
  hb = h.astype(jnp.bfloat16)
  val, (gh, gt) = jax.jit(jax.value_and_grad(fn, (0, 1)))(hb, table, w)
  rval, (rgh, rgt) = jax.value_and_grad(ref_fn, (0, 1))(
      hb.astype(jnp.float32), table.astype(jnp.bfloat16).astype(jnp.float32),
      w)
  assert gh.dtype == jnp.bfloat16 and gt.dtype == jnp.float32
  np.testing.assert_allclose(val, rval, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(gh, np.float32), rgh, rtol=0.05,
                             atol=0.05)
  np.testing.assert_allclose(gt, rgt, rtol=0.05, atol=0.05)


def test_packed_rows_equal_separate_rows(tiny):
  model, params = tiny
  batch = make_batch(seed=3, b=2)
  toks, mask = batch['input_tokens'], batch['target_mask']
  n0, n1 = (toks != 0).sum(1)
  packed = np.zeros((1, 2 * L), np.int32)
  pmask = np.zeros((1, 2 * L), bool)
  seg = np.zeros((1, 2 * L), np.int32)
  packed[0, :n0], packed[0, n0:n0 + n1] = toks[0, :n0], toks[1, :n1]
  pmask[0, :n0], pmask[0, n0:n0 + n1] = mask[0, :n0], mask[1, :n1]
  seg[0, :n0], seg[0, n0:n0 + n1] = 1, 2
  two = {'input_tokens': toks, 'target_mask': mask}
  ref, ref_aux = loss_lib.forward_and_loss_fn(params, model, two)
  got, aux = loss_lib.forward_and_loss_fn(
      params, model, {'input_tokens': packed, 'target_mask': pmask,
                      'segment_ids': seg})
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  assert int(aux['num_target_tokens']) == int(ref_aux['num_target_tokens'])
  # Explicit positions give the same result as derived ones.
  pos = np.asarray(loss_lib.segment_positions(jnp.asarray(seg)))
  assert pos[0, :n0].tolist() == list(range(n0))
  assert pos[0, n0:n0 + n1].tolist() == list(range(n1))
  got2, _ = loss_lib.forward_and_loss_fn(
      params, model, {'input_tokens': packed, 'target_mask': pmask,
                      'segment_ids': seg, 'positions': pos})
  assert float(got2) == float(got)


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_sgd_step_is_params_minus_lr_grad(tiny):
  model, params = tiny
  batch = make_batch()
  lr = 0.5
  opt = make_optimizer(TrainingConfig(learning_rate=lr))
  grads = jax.jit(jax.grad(
      lambda p: loss_lib.forward_and_loss_fn(p, model, batch)[0]))(params)
  expect = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  step = steps.make_train_step(model, opt)
  state, metrics = step(TrainState(_copy(params), opt.init(params)), batch)
  new = state.params
  # Same math, separately compiled: equal up to float32 reassociation.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                        atol=1e-6), new, expect)
  loss, _ = loss_lib.forward_and_loss_fn(params, model, batch)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-6)
  assert bool(jnp.any(jax.tree.leaves(new)[0] != jax.tree.leaves(params)[0]))


def test_grad_accumulation_equals_big_batch(tiny):
  model, params = tiny
  batch = make_batch(seed=5, b=8)  # Micro-batches hold unequal target counts.
  one = steps.make_grad_fn(model, grad_accum_steps=1)
  four = steps.make_grad_fn(model, grad_accum_steps=4)
  l1, a1, g1 = jax.jit(one)(params, batch)
  l4, a4, g4 = jax.jit(four)(params, batch)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  assert int(a4['num_target_tokens']) == int(a1['num_target_tokens'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                        atol=1e-7), g4, g1)
  with pytest.raises(ValueError, match='micro-batches'):
    steps.make_grad_fn(model, grad_accum_steps=3)(params, batch)


def test_optimizers_and_clipping(tiny):
  model, params = tiny
  batch = make_batch()
  cfg = TrainingConfig(optimizer='adamw', learning_rate=1e-3, grad_clip=1.0,
                       weight_decay=0.1)
  opt = make_optimizer(cfg)
  _, m = steps.make_train_step(model, opt)(
      TrainState(_copy(params), opt.init(params)), batch)
  assert np.isfinite(float(m['loss']))
  with pytest.raises(ValueError, match='sgd'):
    make_optimizer(TrainingConfig(optimizer='lion'))
  # Pure optax on a small tree: adafactor runs; clipped SGD's update has
  # global norm lr * clip.
  tree = {'a': jnp.ones((4, 3)), 'b': jnp.arange(5.0)}
  grads = jax.tree.map(lambda x: 10 * x + 1, tree)
  opt = make_optimizer(TrainingConfig(optimizer='adafactor'))
  u, _ = opt.update(grads, opt.init(tree), tree)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(u))
  opt = make_optimizer(TrainingConfig(learning_rate=2.0, grad_clip=1e-3))
  u, _ = opt.update(grads, opt.init(tree), tree)
  np.testing.assert_allclose(steps.global_norm(u), 2e-3, rtol=1e-5)


def test_validation_step_sums(tiny):
  model, params = tiny
  batch = make_batch()
  aux = steps.make_validation_step(model)(TrainState(params, None), batch)
  loss, ref = loss_lib.forward_and_loss_fn(params, model, batch)
  np.testing.assert_allclose(aux['loss_sum'] / aux['num_target_tokens'], loss,
                             rtol=1e-6)


@pytest.mark.parametrize('schedule,at', [
    ('constant', {0: 0.0, 5: 1.0, 10: 2.0, 30: 2.0}),
    ('linear', {0: 0.0, 10: 2.0, 20: 1.0, 30: 0.0}),
    ('cosine', {0: 0.0, 10: 2.0, 20: 1.0, 30: 0.0}),
])
def test_learning_rate_schedules(schedule, at):
  """Warm-up to the peak over 10 steps, then the schedule ends at step 30."""
  cfg = TrainingConfig(learning_rate=2.0, warmup_steps=10, lr_schedule=schedule)
  lr = learning_rate_schedule(cfg, total_steps=30)
  for step, want in at.items():
    np.testing.assert_allclose(float(lr(step)), want, atol=1e-6)
