"""The HTTP service under a loopback load: every request answered once."""

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import pytest
from support.tiny import make_tiny_translator

from gemma_mt import serve
from gemma_mt.decoding.options import SamplingOptions

uvicorn = pytest.importorskip('uvicorn')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Server:
  def __init__(self, translator, app_kw=None, **kw):
    self.port = _free_port()
    self.batcher = serve.Batcher(translator, **kw)
    app = serve.make_app(self.batcher, max_body_bytes=4096, name='tiny',
                         **(app_kw or {}))
    config = uvicorn.Config(app, host='127.0.0.1', port=self.port,
                            log_level='warning', timeout_graceful_shutdown=30)
    self.server = serve.make_server(self.batcher, config)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.server.started:
      assert time.time() < deadline, 'server did not start'
      time.sleep(0.05)

  def request(self, method, path, body=None, timeout=120):
    conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)
    conn.request(method, path, body=body)
    r = conn.getresponse()
    out = r.status, json.loads(r.read()), dict(r.getheaders())
    conn.close()
    return out

  def stop(self):
    self.server.should_exit = True
    self.thread.join(60)
    self.batcher.close()


@pytest.fixture(scope='module')
def tr(tokenizer):
  return make_tiny_translator(tokenizer)


@pytest.fixture(scope='module')
def server(tr):
  s = Server(tr, max_queued=10_000)
  yield s
  s.stop()


GOOD = [{'input_text': f'Sentence {i}.', 'max_tokens': 4} for i in range(6)] + [
    {'input_text': ['Hello', 'Good night'], 'max_tokens': 3},
    {'input_text': 'Cats', 'max_tokens': 5, 'temperature': 1, 'seed': 7}]
BAD = [
    (b'{"input_text": 3}', 'input_text'),
    (b'{"input_text": "x", "top_k": 9999}', 'top_k'),
    (b'{"input_text": "x", "colour": 1}', 'colour'),
    (b'not json', 'JSON'),
    (b'\xff\xfe', 'UTF-8'),
    (json.dumps({'input_text': 'word ' * 2000}).encode(), 'over'),  # 413 or 400.
]


def test_health(server):
  status, body, _ = server.request('GET', '/health')
  assert status == 200 and body['status'] == 'ok' and body['model'] == 'tiny'


def test_concurrent_mixed_load_every_request_answered_once(server, tr):
  want = {}
  for i, req in enumerate(GOOD):
    opts = SamplingOptions(max_new_tokens=req['max_tokens'],
                           temperature=req.get('temperature', 0),
                           seed=req.get('seed', 0))
    texts = req['input_text']
    want[i] = tr.translate([texts] if isinstance(texts, str) else texts, opts)
  served = server.batcher.served
  jobs = [('good', i % len(GOOD)) for i in range(48)] + [
      ('bad', i % len(BAD)) for i in range(24)]

  def one(job):
    kind, i = job
    body = json.dumps(GOOD[i]).encode() if kind == 'good' else BAD[i][0]
    return job, server.request('POST', '/translate', body)

  # A client that sends a request and goes away before the answer.
  gone = socket.create_connection(('127.0.0.1', server.port))
  body = json.dumps(GOOD[0]).encode()
  gone.sendall(b'POST /translate HTTP/1.1\r\nHost: x\r\nContent-Length: '
               + str(len(body)).encode() + b'\r\n\r\n' + body)
  gone.close()
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(one, jobs))
  assert len(answers) == len(jobs)
  for (kind, i), (status, resp, _) in answers:
    if kind == 'good':
      assert status == 200 and resp['status'] == 'SUCCESS', resp
      assert resp['translations'] == want[i]
    else:
      assert status in (400, 413) and resp['status'] == 'FAIL', resp
      assert BAD[i][1] in resp['error'] or status == 413, resp
  deadline = time.time() + 60
  while server.batcher.queued and time.time() < deadline:
    time.sleep(0.05)
  # Greedy requests ran in the service's running continuous batch.
  assert any(k[0] == 'chunk' and k[2] == serve.STREAM_CACHE_LEN
             for k in tr.compiled_shapes)
  # The 48 good ones, each translated once, and the one whose client left:
  # dropped if it had not started yet.
  assert server.batcher.served - served in (48, 49)
  status, body, _ = server.request('GET', '/health')
  assert status == 200 and body['queued'] == 0


class Slow:
  """A translator that waits for a signal, to hold requests in flight."""

  def __init__(self, tr):
    self.tr, self.go = tr, threading.Event()

  def __getattr__(self, name):
    return getattr(self.tr, name)

  def prepare(self, *a):
    self.go.wait(60)
    return self.tr.prepare(*a)


def test_full_queue_is_503_and_recovers(tr):
  slow = Slow(tr)
  s = Server(slow, max_queued=2)
  try:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      first = pool.submit(s.request, 'POST', '/translate',
                          json.dumps({'input_text': ['a', 'b'], 'max_tokens': 2}))
      while s.batcher.queued < 2:
        time.sleep(0.01)
      status, body, headers = s.request('POST', '/translate',
                                        json.dumps({'input_text': 'c'}))
      assert status == 503 and 'overloaded: 2 sentences queued (limit 2)' in body['error']
      assert headers.get('retry-after') == '1'
      slow.go.set()
      assert first.result()[0] == 200
    assert s.request('POST', '/translate',
                     json.dumps({'input_text': 'c', 'max_tokens': 2}))[0] == 200
  finally:
    slow.go.set()
    s.stop()


def test_shutdown_finishes_requests_in_flight(tr):
  slow = Slow(tr)
  s = Server(slow)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    inflight = pool.submit(s.request, 'POST', '/translate',
                           json.dumps({'input_text': 'a', 'max_tokens': 2}))
    while s.batcher.queued < 1:
      time.sleep(0.01)
    s.server.should_exit = True  # What SIGTERM does.
    time.sleep(0.3)
    slow.go.set()
    status, body, _ = inflight.result(60)
  assert status == 200 and body['status'] == 'SUCCESS'
  s.thread.join(60)
  assert not s.thread.is_alive()
  s.batcher.close()


def test_cli_flags_one_line(capsys):
  assert serve.main(['--port', '0']) == 2
  assert 'error: --port must be in 1..65535, got 0' in capsys.readouterr().err
  assert serve.main(['--max_queued', '0']) == 2
  assert '--max_queued must be >= 1' in capsys.readouterr().err


def test_a_failing_request_does_not_stop_the_server(tr):
  class Breaks(Slow):
    def prepare(self, sources, *a):
      if sources == ['boom']:
        raise RuntimeError('broken')
      return self.tr.prepare(sources, *a)

  s = Server(Breaks(tr))
  try:
    status, body, _ = s.request('POST', '/translate', json.dumps({'input_text': 'boom'}))
    assert status == 500 and body['error'] == 'internal error: RuntimeError'
    status, body, _ = s.request('POST', '/translate',
                                json.dumps({'input_text': 'ok', 'max_tokens': 2}))
    assert status == 200 and s.batcher.queued == 0
  finally:
    s.stop()


def test_request_larger_than_the_queue_is_413_not_503(tr):
  s = Server(tr, max_queued=3)
  try:
    status, body, headers = s.request('POST', '/translate', json.dumps(
        {'input_text': ['a', 'b', 'c', 'd']}))
    assert status == 413 and 'at most 3' in body['error']
    assert 'retry-after' not in headers
  finally:
    s.stop()


def test_slow_body_is_408(tr):
  s = Server(tr, app_kw=dict(body_timeout=0.5))
  try:
    with socket.create_connection(('127.0.0.1', s.port), timeout=30) as c:
      c.sendall(b'POST /translate HTTP/1.1\r\nHost: x\r\n'
                b'Content-Length: 100\r\n\r\n{"input_text"')
      reply = c.recv(4096).decode()
    assert reply.startswith('HTTP/1.1 408'), reply
  finally:
    s.stop()


def test_server_flags_are_request_defaults(tr):
  """--max_new_tokens and --stop_sequences apply to a request that does not
  set them; a field in the request wins."""
  defaults = SamplingOptions(max_new_tokens=2)
  s = Server(tr, app_kw=dict(defaults=defaults))
  try:
    _, body, _ = s.request('POST', '/translate',
                           json.dumps({'input_text': 'Hello there'}))
    assert body['usage']['output_tokens'] <= 2
    _, body, _ = s.request('POST', '/translate', json.dumps(
        {'input_text': 'Hello there', 'max_tokens': 5}))
    assert body['usage']['output_tokens'] > 2
  finally:
    s.stop()


def test_exit_answers_queued_requests_503_and_finishes_in_flight(tr):
  """SIGINT/SIGTERM (uvicorn's handle_exit): the request being decoded
  finishes (200); one queued behind it (sampled, so not batched with it)
  gets a JSON 503 at once, not a 500 or a dropped connection."""
  slow = Slow(tr)
  s = Server(slow)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    first = pool.submit(s.request, 'POST', '/translate', json.dumps(
        {'input_text': 'a', 'max_tokens': 2, 'temperature': 1, 'seed': 1}))
    while s.batcher.queued < 1:
      time.sleep(0.01)
    second = pool.submit(s.request, 'POST', '/translate', json.dumps(
        {'input_text': 'b', 'max_tokens': 2, 'temperature': 1, 'seed': 2}))
    while s.batcher.queued < 2:
      time.sleep(0.01)
    import signal
    s.server.handle_exit(signal.SIGTERM, None)
    status, body, _ = second.result(60)
    assert status == 503 and body['error'] == 'server is shutting down'
    slow.go.set()
    assert first.result(60)[0] == 200
  s.thread.join(60)
  s.batcher.close()


@pytest.mark.parametrize('flag,value', [('--graceful_timeout', '-5'),
                                        ('--graceful_timeout', 'nan'),
                                        ('--graceful_timeout', '0'),
                                        ('--body_timeout', 'inf')])
def test_timeouts_are_checked(flag, value, capsys):
  assert serve.main([flag, value]) == 2
  err = capsys.readouterr().err
  assert flag in err and err.count('\n') == 1, err


def test_ctrl_c_stops_the_service_in_one_line(tmp_path, tokenizer):
  import os
  import signal
  import subprocess
  import sys

  from support.tiny import tiny_params

  from gemma_mt import weights
  model = weights.save(tmp_path / 'm', 'tiny', tiny_params(), tokenizer)
  port = _free_port()
  proc = subprocess.Popen(
      [sys.executable, '-m', 'gemma_mt.serve', '--checkpoint', str(model),
       '--port', str(port), '--no_compile_cache'],
      stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    try:
      conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
      conn.request('GET', '/health')
      if conn.getresponse().status == 200:
        break
    except OSError:
      time.sleep(0.3)
  proc.send_signal(signal.SIGINT)
  err = proc.communicate(timeout=120)[1]
  assert proc.returncode == 0, err[-2000:]
  assert 'Traceback' not in err and 'stopped: served 0 requests' in err, err
