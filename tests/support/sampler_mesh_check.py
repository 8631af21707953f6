"""Data-parallel decoding (Sampler / Translator with `mesh=`) on 8 fake CPU
devices. Run by tests/decoding/test_sampler_mesh.py in a subprocess, because the
device count must be fixed before jax is first imported:

  python tests/support/sampler_mesh_check.py OUT.json [CHECK ...]

Uses tests/device_checks.py; writes {check: 'ok' | traceback} to OUT.json.
"""

import os
import sys

# Optimization level 0: compiles faster; every side is compiled alike.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0')
os.environ['JAX_PLATFORMS'] = 'cpu'

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from device_checks import run_checks  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from gemma_mt import sharding as SH  # noqa: E402
from gemma_mt.decoding import sampler as SA  # noqa: E402
from gemma_mt.models import gemma as M  # noqa: E402
from gemma_mt.models import layers  # noqa: E402

V = 256
# One local and one global layer: compile time is the cost.
CFG = M.TransformerConfig.tiny(vocab_size=V,
                               attention_types=(M.LOCAL, M.GLOBAL))
MODEL = M.Transformer(CFG)
MESHES = {'data=8': SH.MeshConfig(data=8, fsdp=1),
          'data=4,fsdp=2': SH.MeshConfig(data=4, fsdp=2)}
NEW_TOKENS = 6
# 16 prompts of mixed lengths (3..29): one 16-row batch, prompt bucket 32.
PROMPTS = [np.random.default_rng(0).integers(2, V, n).astype(np.int32)
           for n in (3, 17, 8, 29, 5, 12, 21, 9, 4, 26, 14, 7, 19, 11, 6, 24)]


def init_params():
  """Random host params (eval_shape: nothing compiles), peaked logits."""
  tokens = jnp.ones((1, 4), jnp.int32)
  mask = tokens != 0
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), tokens,
                          layers.positions_from_mask(mask), layers.causal_mask(mask))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype)
      if len(s.shape) > 1 else np.full(s.shape, 0.1, s.dtype),
      shapes['params'])


def make_sampler(params, mesh=None):
  return SA.Sampler(MODEL, params, pad_id=0, stop_ids=[], batch_size=16,
                    max_pad_ratio=None, mesh=mesh)


def check_greedy_equals_single_device():
  params = init_params()
  ref_sampler = make_sampler(params)
  ref = [o.tolist() for o in ref_sampler.generate(
      PROMPTS, max_new_tokens=NEW_TOKENS)]
  assert all(len(o) == NEW_TOKENS for o in ref)
  assert len({tuple(o) for o in ref}) > 8, ref  # Not a degenerate model.
  ((B, Pw, budget, _),) = ref_sampler.compiled_shapes
  S = Pw + budget
  shape = lambda b: f'[{b},{S},{CFG.num_kv_heads},{CFG.head_dim}]'
  for name, cfg in MESHES.items():
    mesh = SH.make_mesh(cfg)
    sampler = make_sampler(params, mesh)
    got = [o.tolist() for o in sampler.generate(
        PROMPTS, max_new_tokens=NEW_TOKENS)]
    assert got == ref, (name, got, ref)

    # Params: replicated, or FSDP-sharded on the fsdp=2 mesh.
    emb = sampler.params['embedder']['input_embedding']
    want = P('fsdp', None) if cfg.fsdp > 1 else P()
    assert emb.sharding.mesh == mesh and emb.sharding.spec == want, (
        name, emb.sharding)
    # The executable takes the per-row inputs and returns the tokens split
    # over the 8 devices.
    (exe,) = sampler.executables.values()
    tokens_in = exe.input_shardings[0][1]
    out, count = exe.output_shardings
    for s, ndim in ((tokens_in, 2), (out, 2), (count, 1)):
      assert s.is_equivalent_to(SH.batch_sharding(mesh), ndim), (name, s)
    rows = SH.shard_decode_inputs(np.zeros((B, Pw), np.int32), mesh)
    assert {x.data.shape for x in rows.addressable_shards} == {(B // 8, Pw)}
    # The KV cache, the while loop's carry, is split by rows too: each
    # device holds [B/8, S, K, H] slabs and never the whole [B, S, K, H].
    hlo = exe.as_text()
    assert re.search(r'f32' + re.escape(shape(B // 8)), hlo), name
    assert not re.search(r'f32' + re.escape(shape(B)), hlo), name

  # A bucket too small to split over 8 devices runs replicated, same tokens.
  mesh = SH.make_mesh(MESHES['data=8'])
  few = make_sampler(params, mesh).generate(PROMPTS[:3],
                                            max_new_tokens=NEW_TOKENS)
  assert [o.tolist() for o in few] == ref[:3]


def check_beam_equals_single_device():
  """Beam search data-parallel (B*K rows split over the mesh) == one device."""
  params = init_params()
  kw = dict(max_new_tokens=NEW_TOKENS, beam_size=2, length_penalty=0.6)
  ref = make_sampler(params).beam_search(PROMPTS[:8], **kw)
  for name, cfg in MESHES.items():
    got = make_sampler(params, SH.make_mesh(cfg)).beam_search(PROMPTS[:8], **kw)
    for a, b in zip(got, ref):
      assert [h.ids.tolist() for h in a] == [h.ids.tolist() for h in b], name
      np.testing.assert_allclose([h.logp for h in a], [h.logp for h in b],
                                 rtol=1e-4, atol=1e-4, err_msg=name)


def check_translator():
  """Translator(mesh=...) == mesh=None, ids and text (real tokenizer)."""
  from gemma_mt import translator as T
  from gemma_mt.weights.embedded import default_tokenizer

  tokenizer = default_tokenizer()
  cfg = M.TransformerConfig.tiny(attention_types=(M.LOCAL, M.GLOBAL))
  tokens = jnp.ones((1, 4), jnp.int32)
  mask = tokens != 0
  params = M.Transformer(cfg).init(jax.random.key(0), tokens,
                                   layers.positions_from_mask(mask),
                                   layers.causal_mask(mask))['params']
  params = jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x, params)
  sources = [f'Sentence number {i} is {"quite " * (i % 5)}short.'
             for i in range(8)]
  kw = dict(max_new_tokens=4)
  single = T.Translator(cfg, params, tokenizer, batch_size=8)
  ref = single.generate(sources, **kw).token_ids
  ref_text = single.translate(sources, **kw)
  assert len({tuple(x) for x in ref}) > 1, ref
  mesh = SH.make_mesh(SH.MeshConfig(data=-1, fsdp=1))
  tr = T.Translator(cfg, params, tokenizer, batch_size=8, mesh=mesh)
  assert tr.sampler.mesh is mesh
  emb = tr.sampler.params['embedder']['input_embedding']
  assert len(emb.sharding.device_set) == 8
  got = tr.generate(sources, **kw).token_ids
  assert [x.tolist() for x in got] == [x.tolist() for x in ref]
  assert [k[0] for k in tr.compiled_shapes] == [8]  # One 8-row batch, split.
  assert tr.translate(sources, **kw) == ref_text
  # The Pallas decode kernel does not split over devices: refused.
  assert not tr.model.fast_decode
  try:
    T.Translator(cfg, params, tokenizer, mesh=mesh, fast_decode=True)
  except ValueError as e:
    assert 'fast_decode' in str(e), e
  else:
    raise AssertionError('fast_decode with an 8-device mesh was accepted')


CHECKS = {'greedy_equals_single_device': check_greedy_equals_single_device,
          'beam_equals_single_device': check_beam_equals_single_device,
          'translator': check_translator}


if __name__ == '__main__':
  run_checks(CHECKS, sys.argv)
