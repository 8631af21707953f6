"""Next-token cross-entropy on target tokens, without [B, L, V] logits.

A batch is a mapping (or a `data.mtnt.TrainingInput`) with `input_tokens [B, L]`
and `target_mask [B, L]` (True where token t is a target, i.e. the loss of
predicting tokens[t] from tokens[:t] counts), and optionally `segment_ids`
and `positions` for packed rows (several examples per row, segment 0 = pad).

The vocabulary is 256K, so full float32 logits for a 4 x 128 batch already
take 0.5 GB and their gradient as much again. Instead the model returns
final-normed hidden states and the LM head + log-softmax run over chunks of
about `chunk_size` tokens. Each row's target positions are moved to its
front first and the loop stops after the last chunk holding a target, so the
prompt and the padding cost no LM-head FLOPs. Under differentiation one pass
over the chunks makes the loss and both gradients (a fused linear
cross-entropy with a custom VJP): each chunk's logits are computed once,
and the [V, D] table gradient is accumulated in float32 in place.

The loss is the sum over all target tokens of the batch divided by their
count (not a mean of per-row means, nor only row 0 as in the tutorial).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gemma_mt import sharding
from gemma_mt.models import layers as model_lib

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
                          chunk_size: int = DEFAULT_CHUNK_SIZE,
                          mesh: jax.sharding.Mesh | None = None,
                          label_smoothing: float = 0.0) -> Array:
  """Sum of weighted CE of `hidden @ table.T` against `labels`.

  hidden [B, T, D] (or [T, D]), table [V, D], labels/weights [B, T]. Float32
  logits exist for one chunk of about `chunk_size` tokens at a time
  ([B, chunk_size // B, V]). Under differentiation the forward pass also
  computes both gradients chunk by chunk (a custom VJP, as in Liger's fused
  linear cross-entropy): the logits are made once, not once more in the
  backward pass, and no autodiff runs through the loop. Rows stay rows: with
  a batch sharded over devices every device works on its own rows.

  `mesh`: the step's mesh, whose batch axes split the rows. The gradient
  pass then runs per device on its own rows (`shard_map`) and sums the
  [V, D] table gradient once, after the loop; left to XLA's partitioner,
  that all-reduce lands inside the loop, once per chunk.

  `label_smoothing` α: the target is (1 - α) on the label plus α spread
  evenly over the vocabulary (Szegedy et al. 2016), so each token's loss is
  (1 - α) NLL + α times the mean of -log p over the vocabulary.
  """
  if hidden.ndim == 2:
    hidden, labels, weights = hidden[None], labels[None], weights[None]
  n = 1 if mesh is None else sharding.num_batch_shards(mesh)
  if n == 1 or hidden.shape[0] % n:
    mesh = None
  return _fused_ce(softcap, chunk_size, mesh, float(label_smoothing), hidden,
                   table, labels, weights.astype(bool))


def _sorted_chunks(hidden, labels, weights, chunk_size):
  """Targets first in every row, padded to whole chunks; (..., order, c, n)."""
  B, T, _ = hidden.shape
  order = jnp.argsort(~weights, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(
      x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  hidden, labels, weights = take(hidden), take(labels), take(weights)
  c = max(1, min(chunk_size // B, T))
  pad = -T % c
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  # Chunks past every row's last target hold no loss: the loops stop there.
  active = -(-jnp.max(jnp.sum(weights, axis=1, dtype=jnp.int32)) // c)
  return hidden, labels, weights, order, c, active


def _chunk_nll(logits, y, w, smoothing=0.0):
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
  if smoothing:  # -sum_v q_v log p_v with q = (1 - a) onehot + a / V.
    target = (1 - smoothing) * target + smoothing * jnp.mean(logits, axis=-1)
  return jnp.sum(jnp.where(w, lse - target, 0.0)), lse


def _ce_loss_only(softcap, chunk_size, smoothing, hidden, table, labels,
                  weights):
  hidden, labels, weights, _, c, active = _sorted_chunks(
      hidden, labels, weights, chunk_size)
  table = table.astype(hidden.dtype)

  def body(i, total):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
    logits = model_lib.logits_from_hidden(table, sl(hidden), softcap)
    return total + _chunk_nll(logits, sl(labels), sl(weights), smoothing)[0]

  return jax.lax.fori_loop(0, active, body, jnp.float32(0))


def _ce_loss_and_grads(softcap, chunk_size, smoothing, hidden, table, labels,
                       weights, table_grad=True):
  """(loss, d loss/d hidden, d loss/d table or None), one pass over chunks."""
  T, dtype = hidden.shape[1], hidden.dtype
  hs, ys, ws, order, c, active = _sorted_chunks(hidden, labels, weights,
                                                chunk_size)
  table_c = table.astype(dtype)

  def body(i, carry):
    total, dh, dtable = carry
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
    h, y, w = sl(hs), sl(ys), sl(ws)
    logits = model_lib.logits_from_hidden(table_c, h, softcap)  # [B, c, V]
    nll, lse = _chunk_nll(logits, y, w, smoothing)
    # d nll / d logits = softmax - q (q: the smoothed one-hot), zero
    # off-target; then through the soft-cap:
    # d(cap * tanh(z / cap)) / dz = 1 - tanh^2 = 1 - (logits / cap)^2.
    dz = jnp.exp(logits - lse[..., None])
    dz -= (1 - smoothing) * jax.nn.one_hot(y, dz.shape[-1], dtype=dz.dtype)
    if smoothing:
      dz -= smoothing / dz.shape[-1]
    dz *= w[..., None]
    if softcap is not None:
      dz *= 1 - jnp.square(logits / softcap)
    dz = dz.astype(dtype)
    dh_c = jnp.einsum('bcv,vd->bcd', dz, table_c,
                      preferred_element_type=jnp.float32)
    dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_c.astype(dtype), i * c,
                                             axis=1)
    if dtable is not None:
      dtable += jnp.einsum('bcv,bcd->vd', dz, h,
                           preferred_element_type=jnp.float32)
    return total + nll, dh, dtable

  dtable = jnp.zeros(table.shape, jnp.float32) if table_grad else None
  total, dh, dtable = jax.lax.fori_loop(
      0, active, body, (jnp.float32(0), jnp.zeros_like(hs), dtable))
  inverse = jnp.argsort(order, axis=1)  # Back to the input's positions.
  dh = jnp.take_along_axis(dh[:, :T], inverse[..., None], axis=1)
  return total, dh, dtable


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused_ce(softcap, chunk_size, mesh, smoothing, hidden, table, labels,
              weights):
  del mesh  # The loss alone needs only a scalar sum per chunk.
  return _ce_loss_only(softcap, chunk_size, smoothing, hidden, table, labels,
                       weights)


def _fused_ce_fwd(softcap, chunk_size, mesh, smoothing, hidden, table, labels,
                  weights):
  # symbolic_zeros: `perturbed` is False for a frozen table (LoRA), whose
  # gradient is then not computed at all (a third of the LM-head FLOPs).
  grads = functools.partial(_ce_loss_and_grads, softcap, chunk_size,
                            smoothing, table_grad=table.perturbed)
  if mesh is not None:
    grads = _per_device(grads, mesh, table.perturbed)
  total, dh, dtable = grads(hidden.value, table.value, labels.value,
                            weights.value)
  if dtable is not None:
    dtable = dtable.astype(table.value.dtype)
  return total, (dh, dtable, labels.value, weights.value)


def _per_device(grads, mesh, table_grad):
  """`grads` on each device's rows; loss and table gradient summed once."""
  rows, axes = P(sharding.BATCH_AXES), sharding.BATCH_AXES

  def local(hidden, table, labels, weights):
    total, dh, dtable = grads(hidden, table, labels, weights)
    total = jax.lax.psum(total, axes)
    if dtable is None:
      return total, dh
    return total, dh, jax.lax.psum(dtable, axes)

  def run(hidden, table, labels, weights):
    out = jax.shard_map(
        local, mesh=mesh, in_specs=(rows, P(), rows, rows),
        out_specs=(P(), rows) if not table_grad else (P(), rows, P()),
        check_vma=False)(hidden, table, labels, weights)
    return out if table_grad else (*out, None)

  return run


def _fused_ce_bwd(softcap, chunk_size, mesh, smoothing, res, g):
  del softcap, chunk_size, mesh, smoothing
  dh, dtable, labels, weights = res
  g = jnp.asarray(g, jnp.float32)
  dh = (dh * g).astype(dh.dtype)
  dtable = None if dtable is None else (dtable * g).astype(dtable.dtype)
  return dh, dtable, _zero_cotangent(labels), _zero_cotangent(weights)


def _zero_cotangent(x):
  """Integer and bool inputs take float0 cotangents."""
  return np.zeros(x.shape, jax.dtypes.float0)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)


def loss_sum_fn(params, model, batch: Batch, *, pad_id: int = 0,
                chunk_size: int = DEFAULT_CHUNK_SIZE,
                mesh: jax.sharding.Mesh | None = None,
                label_smoothing: float = 0.0):
  """(sum of target-token NLL, aux) of one batch; aux has token counts.

  `mesh`: the mesh the batch is sharded over (see `chunked_cross_entropy`).
  """
  batch = as_batch(batch)
  tokens, positions, attention_mask, input_mask = model_inputs(batch, pad_id)
  hidden, _ = model.apply({'params': params}, tokens, positions,
                          attention_mask, return_hidden=True)
  weights = target_weights(batch)
  loss_sum = chunked_cross_entropy(
      hidden[:, :-1], params['embedder']['input_embedding'], tokens[:, 1:],
      weights, model.config.final_logit_softcap, chunk_size, mesh,
      label_smoothing)
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
