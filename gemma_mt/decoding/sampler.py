"""Batched decoding with a KV cache: prefill plus a `while_loop`, one jit.

Token level only (no tokenizer): `Sampler.generate` takes prompt token arrays
and returns the generated ids. Everything per token runs on the device:
sampling, per-row done flags and the early exit once every row is done, so a
whole batch costs one dispatch and one transfer back.

Shapes are bucketed so that compiled executables are reused: prompt width and
the generation budget round up to powers of two, the batch to a power of two
(at most `batch_size`). Executables live in a small LRU keyed by their
shapes and mode ((batch, prompt width, budget, sampling mode) here;
`continuous` keys its own); a miss reads the executable store
(`executables`: what an earlier process compiled) before compiling, and
`ready` gets several at once, side by side; `num_compiles`, `num_loaded`
and `ready_seconds` count the two and the time they took.

Cache layout (`ModelConfig.init_cache`): right-padded prompts fill slots
[0, P); generated token j is written at slot P + j with position
prompt_len + j. Each row sees its own prompt slots and the generated ones.

Data parallel (`mesh=`, see `sharding`): params are placed with
`sampling_params` (replicated, or FSDP-sharded if the mesh has fsdp > 1),
each batch's per-row inputs are split over the mesh's devices and the KV
cache is created with the same row sharding, so the whole decode loop runs
batch-sharded. A bucket too small to split runs replicated.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gemma_mt import sharding as SH
from gemma_mt.decoding import executables
from gemma_mt.decoding.sampling import (SamplingMode, SamplingParams,
                                        next_pow2, row_keys, sample_logits)
from gemma_mt.models.layers import causal_mask, positions_from_mask

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
_DEFAULT = object()  # `Sampler(store=...)` not given


CPU_ROWS = 32      # decode rows on a CPU, where each row costs its own time
MAX_ROWS = 256     # decode rows at most on an accelerator
MEMORY_SHARE = 0.5  # of the device memory left after the weights


def rows_for_memory(model, cache_len: int, free_bytes: int | None,
                    cap: int = MAX_ROWS) -> int:
  """Decode rows that fit `MEMORY_SHARE` of `free_bytes`: a power of two,
  1 to `cap`. A row holds its KV cache (`cache_len` slots) and its float32
  logits with their sampling temporaries. On an accelerator a decode step
  at these sizes costs about the same for 32 rows as for 256 (it reads the
  weights once, and is bound by kernel count), so rows are nearly free
  throughput; `free_bytes` None (a CPU) gives `CPU_ROWS`."""
  if free_bytes is None:
    return min(CPU_ROWS, cap)
  cache = jax.eval_shape(lambda: model.config.init_cache(1, cache_len,
                                                         dtype=model.dtype))
  per_row = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  per_row += 4 * 4 * model.config.vocab_size
  fit = int(MEMORY_SHARE * free_bytes // per_row)
  return max(1, min(cap, 1 << max(fit, 1).bit_length() - 1))


def free_device_bytes(device=None) -> int | None:
  """Bytes the device can still allocate; None where it does not say (a
  CPU)."""
  device = device or jax.local_devices()[0]
  if device.platform == 'cpu':
    return None
  stats = device.memory_stats() or {}
  if 'bytes_limit' not in stats:
    return None
  return stats['bytes_limit'] - stats.get('bytes_in_use', 0)


def batch_bucket(n: int, batch_size: int) -> int:
  """Rows a batch of n is padded to: a power of two, capped at batch_size."""
  return min(next_pow2(n), batch_size)


class DecodeState(NamedTuple):
  """The `while_loop` carry: step i feeds token i-1 and samples token i."""

  step: jax.Array   # i, int32
  token: jax.Array  # [B] the last sampled token of each row
  cache: dict       # the KV cache (`ModelConfig.init_cache`)
  out: jax.Array    # [B, budget] generated tokens, pad after each row's end
  done: jax.Array   # [B] bool: stopped (stop token or its limit)
  count: jax.Array  # [B] tokens generated so far (incl. the stop token)


def constrain(cache, row_sharding):
  """Pins the cache's [rows, ...] leaves to `row_sharding` (a mesh's batch
  sharding; end_index replicated). None: no constraint."""
  if row_sharding is None:
    return cache
  scalar = SH.replicated(row_sharding.mesh)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, row_sharding if x.ndim else scalar), cache)


def prefill(apply, model, prompt, prompt_len, S, row_sharding):
  """Right-padded prompts [B, P] into an empty cache of S slots: (hidden
  state [B, D] of each row's last prompt token, cache)."""
  B, P = prompt.shape
  cache = constrain(model.config.init_cache(B, S, dtype=model.dtype),
                    row_sharding)
  pmask = jnp.arange(P)[None] < prompt_len[:, None]
  attn = jnp.zeros((B, P, S), bool).at[:, :, :P].set(causal_mask(pmask))
  hidden, cache = apply(prompt, positions_from_mask(pmask), attn, cache)
  return hidden[jnp.arange(B), prompt_len - 1], cache


def model_fns(model, params):
  """(apply, logits) of a decoder and its params: the step that returns
  hidden states and the LM head, both through the model protocol."""
  variables = {'params': params}
  apply = functools.partial(model.apply, variables, return_hidden=True)
  logits = functools.partial(model.apply, variables, method='logits')
  return apply, logits


def _step(apply, tokens, cache, i, P, prompt_len, row_sharding):
  """Feeds generated token i-1 of each row (slot P+i-1, position
  prompt_len+i-1); it sees its own prompt and the generated slots up to
  itself. Returns (hidden [B, D], cache)."""
  slots = jnp.arange(cache['positions'].shape[1])[None]
  seen = (slots < prompt_len[:, None]) | ((slots >= P) & (slots < P + i))
  hidden, cache = apply(tokens[:, None], (prompt_len + i - 1)[:, None],
                        seen[:, None, :], cache)
  return hidden[:, 0], constrain(cache, row_sharding)


def decode(params, prompt, prompt_len, active, row_ids, sampling: SamplingParams,
           max_new_tokens, stop_table, *, model, mode: SamplingMode,
           budget: int, pad_id: int,
           row_sharding: jax.sharding.NamedSharding | None = None):
  """Generates up to `max_new_tokens[r]` (1..budget) tokens for row r.

  prompt [B, P] right-padded, prompt_len [B] >= 1, active [B] (False for
  bucket padding rows), stop_table [V] bool (EOS, newline, ...). The loop
  ends when every row is done (stop token or its own limit).
  Returns (tokens [B, budget] with pad after the end, counts [B]); a row's
  count includes the stop token it ended on. `row_sharding` (a mesh's batch
  sharding) pins the KV cache's rows to it; None: no constraint.
  """
  B, P = prompt.shape
  S = P + budget
  apply, logits_of = model_fns(model, params)

  def sample(logits, step):
    return sample_logits(logits, row_keys(sampling.seed, row_ids, step),
                         sampling, mode)

  last, cache = prefill(apply, model, prompt, prompt_len, S, row_sharding)
  tok = jnp.where(active, sample(logits_of(last), 0), pad_id)
  out = jnp.full((B, budget), pad_id, jnp.int32).at[:, 0].set(tok)
  count = active.astype(jnp.int32)
  done = ~active | stop_table[tok] | (count >= max_new_tokens)

  def cond(state: DecodeState):
    return (state.step < budget) & ~jnp.all(state.done)

  def body(state: DecodeState) -> DecodeState:
    i, done = state.step, state.done
    hidden, cache = _step(apply, state.token, state.cache, i, P, prompt_len,
                          row_sharding)
    new = jnp.where(done, pad_id, sample(logits_of(hidden), i))
    out = jax.lax.dynamic_update_slice(state.out, new[:, None], (0, i))
    count = state.count + (~done).astype(jnp.int32)
    done = done | stop_table[new] | (count >= max_new_tokens)
    return DecodeState(i + 1, new, cache, out, done, count)

  state = DecodeState(jnp.int32(1), tok, cache, out, done, count)
  state = jax.lax.while_loop(cond, body, state)
  return state.out, state.count


def length_penalty_of(length, alpha):
  """GNMT's length penalty ((5 + length) / 6) ** alpha (1 for alpha 0)."""
  return ((5.0 + length) / 6.0) ** alpha


class Hypothesis(NamedTuple):
  """One beam search result: ids (ending with the stop token, if any),
  total log-prob, and that divided by the length penalty."""

  ids: np.ndarray
  logp: float
  score: float


class BeamState(NamedTuple):
  """The beam search carry, per row b and beam k (alive and finished)."""

  step: jax.Array           # i: tokens generated so far by alive beams ([] or [B])
  token: jax.Array          # [B*K] the alive beams' last tokens
  cache: dict               # KV cache of the B*K alive beams
  alive_seq: jax.Array      # [B, K, budget]
  alive_logp: jax.Array     # [B, K] total log-prob (-inf: no beam)
  fin_seq: jax.Array        # [B, K, budget]
  fin_logp: jax.Array       # [B, K] total log-prob, stop token included
  fin_score: jax.Array      # [B, K] logp / length penalty (-inf: empty)
  fin_len: jax.Array        # [B, K] tokens, stop token included


def beam_start(B: int, K: int, budget: int, pad_id: int, cache=None,
               step=None) -> BeamState:
  """No token yet: one live beam per row (K copies of a prompt: one counts)."""
  neg = jnp.float32(-jnp.inf)
  empty = jnp.full((B, K, budget), pad_id, jnp.int32)
  return BeamState(
      jnp.int32(0) if step is None else step, jnp.zeros(B * K, jnp.int32),
      cache, empty, jnp.full((B, K), neg).at[:, 0].set(0.0), empty,
      jnp.full((B, K), neg), jnp.full((B, K), neg), jnp.zeros((B, K), jnp.int32))


def beam_step(state: BeamState, logp, limit, alpha, stop_table
              ) -> tuple[BeamState, jax.Array]:
  """One step of every row: logp [B, K, V] of the alive beams' next tokens
  (`state.step` i, one for all rows or one per row; `limit` [B, 1]).

  Keeps the 2K best continuations by log-prob: those among the K best that
  end on a stop token (or at the row's limit) join the finished set (as
  fairseq; with K = 1 this is greedy), ranked by log-prob / GNMT length
  penalty; the K best that go on stay alive. Returns (the state, its cache
  untouched, and the parent beam [B, K] of each new alive beam: the caller
  reorders the cache's rows)."""
  B, K, V = logp.shape
  neg = jnp.float32(-jnp.inf)
  i = state.step  # The new token is token i (0-based), length i + 1.
  at_i = jnp.arange(state.alive_seq.shape[-1]) == jnp.reshape(i, (-1, 1, 1))
  # The 2K best of each beam hold the 2K best of the row: a top-k over K*V
  # is then one over 2K*K.
  n = min(2 * K, V)
  top, idx = jax.lax.top_k(state.alive_logp[..., None] + logp, n)
  top, pick = jax.lax.top_k(top.reshape(B, K * n), 2 * K)
  beam = pick // n
  tok = jnp.take_along_axis(idx.reshape(B, -1), pick, axis=1).astype(jnp.int32)
  seqs = jnp.take_along_axis(state.alive_seq, beam[..., None], axis=1)
  seqs = jnp.where(at_i, tok[..., None], seqs)
  length = jnp.reshape(i + 1, (-1, 1))
  ends = stop_table[tok] | (length >= limit)
  done = ends & (jnp.arange(2 * K) < K) & (top > neg)
  score = jnp.where(done, top / length_penalty_of(length, alpha), neg)
  all_score = jnp.concatenate([state.fin_score, score], 1)
  all_logp = jnp.concatenate([state.fin_logp, top], 1)
  all_len = jnp.concatenate(
      [state.fin_len, jnp.broadcast_to(length, (B, 2 * K)).astype(jnp.int32)], 1)
  all_seq = jnp.concatenate([state.fin_seq, seqs], 1)
  fin_score, fin = jax.lax.top_k(all_score, K)
  take = lambda x: jnp.take_along_axis(x, fin, axis=1)
  alive_logp, keep = jax.lax.top_k(jnp.where(ends, neg, top), K)
  return BeamState(
      i + 1, jnp.take_along_axis(tok, keep, axis=1).reshape(-1), state.cache,
      jnp.take_along_axis(seqs, keep[..., None], axis=1), alive_logp,
      jnp.take_along_axis(all_seq, fin[..., None], axis=1), take(all_logp),
      fin_score, take(all_len)), jnp.take_along_axis(beam, keep, axis=1)


def check_beam_args(beam_size: int, length_penalty: float) -> None:
  """K >= 1, and alpha >= 0: `beam_final`'s bound (the penalty is largest
  at the limit) needs it."""
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}')
  if not length_penalty >= 0:
    raise ValueError(f'length_penalty must be >= 0, got {length_penalty}')


def beam_final(state: BeamState, limit, alpha) -> jax.Array:
  """[B] rows whose K finished hypotheses no alive beam can still beat: its
  log-prob only falls, and the penalty is largest at the row's limit."""
  best_alive = state.alive_logp[:, 0] / length_penalty_of(limit[:, 0], alpha)
  return ((state.fin_score[:, -1] > best_alive) |
          (state.alive_logp[:, 0] == -jnp.inf))


def reorder_rows(cache, rows):
  """The cache with its rows taken from `rows` (end_index kept)."""
  return {k: v if k == 'end_index' else jax.tree.map(lambda x: x[rows], v)
          for k, v in cache.items()}


def log_probs(logits_of, hidden, K):
  """[B*K, D] hidden states -> [B, K, V] float32 log-probs."""
  logits = logits_of(hidden).astype(jnp.float32)
  return jax.nn.log_softmax(logits, -1).reshape(-1, K, logits.shape[-1])


def beam_decode(params, prompt, prompt_len, active, max_new_tokens,
                stop_table, length_penalty, *, model,
                beam_size: int, budget: int, pad_id: int,
                row_sharding: jax.sharding.NamedSharding | None = None):
  """Beam search: the K best hypotheses of each row, one jit.

  As `decode`, but each row keeps `beam_size` K alive beams (the KV cache
  holds B*K rows, reordered after every step) and K finished hypotheses
  (`beam_step`; alpha = `length_penalty`, 0 = raw log-prob). With K = 1
  this is greedy. The loop ends when every row is final (`beam_final`).
  Returns (tokens [B, K, budget], lengths [B, K], logp [B, K],
  scores [B, K]), best first.
  """
  B, P = prompt.shape
  K, S = beam_size, P + budget
  apply, logits_of = model_fns(model, params)
  alpha = jnp.asarray(length_penalty, jnp.float32)
  len_bk = jnp.repeat(prompt_len, K)  # K rows per prompt, beam-major.
  last, cache = prefill(apply, model, jnp.repeat(prompt, K, axis=0), len_bk,
                         S, row_sharding)
  limit = jnp.where(active, max_new_tokens, 1)[:, None]  # [B, 1]
  # The K rows of a prompt hold the same cache: no reordering yet.
  state, _ = beam_step(beam_start(B, K, budget, pad_id, cache),
                       log_probs(logits_of, last, K), limit, alpha, stop_table)

  def cond(state: BeamState):
    return (state.step < budget) & ~jnp.all(~active | beam_final(state, limit, alpha))

  def body(state: BeamState) -> BeamState:
    hidden, cache = _step(apply, state.token, state.cache, state.step, P,
                          len_bk, None)  # Constrained after reordering.
    state, parent = beam_step(state, log_probs(logits_of, hidden, K), limit,
                              alpha, stop_table)
    rows = (jnp.arange(B)[:, None] * K + parent).reshape(-1)
    return state._replace(cache=constrain(reorder_rows(cache, rows), row_sharding))

  state = jax.lax.while_loop(cond, body, state)
  return state.fin_seq, state.fin_len, state.fin_logp, state.fin_score


def split_batches(lengths: Sequence[int], batch_size: int,
                  max_pad_ratio: float | None = None) -> list[list[int]]:
  """Indices of each batch: by increasing length, at most batch_size each.

  With `max_pad_ratio`, a batch is also closed before a row whose prompt
  bucket would make the batch's padded prompt tokens exceed that many
  times its real ones. Off by default: on a GPU a second batch costs a
  second decode loop (up to `max_new_tokens` steps, each bound by kernel
  count rather than batch size), far more than the padded prefill it
  saves (BENCHMARKS.md); it can pay off on a CPU.
  """
  batches, cur, real = [], [], 0
  for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
    n = lengths[i]
    padded = (len(cur) + 1) * next_pow2(n, MIN_PROMPT_BUCKET)
    if cur and (len(cur) == batch_size or (
        max_pad_ratio is not None and padded > max_pad_ratio * (real + n))):
      batches.append(cur)
      cur, real = [], 0
    cur.append(i)
    real += n
  return batches + [cur] if cur else batches


def progress_bar(total: int, enabled: bool = True):
  """The sentence bar of every decode path (tqdm: rate and ETA)."""
  return tqdm.tqdm(total=total, unit='sent', disable=not enabled,
                   dynamic_ncols=True, leave=False)


class Sampler:
  """Runs `decode` over bucketed batches with a small LRU of executables."""

  def __init__(self, model, params: Any, *, pad_id: int,
               stop_ids: Sequence[int], batch_size: int = 32,
               cache_size: int = 16, max_pad_ratio: float | None = None,
               mesh: jax.sharding.Mesh | None = None, progress: bool = False,
               store: executables.ExecutableStore | None | object = _DEFAULT):
    """`progress`: a tqdm bar over sentences. `mesh`: decode data-parallel
    over its devices (module docstring); `store`: where compiled
    executables are kept across processes (default
    `executables.default()`, which the CLIs set; None: nowhere);
    `params` may then be anywhere (host, one device): they are placed with
    `sharding.sampling_params`. None: the default device, as given."""
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if mesh is not None and mesh.size > 1 and model.fast_decode:
      raise ValueError('fast_decode runs a Pallas kernel that XLA cannot '
                       'split over a mesh: use fast_decode=False with mesh')
    self.model = model
    self.mesh = mesh
    self.progress = progress
    self.params = params if mesh is None else SH.sampling_params(params, mesh)
    self.pad_id = int(pad_id)
    self.batch_size = batch_size
    self.max_pad_ratio = max_pad_ratio
    V = model.config.vocab_size
    bad = [i for i in stop_ids if not 0 <= i < V]
    if bad:
      raise ValueError(f'stop ids {bad} outside the vocabulary [0, {V})')
    table = np.zeros(V, bool)
    table[list(stop_ids)] = True
    self.stop_ids = frozenset(int(i) for i in stop_ids)
    self.stop_table = (jax.device_put(table) if mesh is None else
                        jax.device_put(table, SH.replicated(mesh)))
    self._cache_size = cache_size
    self.store = executables.default() if store is _DEFAULT else store
    self.num_loaded = 0  # executables read from the store
    self._executables: collections.OrderedDict = collections.OrderedDict()
    self.num_compiles = 0
    self.compiled_shapes: list[tuple] = []  # (B, P, budget, mode) per compile
    self.ready_seconds = 0.0  # spent loading and compiling executables
    self._lock = threading.Lock()  # The LRU and counts: `ready` runs threads.
    # Device batches run and tokens of their longest rows (the loop's steps).
    self.batches_run = 0
    self.loop_steps = 0

  def generate(self, prompts: Sequence[np.ndarray], *,
               max_new_tokens: int | Sequence[int],
               temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0,
               epsilon: float | None = None,
               batch_size: int | None = None,
               row_ids: Sequence[int] | None = None) -> list[np.ndarray]:
    """Generated ids of each prompt (ending with its stop token, if any).

    `max_new_tokens` is one limit for all or one per prompt. Prompts are
    sorted by length and cut into batches (`split_batches`), so similar
    lengths share a prompt bucket; results come back in input order.
    A row's sampling key follows its input index, or `row_ids[i]` if given
    (ids that do not depend on what else is in the call).
    """
    mode, sampling = self.sampling_args(temperature, top_k, top_p, seed,
                                        epsilon)

    def run(batch, B, P, budget):
      tokens, lens, active, ids, limits = batch
      out, count = self._call((B, P, budget, mode),
                              (tokens, lens, active, ids, sampling, limits))
      self.loop_steps += int(count.max())
      return [out[r, :count[r]] for r in range(B)]

    return self._batched(prompts, max_new_tokens, batch_size, run, row_ids)

  def sampling_args(self, temperature=0.0, top_k=None, top_p=None, seed=0,
                    epsilon=None) -> tuple[SamplingMode, SamplingParams]:
    """(static mode, traced values) of a sampling setting."""
    mode = SamplingMode.of(temperature, top_k, top_p,
                           self.model.config.vocab_size, epsilon)
    return mode, SamplingParams.of(temperature, top_k, top_p, seed, epsilon)

  def beam_search(self, prompts: Sequence[np.ndarray], *,
                  max_new_tokens: int | Sequence[int], beam_size: int,
                  length_penalty: float = 0.0,
                  batch_size: int | None = None) -> list[list[Hypothesis]]:
    """The `beam_size` best hypotheses of each prompt, best first
    (`beam_decode`); batching as in `generate` (`batch_size` prompts, each
    with `beam_size` rows)."""
    check_beam_args(beam_size, length_penalty)

    def run(batch, B, P, budget):
      tokens, lens, active, _, limits = batch
      seq, n, logp, score = self._call(
          (B, P, budget, ('beam', beam_size)), (tokens, lens, active, limits),
          np.float32(length_penalty))
      self.loop_steps += int(n.max())
      return [[Hypothesis(seq[r, k, :n[r, k]], float(logp[r, k]),
                          float(score[r, k])) for k in range(beam_size)]
              for r in range(B)]

    return self._batched(prompts, max_new_tokens, batch_size, run)

  def _batched(self, prompts, max_new_tokens, batch_size, run, row_ids=None):
    """Checks, sorts into buckets, runs each batch, restores input order."""
    batch_size = batch_size or self.batch_size
    limits = self.limits(prompts, max_new_tokens)
    results: list = [None] * len(prompts)
    bar = progress_bar(len(prompts), self.progress)
    for idx in split_batches([len(p) for p in prompts], batch_size,
                             self.max_pad_ratio):
      n = len(idx)
      B = batch_bucket(n, batch_size)
      P = next_pow2(max(len(prompts[i]) for i in idx), MIN_PROMPT_BUCKET)
      budget = next_pow2(int(limits[idx].max()), MIN_NEW_TOKENS_BUCKET)
      tokens = np.full((B, P), self.pad_id, np.int32)
      lens, lim = np.ones(B, np.int32), np.ones(B, np.int32)
      ids = np.zeros(B, np.int32)
      for r, i in enumerate(idx):
        tokens[r, :len(prompts[i])] = prompts[i]
        lens[r], lim[r] = len(prompts[i]), limits[i]
        ids[r] = i if row_ids is None else row_ids[i]
      outs = run((tokens, lens, np.arange(B) < n, ids, lim), B, P, budget)
      self.batches_run += 1
      for i, o in zip(idx, outs):
        results[i] = o
      bar.update(n)
    bar.close()
    return results

  def limits(self, prompts, max_new_tokens) -> np.ndarray:
    """The per-prompt limits; ValueError on an empty prompt or limit < 1."""
    if any(len(p) == 0 for p in prompts):
      raise ValueError('empty prompt: every prompt needs at least one token')
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64),
                             (len(prompts),))
    if len(prompts) and limits.min() < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {limits.min()}')
    return limits

  def _call(self, key, rows, *extra):
    """Runs the executable of `key` on `rows`, the inputs before the stop
    table (per-row arrays split over the mesh, if any; scalars copied), and
    `extra` after it; returns its outputs on the host."""
    if self.mesh is not None:  # [B, ...] split over the mesh, scalars copied.
      rows = SH.shard_decode_inputs(rows, self.mesh)
    args = (self.params, *rows, self.stop_table, *extra)
    return jax.device_get(self._executable(key, args)(*args))

  def _executable(self, key, args):
    def make():
      B, P, budget, mode = key
      K = mode[1] if isinstance(mode, tuple) else 1
      row_sharding = (None if self.mesh is None else
                      SH.decode_sharding(B * K, self.mesh))
      kw = dict(model=self.model, budget=budget, pad_id=self.pad_id,
                row_sharding=row_sharding)
      return (functools.partial(beam_decode, beam_size=K, **kw)
              if isinstance(mode, tuple) else
              functools.partial(decode, mode=mode, **kw))
    return self.compiled(key, make, args)

  @property
  def executables(self) -> dict:
    """The compiled executables held now, by key (e.g. to read their
    shardings or cost analysis)."""
    with self._lock:
      return dict(self._executables)

  def compiled(self, key, make, args, donate=()):
    """The executable of `key` from the LRU, else from the executable store
    (`executables`), else jit(make()) compiled for `args` (`donate`:
    argument numbers whose buffers it may reuse) and kept in both."""
    with self._lock:
      if key in self._executables:
        self._executables.move_to_end(key)
        return self._executables[key]
    self.ready([(key, make, args, donate)])
    return self._executables[key]

  def ready(self, jobs) -> None:
    """Gets executables ready side by side: `jobs` are (key, make, args,
    donate) as `compiled` takes them. The store's loads and XLA's compiles
    run in threads (both outside the GIL), so a call's few decoders take
    about as long as the slowest one where the host has the cores; tracing
    and lowering stay in this thread, under the caller's jax settings
    (precision, device, mesh contexts are per thread)."""
    with self._lock:
      jobs = [j for j in jobs if j[0] not in self._executables]
    if not jobs:
      return
    t0 = time.perf_counter()
    if jax.default_backend() == 'cpu':  # CPU buffers cannot be donated
      jobs = [(k, m, a, ()) for k, m, a, _ in jobs]  # (and it warns).
    paths = [self._path(*job) for job in jobs]
    pool = concurrent.futures.ThreadPoolExecutor(len(jobs))
    try:
      exes = list(pool.map(lambda p: p and self.store.load(p), paths))
      lowered = {i: jax.jit(make(), donate_argnums=donate).lower(*args)
                 for i, ((_, make, args, donate), exe) in enumerate(zip(jobs, exes))
                 if exe is None}
      built = dict(zip(lowered, pool.map(
          lambda i: self._compile(lowered[i], paths[i]), lowered)))
    finally:
      pool.shutdown()
    with self._lock:
      for i, (key, *_) in enumerate(jobs):
        if i in built:
          self.num_compiles += 1
          self.compiled_shapes.append(key)
        else:
          self.num_loaded += 1
        self._executables[key] = built.get(i) or exes[i]
        while len(self._executables) > max(self._cache_size, len(jobs)):
          self._executables.popitem(last=False)
      self.ready_seconds += time.perf_counter() - t0

  def _path(self, key, make, args, donate):
    """Where the store keeps `key`'s executable (None: no store)."""
    if self.store is None:
      return None
    mesh = None if self.mesh is None else (  # What `make` closes over,
        self.mesh, [d.id for d in self.mesh.devices.flat])  # then the args.
    static = f'{key!r}|{self.model!r}|{self.pad_id}|{mesh!r}'
    return self.store.path(static, args, donate)

  def _compile(self, lowered, path):
    if path is None:
      return lowered.compile()
    exe, fresh = self.store.compile(lowered)
    if fresh:
      self.store.save(path, exe)
    return exe
