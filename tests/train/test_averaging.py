"""Averaged weights: the EMA kept in the optimizer state, the mean of K."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemma_mt.train import averaging as opt_lib


def _params():
  rng = np.random.default_rng(0)
  return {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)}


def test_ema_follows_the_recurrence_and_leaves_updates_alone():
  """Same updates as the inner optimizer; ema = d * ema + (1 - d) * params
  after every step, in float32, starting at the initial params."""
  d, params = 0.9, _params()
  inner = optax.sgd(0.1)
  tx = opt_lib.with_param_ema(inner, d)
  state, inner_state = tx.init(params), inner.init(params)
  want = jax.tree.map(lambda p: np.asarray(p, np.float32), params)
  for k in range(4):
    grads = jax.tree.map(lambda p: jnp.full_like(p, k + 1.0), params)
    u, state = tx.update(grads, state, params)
    u_ref, inner_state = inner.update(grads, inner_state, params)
    jax.tree.map(np.testing.assert_array_equal, u, u_ref)
    params = optax.apply_updates(params, u)
    want = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float32),
                        want, params)
  got = state.ema
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  avg = opt_lib.ema_params(state, params)
  assert jax.tree.map(lambda x: x.dtype, avg) == jax.tree.map(lambda x: x.dtype,
                                                              params)


def test_the_average_of_unchanged_params_is_the_params():
  params = _params()
  tx = opt_lib.with_param_ema(optax.sgd(0.1), 0.99)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(5):
    u, state = tx.update(zeros, state, params)
  # Equal up to float32 rounding of d * x + (1 - d) * x.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6),
      opt_lib.ema_params(state, params), params)
  assert opt_lib.ema_params(optax.sgd(0.1).init(params), params) is None


def test_the_mean_of_identical_params_is_the_params_and_is_a_mean():
  params = _params()
  for k in (1, 3):  # Up to float32 rounding of (k * x) / k.
    jax.tree.map(lambda m, p: np.testing.assert_allclose(
        np.asarray(m, np.float32), np.asarray(p, np.float32), rtol=1e-6),
        opt_lib.mean_params([params] * k), params)
  other = jax.tree.map(lambda x: x + 2, params)
  mean = opt_lib.mean_params([params, other])
  jax.tree.map(lambda m, p: np.testing.assert_allclose(
      np.asarray(m, np.float32), np.asarray(p, np.float32) + 1, rtol=1e-2),
      mean, params)
  assert jax.tree.map(lambda x: x.dtype, mean) == jax.tree.map(
      lambda x: x.dtype, params)
