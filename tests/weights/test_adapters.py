"""Adapter dirs load through the model protocol, whatever the base's family:
a LoRA and a QLoRA dir over a tiny Gemma 4 base load as the trained model
(the base rebuilt by its config, quantized as in training) and translate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt import lora as L
from gemma_mt import models, weights
from gemma_mt.models import layers
from gemma_mt.train.state import random_params
from gemma_mt.translator import Translator


def randomize_b(adapters, seed=3):
  """Non-zero B (A is already random), so the adapters change the output."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
      if str(p[-1]).endswith("_lora_b']") else x, adapters)


@pytest.mark.parametrize('quant', [None, 'int8'])
def test_adapter_dir_over_a_gemma4_base(tokenizer, tmp_path, quant):
  cfg = models.from_name('tiny_gemma4')
  base = random_params(cfg.module(), seed=1)
  base_dir = weights.save(tmp_path / 'base', 'tiny_gemma4', base, tokenizer)
  lcfg = L.LoraConfig(rank=4, alpha=8.0, quant=quant)
  lm = L.apply_lora(cfg.module(), lcfg)
  adapters = randomize_b(L.init_lora_params(lm, jax.random.key(7, impl='rbg')))
  path = weights.save_adapters(tmp_path / 'ad', 'tiny_gemma4', adapters, lcfg,
                               base_model='tiny_gemma4', base_checkpoint=base_dir)

  pre = weights.load_dir(path)
  assert pre.config == cfg
  mask = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])
  tokens = jnp.where(mask, jnp.arange(2, 14).reshape(2, 6), 0)
  args = (tokens, layers.positions_from_mask(mask), layers.causal_mask(mask))
  frozen = L.quantize_base(lm, base) if quant else base
  trained = lm.apply({'params': L.combine(frozen, adapters)}, *args)[0]
  loaded = cfg.module().apply({'params': pre.params}, *args)[0]
  plain = cfg.module().apply({'params': base}, *args)[0]
  real = np.asarray(mask)[..., None]
  assert np.max(np.abs(np.asarray(trained - plain)) * real) > 1e-3  # They act.
  np.testing.assert_allclose(np.asarray(loaded) * real,
                             np.asarray(trained) * real, atol=1e-4, rtol=1e-4)

  # The Translator decodes the loaded dir: its first greedy token is the
  # trained model's argmax after the prompt.
  tr = Translator(pre.config, pre.params, pre.tokenizer, batch_size=2)
  gen = tr.generate(['Hello', 'How are you?'], max_new_tokens=2)
  for source, ids in zip(['Hello', 'How are you?'], gen.token_ids):
    prompt = jnp.asarray(tr.prompt_tokens(source))[None]
    ones = jnp.ones_like(prompt, bool)
    logits = lm.apply({'params': L.combine(frozen, adapters)}, prompt,
                      layers.positions_from_mask(ones),
                      layers.causal_mask(ones))[0]
    assert int(ids[0]) == int(jnp.argmax(logits[0, -1]))
