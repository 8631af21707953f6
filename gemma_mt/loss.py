"""Next-token cross-entropy on target tokens, without [B, L, V] logits.

A batch is a mapping (or a `data.TrainingInput`) with `input_tokens [B, L]`
and `target_mask [B, L]` (True where token t is a target, i.e. the loss of
predicting tokens[t] from tokens[:t] counts), and optionally `segment_ids`
and `positions` for packed rows (several examples per row, segment 0 = pad).

The vocabulary is 256K, so full float32 logits for a 4 x 128 batch already
take 0.5 GB and their gradient as much again. Instead the model returns
final-normed hidden states and the LM head + log-softmax run over chunks of
about `chunk_size` tokens, each under `jax.checkpoint` so the backward pass
recomputes a chunk's logits instead of keeping them. Each row's target
positions are moved to its front first and chunks without any target are
skipped, so most of the prompt and padding cost no LM-head FLOPs.

The loss is the sum over all target tokens of the batch divided by their
count (not a mean of per-row means, nor only row 0 as in the tutorial).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gemma_mt import model as model_lib

Array = jax.Array
Batch = Mapping[str, Array]  # input_tokens, target_mask[, segment_ids, positions]

DEFAULT_CHUNK_SIZE = 512


def as_batch(batch: Any) -> dict[str, Any]:
  """A dict view of a `TrainingInput` (NamedTuple) or a mapping."""
  if hasattr(batch, '_asdict'):
    batch = batch._asdict()
  return {k: v for k, v in dict(batch).items() if v is not None}


def model_inputs(batch: Batch, pad_id: int = 0):
  """(tokens, positions, attention_mask [B, L, L], input_mask [B, L])."""
  tokens = jnp.asarray(batch['input_tokens'])
  segment_ids = batch.get('segment_ids')
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    input_mask = segment_ids != 0
    attention_mask = model_lib.segment_causal_mask(segment_ids)
  else:
    input_mask = tokens != pad_id
    attention_mask = model_lib.causal_mask(input_mask)
  positions = batch.get('positions')
  if positions is None:
    positions = (model_lib.positions_from_mask(input_mask) if segment_ids is None
                 else segment_positions(segment_ids))
  return tokens, jnp.asarray(positions, jnp.int32), attention_mask, input_mask


def segment_positions(segment_ids: Array) -> Array:
  """0, 1, ... restarting at every segment of a packed row."""
  L = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def target_weights(batch: Batch) -> Array:
  """[B, L-1] bool: the prediction made at position t counts (token t+1)."""
  w = jnp.asarray(batch['target_mask'], bool)[:, 1:]
  segment_ids = batch.get('segment_ids')
  if segment_ids is not None:  # Never predict across a segment boundary.
    segment_ids = jnp.asarray(segment_ids)
    w &= (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  return w


def num_target_tokens(batch: Batch) -> Array:
  return jnp.sum(target_weights(batch), dtype=jnp.int32)


def chunked_cross_entropy(hidden: Array, table: Array, labels: Array,
                          weights: Array, softcap: float | None = None,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> Array:
  """Sum of weighted CE of `hidden @ table.T` against `labels`.

  hidden [B, T, D] (or [T, D]), table [V, D], labels/weights [B, T]. Float32
  logits exist for one chunk of about `chunk_size` tokens at a time
  ([B, chunk_size // B, V]), in the forward and (recomputed) in the
  backward pass. Rows stay rows: with a batch sharded over devices every
  device works on its own rows, no gather.
  """
  if hidden.ndim == 2:
    hidden, labels, weights = hidden[None], labels[None], weights[None]
  B, T, D = hidden.shape
  weights = weights.astype(bool)
  # Each row's target positions first (stable): trailing chunks where no
  # row has a target (prompts, padding) are skipped below.
  order = jnp.argsort(~weights, axis=1, stable=True)
  hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
  labels = jnp.take_along_axis(labels, order, axis=1)
  weights = jnp.take_along_axis(weights, order, axis=1)
  c = max(1, min(chunk_size // B, T))
  num_chunks = -(-T // c)
  pad = num_chunks * c - T
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  table = table.astype(hidden.dtype)  # Cast once, not once per chunk.

  @jax.checkpoint
  def chunk_loss(table, h, y, w):
    logits = model_lib.logits_from_hidden(table, h, softcap)  # [B, c, V] f32
    label_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logit
    return jnp.sum(jnp.where(w, nll, 0.0))

  def body(total, xs):
    h, y, w = xs
    loss = jax.lax.cond(jnp.any(w), chunk_loss, lambda *_: jnp.float32(0),
                        table, h, y, w)
    return total + loss, None

  chunks = lambda x: jnp.moveaxis(
      x.reshape(B, num_chunks, c, *x.shape[2:]), 1, 0)
  total, _ = jax.lax.scan(body, jnp.float32(0),
                          (chunks(hidden), chunks(labels), chunks(weights)))
  return total


def loss_sum_fn(params, model, batch: Batch, *, pad_id: int = 0,
                chunk_size: int = DEFAULT_CHUNK_SIZE):
  """(sum of target-token NLL, aux) of one batch; aux has token counts."""
  batch = as_batch(batch)
  tokens, positions, attention_mask, input_mask = model_inputs(batch, pad_id)
  hidden, _ = model.apply({'params': params}, tokens, positions,
                          attention_mask, return_hidden=True)
  weights = target_weights(batch)
  loss_sum = chunked_cross_entropy(
      hidden[:, :-1], params['embedder']['input_embedding'], tokens[:, 1:],
      weights, model.config.final_logit_softcap, chunk_size)
  aux = {'num_target_tokens': jnp.sum(weights, dtype=jnp.int32),
         'num_tokens': jnp.sum(input_mask, dtype=jnp.int32),
         'loss_sum': loss_sum}
  return loss_sum, aux


def forward_and_loss_fn(params, model, batch: Batch, *, pad_id: int = 0,
                        chunk_size: int = DEFAULT_CHUNK_SIZE):
  """(mean NLL per target token over the whole batch, aux)."""
  loss_sum, aux = loss_sum_fn(params, model, batch, pad_id=pad_id,
                              chunk_size=chunk_size)
  return loss_sum / jnp.maximum(aux['num_target_tokens'], 1), aux
