"""Next-token cross-entropy on target tokens, without [B, L, V] logits.

A batch is a mapping (or a `data.TrainingInput`) with `input_tokens [B, L]`
and `target_mask [B, L]` (True where token t is a target, i.e. the loss of
predicting tokens[t] from tokens[:t] counts), and optionally `segment_ids`
and `positions` for packed rows (several examples per row, segment 0 = pad).

The vocabulary is 256K, so full float32 logits for a 4 x 128 batch already
take 0.5 GB and their gradient as much again. Instead the model returns
final-normed hidden states and the LM head + log-softmax run over chunks of
`chunk_size` target rows, each under `jax.checkpoint` so the backward pass
recomputes a chunk's logits instead of keeping them. Target rows are moved to
the front first and chunks without any target are skipped, so the prompt and
the padding cost no LM-head FLOPs.

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
  """Sum of weighted CE of `hidden [N, D] @ table[V, D].T` vs `labels [N]`.

  Float32 logits exist only for one chunk [chunk_size, V] at a time, in the
  forward and (recomputed) in the backward pass.
  """
  n, d = hidden.shape
  weights = weights.astype(bool)
  # Target rows first (stable), so all-padding chunks at the end are skipped.
  order = jnp.argsort(~weights, stable=True)
  hidden, labels, weights = hidden[order], labels[order], weights[order]
  chunk_size = max(1, min(chunk_size, n))
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  if pad:
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad))
    weights = jnp.pad(weights, (0, pad))
  table = table.astype(hidden.dtype)  # Cast once, not once per chunk.

  @jax.checkpoint
  def chunk_loss(table, h, y, w):
    logits = model_lib.logits_from_hidden(table, h, softcap)  # [C, V] f32
    label_logit = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logit
    return jnp.sum(jnp.where(w, nll, 0.0))

  def body(total, xs):
    h, y, w = xs
    loss = jax.lax.cond(jnp.any(w), chunk_loss, lambda *_: jnp.float32(0),
                        table, h, y, w)
    return total + loss, None

  xs = (hidden.reshape(num_chunks, chunk_size, d),
        labels.reshape(num_chunks, chunk_size),
        weights.reshape(num_chunks, chunk_size))
  total, _ = jax.lax.scan(body, jnp.float32(0), xs)
  return total


def loss_sum_fn(params, model, batch: Batch, *, pad_id: int = 0,
                chunk_size: int = DEFAULT_CHUNK_SIZE):
  """(sum of target-token NLL, aux) of one batch; aux has token counts."""
  batch = as_batch(batch)
  tokens, positions, attention_mask, input_mask = model_inputs(batch, pad_id)
  hidden, _ = model.apply({'params': params}, tokens, positions,
                          attention_mask, return_hidden=True)
  weights = target_weights(batch)
  B, L, D = hidden.shape
  loss_sum = chunked_cross_entropy(
      hidden[:, :-1].reshape(B * (L - 1), D),
      params['embedder']['input_embedding'],
      tokens[:, 1:].reshape(-1), weights.reshape(-1),
      model.config.final_logit_softcap, chunk_size)
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
