"""Translate sentences with a (fine-tuned) Gemma; library and CLI.

`Translator` prompts exactly as training does (`[BOS] + format_prompt(src)`),
decodes batches on the device (`sampler.Sampler`) and turns the ids into one
line of text per input. A translation ends at the first of:

* EOS (or `<end_of_turn>`, which instruction-tuned models emit);
* the first generated newline: a translation is one line (every vocabulary
  piece containing "\\n" counts; in Gemma 3 that is id 107 and friends);
* `max_new_tokens`;
* a custom stop sequence. These are matched on the decoded text after
  generation, and the text is cut at the earliest match; they never stop the
  device loop early, so they save no compute.

Then, defensively, a chatty preamble ("Here is the translation:", "Voici la
traduction :") and quotes wrapping the whole output (unless the source was
quoted too) are removed.

CLI (`python -m gemma_mt.translate` or scripts/translate.py): sentences from
the arguments, `--input FILE` or stdin, one per line; one translation per
line on stdout (a blank input line gives a blank output line), logs on
stderr. `--jsonl` switches to the JSON request interface (`json_api`).
`--data_parallel` decodes each batch split over all local devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mt import data, model as M, sharding
from gemma_mt.sampler import Sampler

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_INPUT_TOKENS = 1024
# CLI default: French runs ~1.2-1.5x the English token count, so 3x the
# whole prompt never cuts a real translation but bounds a runaway one.
DEFAULT_MAX_LENGTH_RATIO = 3.0


class InputTooLongError(ValueError):
  """An input whose prompt exceeds `max_input_tokens` (and truncate=False)."""

  def __init__(self, index: int, length: int, limit: int):
    self.index, self.length, self.limit = index, length, limit
    super().__init__(
        f'input {index} is {length} tokens long with the prompt, over the '
        f'limit of {limit} (max_input_tokens); shorten it or pass '
        f'truncate=True (--truncate) to cut the source')


@dataclasses.dataclass
class Generation:
  """Raw output of `Translator.generate`, one entry per input."""

  token_ids: list[np.ndarray]  # generated ids, incl. the stop token if any
  input_tokens: list[int]      # prompt length, BOS included (0: blank input)
  output_tokens: list[int]     # == len(token_ids[i])
  stop_reasons: list[str]      # 'eos' | 'newline' | 'max_tokens' | 'blank'
  truncated: list[bool]        # source was cut to fit max_input_tokens


@dataclasses.dataclass
class Translation:
  text: str
  input_tokens: int
  output_tokens: int
  stop_reason: str  # as in Generation, or 'stop_sequence'


# --- Text clean-up -------------------------------------------------------------
_PREAMBLES = [re.compile(p, re.IGNORECASE) for p in (
    r"^(?:sure[,!.]?\s*)?(?:here(?:'s| is)|this is)\s+(?:the|your|a|my)?\s*"
    r"(?:french\s+)?translation(?:\s+(?:in|into|to)\s+french)?\s*[:：]\s*",
    r"^voici\s+(?:la|une|ma|votre)\s+traduction(?:\s+en\s+français)?\s*[:：]\s*",
    r"^(?:translation|traduction|french|français)\s*[:：]\s*",
)]
_QUOTES = {'"': '"', '“': '”', '«': '»', "'": "'", '‘': '’'}


def _strip_quotes(text: str, source: str) -> str:
  text = text.strip()
  if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
    if source.strip()[:1] not in _QUOTES:  # A quoted source stays quoted.
      inner = text[1:-1].strip()
      if text[0] not in inner:  # '"a" and "b"' is not one quoted whole.
        return inner
  return text


def _find_loop(words: list[str], min_words: int = 6,
               max_unit: int = 24) -> tuple[int, int] | None:
  """(start, unit length) of a phrase repeating back to back, or None.

  A loop is a unit of u words repeated at least max(3, ceil(min_words / u))
  times in a row: "de prise de poids, de prise de poids, de prise de poids,"
  is one; "très très" or "ha ha ha" is not.
  """
  for i in range(len(words)):
    for u in range(1, max_unit + 1):
      reps = max(3, -(-min_words // u))
      if i + u * reps > len(words):
        break
      unit = words[i:i + u]
      if all(words[i + k * u:i + (k + 1) * u] == unit for k in range(1, reps)):
        return i, u
  return None


def cut_repetition(text: str, source: str = '') -> str:
  """Keeps one copy of a phrase the model loops on, and drops the rest.

  Small models sometimes fall into a loop instead of ending the sentence
  (the line never ends, so no stop rule fires until the token budget).
  The translation ends where the loop starts. A source that loops itself
  is left alone.
  """
  words = text.split(' ')
  loop = _find_loop(words)
  if loop is None or _find_loop(source.split(' ')) is not None:
    return text
  start, unit = loop
  return ' '.join(words[:start + unit]).rstrip(' ,;')


def clean_translation(text: str, source: str = '',
                      stop_sequences: Sequence[str] = ()) -> tuple[str, bool]:
  """(one-line translation, whether a stop sequence cut it).

  Keeps the first line, cuts at the earliest stop sequence (on the raw
  text, before any other clean-up) and where the text starts looping
  (`cut_repetition`), drops a chatty preamble and quotes around the whole
  output, and strips whitespace.
  """
  lines = text.splitlines()  # '\r' and U+2028 end a line too.
  text = lines[0] if lines else ''
  hits = [i for i in (text.find(s) for s in stop_sequences if s) if i >= 0]
  if hits:
    text = text[:min(hits)]
  text = cut_repetition(text, source)
  for _ in range(2):  # "Sure! Here is the translation: « ... »"
    for pattern in _PREAMBLES:
      text = pattern.sub('', text.strip(), count=1)
    text = _strip_quotes(text, source)
  return text.strip(), bool(hits)


def stop_token_ids(tokenizer) -> list[int]:
  """EOS, <end_of_turn> if the vocabulary has it, and every newline piece."""
  sp = tokenizer.processor
  ids = {tokenizer.eos_id}
  for piece in ('<end_of_turn>', '<0x0A>'):
    i = sp.PieceToId(piece)
    if i != sp.unk_id():
      ids.add(i)
  ids.update(i for i in range(sp.GetPieceSize()) if '\n' in sp.IdToPiece(i))
  return sorted(ids)


def default_dtype():
  """bfloat16 on accelerators; float32 on CPU, where bf16 matmuls are slow."""
  return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16


def _check_options(max_new_tokens, temperature, top_k, top_p, seed):
  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
  def is_num(x):
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
  if not is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be an int >= 1, got {max_new_tokens!r}')
  if not is_num(temperature) or not 0 <= temperature < float('inf'):
    raise ValueError(f'temperature must be a finite number >= 0, got {temperature!r}')
  if top_k is not None and (not is_int(top_k) or top_k < 1):
    raise ValueError(f'top_k must be None or an int >= 1, got {top_k!r}')
  if top_p is not None and (not is_num(top_p) or not 0 < top_p <= 1):
    raise ValueError(f'top_p must be None or a number in (0, 1], got {top_p!r}')
  if not is_int(seed) or not 0 <= seed < 2**31:
    raise ValueError(f'seed must be an int in [0, 2**31), got {seed!r}')


class Translator:
  """Sentences in, translations out; batched, KV-cached, bucketed shapes.

  `model_or_config` is a `Transformer` (used as is) or a `TransformerConfig`
  (built with `dtype`, default `default_dtype()`). Floating params are cast
  to the compute dtype once, so each decode step reads them at that width.

  `fast_decode` (`model.Transformer`): decode steps attend with one Pallas
  kernel; None: on for a bf16 model built here on one GPU.

  `mesh` (a `sharding.make_mesh` mesh): decode data-parallel over its
  devices, params replicated (FSDP-sharded if the mesh has fsdp > 1) and
  each batch split by rows; a `batch_size` divisible by the device count
  keeps full batches split. None: one device.
  """

  def __init__(self, model_or_config, params: Any, tokenizer,
               lang_pair: str = 'en-fr', dtype: Any = None, *,
               batch_size: int = 32,
               max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS,
               truncate: bool = False, cache_size: int = 16,
               max_pad_ratio: float | None = None,
               mesh: jax.sharding.Mesh | None = None,
               fast_decode: bool | None = None):
    if isinstance(model_or_config, M.Transformer):
      model = model_or_config
    else:
      dtype = dtype or default_dtype()
      if fast_decode is None:  # Triton: GPU and bf16; one device (the
        fast_decode = (jax.default_backend() == 'gpu'  # partitioner can't
                         and dtype == jnp.bfloat16       # split the call).
                         and (mesh is None or mesh.size == 1))
      model = M.Transformer(model_or_config, dtype=dtype)
    if fast_decode is not None:
      model = model.clone(fast_decode=fast_decode)
    if tokenizer.vocab_size > model.config.vocab_size:
      raise ValueError(f'tokenizer has {tokenizer.vocab_size} ids, the model '
                       f'only {model.config.vocab_size}')
    data.format_prompt('', lang_pair)  # Validates lang_pair.
    self.model, self.tokenizer, self.lang_pair = model, tokenizer, lang_pair
    self.max_input_tokens = max_input_tokens
    self.truncate = truncate
    cast = lambda p: (p.astype(model.dtype)
                      if jnp.issubdtype(p.dtype, jnp.floating) else p)
    params = jax.tree.map(cast, params)
    if mesh is None:  # Else the sampler places them on the mesh.
      params = jax.device_put(params)
    self._stop_ids = stop_token_ids(tokenizer)
    self._newline_ids = {i for i in self._stop_ids
                         if '\n' in tokenizer.processor.IdToPiece(i)
                         or tokenizer.processor.IdToPiece(i) == '<0x0A>'}
    self.sampler = Sampler(model, params, pad_id=tokenizer.pad_id,
                           stop_ids=self._stop_ids, batch_size=batch_size,
                           cache_size=cache_size, max_pad_ratio=max_pad_ratio,
                           mesh=mesh)

  @classmethod
  def from_pretrained(cls, model: str = 'gemma3_270m', checkpoint=None, *,
                      mesh: jax.sharding.Mesh | None = None,
                      **kw) -> 'Translator':
    """The embedded base model, a released one, or a training checkpoint.

    With a data-only `mesh`, params are restored straight onto its devices.
    """
    from gemma_mt import pretrained  # Lazy: loading pulls in orbax.
    on_mesh = mesh is not None and mesh.shape['fsdp'] == 1
    p = pretrained.load(model, checkpoint,
                        sharding=sharding.replicated(mesh) if on_mesh else None)
    return cls(p.config, p.params, p.tokenizer, mesh=mesh, **kw)

  @property
  def num_compiles(self) -> int:
    return self.sampler.num_compiles

  @property
  def compiled_shapes(self) -> list[tuple]:
    return list(self.sampler.compiled_shapes)

  # --- Prompts -----------------------------------------------------------------
  def prompt_tokens(self, source: str) -> np.ndarray:
    """`[BOS] + format_prompt(source)`, as in training (source stripped)."""
    return self.tokenizer.tokenize(
        data.format_prompt(source.strip(), self.lang_pair), add_eos=False)

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

  # --- Generation --------------------------------------------------------------
  def generate(self, sources: Sequence[str], *,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0,
               batch_size: int | None = None,
               max_length_ratio: float | None = None) -> Generation:
    """Token ids and usage counts; greedy unless temperature > 0.

    Greedy ignores top_k/top_p. Blank sources are not sent to the model.
    `max_length_ratio` r caps each input at ceil(r * prompt tokens) new
    tokens (the instruction in the prompt gives short inputs some slack):
    a runaway row then stops early instead of holding its batch for
    `max_new_tokens` steps. All inputs are checked before any is decoded.
    """
    if isinstance(sources, str):
      raise TypeError('sources must be a list of strings, not one string')
    _check_options(max_new_tokens, temperature, top_k, top_p, seed)
    if max_length_ratio is not None and not max_length_ratio > 0:
      raise ValueError(f'max_length_ratio must be None or > 0, got '
                       f'{max_length_ratio!r}')
    fitted = [None if not s.strip() else self._fit(i, s)
              for i, s in enumerate(sources)]
    todo = [i for i, f in enumerate(fitted) if f is not None]
    limits = [max_new_tokens if max_length_ratio is None else
              min(max_new_tokens, math.ceil(max_length_ratio * len(fitted[i][0])))
              for i in todo]
    outs = self.sampler.generate(
        [fitted[i][0] for i in todo], max_new_tokens=limits,
        temperature=float(temperature), top_k=top_k, top_p=top_p, seed=seed,
        batch_size=batch_size)
    empty = np.zeros(0, np.int32)
    ids = [empty] * len(sources)
    for i, out in zip(todo, outs):
      ids[i] = out
    return Generation(
        token_ids=ids,
        input_tokens=[0 if f is None else len(f[0]) for f in fitted],
        output_tokens=[len(x) for x in ids],
        stop_reasons=[self._stop_reason(x, f is None)
                      for x, f in zip(ids, fitted)],
        truncated=[f is not None and f[1] for f in fitted])

  def _stop_reason(self, ids: np.ndarray, blank: bool) -> str:
    if blank:
      return 'blank'
    last = int(ids[-1]) if len(ids) else None
    if last in self._newline_ids:
      return 'newline'
    if last in self._stop_ids:
      return 'eos'
    return 'max_tokens'

  def translate_detailed(self, sources: Sequence[str], *,
                         stop_sequences: Sequence[str] = (),
                         **kw) -> list[Translation]:
    """Translations with usage and stop reasons (see `generate` for kw)."""
    gen = self.generate(sources, **kw)
    out = []
    for src, ids, n_in, n_out, reason in zip(
        sources, gen.token_ids, gen.input_tokens, gen.output_tokens,
        gen.stop_reasons):
      text, cut = clean_translation(self.tokenizer.decode(ids), src,
                                    stop_sequences)
      out.append(Translation(text, n_in, n_out,
                             'stop_sequence' if cut else reason))
    return out

  def translate(self, sources: Sequence[str], *,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, seed: int = 0,
                stop_sequences: Sequence[str] = (),
                batch_size: int | None = None,
                max_length_ratio: float | None = None) -> list[str]:
    """One line of text per source, in order (options as in `generate`)."""
    return [t.text for t in self.translate_detailed(
        sources, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, stop_sequences=stop_sequences,
        batch_size=batch_size, max_length_ratio=max_length_ratio)]


# --- CLI -------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('--checkpoint', default=None,
                 help='fine-tuned checkpoint dir (default: the base model)')
  p.add_argument('--model', default='gemma3_270m',
                 help='released model name, or the arch of --checkpoint')
  p.add_argument('--lang_pair', default='en-fr')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--max_new_tokens', type=int, default=DEFAULT_MAX_NEW_TOKENS)
  p.add_argument('--max_input_tokens', type=int,
                 default=DEFAULT_MAX_INPUT_TOKENS)
  p.add_argument('--truncate', action='store_true',
                 help='cut over-long sources instead of failing')
  p.add_argument('--max_length_ratio', type=float,
                 default=DEFAULT_MAX_LENGTH_RATIO,
                 help='at most ceil(R * prompt tokens) new tokens per input '
                      '(0: only --max_new_tokens)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None,
                 help='compute dtype (default: float32 on CPU, else bfloat16)')
  p.add_argument('--data_parallel', action='store_true',
                 help='split each batch over all local devices (params '
                      'replicated); --batch_size should be a multiple of '
                      'the device count')


def data_parallel_mesh() -> jax.sharding.Mesh:
  """A data-only mesh over this host's devices."""
  return sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1),
                            devices=jax.local_devices())


def build_translator(args) -> Translator:
  t0 = time.time()
  dtype = None if args.dtype is None else jnp.dtype(args.dtype)
  mesh = None
  if getattr(args, 'data_parallel', False):
    mesh = data_parallel_mesh()
    n = mesh.devices.size
    log.info('data parallel over %d devices', n)
    if args.batch_size % n:
      log.warning('--batch_size %d is not a multiple of %d devices: batches '
                  'that do not split run replicated', args.batch_size, n)
  translator = Translator.from_pretrained(
      args.model, args.checkpoint, lang_pair=args.lang_pair, dtype=dtype,
      batch_size=args.batch_size, max_input_tokens=args.max_input_tokens,
      truncate=args.truncate, mesh=mesh)
  log.info('loaded %s in %.1fs', args.checkpoint or args.model,
           time.time() - t0)
  return translator


def sampling_kwargs(temperature, top_k, top_p, seed, max_new_tokens) -> dict:
  """Greedy unless sampling options are given; top_k/top_p alone imply T=1."""
  if temperature is None:
    temperature = 1.0 if (top_k is not None or top_p is not None) else 0.0
  return dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
              max_new_tokens=max_new_tokens)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m gemma_mt.translate', description=__doc__.split('\n')[0])
  p.add_argument('sentences', nargs='*', help='sentences to translate')
  p.add_argument('--input', default=None,
                 help='text file, one sentence per line (default: stdin)')
  p.add_argument('--jsonl', action='store_true',
                 help='JSON Lines requests on stdin, one response line each')
  add_model_args(p)
  p.add_argument('--temperature', type=float, default=None)
  p.add_argument('--top_k', type=int, default=None)
  p.add_argument('--top_p', type=float, default=None)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--stop', action='append', default=[], metavar='TEXT',
                 help='stop sequence (repeatable); cuts the text there')
  args = p.parse_args(argv)
  if args.jsonl and (args.sentences or args.input):
    p.error('--jsonl reads requests from stdin; give no sentences/--input')
  if args.sentences and args.input:
    p.error('give sentences as arguments or --input, not both')
  return args


def split_lines(text: str) -> list[str]:
  """Lines split on '\\n' only (not U+2028 & co.), so outputs align with inputs."""
  lines = text.split('\n')
  if lines[-1] == '':
    lines.pop()  # The final newline ends a line; it does not start one.
  return [line.removesuffix('\r') for line in lines]


def _read_lines(args) -> list[str]:
  if args.sentences:
    return list(args.sentences)
  if args.input:
    with open(args.input, encoding='utf-8', newline='') as f:
      return split_lines(f.read())
  return split_lines(sys.stdin.buffer.read().decode('utf-8'))


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format='%(asctime)s %(name)s: %(message)s')
  args = parse_args(argv)
  if hasattr(sys.stdout, 'reconfigure'):
    sys.stdout.reconfigure(encoding='utf-8')  # French, whatever the locale.
  if args.jsonl:
    from gemma_mt import json_api
    translator = build_translator(args)
    json_api.serve_jsonl(translator, sys.stdin.buffer, sys.stdout,
                         args.max_length_ratio or None)
    return 0
  sources = _read_lines(args)
  translator = build_translator(args)
  kw = sampling_kwargs(args.temperature, args.top_k, args.top_p, args.seed,
                       args.max_new_tokens)
  try:
    t0 = time.time()
    out = translator.translate(sources, stop_sequences=args.stop,
                               max_length_ratio=args.max_length_ratio or None,
                               **kw)
  except ValueError as e:
    log.error('%s', e)
    return 2
  log.info('%d sentences in %.1fs (%d compiled shapes)', len(sources),
           time.time() - t0, translator.num_compiles)
  for line in out:
    print(line)
  return 0


if __name__ == '__main__':
  sys.exit(main())
