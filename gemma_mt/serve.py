"""HTTP translation service: the JSON request of `json_api`, over HTTP.

    python -m gemma_mt.serve --checkpoint runs/demo/best --port 8080
    curl -s localhost:8080/translate -d '{"input_text": "Hello!"}'

`POST /translate` takes the JSONL interface's request and answers its body:
200 SUCCESS; 4xx FAIL naming the field (400 bad request, 413 too large);
503 FAIL when the queue is full (with Retry-After). `GET /health` says
whether the model is loaded and how much is queued.

Starlette + uvicorn: the maintained minimal ASGI pair (FastAPI would add
pydantic, and requests are already validated by `json_api`). The model runs
on one worker thread: it takes every queued request, groups those with the
same sampling options, and translates each group in one call; greedy
requests (the common case) instead join one running continuous batch
between two decode chunks, so a short request never waits for a long one. The queue is
bounded in sentences; a full queue answers 503 at once instead of
letting latency grow. On SIGTERM / Ctrl-C uvicorn stops accepting, the
requests in flight are finished and answered, then the worker stops.
Binds 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import sys
import threading
import time

from gemma_mt import cli

log = logging.getLogger(__name__)


# The running batch of greedy requests: up to 256 new tokens (the default)
# and prompts up to 512 tokens in 1024 cache slots a row; others take the
# grouped path. One decode executable and a few inserts for the whole life
# of the server.
STREAM_BUDGET = 256
STREAM_CACHE_LEN = 1024
MAX_TIMEOUT_S = 3600.0
CLIENT_POLL_S = 0.25  # how often a waiting request checks its client


class Overloaded(Exception):
  pass


class Batcher:
  """Queues (sources, options) and translates them on one thread, grouped."""

  def __init__(self, translator, max_queued: int = 1024,
               max_length_ratio: float | None = None):
    self.translator = translator
    self.max_queued = max_queued
    self.max_length_ratio = max_length_ratio
    self.queued = 0  # Sentences waiting or being translated.
    self.served = 0
    self._items: collections.deque = collections.deque()
    self._cv = threading.Condition()
    self._stop = False
    self._draining = False    # Shutting down: queued work is refused (503).
    self._decoder = None      # The continuous batch of greedy requests.
    self._streaming: set = set()  # Futures of requests in it.
    self._thread = threading.Thread(target=self._run, name='translator',
                                    daemon=True)
    self._thread.start()

  def submit(self, sources, options) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    with self._cv:
      if self._stop:
        raise Overloaded('server is shutting down')
      if self.queued + len(sources) > self.max_queued:
        raise Overloaded(f'server overloaded: {self.queued} sentences queued '
                         f'(limit {self.max_queued}); retry later')
      self.queued += len(sources)
      self._items.append((sources, options, fut))
      self._cv.notify()
    return fut

  def drain(self) -> None:
    """On shutdown: requests not yet started are answered 503 at once, so
    that what is decoding finishes within the graceful timeout."""
    with self._cv:
      self._draining = True
      items = list(self._items)
      self._items.clear()
      for sources, _, _ in items:
        self.queued -= len(sources)
      self._cv.notify()
    for _, _, fut in items:
      if fut.set_running_or_notify_cancel():
        fut.set_exception(Overloaded('server is shutting down'))

  def close(self) -> None:
    """Finishes what is queued, then stops the thread."""
    with self._cv:
      self._stop = True
      self._cv.notify()
    self._thread.join()

  def _run(self) -> None:
    while True:
      with self._cv:
        while not (self._items or self._stop or self._streaming):
          self._cv.wait()
        if self._stop and not self._items and not self._streaming:
          return
        items = list(self._items)
        self._items.clear()
      groups = collections.defaultdict(list)
      for item in items:
        if not item[2].set_running_or_notify_cancel():  # Its client left.
          with self._cv:
            self.queued -= len(item[0])
          continue
        try:
          streamed = self._stream(item)
        except Exception as e:  # noqa: BLE001  The thread must live on.
          log.exception('request failed')
          item[2].set_exception(e)
          with self._cv:
            self.queued -= len(item[0])
          continue
        if not streamed:
          # A sample's PRNG stream follows the input's index in its call,
          # so sampled requests (and sampled MBR) run alone: same seed, same
          # answer, whoever else is being served. Beam requests with equal
          # options merge.
          opts = item[1]
          alone = opts.temperature != 0 or opts.mbr_samples
          key = (opts, id(item)) if alone else opts
          groups[key].append(item)
      for group in groups.values():
        if self._draining:
          for sources, _, fut in group:
            fut.set_exception(Overloaded('server is shutting down'))
          with self._cv:
            self.queued -= sum(len(g[0]) for g in group)
          continue
        self._translate(group)
      if self._streaming:
        try:
          self._decoder.step()
        except Exception as e:  # noqa: BLE001  Fail what was in flight.
          log.exception('decode step failed')
          for fut in self._streaming:
            fut.set_exception(e)
          self._streaming.clear()
          self._decoder = None

  def _stream(self, item) -> bool:
    """Greedy requests join the running continuous batch; False: not one."""
    sources, options, fut = item
    opts = options.replace(max_length_ratio=self.max_length_ratio)
    tr = self.translator
    if (opts.temperature != 0 or opts.search_width > 1 or opts.mbr_samples
        or not tr.continuous):  # (Not under a mesh of several devices.)
      return False
    prep = tr.prepare(sources, opts)
    prompts, limits, todo = prep.prompts, prep.limits, prep.todo
    if self._decoder is None:
      from gemma_mt.decoding.continuous import ContinuousDecoder
      mode, sampling = tr.sampler.sampling_args()
      self._decoder = ContinuousDecoder(tr.sampler, tr.sampler.batch_size,
                                        mode, sampling, STREAM_BUDGET, STREAM_CACHE_LEN)
    if not all(self._decoder.fits(len(p), l) for p, l in zip(prompts, limits)):
      return False
    outs: dict = {}

    def finish():
      # Inside the decoder's step: a failure here is this request's alone.
      try:
        fut.set_result(tr.finish(prep, tr.guard(prep, tr.generation(prep,
                                                                    outs))))
      except Exception as e:  # noqa: BLE001
        log.exception('request failed')
        fut.set_exception(e)
      self._streaming.discard(fut)
      with self._cv:
        self.queued -= len(sources)
        self.served += 1

    def on_done(i):
      def record(ids):
        outs[i] = ids
        if len(outs) == len(todo):
          finish()
      return record

    if not todo:
      finish()
      return True
    self._streaming.add(fut)
    for i, p, limit in zip(todo, prompts, limits):
      self._decoder.add(p, limit, 0, on_done(i))
    return True

  def _translate(self, group) -> None:
    sources = [s for srcs, _, _ in group for s in srcs]
    opts = group[0][1].replace(max_length_ratio=self.max_length_ratio)
    try:
      results = self.translator.translate_detailed(sources, opts)
    except Exception as e:  # noqa: BLE001  Answered, never raised here.
      log.exception('translation failed')
      results, error = None, e
    at = 0
    for srcs, _, fut in group:
      if results is None:
        fut.set_exception(error)
      else:
        fut.set_result(results[at:at + len(srcs)])
      at += len(srcs)
    with self._cv:
      self.queued -= len(sources)
      self.served += len(group)


class _ClientLeft(Exception):
  pass


async def _unless_client_leaves(request, fut, n: int):
  """The result of `fut`, or `_ClientLeft` once the client disconnects (its
  work is dropped if it has not started)."""
  waiter = asyncio.wrap_future(fut)

  async def gone():
    while not await request.is_disconnected():
      await asyncio.sleep(CLIENT_POLL_S)

  watcher = asyncio.ensure_future(gone())
  try:
    done, _ = await asyncio.wait({waiter, watcher},
                                 return_when=asyncio.FIRST_COMPLETED)
  finally:
    watcher.cancel()
  if waiter in done:
    return waiter.result()
  dropped = fut.cancel()
  log.info('a client left; its %d sentences were %s', n,
           'dropped' if dropped else 'already being translated')
  raise _ClientLeft


def make_app(batcher: Batcher, *, max_body_bytes: int = 1 << 20,
             name: str = '', defaults=None, body_timeout: float = 30.0):
  """The Starlette app around a running `Batcher`.

  `defaults` (SamplingOptions, the server's flags) are what a request's
  absent fields take. A body that has not arrived after `body_timeout`
  seconds is answered 408; a client that leaves has its queued work dropped.
  """
  from starlette.applications import Starlette
  from starlette.responses import JSONResponse, Response
  from starlette.routing import Route

  from gemma_mt import json_api

  started = time.time()

  def answer(body: dict, status: int = 200, **headers) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers or None)

  async def read_body(request) -> bytes | None:
    size = request.headers.get('content-length')
    if size is not None and size.isdigit() and int(size) > max_body_bytes:
      return None
    body = bytearray()
    async for part in request.stream():
      body += part
      if len(body) > max_body_bytes:
        return None
    return bytes(body)

  async def translate(request):
    try:
      body = await asyncio.wait_for(read_body(request), body_timeout)
    except TimeoutError:
      return answer(json_api.fail(f'request body not received within '
                                  f'{body_timeout:g}s'), 408)
    if body is None:
      return answer(json_api.fail(f'request body over {max_body_bytes} bytes'),
                    413)
    req = None
    try:
      req = json_api.loads(body.decode('utf-8'))
      sources, options = json_api.parse_request(req, defaults)
      batcher.translator.check(sources)
    except UnicodeDecodeError as e:
      return answer(json_api.fail(f'invalid UTF-8 at byte {e.start}'), 400)
    except ValueError as e:
      return answer(json_api.fail(json_api.error_message(e, req)), 400)
    if len(sources) > batcher.max_queued:  # Retrying would never help.
      return answer(json_api.fail(
          f'input_text has {len(sources)} sentences; this server queues at '
          f'most {batcher.max_queued}: split the request'), 413)
    try:
      fut = batcher.submit(sources, options)
    except Overloaded as e:
      return answer(json_api.fail(str(e)), 503, **{'Retry-After': '1'})
    try:
      results = await _unless_client_leaves(request, fut, len(sources))
    except _ClientLeft:
      return Response(status_code=499)  # Nobody reads it.
    except Overloaded as e:
      return answer(json_api.fail(str(e)), 503)
    except ValueError as e:
      return answer(json_api.fail(json_api.error_message(e, req)), 400)
    except Exception as e:  # noqa: BLE001
      return answer(json_api.fail(f'internal error: {type(e).__name__}'), 500)
    return answer(json_api.success(results))

  async def health(request):
    return answer({'status': 'ok', 'model': name, 'queued': batcher.queued,
                   'served': batcher.served,
                   'uptime_s': round(time.time() - started, 1)})

  return Starlette(routes=[Route('/translate', translate, methods=['POST']),
                           Route('/health', health, methods=['GET'])])


def make_server(batcher: Batcher, config):
  """A uvicorn server that, told to exit (SIGINT, SIGTERM), answers what is
  queued 503 at once and finishes what is decoding within the graceful
  timeout."""
  import uvicorn

  class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig, frame):
      batcher.drain()
      super().handle_exit(sig, frame)

  return DrainingServer(config)


def parse_args(argv=None):
  p = cli.ArgumentParser(prog='python -m gemma_mt.serve',
                         description=__doc__.split('\n')[0])
  p.add_argument('--host', default='127.0.0.1',
                 help='address to bind (default: loopback only)')
  p.add_argument('--port', type=int, default=8080)
  p.add_argument('--max_queued', type=int, default=1024,
                 help='sentences waiting at most; beyond, requests get 503')
  p.add_argument('--max_body_bytes', type=int, default=1 << 20,
                 help='largest request body (413 above)')
  p.add_argument('--graceful_timeout', type=float, default=60.0,
                 help='seconds to finish requests in flight on shutdown '
                      '(queued ones get 503 at once)')
  p.add_argument('--body_timeout', type=float, default=30.0,
                 help='seconds a request body may take to arrive (408 after)')
  cli.add_model_args(p)
  cli.add_sampling_args(p)
  args = p.parse_args(argv)
  if not 0 < args.port < 65536:
    p.error(f'--port must be in 1..65535, got {args.port}')
  for flag in ('max_queued', 'max_body_bytes'):
    if getattr(args, flag) < 1:
      p.error(f'--{flag} must be >= 1, got {getattr(args, flag)}')
  for flag in ('graceful_timeout', 'body_timeout'):
    v = getattr(args, flag)
    if not 0 < v <= MAX_TIMEOUT_S:  # nan fails too.
      p.error(f'--{flag} must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {v}')
  args.options = cli.sampling_options(args)
  cli.check_model_args(args)
  return args


def run(argv=None) -> int:
  args = parse_args(argv)
  import uvicorn

  translator = cli.build_translator(args)
  translator.sampler.progress = False  # One bar per request would be noise.
  batcher = Batcher(translator, args.max_queued, args.options.max_length_ratio)
  app = make_app(batcher, max_body_bytes=args.max_body_bytes,
                 name=args.checkpoint or args.model, defaults=args.options,
                 body_timeout=args.body_timeout)
  config = uvicorn.Config(app, host=args.host, port=args.port,
                          timeout_graceful_shutdown=args.graceful_timeout,
                          log_level='info')
  try:
    make_server(batcher, config).run()
  except KeyboardInterrupt:  # uvicorn re-raises the signal once it stopped.
    pass
  finally:
    batcher.close()
  print(f'stopped: served {batcher.served} requests', file=sys.stderr)
  return 0


def main(argv=None) -> int:
  return cli.main_guard(run, argv)


if __name__ == '__main__':
  sys.exit(main())
