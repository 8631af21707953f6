"""Training throughput and memory: gemma_mt vs the tutorial's own code, and
full fine-tuning vs LoRA / QLoRA, same GPU, same batches.

Each variant runs in its own subprocess (clean peak-memory numbers):

  ours_packed   gemma_mt: packed rows, bf16 compute / f32 master weights,
                cuDNN attention, fused chunked CE (loss and gradients in one
                pass) on target positions only, donation
  ours_padded   the same on padded rows (one pair per row)
  tutorial      the tutorial's code: `gemma.transformer` (gemma 2.0.8 wheel)
                and its `train_step`, loss made batch-wide (it used row 0
                only), params in bfloat16 as in the Kaggle checkpoints
  tutorial_f32  the same with float32 params
  ours_bf16     ours_packed with bfloat16 params (no float32 master copy;
                as the tutorial, and as lossy for SGD: an ablation only)
  full_sgd      = ours_packed (the name used in the LoRA memory table)
  full_adamw    ours_packed with AdamW (two float32 moments per weight)
  lora          frozen base in bfloat16 (no float32 master copy: it is never
                updated), float32 rank-`--lora_rank` adapters on all
                projections (q, kv, o, gate_up, down), `--lora_optimizer`
  qlora_int8    lora with the frozen projections held as int8 (qwix)
  qlora_int4    the same in int4

The default `--variants` are the first four (ours vs the tutorial; the
tutorial's code knows Gemma 1-3 only, so for another family its variants
are skipped, with a note); the LoRA memory table is e.g.
  --variants full_sgd,full_adamw,lora,qlora_int8,qlora_int4

Batches come from the real MTNT train split (../shared/data/mtnt), so the
length distribution is MTNT's. Weights are random (speed does not depend on
them).

FLOPs. `mfu` counts the model FLOPs of a step (6 x the weights a token
multiplies through, `config.matmul_params()`, per real token, the LM head
on target tokens only; causal attention over each pair's own context,
`config.attention_flops`) over the H100's 989 TFLOP/s bf16 dense peak; the
same count is used for every variant, so MFU ratios equal throughput
ratios. `mfu_actual` counts what the variant has to compute: the same for
full fine-tuning; for (Q)LoRA the frozen base needs no weight gradients, so
4 (not 6) x params per token in the body and LM head, plus 6 x adapter
params per token. `--model tiny` / `tiny_gemma4` are toys for CPU smoke
tests.

Memory (GPU; None where the backend has no stats, e.g. CPU). JAX cannot
reset the peak counter, so it is read three times: `peak_setup_gb` after
params / optimizer state / batches are on the device (random init,
`random_params`, places each weight in the storage dtype, so it adds no
float32 copy of the model), and `peak_gb` after the steps; `peak_gb` > `peak_setup_gb` means the training
step sets the peak. `live_setup_gb` is what the state holds, and
`step_est_gb` XLA's own estimate for the compiled step (arguments + outputs -
donated + temporaries). `compile_s` is lower + compile (ahead of time).

`--find_max_batch`: for each of `--variants`, run one fresh subprocess per
batch size of `--max_batch_sizes` (rows of `--seq_len`), increasing, until
one fails; reports the largest that ran `--find_steps` steps without
RESOURCE_EXHAUSTED. Subprocesses get XLA_PYTHON_CLIENT_MEM_FRACTION=
`--mem_fraction` (unless it is set already), so the limit is the GPU's
memory, not JAX's default 75% pool.

Timing: `--steps` steps are dispatched back to back and the clock stops
when the last one is done (as in training: no host sync per step);
`step_ms` is the mean. `--profile` then traces 3 more steps with
`jax.profiler` and adds where the GPU time went (kernel categories, top
kernels, GPU idle fraction; `common.trace_summary`) to the result.
`--attention_impl` and `--chunk_size` (the loss's LM-head chunk, in tokens)
exist for ablations.

`--out` is rewritten after every variant / batch size, so a run cut short
still leaves its results; `--time_budget` (seconds) stops starting new
subprocesses when spent, and a running one stops timing steps at it.

  python -m benchmarks.benchmark_train --model gemma3_270m --batch_size 16
  python -m benchmarks.benchmark_train --model gemma_2b \\
      --variants full_sgd,full_adamw,lora,qlora_int8,qlora_int4 --out lora.json
  python -m benchmarks.benchmark_train --model gemma_2b --variants full_sgd \\
      --find_max_batch --out max_batch.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import common

PEAK_FLOPS = 989e12  # H100 SXM bf16 dense
OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory')
FLOPS_CONVENTION = (
    'mfu: 6N/token model FLOPs (+LM head on targets, causal attention), the '
    'same for every variant; mfu_actual: FLOPs the variant must compute '
    '((Q)LoRA: 4N/token, no base weight grads, + 6 x adapter params/token)')


@dataclasses.dataclass(frozen=True)
class Variant:
  kind: str = 'ours'          # 'ours' (gemma_mt) or 'tutorial' (gemma 2.0.8)
  packed: bool = True         # packed rows, else one padded pair per row
  optimizer: str = 'sgd'      # full fine-tunes; LoRA uses --lora_optimizer
  lora: bool = False
  quant: str | None = None    # QLoRA base: 'int8' / 'int4'
  param_dtype: str = 'float32'  # trained / tutorial params


VARIANTS = {
    'ours_packed': Variant(),
    'ours_padded': Variant(packed=False),
    'tutorial': Variant('tutorial', packed=False, param_dtype='bfloat16'),
    'tutorial_f32': Variant('tutorial', packed=False),
    'ours_bf16': Variant(param_dtype='bfloat16'),
    'full_sgd': Variant(),
    'full_adamw': Variant(optimizer='adamw'),
    'lora': Variant(lora=True),
    'qlora_int8': Variant(lora=True, quant='int8'),
    'qlora_int4': Variant(lora=True, quant='int4'),
}
DEFAULT_VARIANTS = ('ours_packed', 'ours_padded', 'tutorial', 'tutorial_f32')


def mtnt_batches(args, vocab_size: int, packed: bool, n: int):
  from gemma_mt.data.mtnt import MTNTDatasetBuilder
  from gemma_mt.data.packing import packed_batches
  from gemma_mt.weights.embedded import default_tokenizer

  builder = MTNTDatasetBuilder(default_tokenizer(), args.seq_len,
                               mtnt_dir=args.mtnt_dir, seed=0)
  if packed:
    it = packed_batches(builder.encode_split('train'), args.batch_size,
                        args.seq_len, seed=0, num_epochs=None)
  else:
    it = builder.get_train_dataset(args.batch_size, num_epochs=None)
  out = []
  for _ in range(n):
    b = next(it)._asdict()
    # The Gemma 1/2 vocabulary is 256,128: fold the few larger Gemma 3 ids.
    b['input_tokens'] = np.where(b['input_tokens'] < vocab_size,
                                 b['input_tokens'], 3).astype(np.int32)
    out.append(b)
  return out


def step_flops(cfg, batch, matmul_params: int, frozen_base: bool = False,
               adapter_params: int = 0) -> float:
  """FLOPs of one training step (forward + backward) on `batch`.

  Full fine-tuning: 6 x params per token (2 forward, 4 backward). With a
  frozen base (LoRA) the backward skips the weight gradients: 4 x params,
  plus 6 x the adapter params. `matmul_params`: `cfg.matmul_params()`
  (tied LM head included), passed in as it may trace the model.
  """
  tokens = batch['input_tokens']
  seg = batch.get('segment_ids')
  seg = (tokens != 0).astype(np.int32) if seg is None else seg
  pos = batch.get('positions')
  if pos is None:
    pos = np.maximum(np.cumsum(tokens != 0, axis=1) - 1, 0)
  real = seg != 0
  n_real = real.sum()
  n_target = (np.asarray(batch['target_mask'])[:, 1:] & real[:, 1:]).sum()
  f = 4 if frozen_base else 6
  head = cfg.vocab_size * cfg.embed_dim  # The LM head, on targets only.
  body = (f * (matmul_params - head) + 6 * adapter_params) * n_real
  # Attention: forward + backward = 3 x forward, per token of each context.
  ctx, n_ctx = np.unique(pos[real] + 1, return_counts=True)
  attn = sum(3 * n * cfg.attention_flops(int(c)) for c, n in zip(ctx, n_ctx))
  return float(body + f * head * n_target + attn)


def mem_gb(key: str = 'peak_bytes_in_use') -> float | None:
  """A device memory stat in GiB; None where the backend has none (CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats()
  if not stats or key not in stats:
    return None
  return stats[key] / 2**30


def tree_gb(tree) -> float:
  """Bytes held by a pytree's arrays (int4 counted as half a byte)."""
  import jax
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, 'dtype'):
      continue
    bits = 4 if str(x.dtype) in ('int4', 'uint4') else np.dtype(x.dtype).itemsize * 8
    total += int(np.prod(x.shape)) * bits // 8
  return total / 2**30


def count(tree) -> int:
  import jax
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)
             if hasattr(x, 'shape'))


@dataclasses.dataclass
class Setup:
  params: object        # what is trained (LoRA: the adapters)
  opt_state: object
  frozen: object        # LoRA: the base (maybe quantized); else None
  compile: object       # (params, opt_state, batch) -> (compiled, step)
  info: dict


def setup_ours(args, cfg, spec: Variant, b0) -> Setup:
  """gemma_mt's own training state (`init_train`) on random device weights."""
  import jax
  import jax.numpy as jnp

  from gemma_mt import sharding
  from gemma_mt.train.config import TrainingConfig
  from gemma_mt.train.state import Model, init_train, random_params
  from gemma_mt.train.steps import make_train_step

  del b0  # The tutorial's init traces a batch; ours needs none.

  impl = args.attention_impl or (
      'cudnn' if jax.default_backend() == 'gpu' else 'einsum')
  # LoRA: the frozen base is never updated, so it needs no float32 master
  # copy; it is created directly in bfloat16 (then quantized for QLoRA).
  base_dtype = jnp.bfloat16 if spec.lora else jnp.dtype(spec.param_dtype)
  model = cfg.module(dtype=jnp.bfloat16, param_dtype=base_dtype,
                     attention_impl=impl, remat=args.remat)
  params = random_params(model)
  opt_name = args.lora_optimizer if spec.lora else spec.optimizer
  tcfg = TrainingConfig(
      optimizer=opt_name, learning_rate=args.learning_rate, seed=1,
      dtype='bfloat16', param_dtype=spec.param_dtype,
      lora_rank=args.lora_rank if spec.lora else 0, lora_alpha=args.lora_alpha,
      lora_quant=spec.quant)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1), jax.devices()[:1])
  setup = init_train(tcfg, mesh, model=Model(model, params))
  del params
  state = setup.state
  info = {'optimizer': opt_name, 'base_dtype': jnp.dtype(base_dtype).name,
          'attention_impl': impl, 'chunk_size': args.chunk_size}
  if spec.lora:
    lcfg = tcfg.lora_config()
    info |= {'lora_rank': lcfg.rank, 'lora_alpha': lcfg.alpha,
             'lora_targets': ','.join(lcfg.targets), 'quant': spec.quant,
             'frozen_gb': tree_gb(state.frozen)}
  step = make_train_step(setup.model, setup.optimizer,
                         chunk_size=args.chunk_size).jitted
  extra = () if state.frozen is None else (state.frozen,)

  def compile_step(p, s, b):
    compiled = step.lower(p, s, b, *extra).compile()
    return compiled, lambda p, s, b: compiled(p, s, b, *extra)

  return Setup(state.params, state.opt_state, state.frozen, compile_step, info)


def setup_tutorial(args, cfg, spec: Variant, b0) -> Setup:
  """The tutorial's code path, with gemma 2.0.8's `gemma.transformer`
  (Gemma 1-3 only)."""
  import jax
  import jax.numpy as jnp
  import optax
  from gemma import transformer as transformer_lib

  model = common.tutorial_transformer(cfg)

  # --- The tutorial's functions (loss over the whole batch, not row 0). ---
  def forward_and_loss_fn(params, *, model, input_tokens, input_mask,
                          positions, attention_mask):
    logits, _ = model.apply(params, input_tokens, positions, None,
                            attention_mask)
    logits = logits[:, :-1]
    target_tokens = input_tokens[:, 1:]
    target_mask = input_mask[:, 1:]
    one_hot = jax.nn.one_hot(target_tokens, logits.shape[-1])
    one_hot = one_hot * target_mask.astype(one_hot.dtype)[..., None]
    norm_factor = 1 / (jnp.sum(target_mask) + 1e-8)
    return -jnp.sum(jax.nn.log_softmax(logits) * one_hot) * norm_factor

  def get_attention_mask_and_positions(example, pad_id):
    pad_mask = example != pad_id
    current_token_position = transformer_lib.build_positions_from_mask(pad_mask)
    attention_mask = transformer_lib.make_causal_attn_mask(pad_mask)
    return current_token_position, attention_mask

  def train_step(model, params, optimizer, opt_state, pad_id, example):
    positions, attention_mask = get_attention_mask_and_positions(
        example['input_tokens'], pad_id)
    train_loss, grads = jax.value_and_grad(forward_and_loss_fn)(
        params, model=model, input_tokens=example['input_tokens'],
        input_mask=example['target_mask'], positions=positions,
        attention_mask=attention_mask)
    updates, opt_state = optimizer.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
    return train_loss, params, opt_state

  jit_train_step = jax.jit(train_step, static_argnames=['model', 'optimizer'])
  # --------------------------------------------------------------------------
  tok = jnp.asarray(b0['input_tokens'][:1])
  pos, mask = get_attention_mask_and_positions(tok, 0)
  params = jax.jit(lambda k: model.init(k, tok, pos, None, mask))(
      jax.random.key(0))
  params = jax.tree.map(lambda p: p.astype(spec.param_dtype), params)
  opt = optax.sgd(args.learning_rate)
  opt_state = opt.init(params)

  def compile_step(p, s, b):
    compiled = jit_train_step.lower(model, p, opt, s, 0, b).compile()

    def step(p, s, b):
      loss, p, s = compiled(p, s, 0, b)
      return p, s, {'loss': loss}
    return compiled, step

  return Setup(params, opt_state, None, compile_step,
               {'optimizer': 'sgd', 'base_dtype': spec.param_dtype})


def step_memory(compiled) -> dict:
  """XLA's memory analysis of the compiled step, in GiB (None if absent)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {'step_est_gb': None, 'step_temp_gb': None}
  g = lambda k: getattr(m, k, 0) / 2**30  # noqa: E731
  est = (g('argument_size_in_bytes') + g('output_size_in_bytes')
         - g('alias_size_in_bytes') + g('temp_size_in_bytes'))
  return {'step_est_gb': est, 'step_temp_gb': g('temp_size_in_bytes')}


def run_variant(args):
  import jax

  from gemma_mt import models

  spec = VARIANTS[args.run_variant]
  cfg = models.from_name(args.model)
  deadline = args.deadline or float('inf')
  batches = mtnt_batches(args, cfg.vocab_size, spec.packed,
                         args.warmup + args.steps)
  t0 = time.perf_counter()
  setup = (setup_ours if spec.kind == 'ours' else setup_tutorial)(
      args, cfg, spec, batches[0])
  params, opt_state = setup.params, setup.opt_state
  dev = [jax.device_put(b) for b in batches]
  jax.block_until_ready((params, opt_state, setup.frozen, dev))
  setup_s = time.perf_counter() - t0
  mem = {'live_setup_gb': mem_gb('bytes_in_use'),
         'peak_setup_gb': mem_gb()}

  t0 = time.perf_counter()
  compiled, step = setup.compile(params, opt_state, dev[0])
  compile_s = time.perf_counter() - t0
  mem |= step_memory(compiled) | {'peak_compile_gb': mem_gb()}

  m = None
  for b in dev[:args.warmup]:
    params, opt_state, m = step(params, opt_state, b)
  if m is not None:
    jax.block_until_ready(m['loss'])
  n = 0
  t = time.perf_counter()
  for b in dev[args.warmup:]:  # back to back, one sync at the end
    if n and time.time() > deadline:
      break  # --time_budget: report the steps dispatched so far
    params, opt_state, m = step(params, opt_state, b)
    n += 1
  final_loss = float(m['loss'])
  total = time.perf_counter() - t
  profile = None
  if args.profile:
    import tempfile
    with tempfile.TemporaryDirectory() as tdir:
      with jax.profiler.trace(tdir):
        for b in dev[args.warmup:args.warmup + 3]:
          params, opt_state, m = step(params, opt_state, b)
        jax.block_until_ready(m['loss'])
      profile = common.trace_summary(tdir, steps=3)

  timed = batches[args.warmup:args.warmup + n]
  tgt = sum(int((b['target_mask'][:, 1:] & (b['input_tokens'][:, 1:] != 0)).sum())
            for b in timed)
  real = sum(int((b['input_tokens'] != 0).sum()) for b in timed)
  n_adapter = count(params) if spec.lora else 0
  matmul = cfg.matmul_params()
  flops = sum(step_flops(cfg, b, matmul) for b in timed)  # The 6N convention.
  actual = sum(step_flops(cfg, b, matmul, spec.lora, n_adapter) for b in timed)
  return {
      'variant': args.run_variant, 'model': args.model,
      'batch_size': args.batch_size, 'seq_len': args.seq_len,
      'packed': spec.packed, 'steps_timed': n,
      'step_ms': 1e3 * total / n,
      'target_tokens_per_s': tgt / total, 'tokens_per_s': real / total,
      'target_tokens_per_step': tgt / n, 'tokens_per_step': real / n,
      'mfu': flops / total / PEAK_FLOPS,
      'mfu_actual': actual / total / PEAK_FLOPS,
      'flops_convention': FLOPS_CONVENTION,
      'compile_s': compile_s, 'setup_s': setup_s,
      'peak_gb': mem_gb(), **mem,
      'trainable_params': count(params),
      'params_gb': tree_gb(params), 'opt_state_gb': tree_gb(opt_state),
      **setup.info, 'final_loss': final_loss, 'remat': args.remat,
      'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__,
      'profile': profile,
  }


# --- The driver (parent process) -----------------------------------------------
def run_child(args, variant: str, extra: list[str],
              budget: common.Budget) -> dict:
  """One variant in a fresh subprocess (this module again, same working
  dir and environment): its result, or an error record with status 'oom' /
  'timeout' / 'error'."""
  cmd = [sys.executable, '-m', __spec__.name] + sys.argv[1:] + [
      '--run_variant', variant] + extra
  left = budget.left()
  if left is not None:  # the child stops timing a little before the end
    cmd += ['--deadline', str(budget.deadline - min(15.0, 0.1 * left))]
  env = dict(os.environ)
  if args.mem_fraction and 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in env:
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = str(args.mem_fraction)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=None if left is None else max(left, 1.0))
  except subprocess.TimeoutExpired:
    return {'variant': variant, 'status': 'timeout',
            'error': f'killed at the time budget ({args.time_budget} s)'}
  line = next((l for l in proc.stdout.splitlines() if l.startswith('RESULT ')),
              None)
  if line is not None:
    return {**json.loads(line[7:]), 'status': 'ok'}
  lines = proc.stderr.strip().splitlines() or [f'exit code {proc.returncode}']
  oom = any(m in proc.stderr for m in OOM_MARKERS)
  keys = OOM_MARKERS if oom else ('Error',)
  err = next((l for l in reversed(lines) if any(k in l for k in keys)),
             lines[-1])
  print('\n'.join(lines[-15:]), file=sys.stderr)
  return {'variant': variant, 'status': 'oom' if oom else 'error',
          'returncode': proc.returncode, 'error': err[:2000]}


def skipped(variant: str, budget, no_tutorial: str | None) -> dict | None:
  """The record of a variant that cannot start, or None."""
  if VARIANTS[variant].kind == 'tutorial' and no_tutorial:
    return {'variant': variant, 'status': 'skipped', 'error': no_tutorial}
  if budget.expired():
    return {'variant': variant, 'status': 'skipped',
            'error': 'time budget spent'}
  return None


def run_variants(args, budget, no_tutorial):
  results = []
  for v in args.variants.split(','):
    r = skipped(v, budget, no_tutorial) or run_child(args, v, [], budget)
    results.append(r)
    report(r)
    common.write_json(args.out, results)
  print_table(results)


def find_max_batch(args, budget, no_tutorial):
  """Largest batch (rows) of each variant that trains without OOM."""
  sizes = [int(s) for s in args.max_batch_sizes.split(',')]
  out = {'seq_len': args.seq_len, 'model': args.model, 'tries': [],
         'max_batch_size': {}, 'stopped_by': {}}
  for v in args.variants.split(','):
    best = None
    for bs in sizes:
      r = skipped(v, budget, no_tutorial) or run_child(
          args, v, ['--batch_size', str(bs), '--steps', str(args.find_steps),
                    '--warmup', '1'], budget)
      r['try_batch_size'] = bs
      out['tries'].append(r)
      report(r)
      if r['status'] == 'ok':
        best = bs
      out['max_batch_size'][v] = best
      if r['status'] != 'ok':  # 'oom' is conclusive; timeout/error/skipped not
        out['stopped_by'][v] = {'batch_size': bs, 'status': r['status']}
      common.write_json(args.out, out)
      if r['status'] != 'ok':
        break  # larger batches need more memory still
  print(f"\n{'variant':12} {'B':>4} {'status':8} {'step ms':>8} {'tgt tok/s':>10} "
        f"{'peak GB':>8} {'est GB':>7}")
  for r in out['tries']:
    ok = r['status'] == 'ok'
    print(f"{r['variant']:12} {r['try_batch_size']:4d} {r['status']:8} "
          + (f"{r['step_ms']:8.1f} {r['target_tokens_per_s']:10.0f} "
             f"{_f(r['peak_gb'], 8)} {_f(r['step_est_gb'], 7)}" if ok
             else r.get('error', '')[:80]))
  for v, bs in out['max_batch_size'].items():
    stop = out['stopped_by'].get(v)
    why = (f"; {stop['batch_size']}: {stop['status']}" if stop
           else '; all sizes tried ran')
    print(f'{v}: max batch size {bs} (L={args.seq_len}{why})')


def report(r):
  """One line per finished subprocess, as it happens."""
  if r['status'] == 'ok':
    print(f"[{r['variant']} B{r['batch_size']}] {r['step_ms']:.1f} ms/step"
          f", peak {_f(r['peak_gb'], 0)} GB, compile {r['compile_s']:.1f} s",
          file=sys.stderr, flush=True)
    if r.get('profile'):
      common.print_trace_summary(f"{r['variant']} B{r['batch_size']}",
                                       r['profile'])
  else:
    print(f"[{r['variant']}] {r['status'].upper()}: {r.get('error', '')[:300]}",
          file=sys.stderr, flush=True)


def _f(x, width: int, prec: int = 2) -> str:
  return f'{"-":>{width}}' if x is None else f'{x:{width}.{prec}f}'


def print_table(results):
  ok = [r for r in results if r.get('status') == 'ok']
  base = next((r for r in ok if r['variant'] == 'tutorial'), ok[0] if ok else None)
  name = base['variant'][:8] if base else '-'
  print(f"{'variant':13} {'model':12} {'B':>3} {'L':>4} {'step ms':>8} "
        f"{'tgt tok/s':>10} {'tok/s':>9} {'MFU':>6} {'MFU*':>6} "
        f"{'setup GB':>8} {'peak GB':>8} {'est GB':>7} {'compile s':>9} "
        f"{'vs ' + name:>11}")
  for r in results:
    if r.get('status') != 'ok':
      print(f"{r['variant']:13} {r.get('status', '?').upper()}: "
            f"{r.get('error', '')[:100]}")
      continue
    ratio = r['target_tokens_per_s'] / base['target_tokens_per_s']
    print(f"{r['variant']:13} {r['model']:12} {r['batch_size']:3d} "
          f"{r['seq_len']:4d} {r['step_ms']:8.1f} "
          f"{r['target_tokens_per_s']:10.0f} {r['tokens_per_s']:9.0f} "
          f"{100 * r['mfu']:5.1f}% {100 * r['mfu_actual']:5.1f}% "
          f"{_f(r['peak_setup_gb'], 8)} {_f(r['peak_gb'], 8)} "
          f"{_f(r['step_est_gb'], 7)} {r['compile_s']:9.1f} {ratio:10.2f}x")
  print('MFU: 6N model FLOPs; MFU*: FLOPs the variant computes (LoRA: 4N + '
        'adapters). setup GB: peak after setup; peak GB: after the steps; '
        'est GB: XLA estimate of the step.')


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='gemma3_270m')
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--seq_len', type=int, default=256)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--learning_rate', type=float, default=1e-4)
  p.add_argument('--remat', action='store_true')
  p.add_argument('--attention_impl', default=None,
                 choices=['cudnn', 'jax', 'einsum'],
                 help='ours: default cudnn on GPU, einsum elsewhere')
  p.add_argument('--chunk_size', type=int, default=None,
                 help='ours: LM-head/CE chunk in tokens (default: the loss\'s)')
  p.add_argument('--profile', action='store_true',
                 help='trace 3 steps after timing; add a kernel-time summary')
  p.add_argument('--lora_rank', type=int, default=8)
  p.add_argument('--lora_alpha', type=float, default=16.0)
  p.add_argument('--lora_optimizer', default='adamw',
                 help='optimizer of the LoRA / QLoRA adapters')
  p.add_argument('--mtnt_dir', default=common.DEFAULT_MTNT_DIR)
  p.add_argument('--variants', default=','.join(DEFAULT_VARIANTS),
                 help=f'comma-separated, of: {", ".join(VARIANTS)}')
  p.add_argument('--find_max_batch', action='store_true',
                 help='largest batch size of each variant without OOM')
  p.add_argument('--max_batch_sizes', default='16,24,32,48,64,96,128')
  p.add_argument('--find_steps', type=int, default=2,
                 help='timed steps per --find_max_batch try (after 1 warm-up)')
  p.add_argument('--mem_fraction', type=float, default=0.95,
                 help='XLA_PYTHON_CLIENT_MEM_FRACTION for the subprocesses '
                      '(unless set); 0 = JAX default')
  p.add_argument('--time_budget', type=float, default=None,
                 help='seconds for the whole run')
  p.add_argument('--out', default=None, help='JSON results file')
  p.add_argument('--run_variant', default=None, help=argparse.SUPPRESS)
  p.add_argument('--deadline', type=float, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.run_variant:
    print('RESULT ' + json.dumps(run_variant(args)), flush=True)
    return
  unknown = set(args.variants.split(',')) - set(VARIANTS)
  if unknown:
    p.error(f'unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}')
  from gemma_mt import models
  no_tutorial = common.tutorial_refusal(models.from_name(args.model))
  budget = common.Budget(args.time_budget)
  if args.find_max_batch:
    find_max_batch(args, budget, no_tutorial)
  else:
    run_variants(args, budget, no_tutorial)


if __name__ == '__main__':
  main()
