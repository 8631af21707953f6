"""How the next token is drawn from logits: the static `SamplingMode` (one
executable each) and the traced `SamplingParams`, with the per-row keys
that make a sample independent of its batch."""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def next_pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass(frozen=True)
class SamplingMode:
  """The static part of sampling (one executable each); values stay traced."""

  greedy: bool = True
  k_cap: int | None = None  # candidates kept by lax.top_k; None: no top-k
  top_p: bool = False
  epsilon: bool = False

  @classmethod
  def of(cls, temperature: float, top_k: int | None, top_p: float | None,
         vocab_size: int, epsilon: float | None = None) -> 'SamplingMode':
    if temperature == 0:
      return cls()
    k_cap = None if top_k is None else min(next_pow2(top_k), vocab_size)
    return cls(False, k_cap, top_p is not None and top_p < 1,
               epsilon is not None and epsilon > 0)


@flax.struct.dataclass
class SamplingParams:
  """The traced values of a sampling setting (a pytree of scalars), so
  one executable serves every temperature, k, p and seed of its mode."""

  seed: jax.Array
  temperature: jax.Array
  top_k: jax.Array   # 0: no top-k
  top_p: jax.Array   # 1: no nucleus cut
  epsilon: jax.Array  # 0: no epsilon cut

  @classmethod
  def of(cls, temperature: float = 0.0, top_k: int | None = None,
         top_p: float | None = None, seed: int = 0,
         epsilon: float | None = None) -> 'SamplingParams':
    return cls(np.int32(seed), np.float32(temperature or 1.0),
               np.int32(top_k or 0), np.float32(1.0 if top_p is None else top_p),
               np.float32(epsilon or 0.0))


def sample_logits(logits: jax.Array, keys: jax.Array, sp: SamplingParams,
                  mode: SamplingMode) -> jax.Array:
  """Next tokens [B] from logits [B, V]: argmax, or temperature/top-k/top-p.

  Order as in common samplers: scale by temperature, keep the top_k, then
  the smallest prefix of those whose probability reaches top_p, then (epsilon
  sampling, Hewitt et al. 2022) only tokens whose probability is at least
  epsilon. The most likely token is always kept. `keys` holds one PRNG key
  per row.
  """
  if mode.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sp.temperature
  if mode.k_cap is None and not mode.top_p:
    cand, idx = logits, None
  else:
    cand, idx = jax.lax.top_k(logits, mode.k_cap or logits.shape[-1])
    rank = jnp.arange(cand.shape[-1])
    keep = rank < (sp.top_k if mode.k_cap is not None else cand.shape[-1])
    cand = jnp.where(keep, cand, -jnp.inf)
    if mode.top_p:
      probs = jax.nn.softmax(cand, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of better tokens
      cand = jnp.where((before < sp.top_p) | (rank == 0), cand, -jnp.inf)
  if mode.epsilon:  # Probabilities of the whole (tempered) distribution.
    probs = jax.nn.softmax(logits, axis=-1)
    if idx is not None:
      probs = jnp.take_along_axis(probs, idx, axis=-1)
    top = jnp.max(cand, axis=-1, keepdims=True)
    cand = jnp.where((probs >= sp.epsilon) | (cand == top), cand, -jnp.inf)
  choice = jax.vmap(jax.random.categorical)(keys, cand)
  if idx is not None:
    choice = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
  return choice.astype(jnp.int32)


def row_keys(seed, row_ids, step):
  """One key per row that depends on (seed, row id, step) only.

  Row ids are input indices, so a sentence's sample does not depend on
  which other sentences share its batch or on the bucket it landed in.
  `step` is one step for all rows, or one per row (continuous batching).
  """
  base = jax.random.key(seed)
  rows = jax.vmap(jax.random.fold_in, (None, 0))(base, row_ids)
  return jax.vmap(jax.random.fold_in)(rows, jnp.broadcast_to(step, row_ids.shape))
