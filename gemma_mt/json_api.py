"""JSON requests and responses, shaped like a hosted model API's invoke call.

Request (only `input_text` is required; unknown fields are rejected):

  {"input_text": "Hello" | ["Hello", ...],   non-empty strings
   "temperature": 0..1,       default 0 (greedy), or 1 if top_k/top_p given
   "top_p": 0..1,             nucleus mass; 1 = off; needs temperature > 0
   "top_k": 0..500,           0 = off; needs temperature > 0
   "max_tokens": 1..1024,     new tokens per input, default 256 (SamplingOptions)
   "stop_sequences": [str],   at most 16 non-empty strings
   "seed": 0..2**31-1,        default 0
   "beam_size": 1..16,        beam search (default 1: greedy)
   "length_penalty": 0..2,    GNMT alpha for beam search, default 0
   "mbr": 0..32,              MBR over N candidates (0/1: off)
   "mbr_candidates": "beam" | "sample" | "both",   default "beam"
   "mbr_utility": "chrf" | "bleu" | "chrf+bleu",   default "chrf"
   "epsilon": 0 <= e < 1,     epsilon sampling cut; 0 = off (sampled MBR: 0.02)
   "guard": true | false}     avoid copies of the source / other languages (default true)

Response: {"status": "SUCCESS", "translations": [str, ...],
           "usage": {"input_tokens": n, "output_tokens": m}}
       or {"status": "FAIL", "error": "<what is wrong, naming the field>"}.

`translations` is always a list, one per input. Usage counts prompt tokens
(BOS and instruction included) and generated tokens (the stop token
included). Integers must be JSON integers (5.0 is rejected) and booleans are
never numbers; NaN/Infinity and duplicate keys are rejected.

JSON Lines (`serve_jsonl`): exactly one response line per input line, in
order, flushed as it is written. A blank line is a request too: it gets a
FAIL ("empty line"), so responses always pair up with request lines. Errors
in JSONL mode start with "line N: ". Nothing is ever partially answered: a
request whose inputs cannot all be translated fails as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from typing import Any, BinaryIO, TextIO

from gemma_mt.decoding.options import OptionError, SamplingOptions
from gemma_mt.translator import InputTooLongError

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 1024
MAX_TOP_K = 500
MAX_STOP_SEQUENCES = 16
_SURROGATE = re.compile('[\ud800-\udfff]')
FIELDS = ('input_text', 'temperature', 'top_p', 'top_k', 'max_tokens',
          'stop_sequences', 'seed', 'beam_size', 'length_penalty', 'mbr',
          'mbr_candidates', 'mbr_utility', 'epsilon', 'guard')
MAX_BEAM_SIZE, MAX_MBR, MAX_LENGTH_PENALTY = 16, 32, 2


class RequestError(ValueError):
  """A bad request; the message names the offending field."""


def _reject_constant(name):
  raise RequestError(f'invalid JSON: {name} is not allowed')


def _no_duplicates(pairs):
  obj = {}
  for k, v in pairs:
    if k in obj:
      raise RequestError(f'invalid JSON: duplicate field {k!r}')
    obj[k] = v
  return obj


def loads(text: str) -> Any:
  """Strict JSON: no NaN/Infinity, no duplicate keys."""
  try:
    return json.loads(text, parse_constant=_reject_constant,
                      object_pairs_hook=_no_duplicates)
  except json.JSONDecodeError as e:
    raise RequestError(f'invalid JSON: {e}') from None
  except RecursionError:
    raise RequestError('invalid JSON: nested too deeply') from None


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) \
      and math.isfinite(x)


def _number(req, name, lo, hi):
  x = req[name]
  if not _is_num(x) or not lo <= x <= hi:
    raise RequestError(f'{name} must be a number in [{lo}, {hi}], got '
                       f'{json.dumps(x)}')
  return float(x)


def _int(req, name, lo, hi):
  x = req[name]
  if not _is_int(x) or not lo <= x <= hi:
    raise RequestError(f'{name} must be an integer in [{lo}, {hi}], got '
                       f'{json.dumps(x)}')
  return x


_JSON_NAMES = {'max_new_tokens': 'max_tokens'}  # SamplingOptions -> JSON


def parse_request(req: Any, defaults: SamplingOptions | None = None
                  ) -> tuple[list[str], SamplingOptions]:
  """(sources, options) of a request; RequestError names the JSON field.

  Absent fields take `defaults` (the server's or the CLI's flags).

  JSON types and this service's limits are checked here; what the values
  mean (greedy unless sampling, top_k/top_p imply temperature 1, ranges) is
  `SamplingOptions`' job.
  """
  if not isinstance(req, dict):
    raise RequestError(f'request must be a JSON object, got '
                       f'{type(req).__name__ if req is not None else "null"}')
  unknown = [k for k in req if k not in FIELDS]
  if unknown:
    raise RequestError(f'unknown field(s) {", ".join(map(repr, unknown))}; '
                       f'allowed: {", ".join(FIELDS)}')
  if 'input_text' not in req:
    raise RequestError('missing required field input_text')
  text = req['input_text']
  sources = [text] if isinstance(text, str) else text
  if not isinstance(sources, list) or not sources:
    raise RequestError('input_text must be a string or a non-empty list of '
                       'strings')
  for i, s in enumerate(sources):
    where = 'input_text' if isinstance(text, str) else f'input_text[{i}]'
    if not isinstance(s, str):
      raise RequestError(f'{where} must be a string, got {json.dumps(s)}')
    if not s.strip():
      raise RequestError(f'{where} is empty')
    if _SURROGATE.search(s):
      raise RequestError(f'{where} holds a lone surrogate (not valid Unicode)')
  kw: dict[str, Any] = {}
  if 'top_k' in req:
    kw['top_k'] = _int(req, 'top_k', 0, MAX_TOP_K) or None  # 0 = off
  if 'top_p' in req:
    top_p = _number(req, 'top_p', 0, 1)
    kw['top_p'] = None if top_p >= 1 else top_p  # 1 = off
  if 'temperature' in req:
    kw['temperature'] = _number(req, 'temperature', 0, 1)
  elif ('top_k' in req or 'top_p' in req) and not (
      defaults is not None and defaults.temperature):
    kw['temperature'] = 1.0
  if 'max_tokens' in req:
    kw['max_new_tokens'] = _int(req, 'max_tokens', 1, MAX_TOKENS_LIMIT)
  if 'seed' in req:
    kw['seed'] = _int(req, 'seed', 0, 2**31 - 1)
  if 'beam_size' in req:
    kw['beam_size'] = _int(req, 'beam_size', 1, MAX_BEAM_SIZE)
  if 'length_penalty' in req:
    kw['length_penalty'] = _number(req, 'length_penalty', 0,
                                   MAX_LENGTH_PENALTY)
  if 'mbr' in req:
    kw['mbr'] = _int(req, 'mbr', 0, MAX_MBR)
  for name in ('mbr_candidates', 'mbr_utility'):
    if name in req:
      if not isinstance(req[name], str):
        raise RequestError(f'{name} must be a string, got '
                           f'{json.dumps(req[name])}')
      kw[name] = req[name]  # Its values are checked by SamplingOptions.
  if 'epsilon' in req:
    kw['epsilon'] = _number(req, 'epsilon', 0, 1) or None  # 0 = off
  if 'guard' in req:
    if not isinstance(req['guard'], bool):
      raise RequestError(f'guard must be true or false, got '
                         f'{json.dumps(req["guard"])}')
    kw['guard'] = req['guard']
  if 'stop_sequences' in req:
    stops = req['stop_sequences']
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES:
      raise RequestError(f'stop_sequences must be a list of at most '
                         f'{MAX_STOP_SEQUENCES} strings')
    kw['stop_sequences'] = stops
  if kw.get('temperature', 0) > 0 and kw.get('top_p', 1) == 0:
    raise RequestError('top_p must be > 0 when sampling (temperature > 0)')
  if defaults is not None:
    kw = {**dataclasses.asdict(defaults), **kw}
  try:
    return sources, SamplingOptions(**kw)
  except OptionError as e:
    name = _JSON_NAMES.get(e.field, e.field)
    raise RequestError(name + str(e)[len(e.field):]) from None


def fail(error: str) -> dict:
  return {'status': 'FAIL', 'error': error}


def handle_request(translator, request: Any,
                   max_length_ratio: float | None = None,
                   defaults: SamplingOptions | None = None) -> dict:
  """A response dict for a request (a parsed object or its JSON text).

  `max_length_ratio` is the server's runaway cap (`SamplingOptions`);
  `defaults`, what absent fields take.
  """
  req = None
  try:
    req = loads(request) if isinstance(request, (str, bytes)) else request
    sources, options = parse_request(req, defaults)
    results = translator.translate_detailed(
        sources, options.replace(max_length_ratio=max_length_ratio))
  except ValueError as e:  # RequestError, InputTooLongError, other input problems.
    return fail(error_message(e, req))
  except Exception as e:  # Never a traceback in the response stream.
    log.exception('request failed')
    return fail(f'internal error: {type(e).__name__}: {e}')
  return success(results)


def error_message(e: ValueError, req: Any) -> str:
  """What is wrong with a request, naming the field."""
  if isinstance(e, InputTooLongError):
    where = ('input_text' if isinstance(req['input_text'], str)
             else f'input_text[{e.index}]')
    return (f'{where} is {e.length} tokens long with the prompt, over the '
            f'limit of {e.limit}')
  return str(e)


def success(results) -> dict:
  return {'status': 'SUCCESS',
          'translations': [r.text for r in results],
          'usage': {'input_tokens': sum(r.input_tokens for r in results),
                    'output_tokens': sum(r.output_tokens for r in results)}}


def dumps(response: dict) -> str:
  return json.dumps(response, ensure_ascii=False)


def serve_jsonl(translator, lines: BinaryIO, out: TextIO,
                max_length_ratio: float | None = None,
                defaults: SamplingOptions | None = None) -> int:
  """One response line per request line (bytes in, text out); returns count."""
  n = 0
  for n, raw in enumerate(lines, start=1):
    raw = raw.rstrip(b'\n').removesuffix(b'\r')
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      response = fail(f'invalid UTF-8 at byte {e.start}')
    else:
      response = (fail('empty line') if not text.strip()
                  else handle_request(translator, text, max_length_ratio,
                                      defaults))
    if response['status'] == 'FAIL':
      response['error'] = f'line {n}: {response["error"]}'
    out.write(dumps(response) + '\n')
    out.flush()
  return n
