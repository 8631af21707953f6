"""Gemma 4's text decoder equals Google's `gemma.gm.nn` Gemma 4 (same params)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt import gemma4 as G
from gemma_mt import model as M
from reference import gm  # noqa: F401  (skips without the gemma library)
from gemma.gm.nn.gemma4 import _config as g4_config  # noqa: E402
from gemma.gm.nn.gemma4 import _modules as g4_modules  # noqa: E402
from gemma.gm.nn.gemma4 import _transformer as g4_transformer  # noqa: E402

V = 512


def small(base: G.Gemma4Config, **kw) -> G.Gemma4Config:
  """A few layers of a released variant, every feature of it kept."""
  return base.replace(vocab_size=V, embed_dim=64, hidden_dim=96, num_heads=4,
                      head_dim=16, sliding_window_size=3, **kw)


CONFIGS = {
    # Per-layer inputs, MQA, the last 3 of 5 layers share KV (wider FFW).
    'e2b': small(G.Gemma4Config.gemma4_e2b(), num_kv_heads=1,
                 attention_types=('local', 'global') * 2 + ('local',),
                 per_layer_input_dim=8, frac_shared_layers=3 / 5,
                 shared_hidden_dim=192, global_key_size=32),
    'e4b': small(G.Gemma4Config.gemma4_e4b(), num_kv_heads=2,
                 attention_types=('local', 'global') * 3,
                 per_layer_input_dim=8, frac_shared_layers=2 / 6,
                 global_key_size=32),
    # Global layers: 1 KV head, key size 32, keys = values.
    '31b': small(G.Gemma4Config.gemma4_31b(), num_kv_heads=2,
                 num_global_kv_heads=1, global_key_size=32,
                 attention_types=('local', 'local', 'global')),
    # MoE: 8 experts, top 2, beside a dense MLP.
    '26b_a4b': small(G.Gemma4Config.gemma4_26b_a4b(), num_kv_heads=2,
                     num_global_kv_heads=1, global_key_size=32,
                     attention_types=('local', 'global'), num_experts=8,
                     expert_dim=24, top_k_experts=2),
}


def official(cfg: G.Gemma4Config):
  t = {'global': g4_modules.AttentionType.GLOBAL,
       'local': g4_modules.AttentionType.LOCAL_SLIDING}
  sharing = (g4_config.KVCacheSharingConfig(cfg.frac_shared_layers, True, True)
             if cfg.frac_shared_layers else None)
  return g4_transformer.Transformer(config=g4_config.TransformerConfig(
      num_embed=cfg.vocab_size, embed_dim=cfg.embed_dim,
      hidden_dim=cfg.hidden_dim, num_heads=cfg.num_heads,
      head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
      final_logit_softcap=cfg.final_logit_softcap, use_post_attn_norm=True,
      use_post_ffw_norm=True,
      attention_types=tuple(t[a] for a in cfg.attention_types),
      sliding_window_size=cfg.sliding_window_size,
      num_global_kv_heads=cfg.num_global_kv_heads,
      global_key_size=cfg.global_key_size, k_eq_v_global=cfg.k_eq_v_global,
      global_rope_proportion=cfg.global_rope_proportion,
      local_rope_proportion=cfg.local_rope_proportion,
      local_base_frequency=int(cfg.local_rope_base),
      global_base_frequency=int(cfg.global_rope_base),
      per_layer_input_dim=cfg.per_layer_input_dim,
      kv_cache_sharing_config=sharing,
      override_kv_shared_ffw_hidden=cfg.shared_hidden_dim,
      enable_moe=cfg.num_experts > 0, num_experts=cfg.num_experts,
      expert_dim=cfg.expert_dim, top_k_experts=cfg.top_k_experts,
      moe_dense_hidden_dim=cfg.hidden_dim if cfg.num_experts else 0),
      dtype=jnp.float32)


def batch(lengths, L, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.arange(L)[None] < np.asarray(lengths)[:, None]
  tokens = np.where(mask, rng.integers(1, V, (len(lengths), L)), 0)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def random_params(cfg, seed=0):
  tokens, mask = batch([4], 4)
  params = G.Gemma4(cfg).init(jax.random.key(seed), tokens,
                              M.positions_from_mask(mask),
                              M.causal_mask(mask))['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def flat_shapes(tree):
  return {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('name', CONFIGS)
def test_param_tree_equals_official(name):
  cfg = CONFIGS[name]
  tokens, mask = batch([4], 4)
  mine = jax.eval_shape(lambda: G.Gemma4(cfg).init(
      jax.random.key(0), tokens, M.positions_from_mask(mask),
      M.causal_mask(mask)))['params']
  ref = jax.eval_shape(lambda: official(cfg).init(jax.random.key(0), tokens))
  assert flat_shapes(mine) == flat_shapes(ref['params'])


@pytest.mark.parametrize('name', CONFIGS)
def test_logits_equal_official(name):
  cfg = CONFIGS[name]
  params = random_params(cfg)
  tokens, mask = batch([12, 7, 3], 12)
  pos, attn = M.positions_from_mask(mask), M.causal_mask(mask)
  ours, _ = jax.jit(G.Gemma4(cfg).apply)({'params': params}, tokens, pos, attn)
  ref = jax.jit(official(cfg).apply)({'params': params}, tokens, positions=pos,
                                     attention_mask=attn).logits
  real = np.asarray(mask)[..., None]
  err = np.max(np.abs(np.asarray(ours) - np.asarray(ref)) * real)
  print(f'\n{name}: max |Δlogit| vs gemma.gm = {err:.1e}')
  assert err < 2e-5, err
  assert np.max(np.abs(ref)) > 1.0


@pytest.mark.parametrize('name,theirs', [
    ('gemma4_e2b', 'Gemma4_E2B'), ('gemma4_e4b', 'Gemma4_E4B'),
    ('gemma4_31b', 'Gemma4_31B'), ('gemma4_26b_a4b', 'Gemma4_26B_A4B')])
def test_released_configs_equal_official(name, theirs):
  """The full-size trees (text part), traced only."""
  cfg = getattr(G.Gemma4Config, name)()
  tokens, mask = batch([4], 4)
  mine = jax.eval_shape(lambda: G.Gemma4(cfg).init(
      jax.random.key(0), tokens, M.positions_from_mask(mask),
      M.causal_mask(mask)))['params']
  ref = jax.eval_shape(lambda: getattr(gm.nn, theirs)(text_only=True).init(
      jax.random.key(0), tokens))['params']
  assert flat_shapes(mine) == flat_shapes(ref)
  sharing = g4_config.create_kv_cache_sharing_patterns(
      getattr(gm.nn, theirs).config.kv_cache_sharing_config, cfg.num_layers,
      getattr(gm.nn, theirs).config.attention_types)
  assert [cfg.kv_source(i) for i in range(cfg.num_layers)] == sharing
