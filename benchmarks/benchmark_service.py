"""Load test of `python -m gemma_mt.serve`: throughput and latency by clients.

Starts the service (the given model flags are passed on), waits for
/health, sends one warm-up round, then for each concurrency C runs C client
threads, each posting one MTNT valid sentence per request until `--requests`
are done. Prints one JSON line per C: sentences/s, p50/p99 latency (ms),
status counts.

  python -m benchmarks.benchmark_service --mtnt_dir ../shared/data/mtnt \
      --clients 1,8,32 --requests 64 -- --checkpoint runs/demo/best
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def post(port: int, body: bytes) -> tuple[int, float]:
  t0 = time.perf_counter()
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
  conn.request('POST', '/translate', body=body)
  r = conn.getresponse()
  r.read()
  conn.close()
  return r.status, time.perf_counter() - t0


def wait_healthy(port: int, proc, timeout: float = 600) -> float:
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      sys.exit(f'server exited with {proc.returncode}')
    try:
      conn = http.client.HTTPConnection('127.0.0.1', port, timeout=2)
      conn.request('GET', '/health')
      if conn.getresponse().status == 200:
        return time.time() - t0
    except OSError:
      time.sleep(0.5)
  sys.exit('server did not become healthy')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--mtnt_dir', required=True)
  p.add_argument('--clients', default='1,8,32')
  p.add_argument('--requests', type=int, default=64, help='per concurrency')
  p.add_argument('--max_tokens', type=int, default=256)
  p.add_argument('--port', type=int, default=0)
  p.add_argument('--output', default=None, help='also write the JSON here')
  p.add_argument('serve_args', nargs='*', help='after --: flags for gemma_mt.serve')
  args = p.parse_args()
  from gemma_mt.data.mtnt import read_mtnt_tsv
  pairs, _ = read_mtnt_tsv(Path(args.mtnt_dir) / 'valid' / 'valid.en-fr.tsv')
  sources = [s for s, _ in pairs]
  port = args.port
  if not port:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, '-m', 'gemma_mt.serve', '--port',
                           str(port), *args.serve_args], env=dict(os.environ))
  results = []
  try:
    startup = wait_healthy(port, proc)
    body = lambda i: json.dumps({'input_text': sources[i % len(sources)],
                                 'max_tokens': args.max_tokens}).encode()
    for c in [int(x) for x in args.clients.split(',')]:
      with concurrent.futures.ThreadPoolExecutor(c) as pool:  # Warm-up.
        list(pool.map(lambda i: post(port, body(i)), range(c)))
      t0 = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(c) as pool:
        out = list(pool.map(lambda i: post(port, body(i)), range(args.requests)))
      wall = time.perf_counter() - t0
      lat = np.array([t for _, t in out]) * 1000
      statuses = {}
      for s, _ in out:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
      row = {'clients': c, 'requests': args.requests,
             'sentences_per_s': round(args.requests / wall, 2),
             'p50_ms': round(float(np.percentile(lat, 50)), 1),
             'p99_ms': round(float(np.percentile(lat, 99)), 1),
             'statuses': statuses, 'server_startup_s': round(startup, 1)}
      print(json.dumps(row), flush=True)
      results.append(row)
  finally:
    proc.terminate()
    proc.wait(120)
  if args.output:
    Path(args.output).write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
  main()
