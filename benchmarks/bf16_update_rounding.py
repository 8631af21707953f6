"""How many SGD updates vanish in rounding with pure-bf16 weights?

Takes one real gradient of Gemma 3 270M on an MTNT batch and counts, among
elements with a non-zero gradient, those where `p - lr * g` rounds back to
`p`: in bfloat16 (pure-bf16 training: bf16 params, grads and update) and in
float32 (master weights). Why float32 master params are the default.

    python -m benchmarks.bf16_update_rounding --mtnt_dir ../shared/data/mtnt
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from gemma_mt import weights
from gemma_mt.data.mtnt import MTNTDatasetBuilder
from gemma_mt.train import loss as loss_lib


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--mtnt_dir', default=common.DEFAULT_MTNT_DIR)
  ap.add_argument('--lr', type=float, default=1e-4)
  ap.add_argument('--batch_size', type=int, default=4)
  ap.add_argument('--max_seq_len', type=int, default=128)
  args = ap.parse_args()

  pre = weights.load('gemma3_270m')
  model = pre.config.module(dtype=jnp.bfloat16)
  data = MTNTDatasetBuilder(pre.tokenizer, args.max_seq_len,
                            mtnt_dir=args.mtnt_dir)
  batch = next(data.get_train_dataset(args.batch_size))
  grad_fn = jax.jit(jax.grad(
      lambda p: loss_lib.forward_and_loss_fn(p, model, batch)[0]))
  p32 = pre.params
  grads32 = grad_fn(p32)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  grads16 = grad_fn(p16)  # What pure-bf16 training would get.
  lr = args.lr

  rows = []
  for (path, p), g32, pb, gb in zip(
      jax.tree_util.tree_leaves_with_path(p32), jax.tree.leaves(grads32),
      jax.tree.leaves(p16), jax.tree.leaves(grads16)):
    name = jax.tree_util.keystr(path)
    nz32 = np.asarray(g32 != 0)
    lost32 = np.asarray((p - lr * g32) == p) & nz32
    upd = (-lr * gb).astype(jnp.bfloat16)  # optax.sgd in the params' dtype.
    nz16 = np.asarray(gb != 0)
    lost16 = np.asarray((pb + upd).astype(jnp.bfloat16) == pb) & nz16
    a32, a16 = np.abs(np.asarray(g32, np.float64)), np.abs(
        np.asarray(gb, np.float64))
    rows.append((name, nz32.sum(), lost32.sum(), nz16.sum(), lost16.sum(),
                 a32.sum(), a32[lost32].sum(), a16.sum(), a16[lost16].sum()))

  def report(label, sel):
    n32 = sum(r[1] for r in sel); l32 = sum(r[2] for r in sel)
    n16 = sum(r[3] for r in sel); l16 = sum(r[4] for r in sel)
    m32 = sum(r[6] for r in sel) / sum(r[5] for r in sel)
    m16 = sum(r[8] for r in sel) / sum(r[7] for r in sel)
    print(f'{label:<19} bf16: {l16 / max(n16, 1):7.2%} of {n16:>11,} elems, '
          f'{m16:7.2%} of |update| | f32: {l32 / max(n32, 1):7.3%} elems, '
          f'{m32:8.4%} of |update|')

  print(f'SGD lr={lr}, one MTNT batch ({args.batch_size} x '
        f'{args.max_seq_len}); non-zero updates that round to no change '
        '(share of elements, share of the L1 update mass):')
  report('all params', rows)
  report('embedding', [r for r in rows if 'embedder' in r[0]])
  report('transformer layers', [r for r in rows if 'layer_' in r[0]])
  report('norm scales', [r for r in rows if 'scale' in r[0]])


if __name__ == '__main__':
  main()
