"""Continuous batching: a fixed set of slots; a finished row's slot takes the
next prompt while the others keep decoding.

A static batch runs until its longest row ends, so one runaway holds every
finished row of its batch. Here (as in JetStream's insert/generate split)
the device holds `slots` rows of a KV cache of S cache slots each:

* `insert` prefills up to `width` prompts into a small cache and copies each
  into a free row: its prompt fills slots [0, prompt length);
* `chunk` runs up to `CHUNK_STEPS` decode steps for all rows, each writing
  its fed token at its own next slot (`layers.write_at` with one index per
  row), then returns to the host, which collects finished rows and inserts
  new prompts into their slots.

A row's tokens are its slots [0, length), and it attends to those only: the
decode kernel (`fast_decode`) reads no slot past a row's own length, so a
short row costs a short read however large S is. What other rows hold, and
which slot a row landed in, never change its output: greedy output equals
static batching's, and sampling keys depend on (seed, input index, step)
as there.

Beam search runs the same way (`BeamDecoder`): a prompt's K beams are a
group of K rows, reordered within the group after each step; a group
whose K best are final (`sampler.beam_final`) takes the next prompt, so a
long beam no longer holds a whole static batch. Its hypotheses are
static `beam_decode`'s up to float rounding (one `sampler.beam_step`
serves both; equal in float32 in the tests).

Executables for a whole call: one `empty`, one `chunk` (slots, S, sampling
mode) and an `insert` per prompt width. A decoder made for a known set of
prompts (`for_prompts`) has two widths (see there), so it needs two inserts;
an open-ended one (the service) takes an insert per prompt-width bucket
(16, 32, 64, ...). S is `MIN_CACHE_LEN` or the
next power of two that holds the widest prompt bucket plus the largest
budget, so calls with similar inputs share executables.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mt.decoding.sampler import (MIN_PROMPT_BUCKET, BeamState,
                                       Hypothesis, beam_final, beam_start,
                                       check_beam_args,
                                       beam_step, log_probs, model_fns,
                                       prefill, progress_bar, reorder_rows)
from gemma_mt.decoding.sampling import (SamplingMode, SamplingParams,
                                        next_pow2, row_keys, sample_logits)

INSERT_WIDTH = 8   # prompts prefilled per insert call, at least (slots/8 for more slots)
CHUNK_STEPS = 16   # decode steps between two host checks
MIN_CACHE_LEN = 512     # cache slots per row, at least (memory only: rows read their own)


class Slots(NamedTuple):
  """Device state between calls; row r is one slot."""

  cache: dict        # KV cache [slots, S, ...]; a row's tokens are [0, length)
  token: jax.Array   # [N] last sampled token (fed next)
  length: jax.Array  # [N] tokens of the row in the cache (its next write slot)
  prompt_len: jax.Array  # [N]
  count: jax.Array   # [N] generated tokens so far (incl. a stop token)
  limit: jax.Array   # [N] max new tokens of the row
  done: jax.Array    # [N] finished, or empty
  row_id: jax.Array  # [N] input index (PRNG stream)
  out: jax.Array     # [N, budget] generated tokens


def empty(model, slots: int, cache_len: int, budget: int, pad_id: int) -> Slots:
  cache = model.config.init_cache(slots, cache_len, dtype=model.dtype)
  cache['end_index'] = jnp.zeros(slots, jnp.int32)  # One per row.
  z = lambda: jnp.zeros(slots, jnp.int32)  # Distinct buffers: all donated.
  return Slots(cache, z(), z(), z(), z(), z() + 1, jnp.ones(slots, bool), z(),
               jnp.full((slots, budget), pad_id, jnp.int32))


def put_prompts(cache, small, rows, repeat: int = 1):
  """`cache` with the prefilled prompts of `small` ([I, P] slots) in rows
  `rows` ([I * repeat]: each prompt `repeat` times; rows past the cache are
  dropped), at slots [0, P). Slots [prompt_len, P) get padding's keys:
  unseen, and overwritten by the row's own tokens before it reaches them."""
  I, P = small['positions'].shape
  put = lambda big, new: big.at[rows, :P].set(
      jnp.repeat(new, repeat, axis=0).astype(big.dtype), mode='drop')
  cache = dict(cache)
  for name in (k for k in cache if k.startswith('layer_')):  # (Gemma 4's
    layer, new = cache[name], small[name]  # KV-sharing layers own none.)
    cache[name] = {'k': put(layer['k'], new['k']), 'v': put(layer['v'], new['v'])}
  cache['positions'] = put(cache['positions'],
                           jnp.broadcast_to(jnp.arange(P)[None], (I, P)))
  return cache


def insert(params, state: Slots, prompt, prompt_len, slot, row_id, limit,
           sampling: SamplingParams, stop_table, *, model, mode: SamplingMode,
           pad_id: int) -> Slots:
  """Prefills prompt [I, P] (right-padded; slot = N for unused rows) and
  puts row i into slot[i], its prompt at slots [0, prompt_len[i])."""
  I, P = prompt.shape
  apply, logits_of = model_fns(model, params)
  last, small = prefill(apply, model, prompt, prompt_len, P, None)
  tok = sample_logits(logits_of(last), row_keys(sampling.seed, row_id, 0),
                      sampling, mode)
  cache = put_prompts(state.cache, small, slot)
  at = lambda x, v: x.at[slot].set(v, mode='drop')
  done = stop_table[tok] | (limit <= 1)
  budget = state.out.shape[1]
  first = jnp.full((I, budget), pad_id, jnp.int32).at[:, 0].set(tok)
  return state._replace(
      cache=cache, token=at(state.token, tok),
      length=at(state.length, prompt_len), prompt_len=at(state.prompt_len, prompt_len),
      count=at(state.count, jnp.ones(I, jnp.int32)), limit=at(state.limit, limit),
      done=at(state.done, done), row_id=at(state.row_id, row_id),
      out=state.out.at[slot].set(first, mode='drop'))


def chunk(params, state: Slots, sampling: SamplingParams, stop_table, *,
          model, mode: SamplingMode, pad_id: int,
          steps: int = CHUNK_STEPS) -> Slots:
  """Up to `steps` decode steps for every unfinished row (fewer if all end)."""
  S = state.cache['positions'].shape[1]
  apply, logits_of = model_fns(model, params)

  def body(carry):
    n, s = carry
    live = ~s.done  # A finished row writes past its tokens, unseen.
    cache = dict(s.cache, end_index=s.length)
    length = s.length + live
    seen = jnp.arange(S)[None] < length[:, None]
    pos = s.prompt_len + s.count - 1  # Position of the token fed.
    hidden, cache = apply(s.token[:, None], pos[:, None], seen[:, None, :], cache)
    new = sample_logits(logits_of(hidden[:, 0]),
                        row_keys(sampling.seed, s.row_id, s.count), sampling,
                        mode)
    new = jnp.where(live, new, pad_id)
    rows = jnp.arange(new.shape[0])
    out = s.out.at[rows, jnp.where(live, s.count, s.out.shape[1])].set(
        new, mode='drop')
    count = s.count + live
    done = s.done | (live & (stop_table[new] | (count >= s.limit)))
    return n + 1, s._replace(cache=cache, token=jnp.where(live, new, s.token),
                             length=length, count=count, done=done, out=out)

  cond = lambda carry: (carry[0] < steps) & ~jnp.all(carry[1].done)
  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


class BeamSlots(NamedTuple):
  """Device state of beam search over refilled groups: group g is one
  prompt, its K beams rows g*K .. g*K+K-1 of the cache."""

  beam: BeamState        # step [G]; cache [G*K, S, ...], a row's tokens [0, length)
  prompt_len: jax.Array  # [G]
  limit: jax.Array       # [G, 1] max new tokens of the group
  done: jax.Array        # [G] final (`beam_final`), or empty


def beam_empty(model, groups: int, K: int, cache_len: int, budget: int,
               pad_id: int) -> BeamSlots:
  cache = model.config.init_cache(groups * K, cache_len, dtype=model.dtype)
  cache['end_index'] = jnp.zeros(groups * K, jnp.int32)
  z = jnp.zeros(groups, jnp.int32)
  return BeamSlots(beam_start(groups, K, budget, pad_id, cache, z), z + 1,
                   jnp.ones((groups, 1), jnp.int32), jnp.ones(groups, bool))


def beam_insert(params, state: BeamSlots, prompt, prompt_len, slot, limit,
                length_penalty, stop_table, *, model, pad_id: int) -> BeamSlots:
  """Prefills prompt [I, P] (slot = G for unused rows) into the K rows of
  group slot[i], and takes each group's first step."""
  I, P = prompt.shape
  b = state.beam
  G, K, budget = b.alive_seq.shape
  apply, logits_of = model_fns(model, params)
  last, small = prefill(apply, model, prompt, prompt_len, P, None)
  alpha = jnp.asarray(length_penalty, jnp.float32)
  first, _ = beam_step(beam_start(I, K, budget, pad_id),
                       jnp.repeat(log_probs(logits_of, last, 1), K, axis=1),
                       limit[:, None], alpha, stop_table)
  rows = (slot[:, None] * K + jnp.arange(K)).reshape(-1)  # >= G*K: dropped.
  cache = put_prompts(b.cache, small, rows, repeat=K)
  at = lambda x, v: x.at[slot].set(v, mode='drop')
  beam = BeamState(
      at(b.step, first.step + jnp.zeros(I, jnp.int32)),
      b.token.at[rows].set(first.token, mode='drop'), cache,
      *(at(x, v) for x, v in zip(b[3:], first[3:])))
  return BeamSlots(beam, at(state.prompt_len, prompt_len),
                   at(state.limit, limit[:, None]),
                   at(state.done, beam_final(first, limit[:, None], alpha)))


def beam_chunk(params, state: BeamSlots, length_penalty, stop_table, *,
               model, steps: int = CHUNK_STEPS) -> BeamSlots:
  """Up to `steps` beam steps of every unfinished group; a final group's
  state stays as it is (no later step could change its K best)."""
  G, K, _ = state.beam.alive_seq.shape
  S = state.beam.cache['positions'].shape[1]
  apply, logits_of = model_fns(model, params)
  alpha = jnp.asarray(length_penalty, jnp.float32)

  def body(carry):
    n, s = carry
    b, live = s.beam, ~s.done
    # The fed token is token i-1: slot and position prompt_len + i - 1.
    length = jnp.repeat(s.prompt_len + b.step - 1, K)
    seen = jnp.arange(S)[None] < length[:, None] + 1
    hidden, cache = apply(b.token[:, None], length[:, None], seen[:, None, :],
                          dict(b.cache, end_index=length))
    new, parent = beam_step(b, log_probs(logits_of, hidden[:, 0], K), s.limit,
                            alpha, stop_table)
    keep = lambda x, y: jnp.where(
        jnp.reshape(live, (-1,) + (1,) * (x.ndim - 1)), x, y)
    new = BeamState(keep(new.step, b.step),
                    jnp.where(jnp.repeat(live, K), new.token, b.token), None,
                    *(keep(x, y) for x, y in zip(new[3:], b[3:])))
    parent = jnp.where(live[:, None], parent, jnp.arange(K))
    rows = (jnp.arange(G)[:, None] * K + parent).reshape(-1)
    new = new._replace(cache=reorder_rows(cache, rows))
    return n + 1, BeamSlots(new, s.prompt_len, s.limit,
                            s.done | beam_final(new, s.limit, alpha))

  cond = lambda carry: (carry[0] < steps) & ~jnp.all(carry[1].done)
  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def call_shapes(prompts, limits) -> dict:
  """Budget, cache length and insert widths of a decoder for these prompts:
  two widths, the bucket of the 90th-percentile prompt and the widest
  one's (MTNT: 64 and 512), so a few long prompts neither add executables
  nor pad every insert."""
  budget = next_pow2(int(limits.max()), 16)
  buckets = sorted(next_pow2(len(p), MIN_PROMPT_BUCKET) for p in prompts)
  P = buckets[-1]
  return dict(budget=budget, cache_len=max(MIN_CACHE_LEN, next_pow2(P + budget)),
              prompt_widths={buckets[int(0.9 * (len(buckets) - 1))], P})


class ContinuousDecoder:
  """Prompts through `slots` rows with refills (module docstring).

  `add` queues a prompt with a callback; each `step` fills free slots,
  runs one chunk and calls back the rows that finished. Prompts can be
  added between steps (the HTTP service does), as long as their prompt
  bucket plus `budget` fits the cache. Uses a `sampler.Sampler`'s params,
  stop table and executable cache; one sampling mode per decoder.
  `prompt_widths`: an insert pads its prompts to the narrowest of these
  that holds its longest (a few insert executables for a whole call);
  None: to its longest prompt's bucket (any width).
  """

  EMPTY, INSERT, CHUNK = 'empty', 'insert', 'chunk'  # Executable names.

  def __init__(self, sampler, slots: int, mode: SamplingMode,
               sampling: SamplingParams, budget: int, cache_len: int | None = None,
               prompt_widths: Sequence[int] | None = None):
    self.sampler, self.slots, self.mode, self.sampling = sampler, slots, mode, sampling
    self.budget = next_pow2(budget, 16)
    self.cache_len = cache_len or MIN_CACHE_LEN
    self.prompt_widths = None if prompt_widths is None else sorted(prompt_widths)
    self.width = min(slots, max(INSERT_WIDTH, slots // 8))
    # One executable (kept in the store) rather than a dozen small array
    # ops, each of which a new process would fetch from XLA's cache.
    self._state = sampler.compiled(self._key(self.EMPTY), self._empty, ())()
    self._owner: list = [None] * slots  # (row id, callback) per slot.
    self._queue: list = []

  @classmethod
  def for_prompts(cls, sampler, slots, mode, sampling, prompts, limits):
    """A decoder for these prompts (`call_shapes`)."""
    return cls(sampler, slots, mode, sampling, **call_shapes(prompts, limits))

  # What a beam decoder changes: the device functions and their extra
  # arguments, and what a finished slot hands back.
  def _key(self, name, *shape):
    return (name, self.slots, self.cache_len, self.budget, *shape, self.mode)

  def _empty(self):
    sp = self.sampler
    return functools.partial(empty, sp.model, self.slots, self.cache_len,
                             self.budget, sp.pad_id)

  def _insert(self, tokens, lens, slot, ids, lim):
    """(key, make, args, donate) of an insert (`Sampler.compiled`)."""
    sp = self.sampler
    args = (sp.params, self._state, tokens, lens, slot, ids, lim,
            self.sampling, sp.stop_table)
    return (self._key(self.INSERT, *tokens.shape), lambda: functools.partial(
        insert, model=sp.model, mode=self.mode, pad_id=sp.pad_id), args, (1,))

  def _chunk(self):
    sp = self.sampler
    args = (sp.params, self._state, self.sampling, sp.stop_table)
    return (self._key(self.CHUNK), lambda: functools.partial(
        chunk, model=sp.model, mode=self.mode, pad_id=sp.pad_id), args, (1,))

  def _run(self, job):
    key, make, args, donate = job
    return self.sampler.compiled(key, make, args, donate)(*args)

  def ready(self) -> None:
    """The chunk and, with fixed prompt widths, every insert, made ready
    side by side (`Sampler.ready`) before the first step needs them."""
    W, z = self.width, np.zeros(self.width, np.int32)
    inserts = [self._insert(np.zeros((W, P), np.int32), z, z, z, z)
               for P in self.prompt_widths or ()]
    self.sampler.ready([self._chunk(), *inserts])

  def _finished(self):
    """(done [slots], the result of slot r)."""
    done, count, out = jax.device_get(
        (self._state.done, self._state.count, self._state.out))
    return done, lambda r: out[r, :count[r]].copy()

  def fits(self, prompt_len: int, limit: int) -> bool:
    P = next_pow2(prompt_len, MIN_PROMPT_BUCKET)
    return (limit <= self.budget and P + limit <= self.cache_len and
            (self.prompt_widths is None or P <= self.prompt_widths[-1]))

  @property
  def busy(self) -> bool:
    return bool(self._queue) or any(o is not None for o in self._owner)

  def add(self, prompt: np.ndarray, limit: int, row_id: int, on_done) -> None:
    """Queues a prompt; `on_done(result)` gets its generated ids."""
    if not self.fits(len(prompt), limit):
      raise ValueError(f'a {len(prompt)}-token prompt with {limit} new tokens '
                       f'does not fit this decoder (budget {self.budget}, '
                       f'cache {self.cache_len} slots)')
    self._queue.append((prompt, int(limit), int(row_id), on_done))

  def step(self) -> None:
    N, pad = self.slots, self.sampler.pad_id
    free = [r for r in range(N) if self._owner[r] is None]
    W = self.width
    while self._queue and free:
      take, self._queue = self._queue[:min(W, len(free))], self._queue[min(W, len(free)):]
      P = max(next_pow2(len(t[0]), MIN_PROMPT_BUCKET) for t in take)
      if self.prompt_widths is not None:
        P = next(w for w in self.prompt_widths if w >= P)
      tokens = np.full((W, P), pad, np.int32)
      lens, lim = np.ones(W, np.int32), np.ones(W, np.int32)
      slot, ids = np.full(W, N, np.int32), np.zeros(W, np.int32)
      for j, (prompt, limit, row_id, on_done) in enumerate(take):
        r = free.pop(0)
        self._owner[r] = (row_id, on_done)
        tokens[j, :len(prompt)] = prompt
        lens[j], lim[j], slot[j], ids[j] = len(prompt), limit, r, row_id
      self._state = self._run(self._insert(tokens, lens, slot, ids, lim))
    self._state = self._run(self._chunk())
    done, result = self._finished()
    for r in range(N):
      if self._owner[r] is not None and done[r]:
        _, on_done = self._owner[r]
        self._owner[r] = None
        on_done(result(r))

  def generate(self, prompts: Sequence[np.ndarray], limits: np.ndarray,
               progress=None, row_ids: Sequence[int] | None = None) -> list:
    """Generated ids of every prompt, in input order (sampling keys from
    `row_ids`, default the input index). Prompts go in longest first: long
    prompts tend to have long outputs, which then do not make the tail,
    and inserts of similar widths come together."""
    results: list = [None] * len(prompts)

    def setter(i):
      def on_done(ids):
        results[i] = ids
        if progress is not None:
          progress.update(1)
      return on_done

    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
      self.add(prompts[i], limits[i], i if row_ids is None else row_ids[i],
               setter(i))
    self.ready()
    while self.busy:
      self.step()
    self.sampler.batches_run += 1
    return results


def generate(sampler, prompts: Sequence[np.ndarray], *,
             max_new_tokens: int | Sequence[int], temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, epsilon: float | None = None,
             slots: int | None = None,
             row_ids: Sequence[int] | None = None) -> list[np.ndarray]:
  """`sampler.generate`'s result (`row_ids` as there), decoded through
  `slots` (default the sampler's batch size) refilled rows."""
  if sampler.mesh is not None and sampler.mesh.size > 1:
    raise ValueError('continuous batching runs on one device; drop the mesh')
  limits = sampler.limits(prompts, max_new_tokens)
  if not len(prompts):
    return []
  mode, sampling = sampler.sampling_args(temperature, top_k, top_p, seed,
                                         epsilon)
  decoder = ContinuousDecoder.for_prompts(
      sampler, slots or sampler.batch_size, mode, sampling, prompts, limits)
  with progress_bar(len(prompts), sampler.progress) as bar:
    return decoder.generate(prompts, limits, bar, row_ids)


class BeamDecoder(ContinuousDecoder):
  """Beam search through `groups` refilled groups of K rows: a prompt's
  K beams are one group, which the next prompt takes as soon as its K
  best are final (`beam_chunk`), so a long beam holds only its own group.
  `add`'s callback gets the K `Hypothesis`es, best first: static
  `beam_decode`'s, up to float rounding."""

  EMPTY, INSERT, CHUNK = 'beam_empty', 'beam_insert', 'beam_chunk'

  def __init__(self, sampler, groups: int, beam_size: int,
               length_penalty: float, budget: int, cache_len: int | None = None,
               prompt_widths: Sequence[int] | None = None):
    self.K, self.length_penalty = beam_size, np.float32(length_penalty)
    super().__init__(sampler, groups, ('beam', beam_size), None, budget,
                     cache_len, prompt_widths)

  def _empty(self):
    sp = self.sampler
    return functools.partial(beam_empty, sp.model, self.slots, self.K,
                             self.cache_len, self.budget, sp.pad_id)

  def _insert(self, tokens, lens, slot, ids, lim):
    sp = self.sampler
    args = (sp.params, self._state, tokens, lens, slot, lim,
            self.length_penalty, sp.stop_table)
    return (self._key(self.INSERT, *tokens.shape), lambda: functools.partial(
        beam_insert, model=sp.model, pad_id=sp.pad_id), args, (1,))

  def _chunk(self):
    sp = self.sampler
    args = (sp.params, self._state, self.length_penalty, sp.stop_table)
    return (self._key(self.CHUNK), lambda: functools.partial(
        beam_chunk, model=sp.model), args, (1,))

  def _finished(self):
    b = self._state.beam
    done, seq, n, logp, score = jax.device_get(
        (self._state.done, b.fin_seq, b.fin_len, b.fin_logp, b.fin_score))
    return done, lambda r: [
        Hypothesis(seq[r, k, :n[r, k]].copy(), float(logp[r, k]),
                   float(score[r, k])) for k in range(self.K)]


def beam_search(sampler, prompts: Sequence[np.ndarray], *,
                max_new_tokens: int | Sequence[int], beam_size: int,
                length_penalty: float = 0.0,
                groups: int | None = None) -> list[list[Hypothesis]]:
  """`sampler.beam_search`'s result through `groups` (default, as there,
  the sampler's batch size: prompts, each with `beam_size` rows) refilled
  groups of beams."""
  check_beam_args(beam_size, length_penalty)
  if sampler.mesh is not None and sampler.mesh.size > 1:
    raise ValueError('continuous batching runs on one device; drop the mesh')
  limits = sampler.limits(prompts, max_new_tokens)
  if not len(prompts):
    return []
  decoder = BeamDecoder(sampler, groups or sampler.batch_size,
                        beam_size, length_penalty, **call_shapes(prompts, limits))
  with progress_bar(len(prompts), sampler.progress) as bar:
    return decoder.generate(prompts, limits, bar)
