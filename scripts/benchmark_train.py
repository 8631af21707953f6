"""Training throughput: gemma_mt vs the tutorial's own code, same GPU, same batches.

Each variant runs in its own subprocess (clean peak-memory numbers):

  ours_packed   gemma_mt: packed rows, bf16 compute / f32 master weights,
                cuDNN attention, chunked CE on target positions only, donation
  ours_padded   the same on padded rows (one pair per row)
  tutorial      the tutorial's code: `gemma.transformer` (gemma 2.0.8 wheel)
                and its `train_step`, loss made batch-wide (it used row 0
                only), params in bfloat16 as in the Kaggle checkpoints
  tutorial_f32  the same with float32 params

Batches come from the real MTNT train split (../shared/data/mtnt), so the
length distribution is MTNT's. Weights are random (speed does not depend on
them). MFU counts the useful model FLOPs of a step (6 x non-embedding params
per real token, the LM head on target tokens, causal attention over each
pair's own context) over the H100's 989 TFLOP/s bf16 dense peak; the same
count is used for every variant, so MFU ratios equal throughput ratios.

  python scripts/benchmark_train.py --model gemma3_270m --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PEAK_FLOPS = 989e12  # H100 SXM bf16 dense
VARIANTS = ('ours_packed', 'ours_padded', 'tutorial', 'tutorial_f32')


def mtnt_batches(args, vocab_size: int, packed: bool, n: int):
  from gemma_mt.data import MTNTDatasetBuilder
  from gemma_mt.packing import packed_batches
  from gemma_mt.tokenizer import default_tokenizer

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


def useful_flops(cfg, batch) -> float:
  """Model FLOPs of one training step (forward + backward) on `batch`."""
  tokens = batch['input_tokens']
  seg = batch.get('segment_ids')
  seg = (tokens != 0).astype(np.int32) if seg is None else seg
  pos = batch.get('positions')
  if pos is None:
    pos = np.maximum(np.cumsum(tokens != 0, axis=1) - 1, 0)
  real = seg != 0
  n_real = real.sum()
  n_target = (np.asarray(batch['target_mask'])[:, 1:] & real[:, 1:]).sum()
  body = 6 * cfg.num_params(include_embedding=False) * n_real
  head = 6 * cfg.vocab_size * cfg.embed_dim * n_target
  ctx = pos[real] + 1
  attn = 0
  for t in cfg.attention_types:
    c = np.minimum(ctx, cfg.sliding_window_size) if t == 'local' else ctx
    attn += 12 * cfg.num_heads * cfg.head_dim * c.sum()
  return float(body + head + attn)


def gpu_peak_bytes() -> int:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get('peak_bytes_in_use', 0))


def run_ours(args, cfg, batches):
  import jax
  import jax.numpy as jnp
  import optax

  from gemma_mt import model as model_lib
  from gemma_mt.steps import make_train_step

  impl = 'cudnn' if jax.default_backend() == 'gpu' else 'einsum'
  model = model_lib.Transformer(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                attention_impl=impl, remat=args.remat)
  b0 = {k: jnp.asarray(v) for k, v in batches[0].items()}
  init = jax.jit(lambda k: model.init(
      k, b0['input_tokens'][:1], jnp.zeros_like(b0['input_tokens'][:1]),
      model_lib.causal_mask(b0['input_tokens'][:1] != 0))['params'])
  params = init(jax.random.key(0))
  opt = optax.sgd(args.learning_rate)
  opt_state = opt.init(params)
  step = make_train_step(model, opt)
  return lambda p, s, b: step(p, s, b), params, opt_state


def run_tutorial(args, cfg, batches, dtype):
  """The tutorial's code path, with gemma 2.0.8's `gemma.transformer`."""
  import jax
  import jax.numpy as jnp
  import optax
  from gemma import modules as g_modules
  from gemma import transformer as transformer_lib

  types = {'global': g_modules.AttentionType.GLOBAL,
           'local': g_modules.AttentionType.LOCAL_SLIDING}
  config = transformer_lib.TransformerConfig(
      num_layers=cfg.num_layers, num_embed=cfg.vocab_size,
      embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
      num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      num_kv_heads=cfg.num_kv_heads,
      final_logit_softcap=cfg.final_logit_softcap,
      use_post_attn_norm=cfg.use_post_attn_norm,
      use_post_ffw_norm=cfg.use_post_ffw_norm,
      attention_types=tuple(types[t] for t in cfg.attention_types),
      max_cache_length=None, attn_logits_soft_cap=cfg.attn_logits_soft_cap,
      sliding_window_size=cfg.sliding_window_size,
      transpose_gating_einsum=cfg.transpose_gating_einsum,
      use_qk_norm=cfg.use_qk_norm,
      local_base_frequency=int(cfg.local_rope_base),
      global_base_frequency=int(cfg.global_rope_base))
  model = transformer_lib.Transformer(config)

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
  b0 = jnp.asarray(batches[0]['input_tokens'][:1])
  pos, mask = get_attention_mask_and_positions(b0, 0)
  params = jax.jit(lambda k: model.init(k, b0, pos, None, mask))(
      jax.random.key(0))
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  opt = optax.sgd(args.learning_rate)
  opt_state = opt.init(params)

  def step(p, s, b):
    loss, p, s = jit_train_step(model, p, opt, s, 0, b)
    return p, s, {'loss': loss}
  return step, params, opt_state


def run_variant(args):
  import jax
  import jax.numpy as jnp

  from gemma_mt.model import TransformerConfig

  cfg = TransformerConfig.from_name(args.model)
  packed = args.run_variant == 'ours_packed'
  n = args.warmup + args.steps
  batches = mtnt_batches(args, cfg.vocab_size, packed, n)
  if args.run_variant.startswith('ours'):
    step, params, opt_state = run_ours(args, cfg, batches)
  else:
    dtype = jnp.float32 if args.run_variant == 'tutorial_f32' else jnp.bfloat16
    step, params, opt_state = run_tutorial(args, cfg, batches, dtype)
  dev = [jax.device_put({k: v for k, v in b.items()}) for b in batches]
  t0 = time.perf_counter()
  params, opt_state, m = step(params, opt_state, dev[0])
  jax.block_until_ready(m['loss'])
  compile_s = time.perf_counter() - t0
  for b in dev[1:args.warmup]:
    params, opt_state, m = step(params, opt_state, b)
  jax.block_until_ready(m['loss'])
  times, losses = [], []
  for b in dev[args.warmup:]:
    t = time.perf_counter()
    params, opt_state, m = step(params, opt_state, b)
    losses.append(float(m['loss']))  # Blocks: one step at a time is timed.
    times.append(time.perf_counter() - t)
  timed = batches[args.warmup:]
  tgt = sum(int((b['target_mask'][:, 1:] & (b['input_tokens'][:, 1:] != 0)).sum())
            for b in timed)
  real = sum(int((b['input_tokens'] != 0).sum()) for b in timed)
  flops = sum(useful_flops(cfg, b) for b in timed)
  total = sum(times)
  return {
      'variant': args.run_variant, 'model': args.model,
      'batch_size': args.batch_size, 'seq_len': args.seq_len,
      'step_ms_median': 1e3 * float(np.median(times)),
      'target_tokens_per_s': tgt / total, 'tokens_per_s': real / total,
      'target_tokens_per_step': tgt / len(timed),
      'tokens_per_step': real / len(timed),
      'mfu': flops / total / PEAK_FLOPS, 'compile_s': compile_s,
      'peak_gb': gpu_peak_bytes() / 2**30, 'final_loss': losses[-1],
      'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__,
  }


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
  p.add_argument('--mtnt_dir', default=str(Path(__file__).resolve().parents[2]
                                           / 'shared' / 'data' / 'mtnt'))
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--out', default=None, help='JSON results file')
  p.add_argument('--run_variant', default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.run_variant:
    print('RESULT ' + json.dumps(run_variant(args)), flush=True)
    return
  results = []
  for v in args.variants.split(','):
    cmd = [sys.executable, __file__, '--run_variant', v] + [
        a for a in sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith('RESULT ')), None)
    if line is None:
      lines = proc.stderr.strip().splitlines() or ['?']
      err = next((l for l in reversed(lines) if 'Error' in l), lines[-1])
      print(f'{v}: FAILED ({err[:300]})', file=sys.stderr)
      results.append({'variant': v, 'error': err[:2000]})
      continue
    results.append(json.loads(line[7:]))
  print_table(results)
  if args.out:
    Path(args.out).write_text(json.dumps(results, indent=1))


def print_table(results):
  base = next((r for r in results if r.get('variant') == 'tutorial'
               and 'error' not in r), None)
  print(f"{'variant':14} {'model':12} {'B':>3} {'L':>4} {'step ms':>8} "
        f"{'tgt tok/s':>10} {'tok/s':>9} {'MFU':>6} {'peak GB':>8} "
        f"{'compile s':>9} {'vs tutorial':>11}")
  for r in results:
    if 'error' in r:
      print(f"{r['variant']:14} FAILED: {r['error'][:100]}")
      continue
    ratio = (r['target_tokens_per_s'] / base['target_tokens_per_s']
             if base else float('nan'))
    print(f"{r['variant']:14} {r['model']:12} {r['batch_size']:3d} "
          f"{r['seq_len']:4d} {r['step_ms_median']:8.1f} "
          f"{r['target_tokens_per_s']:10.0f} {r['tokens_per_s']:9.0f} "
          f"{100 * r['mfu']:5.1f}% {r['peak_gb']:8.2f} {r['compile_s']:9.1f} "
          f"{ratio:10.2f}x")


if __name__ == '__main__':
  main()
