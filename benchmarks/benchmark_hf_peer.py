"""Ours against the peer a Hugging Face user would reach for: transformers
`generate` on our HF export of the same checkpoint, the same prompt ids,
greedy, the same stop ids, on the same device, in the same run.

Each engine runs in a process of its own (JAX and PyTorch would each claim
the GPU's memory):

  ours  `Translator.generate` (guard off: the decoder alone), once to get
        its executables ready, then timed
  hf    `AutoModelForCausalLM.from_pretrained(export, dtype=bfloat16)` and
        `generate(do_sample=False)` over batches of `--hf_batch` prompts,
        sorted by length (padding on the left, as HF asks), once on the
        first batch to warm up, then timed

Both stop at the same ids (EOS, <end_of_turn>, every newline piece) and get
the same budget. Printed: sentences/s and generated tokens/s of each, the
ratio, and how many outputs agree token for token (bf16 on both sides:
near-ties may break differently). The export goes through the public CLI
(`python -m gemma_mt.export --to hf`).

  python -m benchmarks.benchmark_hf_peer --checkpoint runs/x/best --mtnt_dir DIR --limit 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_ours(args, out: Path) -> None:
  from gemma_mt.data import mtnt
  from gemma_mt.translator import Translator
  pairs = mtnt.load_pairs('valid', mtnt_dir=args.mtnt_dir)[:args.limit]
  sources = [s for s, _ in pairs]
  tr = Translator.from_pretrained(args.model, args.checkpoint,
                                  **({'dtype': args.dtype} if args.dtype else {}))
  kw = dict(max_new_tokens=args.max_new_tokens, guard=False)
  t0 = time.perf_counter()
  tr.generate(sources, **kw)  # Executables ready (loaded or compiled).
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  gen = tr.generate(sources, **kw)
  seconds = time.perf_counter() - t0
  out.write_text(json.dumps({
      'prompts': [tr.prompt_tokens(s).tolist() for s in sources],
      'stop_ids': sorted(tr.sampler.stop_ids), 'pad_id': tr.tokenizer.pad_id,
      'outputs': [x.tolist() for x in gen.token_ids], 'seconds': seconds,
      'first_seconds': first, 'rows': tr.sampler.batch_size}))


def run_hf(args, request: Path, out: Path) -> None:
  """Imports only torch and transformers: this may run in another venv."""
  import torch
  import transformers
  req = json.loads(request.read_text())
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  dtype = getattr(torch, args.dtype) if args.dtype else (
      torch.bfloat16 if device == 'cuda' else torch.float32)  # As ours.
  model = transformers.AutoModelForCausalLM.from_pretrained(
      args.hf_dir, dtype=dtype).to(device).eval()
  prompts, stop = req['prompts'], req['stop_ids']
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  batches = [order[i:i + args.hf_batch] for i in range(0, len(order), args.hf_batch)]

  def run(batch):
    width = max(len(prompts[i]) for i in batch)
    ids = torch.full((len(batch), width), req['pad_id'], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(batch):  # Left padding.
      ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
      mask[r, width - len(prompts[i]):] = 1
    with torch.no_grad():
      gen = model.generate(ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=args.max_new_tokens, do_sample=False,
                           eos_token_id=stop, pad_token_id=req['pad_id'])
    new = gen[:, width:].cpu().tolist()
    outs = []
    for row in new:  # Up to and with the first stop id, as ours.
      cut = next((j + 1 for j, t in enumerate(row) if t in set(stop)), len(row))
      outs.append(row[:cut])
    return outs

  run(batches[0])  # Warm-up.
  if device == 'cuda':
    torch.cuda.synchronize()
  outputs = [None] * len(prompts)
  t0 = time.perf_counter()
  for batch in batches:
    for i, o in zip(batch, run(batch)):
      outputs[i] = o
  seconds = time.perf_counter() - t0
  out.write_text(json.dumps({'outputs': outputs, 'seconds': seconds,
                             'device': device, 'dtype': str(dtype),
                             'transformers': transformers.__version__,
                             'torch': torch.__version__}))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True)
  p.add_argument('--model', default='gemma3_270m')
  p.add_argument('--mtnt_dir', required=True)
  p.add_argument('--limit', type=int, default=256, help='first N valid sentences')
  p.add_argument('--max_new_tokens', type=int, default=256)
  p.add_argument('--hf_batch', type=int, default=64)
  p.add_argument('--dtype', default=None,
                 help='both engines\' compute dtype (default: bf16 on a GPU, '
                      'float32 on a CPU)')
  p.add_argument('--hf_python', default=sys.executable,
                 help='the interpreter with torch and transformers')
  p.add_argument('--out', default=None, help='JSON results')
  p.add_argument('--engine', choices=('ours', 'hf'), default=None,
                 help=argparse.SUPPRESS)  # A child process's part.
  p.add_argument('--hf_dir', default=None, help=argparse.SUPPRESS)
  p.add_argument('--request', default=None, help=argparse.SUPPRESS)
  p.add_argument('--result', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.engine == 'ours':
    return run_ours(args, Path(args.result))
  if args.engine == 'hf':
    return run_hf(args, Path(args.request), Path(args.result))

  with tempfile.TemporaryDirectory(prefix='hf-peer-') as work:
    return compare(args, Path(work))


def compare(args, work: Path) -> dict:
  """Exports, runs each engine in its own process, prints the table."""
  here = Path(__file__).resolve()
  common = ['--checkpoint', args.checkpoint, '--model', args.model,
            '--mtnt_dir', args.mtnt_dir, '--limit', str(args.limit),
            '--max_new_tokens', str(args.max_new_tokens),
            '--hf_batch', str(args.hf_batch)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in [str(here.parents[1]), os.environ.get('PYTHONPATH')] if p))

  def child(cmd):
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode:
      raise SystemExit(f'{cmd[1:4]} failed:\n{run.stderr[-3000:]}')
    return time.perf_counter() - t0

  hf_dir = work / 'hf'
  export_s = child([sys.executable, '-m', 'gemma_mt.export', '--checkpoint',
                    args.checkpoint, '--model', args.model, '--to', 'hf',
                    str(hf_dir)])
  ours_wall = child([sys.executable, str(here), '--engine', 'ours',
                     '--result', str(work / 'ours.json'), *common,
                     *(['--dtype', args.dtype] if args.dtype else [])])
  hf_wall = child([args.hf_python, str(here), '--engine', 'hf', '--hf_dir',
                   str(hf_dir), '--request', str(work / 'ours.json'),
                   '--result', str(work / 'hf.json'), *common,
                   *(['--dtype', args.dtype] if args.dtype else [])])
  ours, hf = (json.loads((work / f).read_text()) for f in ('ours.json', 'hf.json'))
  n = len(ours['outputs'])
  agree = sum(a == b for a, b in zip(ours['outputs'], hf['outputs']))
  rows = []
  for name, r, wall in (('ours', ours, ours_wall), ('hf', hf, hf_wall)):
    tokens = sum(map(len, r['outputs']))
    rows.append(dict(engine=name, seconds=round(r['seconds'], 3),
                     sentences_per_s=round(n / r['seconds'], 2),
                     generated_tokens_per_s=round(tokens / r['seconds']),
                     process_wall_s=round(wall, 1)))
  result = dict(sentences=n, max_new_tokens=args.max_new_tokens,
                ours_rows=ours['rows'], hf_batch=args.hf_batch,
                ours_first_call_s=round(ours['first_seconds'], 2),
                hf_env={k: hf[k] for k in ('device', 'dtype', 'transformers', 'torch')},
                export_s=round(export_s, 1), rows=rows,
                speedup=round(hf['seconds'] / ours['seconds'], 1),
                identical_outputs=agree)
  print(f'{"engine":<8}{"seconds":>9}{"sent/s":>10}{"gen tok/s":>11}{"process s":>11}')
  for r in rows:
    print(f'{r["engine"]:<8}{r["seconds"]:>9.2f}{r["sentences_per_s"]:>10.1f}'
          f'{r["generated_tokens_per_s"]:>11}{r["process_wall_s"]:>11.1f}')
  print(f'ours is {result["speedup"]}x HF transformers generate on {n} sentences; '
        f'{agree}/{n} outputs identical')
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == '__main__':
  main()
