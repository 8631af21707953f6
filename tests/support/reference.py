"""Bridges to Google's `gemma` library, the reference implementation (tests only)."""

import jax.numpy as jnp
import pytest

gm = pytest.importorskip('gemma.gm')
from gemma.gm.nn import _config as gm_config  # noqa: E402
from gemma.gm.nn import _modules as gm_modules  # noqa: E402

from gemma_mt.models.gemma import GLOBAL, TransformerConfig  # noqa: E402


def gm_transformer(cfg: TransformerConfig, dtype=jnp.float32):
  """The official `gm.nn.Transformer` built from one of our configs."""
  types = {GLOBAL: gm_modules.AttentionType.GLOBAL,
           'local': gm_modules.AttentionType.LOCAL_SLIDING}
  norm = gm_config.QueryPreAttentionNormalisation
  if abs(cfg.query_pre_attn_scalar - cfg.head_dim**-0.5) < 1e-12:
    query_norm = norm.BY_ONE_OVER_SQRT_HEAD_DIM
  else:  # Gemma 3 27B's.
    assert abs(cfg.query_pre_attn_scalar
               - (cfg.embed_dim // cfg.num_heads)**-0.5) < 1e-12
    query_norm = norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
  config = gm_config.TransformerConfig(
      num_embed=cfg.vocab_size, embed_dim=cfg.embed_dim,
      hidden_dim=cfg.hidden_dim, num_heads=cfg.num_heads,
      head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
      final_logit_softcap=cfg.final_logit_softcap,
      use_post_attn_norm=cfg.use_post_attn_norm,
      use_post_ffw_norm=cfg.use_post_ffw_norm,
      attention_types=tuple(types[t] for t in cfg.attention_types),
      query_pre_attn_norm=query_norm,
      attn_logits_soft_cap=cfg.attn_logits_soft_cap,
      sliding_window_size=cfg.sliding_window_size,
      transpose_gating_einsum=cfg.transpose_gating_einsum,
      use_qk_norm=cfg.use_qk_norm,
      local_base_frequency=int(cfg.local_rope_base),
      global_base_frequency=int(cfg.global_rope_base),
      local_scale_factor=cfg.local_rope_scale,
      global_scale_factor=cfg.global_rope_scale)
  return gm.nn.Transformer(config=config, dtype=dtype)
