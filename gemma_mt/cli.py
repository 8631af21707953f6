"""What every command line shares: flags derived from dataclass fields, the
model/translator flags, and one error handler.

`add_fields` turns a dataclass (`TrainingConfig`, `SamplingOptions`) into
argparse flags, one per field, typed from the annotation, with the field's
trailing comment as its help: a field is declared once and every CLI gets it
the same way. `main_guard` turns an expected error into one `error: ...`
line and exit status 2 (`--debug` or GEMMA_MT_DEBUG=1 shows the traceback)
and turns on JAX's persistent compilation cache and the store of compiled
decoders (`decoding.executables`), so the second run of a command neither
compiles nor traces them (`--compile_cache_dir`, `--no_compile_cache`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import re
import signal
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

from gemma_mt import signals
from gemma_mt.cache import CACHE_ENV, cache_home

log = logging.getLogger(__name__)

DEBUG_ENV = 'GEMMA_MT_DEBUG'


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a bad flag is one line (not usage + error) and exit 2;
  with the flags every CLI shares (`add_common_args`)."""

  def __init__(self, *args, **kw):
    kw.setdefault('allow_abbrev', False)
    super().__init__(*args, **kw)
    add_common_args(self)

  def error(self, message):
    self.exit(2, f'error: {message} (see {self.prog} --help)\n')


def add_common_args(p: argparse.ArgumentParser) -> None:
  """Read by `main_guard` before anything runs; here for --help and so the
  CLI's own parser accepts them."""
  g = p.add_argument_group('every command')
  g.add_argument('--debug', action='store_true',
                 help=f'show tracebacks (or set {DEBUG_ENV}=1)')
  g.add_argument('--compile_cache_dir', default=None, metavar='DIR',
                 help='persistent XLA compilation cache (default: '
                      f'${CACHE_ENV} or ~/.cache/gemma_mt, /xla)')
  g.add_argument('--no_compile_cache', action='store_true',
                 help='compile everything afresh')


def default_compile_cache_dir() -> Path:
  return cache_home() / 'xla'


@contextlib.contextmanager
def using_store(directory: Path | None):
  """`executables.using(directory)`, importing jax only when there is one
  (`--help` and flag errors stay fast)."""
  if directory is None:
    yield None
    return
  from gemma_mt.decoding import executables
  with executables.using(directory) as store:
    yield store


class CompileCacheStats:
  """Counts the persistent cache's hits and misses (jax monitoring events)."""

  def __init__(self):
    self.hits = self.misses = 0

  def __call__(self, event: str, **kw):
    if event == '/jax/compilation_cache/cache_hits':
      self.hits += 1
    elif event == '/jax/compilation_cache/cache_misses':
      self.misses += 1


def enable_compile_cache(path: str | os.PathLike) -> CompileCacheStats:
  """Compiled executables go to `path` and are reused by later processes:
  the second run of a command compiles nothing."""
  import jax
  path = Path(path).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  stats = CompileCacheStats()
  jax.monitoring.register_event_listener(stats)
  return stats


# ------------------------------------------------------- flags from fields


@functools.cache
def field_comments(cls) -> dict[str, str]:
  """{field: its trailing `# comment`} from the class source."""
  try:
    src = inspect.getsource(cls)
  except (OSError, TypeError):
    return {}
  pat = re.compile(r'^\s+(\w+):[^#\n]*#\s*(.+)$', re.MULTILINE)
  return {m[1]: m[2].strip() for m in pat.finditer(src)}


def parse_bool(text: str) -> bool:
  t = text.lower()
  if t in ('1', 'true', 'yes', 'on'):
    return True
  if t in ('0', 'false', 'no', 'off'):
    return False
  raise argparse.ArgumentTypeError(f'expects true/false, got {text!r}')


def _scalar(tp) -> Callable[[str], object]:
  def parse(text: str):
    try:
      return tp(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f'expects {tp.__name__}, got {text!r}') from None
  return parse


def _optional(parse):
  def parse_opt(text: str):
    return None if text.lower() in ('none', 'null', '') else parse(text)
  return parse_opt


def _flag_kwargs(tp) -> dict:
  """argparse kwargs for a field annotation: bool, int, float, str,
  `X | None`, or `tuple[str, ...]` (a repeatable flag)."""
  optional = False
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional, tp = len(args) < len(typing.get_args(tp)), args[0]
  if typing.get_origin(tp) is tuple:
    return dict(action='append', type=typing.get_args(tp)[0])
  if tp is bool:
    return dict(nargs='?', const=True, type=parse_bool, metavar='BOOL')
  parse = _scalar(tp)
  return dict(type=_optional(parse) if optional else parse,
              metavar=tp.__name__.upper())


def add_fields(parser: argparse.ArgumentParser, cls, *,
               defaults: dict | None = None, only_given: bool = False,
               skip: tuple[str, ...] = ()) -> None:
  """One `--field` per dataclass field of `cls`.

  only_given: flags not on the command line leave no attribute (so they
  can override a config file's values); else `defaults` or the field's
  default.
  """
  hints = typing.get_type_hints(cls)
  comments = field_comments(cls)
  aliases = getattr(cls, 'FLAG_ALIASES', {})
  defaults = defaults or {}
  for f in dataclasses.fields(cls):
    if f.name in skip:
      continue
    default = defaults.get(f.name, f.default)
    kw = _flag_kwargs(hints[f.name])
    help_ = comments.get(f.name, '')
    if only_given:
      kw['default'] = argparse.SUPPRESS
      help_ += f' (default {default!r})'
    else:
      kw['default'] = default
    flags = [f'--{f.name}'] + ([aliases[f.name]] if f.name in aliases else [])
    parser.add_argument(*flags, dest=f.name, help=help_.strip(), **kw)


def from_args(cls, args: argparse.Namespace, base=None, **extra):
  """`cls` (or `base` replaced) from the fields present in `args`."""
  given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
           if hasattr(args, f.name)}
  given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
  given.update(extra)
  return dataclasses.replace(base, **given) if base is not None else cls(**given)


# ------------------------------------------------- translation commands


def add_model_args(p: argparse.ArgumentParser) -> None:
  """Which model and how to run it (translate, evaluate)."""
  from gemma_mt.decoding.options import DEFAULT_MAX_INPUT_TOKENS
  p.add_argument('--checkpoint', default=None,
                 help='fine-tuned checkpoint dir (default: the base model)')
  p.add_argument('--model', default='gemma3_270m',
                 help='released model name, or the arch of --checkpoint')
  p.add_argument('--lang_pair', default='en-fr')
  from gemma_mt.data.prompts import FORMATS
  p.add_argument('--prompt_format', default=None, choices=FORMATS,
                 help='prompt template (default: the one the checkpoint was '
                      'trained with, else plain)')
  p.add_argument('--batch_size', type=int, default=None,
                 help='decode rows (default: sized by the device memory, at '
                      'most 256 a device; 32 on a CPU)')
  p.add_argument('--max_input_tokens', type=int,
                 default=DEFAULT_MAX_INPUT_TOKENS)
  p.add_argument('--truncate', action='store_true',
                 help='cut over-long sources instead of failing')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None,
                 help='compute dtype (default: float32 on CPU, else bfloat16)')
  p.add_argument('--static_batching', action='store_true',
                 help='decode fixed batches to the end (default: continuous '
                      'batching, finished rows refilled; one device)')
  p.add_argument('--data_parallel', action='store_true',
                 help='split each batch over all local devices (params '
                      'replicated); --batch_size should be a multiple of '
                      'the device count')


def add_sampling_args(p: argparse.ArgumentParser) -> None:
  """`SamplingOptions` as flags; the CLI caps runaways by default."""
  from gemma_mt.decoding.options import DEFAULT_MAX_LENGTH_RATIO, SamplingOptions
  add_fields(p, SamplingOptions,
             defaults={'max_length_ratio': DEFAULT_MAX_LENGTH_RATIO,
                       'stop_sequences': None})


def sampling_options(args: argparse.Namespace):
  from gemma_mt.decoding.options import SamplingOptions
  opts = dict(stop_sequences=tuple(args.stop_sequences or ()))
  return from_args(SamplingOptions, args, **opts)


def check_model_args(args) -> None:
  """One-line errors for model flags, before anything loads."""
  for name in ('batch_size', 'max_input_tokens'):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      raise ValueError(f'--{name} must be >= 1, got {getattr(args, name)}')
  if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
    raise ValueError(f'--checkpoint {args.checkpoint}: no such directory')


def build_translator(args):
  import time

  import jax
  import jax.numpy as jnp

  from gemma_mt import sharding
  from gemma_mt.translator import Translator
  check_model_args(args)
  t0 = time.time()
  dtype = None if args.dtype is None else jnp.dtype(args.dtype)
  mesh = None
  if getattr(args, 'data_parallel', False):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1),
                              devices=jax.local_devices())
    n = mesh.devices.size
    log.info('data parallel over %d devices', n)
    if args.batch_size and args.batch_size % n:
      log.warning('--batch_size %d is not a multiple of %d devices: batches '
                  'that do not split run replicated', args.batch_size, n)
  translator = Translator.from_pretrained(
      args.model, args.checkpoint, lang_pair=args.lang_pair, dtype=dtype,
      batch_size=args.batch_size, max_input_tokens=args.max_input_tokens,
      truncate=args.truncate, mesh=mesh, progress=True,
      continuous=not getattr(args, 'static_batching', False),
      prompt_format=args.prompt_format)
  log.info('loaded %s in %.1fs', args.checkpoint or args.model,
           time.time() - t0)
  return translator


# ---------------------------------------------------------------- errors


def main_guard(fn: Callable[[list[str] | None], int],
               argv: list[str] | None = None) -> int:
  """Runs a CLI main; an expected error becomes one line and exit 2."""
  argv = sys.argv[1:] if argv is None else list(argv)
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  add_common_args(common)
  known, _ = common.parse_known_args(argv)
  debug = known.debug or os.environ.get(DEBUG_ENV, '') not in ('', '0')
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format='%(asctime)s %(name)s: %(message)s')
  for chatty in ('absl', 'jax'):  # orbax; jax's backend probing.
    logging.getLogger(chatty).setLevel(logging.WARNING)
  stats = store_dir = store = None
  if not (known.no_compile_cache or {'-h', '--help'} & set(argv)):
    cache = known.compile_cache_dir or default_compile_cache_dir()
    try:
      stats = enable_compile_cache(cache)
      store_dir = Path(cache).expanduser() / 'executables'
    except OSError as e:
      log.warning('no compile cache at %s: %s', cache, e)
  # SIGTERM as SIGINT, so that both end a run the same way (`signals`).
  with contextlib.suppress(ValueError):  # Not in the main thread.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
  try:
    with using_store(store_dir) as store:
      return fn(argv)
  except SystemExit as e:  # argparse: --help (0) or a bad flag (2).
    return e.code if isinstance(e.code, int) else 2
  except (signals.Interrupted, KeyboardInterrupt) as e:
    if debug:
      raise
    print(f'interrupted: {str(e).strip() or "nothing was kept"}',
          file=sys.stderr)
    return signals.EXIT_CODE
  except (ValueError, OSError, RuntimeError, KeyError, ArithmeticError,
          TypeError) as e:
    if debug:
      raise
    msg = ' '.join(str(e).split()) or type(e).__name__
    print(f'error: {msg}', file=sys.stderr)
    return 2
  finally:
    if stats is not None and store is not None:
      log.info('compile cache: decoders %d loaded, %d compiled; XLA %d hits, '
               '%d compiled', store.loaded, store.compiled, stats.hits,
               stats.misses)
