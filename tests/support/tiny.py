"""A tiny random Gemma-3-shaped model with the real tokenizer, for fast tests."""

import jax
import jax.numpy as jnp

from gemma_mt.models import gemma as M
from gemma_mt.models import layers  # noqa: E402
from gemma_mt.translator import Translator

CFG = M.TransformerConfig.tiny()  # The real tokenizer's 262144-id vocabulary.


def tiny_params(seed=0):
  tokens = jnp.ones((1, 4), jnp.int32)
  mask = jnp.ones((1, 4), bool)
  params = M.Transformer(CFG).init(jax.random.key(seed), tokens,
                                   layers.positions_from_mask(mask),
                                   layers.causal_mask(mask))['params']
  # Larger weights: clear argmax gaps, not near-uniform logits.
  return jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x, params)


def make_tiny_translator(tokenizer, **kw):
  return Translator(CFG, tiny_params(), tokenizer, batch_size=4, **kw)


def forcing(params, token: int):
  """Params under which every step's argmax is `token`, whatever the input.

  Column 0 of the (tied) embedding is large and positive, so the residual
  stream's dim 0 is too; the final norm keeps only dim 0, so logits are
  proportional to column 0, where `token` is largest.
  """
  table = params['embedder']['input_embedding']
  table = table.at[:, 0].set(100.0).at[token, 0].set(200.0)
  scale = jnp.full((CFG.embed_dim,), -1.0).at[0].set(0.0)
  return {**params, 'embedder': {'input_embedding': table},
          'final_norm': {'scale': scale}}
