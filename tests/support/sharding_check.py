"""Multi-device checks of gemma_mt.sharding on 8 fake CPU devices.

Run by tests/test_sharding.py in a subprocess, because the device count
must be fixed before jax is first imported:

  python tests/support/sharding_check.py OUT.json [CHECK ...]

Uses tests/device_checks.py; writes {check: 'ok' | traceback} to OUT.json. Self-contained: a tiny local
loss and SGD/AdamW step, not the training loop's.
"""

import os
import sys

# Optimization level 0: compiles ~1.5x faster; both sides of every
# comparison are compiled alike.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0')
os.environ['JAX_PLATFORMS'] = 'cpu'

import re  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from device_checks import run_checks  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from gemma_mt import sharding as S  # noqa: E402
from gemma_mt.models import gemma as M  # noqa: E402
from gemma_mt.models import layers  # noqa: E402
from gemma_mt.weights import orbax_io  # noqa: E402

V, B, L = 256, 16, 12
# D=64, F=128; one local and one global layer (compile time is the cost).
CFG = M.TransformerConfig.tiny(vocab_size=V,
                               attention_types=(M.LOCAL, M.GLOBAL))
MODEL = M.Transformer(CFG)
MESHES = {'data=8': S.MeshConfig(data=8, fsdp=1),
          'fsdp=8': S.MeshConfig(data=1, fsdp=8),
          'data=2,fsdp=4': S.MeshConfig(data=-1, fsdp=4)}


def one_device_mesh():
  return S.make_mesh(S.MeshConfig(1, 1), devices=jax.devices()[:1])


def init_params():
  """Random host params of the model's tree (eval_shape: nothing compiles)."""
  tokens = jnp.ones((1, L), jnp.int32)
  mask = tokens != 0
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), tokens,
                          layers.positions_from_mask(mask), layers.causal_mask(mask))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
      shapes['params'])


def batches(num):
  rng = np.random.default_rng(1)
  out = []
  for _ in range(num):
    tokens = rng.integers(1, V, (B, L)).astype(np.int32)
    lens = rng.integers(L // 2, L + 1, B)
    tokens[np.arange(L)[None] >= lens[:, None]] = 0  # right padding
    target = (np.arange(L)[None] >= 4) & (tokens != 0)
    out.append({'input_tokens': tokens, 'target_mask': target})
  return out


def loss_fn(params, batch):
  tokens = batch['input_tokens']
  mask = tokens != 0
  logits, _ = MODEL.apply({'params': params}, tokens,
                          layers.positions_from_mask(mask), layers.causal_mask(mask))
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  w = batch['target_mask'][:, 1:].astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1)


def make_step(optimizer):
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {'loss': loss}
  return step


def train(optimizer, mesh, params, data):
  """2 steps on `mesh`, the integration train.py is meant to follow."""
  p_sh = S.param_shardings(params, mesh)
  params = S.shard_params(params, mesh, p_sh)
  o_sh = S.opt_state_shardings(optimizer, params, mesh, p_sh)
  opt_state = S.init_opt_state(optimizer, params, mesh, o_sh)
  in_sh, out_sh = S.step_shardings(mesh, p_sh, o_sh)
  step = jax.jit(make_step(optimizer), in_shardings=in_sh,
                 out_shardings=out_sh, donate_argnums=(0, 1))
  losses = []
  for batch in data:
    params, opt_state, metrics = step(params, opt_state,
                                      S.shard_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  same = jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim),
                      params, p_sh)
  assert all(jax.tree.leaves(same)), 'params left their shardings'
  return jax.device_get(params), losses


# --------------------------------------------------------------------- checks


def check_train_step():
  data = batches(2)
  init = init_params()
  for name, optimizer, atol, meshes in (
      ('sgd', optax.sgd(0.5), 1e-5, MESHES),
      # Adam's m / sqrt(v) turns float noise on near-zero gradients into
      # up to lr-sized steps: a looser atol, still 10x below one step.
      ('adamw', optax.adamw(1e-3), 1e-4, ('fsdp=8', 'data=2,fsdp=4'))):
    ref_params, ref_losses = train(optimizer, one_device_mesh(), init, data)
    moved = max(np.abs(a - b).max() for a, b in zip(
        jax.tree.leaves(ref_params), jax.tree.leaves(init)))
    assert moved > 10 * atol, (name, moved)  # The comparison means something.
    for mesh_name in meshes:
      cfg = MESHES[mesh_name]
      params, losses = train(optimizer, S.make_mesh(cfg), init, data)
      np.testing.assert_allclose(losses, ref_losses, rtol=1e-5,
                                 err_msg=f'{name} {mesh_name} loss')
      for path, a, b in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=atol,
            err_msg=f'{name} {mesh_name} {jax.tree_util.keystr(path[0])}')


def check_param_shardings():
  params = init_params()
  mesh = S.make_mesh(S.MeshConfig(data=1, fsdp=8))
  sharded = S.shard_params(params, mesh)
  emb = sharded['embedder']['input_embedding']
  assert emb.sharding.spec == P('fsdp', None), emb.sharding.spec
  assert {s.data.shape for s in emb.addressable_shards} == {(V // 8, 64)}
  attn, mlp = sharded['layer_0']['attn'], sharded['layer_0']['mlp']
  # Tiny: N=4, K=2, D=64, H=16, F=128 -> D for attention, F for the MLP.
  assert attn['q_einsum']['w'].sharding.spec == P(None, 'fsdp', None)
  assert attn['kv_einsum']['w'].sharding.spec == P(None, None, 'fsdp', None)
  assert attn['attn_vec_einsum']['w'].sharding.spec == P(None, None, 'fsdp')
  assert mlp['gating_einsum'].sharding.spec == P(None, 'fsdp', None)
  assert mlp['linear'].sharding.spec == P('fsdp', None)
  assert mlp['linear'].addressable_shards[0].data.shape == (128 // 8, 64)
  norm = sharded['layer_0']['pre_attention_norm']['scale']
  assert norm.sharding.spec == P() and norm.addressable_shards[0].data.shape == (64,)
  n_dev = len(jax.devices())
  bytes_per_device = sum(s.data.nbytes for x in jax.tree.leaves(sharded)
                         for s in x.addressable_shards) / n_dev
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  assert bytes_per_device < total / 6, (bytes_per_device, total)

  mesh24 = S.make_mesh(S.MeshConfig(data=2, fsdp=4))
  emb = S.shard_params(params, mesh24)['embedder']['input_embedding']
  assert emb.addressable_shards[0].data.shape == (V // 4, 64)
  assert len({s.index for s in emb.addressable_shards}) == 4  # 2 replicas each

  data_mesh = S.make_mesh(S.MeshConfig(data=8))
  assert all(s.spec == P() for s in jax.tree.leaves(
      S.param_shardings(params, data_mesh)))

  # Optimizer state follows params; the step count is replicated.
  o_sh = S.opt_state_shardings(optax.adamw(1e-3), params, mesh)
  adam = o_sh[0]
  assert adam.count.spec == P()
  assert adam.mu['embedder']['input_embedding'].spec == P('fsdp', None)
  assert adam.nu['layer_1']['mlp']['linear'].spec == P('fsdp', None)
  state = S.init_opt_state(optax.adamw(1e-3), S.shard_params(params, mesh),
                           mesh, o_sh)
  assert state[0].mu['layer_0']['mlp']['linear'].addressable_shards[0].data.shape == (16, 64)


def check_batch_sharding():
  mesh = S.make_mesh(S.MeshConfig(data=2, fsdp=4))
  batch = batches(1)[0]
  sharded = S.shard_batch(batch, mesh)
  tok = sharded['input_tokens']
  assert tok.shape == (B, L) and tok.sharding.spec == P(('data', 'fsdp'))
  rows = sorted(s.index[0].start for s in tok.addressable_shards)
  assert rows == list(range(0, B, B // 8)), rows
  np.testing.assert_array_equal(np.asarray(tok), batch['input_tokens'])
  # One host: host_local_batches is the identity, shard_batch takes it all.
  (local,) = S.host_local_batches([batch])
  np.testing.assert_array_equal(local['target_mask'], batch['target_mask'])
  try:
    S.shard_batch({'x': np.zeros((12, 3))}, mesh)
    raise AssertionError('12 rows over 8 devices should fail')
  except ValueError:
    pass
  # Decode inputs: split when the bucket divides the mesh, else replicated.
  args = S.shard_decode_inputs((np.zeros((8, 5), np.int32),
                                np.ones(8, np.int32), np.int32(3)), mesh)
  assert args[0].sharding.spec == P(('data', 'fsdp')) and args[2].sharding.spec == P()
  small = S.shard_decode_inputs(np.zeros((4, 5), np.int32), mesh)
  assert small.sharding.spec == P()
  p = S.sampling_params(init_params(), mesh)
  assert p['embedder']['input_embedding'].sharding.spec == P('fsdp', None)
  p = S.sampling_params(init_params(), mesh, fsdp=False)
  assert p['embedder']['input_embedding'].sharding.spec == P()
  # Jitted code runs on whatever it gets.
  out = jax.jit(lambda t, n: t.sum(1) + n)(args[0], args[1])
  assert out.sharding.spec[0] in (('data', 'fsdp'), 'data'), out.sharding


def check_restore_other_mesh():
  params = init_params()
  optimizer = optax.adamw(1e-3)
  tmp = tempfile.mkdtemp()
  fsdp8 = S.make_mesh(S.MeshConfig(data=1, fsdp=8))
  one = one_device_mesh()
  mesh24 = S.make_mesh(S.MeshConfig(data=2, fsdp=4))

  # fsdp=8 -> one device, and -> data=2 x fsdp=4 (params and Adam state).
  sharded = S.shard_params(params, fsdp8)
  opt_state = S.init_opt_state(optimizer, sharded, fsdp8)
  opt_state = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s))(opt_state)
  orbax_io.save_params(f'{tmp}/params', sharded)
  orbax_io.save_params(f'{tmp}/opt', opt_state)
  want_opt = jax.device_get(opt_state)
  for mesh in (one, mesh24):
    p_sh = S.param_shardings(params, mesh)
    got = orbax_io.restore_tree(f'{tmp}/params', orbax_io.abstract_tree(params, p_sh))
    _assert_equal(got, params)
    _assert_shardings(got, p_sh)
    o_sh = S.opt_state_shardings(optimizer, params, mesh, p_sh)
    got = orbax_io.restore_tree(f'{tmp}/opt', orbax_io.abstract_tree(want_opt, o_sh))
    _assert_equal(got, want_opt)
    _assert_shardings(got, o_sh)
    assert type(got[0]).__name__ == 'ScaleByAdamState', type(got[0])

  # One device -> fsdp=8, through load_params(sharding=mesh) (metadata shapes).
  orbax_io.save_params(f'{tmp}/single', S.shard_params(params, one))
  got = orbax_io.load_params(f'{tmp}/single', sharding=fsdp8)
  _assert_equal(got, params)
  _assert_shardings(got, S.param_shardings(params, fsdp8))
  assert got['embedder']['input_embedding'].addressable_shards[0].data.shape == (V // 8, 64)
  # bfloat16 on restore.
  got = orbax_io.load_params(f'{tmp}/params', dtype=jnp.bfloat16, sharding=mesh24)
  assert got['layer_0']['mlp']['linear'].dtype == jnp.bfloat16

  # load_params with a tree of shardings agrees.
  got = orbax_io.load_params(f'{tmp}/params',
                                sharding=S.param_shardings(params, mesh24))
  _assert_equal(got, params)
  _assert_shardings(got, S.param_shardings(params, mesh24))


def _assert_equal(got, want):
  assert jax.tree.structure(jax.device_get(got)) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _assert_shardings(tree, shardings):
  for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)


def _while_bodies_with_all_reduce(hlo_text: str, shape: str) -> list[str]:
  """Names of while-loop bodies that all-reduce an array of `shape`."""
  bodies = set(re.findall(r'body=%?([\w.\-]+)', hlo_text))
  found = []
  for comp in re.split(r'\n(?=\S)', hlo_text):  # One computation each.
    name = re.match(r'%?([\w.\-]+)', comp.strip())
    if name and name.group(1) in bodies and re.search(
        rf'{re.escape(shape)}[^\n]*all-reduce', comp):
      found.append(name.group(1))
  return found


def check_fused_ce():
  """The fused CE on a mesh equals one device, and sums the table gradient
  once, after its loop (not once per chunk inside it)."""
  from gemma_mt.train import loss as loss_lib
  rng = np.random.default_rng(0)
  n, d, v = 24, 16, 96
  h = rng.standard_normal((B, n, d)).astype(np.float32)
  table = rng.standard_normal((v, d)).astype(np.float32)
  labels = rng.integers(0, v, (B, n))
  w = rng.random((B, n)) < 0.5
  w[3] = False  # Devices hold different target counts (loops differ).

  def fn(mesh):
    ce = lambda h, t: loss_lib.chunked_cross_entropy(
        h, t, labels, w, None, 32, mesh=mesh)
    return jax.value_and_grad(ce, (0, 1)), jax.grad(ce)  # table frozen

  ref, ref_frozen = (jax.jit(f)(h, table) for f in fn(None))
  for mesh_name in ('data=8', 'data=2,fsdp=4'):
    mesh = S.make_mesh(MESHES[mesh_name])
    rows = jax.device_put(h, S.batch_sharding(mesh))
    both, frozen = (jax.jit(f) for f in fn(mesh))
    val, (gh, gt) = both(rows, table)
    np.testing.assert_allclose(val, ref[0], rtol=1e-5, err_msg=mesh_name)
    np.testing.assert_allclose(gh, ref[1][0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gt, ref[1][1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(frozen(rows, table), ref_frozen, rtol=1e-4,
                               atol=1e-6)
    hlo = both.lower(rows, table).compile().as_text()
    assert f'f32[{v},{d}]' in hlo
    assert not _while_bodies_with_all_reduce(hlo, f'f32[{v},{d}]'), mesh_name
  # Without the mesh XLA's partitioner puts that all-reduce inside the loop:
  # the structural check above can fail.
  mesh = S.make_mesh(MESHES['data=8'])
  rows = jax.device_put(h, S.batch_sharding(mesh))
  auto = jax.jit(fn(None)[0]).lower(rows, table).compile().as_text()
  assert _while_bodies_with_all_reduce(auto, f'f32[{v},{d}]')


def check_moe_experts():
  """Gemma 4 MoE on fsdp=8: each device holds one of 8 experts; the
  sharded forward equals one device's."""
  from gemma_mt.models import gemma4 as G
  cfg = G.Gemma4Config.gemma4_26b_a4b().replace(
      vocab_size=V, embed_dim=64, hidden_dim=96, num_heads=4, head_dim=16,
      num_kv_heads=2, num_global_kv_heads=1, global_key_size=32,
      sliding_window_size=3, attention_types=(M.LOCAL, M.GLOBAL),
      num_experts=8, expert_dim=32, top_k_experts=2)
  model = G.Gemma4(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, V, (B, L)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = layers.causal_mask(jnp.ones((B, L), bool))
  params = model.init(jax.random.key(0), tokens[:1, :4], pos[:1, :4],
                      mask[:1, :4, :4])['params']
  params = jax.tree.map(lambda x: x + 0.1, params)
  ref = jax.jit(model.apply)({'params': params}, tokens, pos, mask)[0]
  mesh = S.make_mesh(MESHES['fsdp=8'])
  sharded = S.shard_params(params, mesh)
  moe = sharded['layer_0']['mlp']
  assert moe['gating_einsum']['w'].sharding.spec == P('fsdp', None, None, None)
  assert moe['linear']['w'].addressable_shards[0].data.shape == (1, 32, 64)
  assert sharded['layer_0']['mlp2']['linear'].sharding.spec == P('fsdp', None)
  got = jax.jit(model.apply)({'params': sharded}, tokens, pos, mask)[0]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


CHECKS = {'train_step': check_train_step,
          'moe_experts': check_moe_experts,
          'fused_ce': check_fused_ce,
          'param_shardings': check_param_shardings,
          'batch_sharding': check_batch_sharding,
          'restore_other_mesh': check_restore_other_mesh}


if __name__ == '__main__':
  run_checks(CHECKS, sys.argv)
