"""`Translator`: sentences in, one line of translation each out.

It prompts exactly as training does (`[BOS] + format_prompt(src)` in the
model's `prompts` format), decodes
batches on the device (`sampler.Sampler`, one jit per shape bucket) and
turns the ids into text (`postprocess`). A translation ends at the first of
EOS / `<end_of_turn>`, the first generated newline, the per-input token
budget (`SamplingOptions.limit`), or a stop sequence (matched on the text
after generation; it never stops the device loop early).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mt import language, sharding, weights
from gemma_mt.data import prompts
from gemma_mt.decoding import continuous, postprocess
from gemma_mt.decoding import mbr as mbr_lib
from gemma_mt.decoding.options import (DEFAULT_MAX_INPUT_TOKENS,
                                      DEFAULT_MAX_NEW_TOKENS, SamplingOptions)
from gemma_mt.decoding.sampler import (Hypothesis, Sampler, free_device_bytes,
                                       rows_for_memory)
from gemma_mt.decoding.sampling import next_pow2


# Samples the guard draws for a source whose candidates are all untranslated.
GUARD_SAMPLES = 8
# A call written out in pieces (evaluate, translate) takes at least this many
# decoder rows' worth a piece: a wide decoder restarted every few hundred
# sentences would idle at each piece's tail.
BATCHES_PER_CHUNK = 8
# Outputs up to this long are never runaways by length ("Thanks!" ->
# "Merci beaucoup à tous !" is 3.3x its source).
RUNAWAY_MIN_CHARS = 48


class InputTooLongError(ValueError):
  """An input whose prompt exceeds `max_input_tokens` (and truncate=False)."""

  def __init__(self, index: int, length: int, limit: int):
    self.index, self.length, self.limit = index, length, limit
    super().__init__(
        f'input {index} is {length} tokens long with the prompt, over the '
        f'limit of {limit} (max_input_tokens); shorten it or pass '
        f'truncate=True (--truncate) to cut the source')


@dataclasses.dataclass
class Prepared:
  """A call's sources made ready for the model (`Translator.prepare`): what
  any decoder needs (`prompts`, `limits`) and what `finish` needs after."""

  sources: Sequence[str]
  options: SamplingOptions
  fitted: list[tuple[np.ndarray, bool] | None]  # (prompt ids, truncated); None: blank

  @property
  def todo(self) -> list[int]:
    """Indices of the sources sent to the model (the non-blank ones)."""
    return [i for i, f in enumerate(self.fitted) if f is not None]

  @property
  def prompts(self) -> list[np.ndarray]:
    return [f[0] for f in self.fitted if f is not None]

  @property
  def limits(self) -> list[int]:
    return [self.options.limit(len(p)) for p in self.prompts]

  def chunks(self, size: int) -> Iterator['Prepared']:
    """The same call in pieces of `size` sources, to decode and finish one
    at a time (results written as they come, all inputs checked once)."""
    for a in range(0, len(self.sources), size):
      yield Prepared(self.sources[a:a + size], self.options,
                     self.fitted[a:a + size])


@dataclasses.dataclass
class Generation:
  """Raw output of `Translator.generate`, one entry per input."""

  token_ids: list[np.ndarray]  # generated ids, incl. the stop token if any
  input_tokens: list[int]      # prompt length, BOS included (0: blank input)
  output_tokens: list[int]     # == len(token_ids[i])
  stop_reasons: list[str]      # 'eos' | 'newline' | 'max_tokens' | 'blank'
  truncated: list[bool]        # source was cut to fit max_input_tokens
  # Candidates per input: beam search's K best (best first), MBR's samples,
  # or the guard's alternatives to an untranslated output ([]: none).
  nbest: list[list[Hypothesis]] | None = None


@dataclasses.dataclass
class Translation:
  text: str
  input_tokens: int
  output_tokens: int
  stop_reason: str  # as in Generation, or 'stop_sequence'
  candidates: list[str] | None = None  # beam/MBR/guard: the candidate texts (beams best first, then samples)


def check_sources(sources) -> list[str]:
  """The sources as a list, each a valid Unicode string; TypeError or
  ValueError naming the first bad one, before any device work."""
  if isinstance(sources, (str, bytes)):
    raise TypeError('sources must be a list of strings, not one string')
  if isinstance(sources, (Mapping, Set)) or not isinstance(sources, Iterable):
    raise TypeError(f'sources must be a sequence of strings, in order; got '
                    f'a {type(sources).__name__}')
  sources = list(sources)  # A generator is read once, here.
  for i, s in enumerate(sources):
    if not isinstance(s, str):
      raise TypeError(f'sources[{i}] is a {type(s).__name__}, not a str')
    try:
      s.encode('utf-8')
    except UnicodeEncodeError as e:
      raise ValueError(f'sources[{i}] is not valid Unicode (a lone surrogate '
                       f'at character {e.start})') from None
  return sources


def check_batch_size(batch_size) -> None:
  """A positive int (None, where a default stands, is not checked here)."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
      or batch_size < 1:
    raise ValueError(f'batch_size must be an integer >= 1, got {batch_size!r}')


def default_dtype():
  """bfloat16 on accelerators; float32 on CPU, where bf16 matmuls are slow."""
  return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16


def acceptable(text: str, source: str, lang_pair: str = 'en-fr') -> bool:
  """A candidate the guard may answer: a translation (neither a copy of the
  source nor in another language: `language.judge`) that did not run away
  (no phrase looping, not `RUNAWAY_LENGTH_RATIO` times the source's
  length: the evaluation's detectors, with the source standing in for the
  reference; a short source's translation may well be 3x its length,
  hence `RUNAWAY_MIN_CHARS`, and a source that repeats itself may be
  translated so)."""
  too_long = (postprocess.too_long(text, source)
              and len(text) > RUNAWAY_MIN_CHARS)
  loops = postprocess.repeats_itself(text) and not postprocess.repeats_itself(source)
  return language.judge(text, source, lang_pair).ok and not too_long and not loops


def _options(options: SamplingOptions | None, kw: dict) -> SamplingOptions:
  if options is not None and kw:
    raise TypeError(f'give options= or keyword options, not both: {sorted(kw)}')
  return options if options is not None else SamplingOptions(**kw)


class Translator:
  """Sentences in, translations out; batched, KV-cached, bucketed shapes.

  `model_or_config` is a `Transformer` (its dtype is the compute dtype; a
  different `dtype` is an error) or a `TransformerConfig` (built with
  `dtype`, default `default_dtype()`). Floating params are cast to the
  compute dtype once, so each decode step reads them at that width.

  `fast_decode` (any family): decode steps attend with one Pallas
  kernel; None: on for a bf16 model on one GPU.

  `batch_size`: decode rows (continuous slots, or a static batch's rows);
  None: as many as half the device memory left after the weights holds
  (`rows_for_memory`, at most 256 a device; 32 on a CPU), beam search
  then taking that many rows (batch_size / beam prompts).

  `mesh` (a `sharding.make_mesh` mesh): decode data-parallel over its
  devices, params replicated (FSDP-sharded if the mesh has fsdp > 1) and
  each batch split by rows; a `batch_size` divisible by the device count
  keeps full batches split. None: one device. `progress`: a tqdm bar over
  the sentences of each call. `continuous`: more sentences than
  a batch holds run through refilled slots (`continuous`; the same output
  up to float rounding; one device: off under a mesh of several): rows for
  greedy and sampling, groups of `beam` rows for beam search.
  """

  def __init__(self, model_or_config, params: Any, tokenizer,
               lang_pair: str = 'en-fr', dtype: Any = None, *,
               batch_size: int | None = None,
               max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS,
               truncate: bool = False, cache_size: int = 16,
               max_pad_ratio: float | None = None,
               mesh: jax.sharding.Mesh | None = None,
               fast_decode: bool | None = None, progress: bool = False,
               continuous: bool = True,
               prompt_format: str = prompts.DEFAULT):
    if params is None:
      raise TypeError('params is None: pass the model\'s weights '
                      '(Translator.from_pretrained loads them)')
    if batch_size is not None:
      check_batch_size(batch_size)
    if isinstance(model_or_config, nn.Module):
      model = model_or_config
      if dtype is not None and jnp.dtype(dtype) != jnp.dtype(model.dtype):
        raise ValueError(f'dtype={jnp.dtype(dtype).name} but the given '
                         f'Transformer computes in {jnp.dtype(model.dtype).name}'
                         '; pass a TransformerConfig or a matching model')
    else:
      model = model_or_config.module(dtype=dtype or default_dtype())
    if fast_decode is None:  # Triton: GPU and bf16; one device (the
      fast_decode = (jax.default_backend() == 'gpu'  # partitioner can't
                     and jnp.dtype(model.dtype) == jnp.bfloat16  # split it).
                     and (mesh is None or mesh.size == 1)) or model.fast_decode
    model = model.clone(fast_decode=fast_decode)
    if tokenizer.vocab_size > model.config.vocab_size:
      raise ValueError(f'tokenizer has {tokenizer.vocab_size} ids, the model '
                       f'only {model.config.vocab_size}')
    prompts.format_prompt('', lang_pair, prompt_format)  # Validates both.
    self.model, self.tokenizer, self.lang_pair = model, tokenizer, lang_pair
    self.prompt_format = prompt_format
    self.max_input_tokens = max_input_tokens
    self.truncate = truncate
    self._mesh = mesh
    params = self._placed(params)
    self.rows_by_memory = batch_size is None
    if batch_size is None:  # What the device has left after the weights.
      devices = 1 if mesh is None else mesh.size
      batch_size = devices * rows_for_memory(  # The largest cache a call
          model, next_pow2(max_input_tokens + DEFAULT_MAX_NEW_TOKENS),  # makes.
          free_device_bytes())
    self._stop_ids = postprocess.stop_token_ids(tokenizer)
    self._newline_ids = postprocess.newline_ids(tokenizer, self._stop_ids)
    self.sampler = Sampler(model, params, pad_id=tokenizer.pad_id,
                           stop_ids=self._stop_ids, batch_size=batch_size,
                           cache_size=cache_size, max_pad_ratio=max_pad_ratio,
                           mesh=mesh, progress=progress)
    self.continuous = continuous and (mesh is None or mesh.size == 1)

  def _placed(self, params):
    """Floating params cast to the compute dtype, on the device (else the
    sampler places them on its mesh)."""
    dt = self.model.dtype
    floating = lambda p: jnp.issubdtype(p.dtype, jnp.floating)
    cast = lambda p: p.astype(dt) if floating(p) else p
    if self._mesh is not None:  # Placed (and sharded) by the sampler.
      return jax.tree.map(cast, params)
    if any(floating(p) and p.dtype != dt for p in jax.tree.leaves(params)):
      # One executable for the tree, not one array op per leaf shape (each
      # of which a new process traces and fetches from XLA's cache).
      return jax.jit(functools.partial(jax.tree.map, cast))(params)
    return jax.device_put(params)

  def set_params(self, params) -> None:
    """New weights of the same shapes (e.g. during training): the compiled
    executables are reused."""
    params = self._placed(params)
    if self._mesh is not None:
      params = sharding.sampling_params(params, self._mesh)
    self.sampler.params = params

  @classmethod
  def from_pretrained(cls, model: str = 'gemma3_270m', checkpoint=None, *,
                      mesh: jax.sharding.Mesh | None = None,
                      **kw) -> 'Translator':
    """The embedded base model, a released one, or a training checkpoint.

    With a data-only `mesh`, params are restored straight onto its devices.
    """
    on_mesh = mesh is not None and mesh.shape['fsdp'] == 1
    p = weights.load(model, checkpoint,
                     sharding=sharding.replicated(mesh) if on_mesh else None)
    if kw.get('prompt_format') is None:  # The format the model was tuned with.
      kw['prompt_format'] = p.prompt_format
    return cls(p.config, p.params, p.tokenizer, mesh=mesh, **kw)

  def chunk_size(self, at_least: int) -> int:
    """Sources per piece of a call decoded and written piece by piece."""
    return max(at_least, BATCHES_PER_CHUNK * self.sampler.batch_size)

  @property
  def num_compiles(self) -> int:
    return self.sampler.num_compiles

  @property
  def compiled_shapes(self) -> list[tuple]:
    return list(self.sampler.compiled_shapes)

  # --- Prompts -----------------------------------------------------------------
  def prompt_tokens(self, source: str) -> np.ndarray:
    """`[BOS] + format_prompt(source)`, as in training (source stripped)."""
    return prompts.prompt_ids(self.tokenizer, source.strip(), self.lang_pair,
                              self.prompt_format)

  def _fit(self, index: int, source: str) -> tuple[np.ndarray, bool]:
    ids = self.prompt_tokens(source)
    if len(ids) <= self.max_input_tokens:
      return ids, False
    if not self.truncate:
      raise InputTooLongError(index, len(ids), self.max_input_tokens)
    # Cut the source (never the instruction) until the prompt fits.
    src_ids = self.tokenizer.tokenize(source.strip(), add_bos=False,
                                      add_eos=False)
    keep = len(src_ids) - (len(ids) - self.max_input_tokens)
    while keep > 0:
      ids = self.prompt_tokens(self.tokenizer.decode(src_ids[:keep]))
      if len(ids) <= self.max_input_tokens:
        return ids, True
      keep -= len(ids) - self.max_input_tokens
    raise ValueError(f'max_input_tokens={self.max_input_tokens} leaves no '
                     f'room for input {index}\'s source')

  def check(self, sources: Sequence[str]) -> None:
    """InputTooLongError for the first source whose prompt does not fit."""
    for i, s in enumerate(sources):
      if s.strip():
        self._fit(i, s)

  # --- Generation --------------------------------------------------------------
  def generate(self, sources: Sequence[str],
               options: SamplingOptions | None = None, *,
               batch_size: int | None = None, **kw) -> Generation:
    """Token ids and usage counts (`options`, or its fields as keywords).

    Greedy ignores top_k/top_p; `beam_size` (or beam `mbr`) > 1 runs beam search
    and fills `nbest`. Blank sources are not sent to the model.
    All inputs are checked before any is decoded.
    """
    return self.decode(self.prepare(sources, _options(options, kw)),
                       batch_size=batch_size)

  # The pipeline every caller runs (this class, the service, the benchmarks):
  # prepare -> decode (or the service's running batch) -> generation -> finish.
  def prepare(self, sources: Sequence[str],
              options: SamplingOptions) -> Prepared:
    """Prompts of every source, all checked before any is decoded."""
    sources = check_sources(sources)
    return Prepared(sources, options,
                    [None if not s.strip() else self._fit(i, s)
                     for i, s in enumerate(sources)])

  def decode(self, prep: Prepared, *, batch_size: int | None = None
             ) -> Generation:
    """Runs the model on `prep`: beam search when its options search
    (beam/MBR), sampled MBR candidates as rows of their own, else greedy or
    sampled rows; continuous batching (refilled rows, or groups of beams)
    for more prompts than a batch holds, else static batches; then the
    guard (`guard`)."""
    if batch_size is not None:
      check_batch_size(batch_size)
    opts, prompts, limits = prep.options, prep.prompts, prep.limits
    nbest = None
    if opts.search_width > 1:
      groups = batch_size  # Prompts at a time, each with K rows.
      if groups is None and self.rows_by_memory:  # The rows memory holds,
        n = 1 if self._mesh is None else self._mesh.size  # split evenly.
        groups = self.sampler.batch_size // opts.search_width // n * n or n
      groups = groups or self.sampler.batch_size
      kw = dict(max_new_tokens=limits, beam_size=opts.search_width,
                length_penalty=opts.length_penalty)
      beams = (continuous.beam_search(self.sampler, prompts, groups=groups, **kw)
               if self.continuous and len(prompts) > groups else
               self.sampler.beam_search(prompts, batch_size=groups, **kw))
      outs = [b[0].ids for b in beams]
      nbest = [list(b) for b in beams]
    elif not opts.mbr_samples:
      outs = self._sample(prompts, limits, opts, batch_size)
    if opts.mbr_samples:
      samples = self.sample_candidates(prompts, limits, opts, opts.mbr_samples,
                                       batch_size=batch_size)
      nbest = samples if nbest is None else [
          b + s for b, s in zip(nbest, samples)]
      if opts.search_width == 1:
        outs = [s[0].ids for s in samples]
    if nbest is not None:
      by_index = [[] for _ in prep.sources]
      for i, b in zip(prep.todo, nbest):
        by_index[i] = b
      nbest = by_index
    return self.guard(prep, self.generation(prep, dict(zip(prep.todo, outs)),
                                            nbest))

  def sample_candidates(self, prompts, limits, opts: SamplingOptions, n: int,
                        *, batch_size: int | None = None,
                        keys: Sequence[int] | None = None,
                        seed_shift: int = 0) -> list[list[Hypothesis]]:
    """`n` samples per prompt, drawn with `opts.candidate_sampling()`
    (epsilon sampling; its seed plus `seed_shift`) as rows of their own.
    Sample j of prompt k has its own key: from (k, j), or with `keys` from
    (keys[k], j), so that its draws do not depend on what else is in the
    call. One seed gives one answer."""
    c = opts.candidate_sampling()
    c = dataclasses.replace(c, seed=(c.seed + seed_shift) % 2**31)
    row_ids = None if keys is None else [
        k % 2**20 * n + j for k in keys for j in range(n)]
    drawn = self._sample([p for p in prompts for _ in range(n)],
                         [l for l in limits for _ in range(n)], c, batch_size,
                         row_ids)
    return [[Hypothesis(x, float('nan'), float('nan'))
             for x in drawn[k * n:(k + 1) * n]] for k in range(len(prompts))]

  def _sample(self, prompts, limits, opts: SamplingOptions, batch_size,
              row_ids=None):
    """Greedy or sampled ids of each prompt (no search); `row_ids` key the
    rows' draws (default: their index)."""
    kw = dict(max_new_tokens=limits, temperature=float(opts.temperature),
              top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed,
              epsilon=opts.epsilon, row_ids=row_ids)
    if self.continuous and len(prompts) > (batch_size or self.sampler.batch_size):
      return continuous.generate(self.sampler, prompts, slots=batch_size, **kw)
    return self.sampler.generate(prompts, batch_size=batch_size, **kw)

  def guard(self, prep: Prepared, gen: Generation) -> Generation:
    """Alternatives for the inputs whose candidates all fail (`acceptable`).

    An input whose output, or every candidate of whose n-best or MBR pool,
    is a copy of the source, in another language, or a runaway gets
    GUARD_SAMPLES epsilon samples as further candidates; `finish` then
    answers the consensus of those in the target language. Beam candidates
    of such a source are mostly copies again (measured: a beam of 4 fixed 4
    of 18 greedy failures), samples are diverse. A few rows of a corpus, so
    the guard costs little. Off with `options.guard=False`.
    """
    if not prep.options.guard:
      return gen
    pools = [(gen.nbest[i] if gen.nbest and gen.nbest[i] else
              [Hypothesis(gen.token_ids[i], float('nan'), float('nan'))])
             for i in range(len(prep.sources))]
    redo = [i for i in prep.todo
            if not any(self._acceptable(h.ids, prep, i) for h in pools[i])]
    if not redo:
      return gen
    # Keyed by the source's text, not its place in the call (a service
    # merges requests); the seed shifted, so they are not the sampled-MBR
    # draws just rejected.
    drawn = self.sample_candidates(
        [prep.fitted[i][0] for i in redo],
        [prep.options.limit(len(prep.fitted[i][0])) for i in redo], prep.options, GUARD_SAMPLES,
        keys=[zlib.crc32(prep.sources[i].encode('utf-8')) for i in redo],
        seed_shift=1)
    nbest = list(gen.nbest) if gen.nbest else [[] for _ in prep.sources]
    for i, samples in zip(redo, drawn):  # The decoder's own candidates first.
      nbest[i] = pools[i] + samples
    return dataclasses.replace(gen, nbest=nbest)

  def _clean(self, ids, source: str, opts: SamplingOptions):
    return postprocess.clean_translation(self.tokenizer.decode(ids), source,
                                         opts.stop_sequences)

  def _acceptable(self, ids, prep: Prepared, i: int) -> bool:
    text, _ = self._clean(ids, prep.sources[i], prep.options)
    return acceptable(text, prep.sources[i], self.lang_pair)

  def generation(self, prep: Prepared, outs: dict, nbest=None) -> Generation:
    """A `Generation` from {index: generated ids} of `prep`'s sources."""
    fitted = prep.fitted
    ids = [np.zeros(0, np.int32)] * len(fitted)
    for i, out in outs.items():
      ids[i] = out
    return Generation(
        token_ids=ids,
        input_tokens=[0 if f is None else len(f[0]) for f in fitted],
        output_tokens=[len(x) for x in ids],
        stop_reasons=[self._stop_reason(x, f is None)
                      for x, f in zip(ids, fitted)],
        truncated=[f is not None and f[1] for f in fitted], nbest=nbest)

  def _stop_reason(self, ids: np.ndarray, blank: bool) -> str:
    if blank:
      return 'blank'
    last = int(ids[-1]) if len(ids) else None
    if last in self._newline_ids:
      return 'newline'
    if last in self._stop_ids:
      return 'eos'
    return 'max_tokens'

  def translate_detailed(self, sources: Sequence[str],
                         options: SamplingOptions | None = None, *,
                         batch_size: int | None = None,
                         **kw) -> list[Translation]:
    """Translations with usage and stop reasons (options as in `generate`)."""
    prep = self.prepare(sources, _options(options, kw))
    return self.finish(prep, self.decode(prep, batch_size=batch_size))

  def finish(self, prep: Prepared, gen: Generation) -> list[Translation]:
    """Text of a `Generation`: cleaned, stop sequences cut, and among
    candidates the MBR choice or the best; under the guard, a candidate in
    the target language whenever there is one."""
    sources, opts = prep.sources, prep.options
    clean = lambda ids, src: self._clean(ids, src, opts)
    out = []
    for i, src in enumerate(sources):
      ids, reason = gen.token_ids[i], gen.stop_reasons[i]
      candidates = None
      if gen.nbest is not None and gen.nbest[i]:  # Best first.
        cleaned = [clean(h.ids, src) for h in gen.nbest[i]]
        candidates = [text for text, _ in cleaned]
        ok = ([acceptable(c, src, self.lang_pair) for c in candidates]
              if opts.guard else None)
        pool = gen.nbest[i]
        beams = [k for k, h in enumerate(pool) if not np.isnan(h.score)
                 and (ok is None or ok[k])]
        if opts.mbr > 1:
          pick = mbr_lib.mbr_select(candidates, opts.mbr_utility, ok)
        elif not ok or ok[0] or not any(ok):
          pick = 0
        elif beams:  # The best acceptable hypothesis of the beam.
          pick = beams[0]
        else:  # The guard's samples: the consensus of the acceptable ones.
          pick = mbr_lib.mbr_select(candidates, 'chrf', ok)
        ids = gen.nbest[i][pick].ids
        text, cut = cleaned[pick]
        reason = self._stop_reason(ids, False)
      else:
        text, cut = clean(ids, src)
      out.append(Translation(text, gen.input_tokens[i], len(ids),
                             'stop_sequence' if cut else reason, candidates))
    return out

  def translate(self, sources: Sequence[str],
                options: SamplingOptions | None = None, *,
                batch_size: int | None = None, **kw) -> list[str]:
    """One line of text per source, in order (options as in `generate`)."""
    return [t.text for t in self.translate_detailed(
        sources, options, batch_size=batch_size, **kw)]
