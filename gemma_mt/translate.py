"""Translate sentences with a (fine-tuned) Gemma from the command line.

    python -m gemma_mt.translate --checkpoint runs/demo/final "Hello!"

Sentences come from the arguments, `--input FILE` or stdin, one per line;
one translation per line goes to stdout (a blank input line gives a blank
output line), logs to stderr. `--jsonl` switches to the JSON request
interface (`json_api`). The library side is `translator.Translator`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
import time

from gemma_mt import cli, signals

log = logging.getLogger(__name__)

CHUNK = 512  # Sentences translated between two writes to stdout, at least.


def parse_args(argv=None):
  p = cli.ArgumentParser(prog='python -m gemma_mt.translate',
                         description=__doc__.split('\n')[0])
  p.add_argument('sentences', nargs='*', help='sentences to translate')
  p.add_argument('--input', default=None,
                 help='text file, one sentence per line (default: stdin)')
  p.add_argument('--jsonl', action='store_true',
                 help='JSON Lines requests on stdin, one response line each')
  cli.add_model_args(p)
  cli.add_sampling_args(p)
  args = p.parse_args(argv)
  if args.jsonl and (args.sentences or args.input):
    p.error('--jsonl reads requests from stdin; give no sentences/--input')
  if args.sentences and args.input:
    p.error('give sentences as arguments or --input, not both')
  if args.input and not Path(args.input).is_file():
    p.error(f'--input {args.input}: no such file')
  args.options = cli.sampling_options(args)  # Checked before any loading.
  cli.check_model_args(args)
  return args


def split_lines(data: bytes | str, where: str = 'input') -> list[str]:
  """Lines split on '\\n' only (not U+2028 & co.), so outputs align with
  inputs. A line that is not UTF-8 is reported by number and becomes a
  blank line (a blank output), so one bad line loses nothing else."""
  if isinstance(data, str):
    data = data.encode('utf-8', 'surrogatepass')
  raw = data.split(b'\n')
  if raw[-1] == b'':
    raw.pop()  # The final newline ends a line; it does not start one.
  lines = []
  for n, line in enumerate(raw, start=1):
    try:
      lines.append(line.removesuffix(b'\r').decode('utf-8'))
    except UnicodeDecodeError as e:
      log.warning('%s line %d: invalid UTF-8 at byte %d; skipped (blank '
                  'output line)', where, n, e.start)
      lines.append('')
  return lines


def _read_lines(args) -> list[str]:
  if args.sentences:
    return list(args.sentences)
  if args.input:
    with open(args.input, 'rb') as f:
      return split_lines(f.read(), args.input)
  return split_lines(sys.stdin.buffer.read(), 'stdin')


def run(argv=None) -> int:
  args = parse_args(argv)
  # A closed stream is None here (the shell's `>&-`): say so before the work,
  # instead of translating into nothing.
  if sys.stdout is None:
    raise ValueError('stdout is closed: the translations could go nowhere')
  if sys.stdin is None and (args.jsonl or not (args.sentences or args.input)):
    raise ValueError('stdin is closed: give sentences or --input FILE')
  if hasattr(sys.stdout, 'reconfigure'):
    sys.stdout.reconfigure(encoding='utf-8')  # French, whatever the locale.
  if args.jsonl:
    from gemma_mt import json_api
    translator = cli.build_translator(args)
    json_api.serve_jsonl(translator, sys.stdin.buffer, sys.stdout,
                         args.options.max_length_ratio, args.options)
    return 0
  sources = _read_lines(args)
  translator = cli.build_translator(args)
  prep = translator.prepare(sources, args.options)  # All checked first.
  t0, written = time.time(), 0
  try:
    # Written as they are done, so an interrupted run keeps what it has.
    for part in prep.chunks(translator.chunk_size(CHUNK)):
      out = translator.finish(part, translator.decode(part))
      try:
        sys.stdout.write(''.join(t.text + '\n' for t in out))
        sys.stdout.flush()
      except (OSError, ValueError) as e:  # A closed pipe or file.
        raise OSError(f'cannot write the translations to stdout: {e}') from None
      written += len(out)
  except KeyboardInterrupt:
    raise signals.Interrupted(f'the first {written} of {len(sources)} '
                              'translations were written') from None
  log.info('%d sentences in %.1fs (%d compiled shapes)', len(sources),
           time.time() - t0, translator.num_compiles)
  return 0


def main(argv=None) -> int:
  return cli.main_guard(run, argv)


if __name__ == '__main__':
  sys.exit(main())
