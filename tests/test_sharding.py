"""gemma_mt.sharding: mesh shapes, the FSDP rule, host slicing (in process),
and the 8-device checks of tests/support/sharding_check.py (one subprocess, since
the fake device count must be set before jax is imported)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gemma_mt import sharding as S
from gemma_mt.models import gemma as M

CHECK_SCRIPT = Path(__file__).resolve().parent / 'support' / 'sharding_check.py'


# ------------------------------------------------------------- in process


@pytest.mark.parametrize('cfg, n, want', [
    (S.MeshConfig(), 1, (1, 1)),
    (S.MeshConfig(), 8, (8, 1)),
    (S.MeshConfig(data=-1, fsdp=8), 8, (1, 8)),
    (S.MeshConfig(data=2, fsdp=-1), 8, (2, 4)),
    (S.MeshConfig(data=-1, fsdp=4), 16, (4, 4)),
    (S.MeshConfig(data=2, fsdp=4), 8, (2, 4)),
])
def test_mesh_config_resolve(cfg, n, want):
  assert cfg.resolve(n) == want


@pytest.mark.parametrize('cfg, n', [
    (S.MeshConfig(data=-1, fsdp=3), 8),   # does not divide
    (S.MeshConfig(data=2, fsdp=2), 8),    # leaves devices unused
    (S.MeshConfig(data=-1, fsdp=-1), 8),
    (S.MeshConfig(data=0, fsdp=1), 8),
])
def test_mesh_config_errors(cfg, n):
  with pytest.raises(ValueError):
    cfg.resolve(n)


def test_single_device_is_the_1x1_case():
  mesh = S.make_mesh(S.MeshConfig(1, 1), devices=jax.devices()[:1])
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1}
  batch = {'input_tokens': np.arange(6).reshape(3, 2)}
  out = S.shard_batch(batch, mesh)['input_tokens']
  np.testing.assert_array_equal(np.asarray(out), batch['input_tokens'])
  params = {'w': np.ones((64, 32), np.float32)}
  assert S.shard_params(params, mesh)['w'].sharding.spec == P()


def _gemma_shapes(cfg):
  tokens = jax.ShapeDtypeStruct((1, 4), np.int32)
  mask = jax.ShapeDtypeStruct((1, 4, 4), bool)
  return jax.eval_shape(M.Transformer(cfg).init, jax.random.key(0), tokens,
                        tokens, mask)['params']


@pytest.mark.parametrize('cfg', [M.TransformerConfig.gemma3_270m(),
                                 M.TransformerConfig.gemma_2b()],
                         ids=['gemma3_270m', 'gemma_2b'])
def test_fsdp_rule_on_real_shapes(cfg):
  """Embedding along V, attention along D, MLP along F, norms replicated."""
  shapes = _gemma_shapes(cfg)
  spec = lambda x: S.fsdp_spec(x.shape, 8)
  assert spec(shapes['embedder']['input_embedding']) == P('fsdp', None)
  attn, mlp = shapes['layer_0']['attn'], shapes['layer_0']['mlp']
  D, F = cfg.embed_dim, cfg.hidden_dim
  for w in jax.tree.leaves(attn):
    if w.ndim > 1:
      assert w.shape[spec(w).index('fsdp')] == D, (w.shape, spec(w))
  for w in (mlp['gating_einsum'], mlp['linear']):
    assert w.shape[spec(w).index('fsdp')] == F
  norms = [x for x in jax.tree.leaves(shapes) if x.ndim == 1]
  assert norms and all(spec(x) == P() for x in norms)
  assert S.fsdp_spec(shapes['embedder']['input_embedding'].shape, 1) == P()


def test_fsdp_rule_edge_cases():
  assert S.fsdp_spec((64, 48), 8) == P('fsdp', None)
  assert S.fsdp_spec((60, 48), 8) == P(None, 'fsdp')  # 60 does not divide
  assert S.fsdp_spec((60, 45), 8) == P()              # nothing divides
  assert S.fsdp_spec((8, 8), 8) == P()                # small: replicated
  assert S.fsdp_spec((8, 8), 8, min_size=1) == P('fsdp', None)  # tie: first
  assert S.fsdp_spec((), 8) == P()


def _global_batches(start_step, n_steps, batch_size=12):
  """A resumable global iterator: batch k is a pure function of k."""
  for step in range(start_step, start_step + n_steps):
    ids = np.arange(step * batch_size, (step + 1) * batch_size)
    yield {'ids': ids, 'tokens': np.stack([ids, -ids], axis=1)}


def test_host_local_batches_cover_each_row_once():
  hosts = 4
  per_host = [list(S.host_local_batches(_global_batches(0, 3), p, hosts))
              for p in range(hosts)]
  for step, global_batch in enumerate(_global_batches(0, 3)):
    parts = [per_host[p][step] for p in range(hosts)]
    assert all(len(x['ids']) == 3 for x in parts)
    got = np.concatenate([x['ids'] for x in parts])
    np.testing.assert_array_equal(got, global_batch['ids'])  # union, order
    assert len(set(got.tolist())) == len(got)                 # no overlap
    for x in parts:
      np.testing.assert_array_equal(x['tokens'][:, 0], x['ids'])
  # Resume: starting the global iterator at step 2 gives the same rows.
  resumed = next(S.host_local_batches(_global_batches(2, 1), 1, hosts))
  np.testing.assert_array_equal(resumed['ids'], per_host[1][2]['ids'])


def test_host_local_batches_training_input():
  from gemma_mt.data.mtnt import TrainingInput

  batch = TrainingInput(np.arange(8).reshape(4, 2), np.ones((4, 2), bool))
  (local,) = S.host_local_batches([batch], process_index=1, process_count=2)
  assert isinstance(local, TrainingInput)
  np.testing.assert_array_equal(local.input_tokens, [[4, 5], [6, 7]])


def test_host_shard():
  assert S.host_shard(32) == (32, 0, 1)
  assert S.host_shard(32, 3, 4) == (8, 3, 4)
  with pytest.raises(ValueError):
    S.host_shard(30, 0, 4)
  with pytest.raises(ValueError):
    S.host_shard(32, 4, 4)


def test_no_distributed_init_on_a_plain_launch(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'SLURM_STEP_ID',
              'SLURM_NTASKS', 'SLURM_NPROCS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(var, raising=False)
  called = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda *a, **k: called.append((a, k)))
  assert S.maybe_initialize_distributed() is False
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  assert S.maybe_initialize_distributed() is True
  assert called == [((), {'coordinator_address': '10.0.0.1:1234',
                          'num_processes': 2, 'process_id': 1})]


# ------------------------------------------------- 8 fake devices (subprocess)


@pytest.fixture(scope='module')
def device_checks(tmp_path_factory):
  out = tmp_path_factory.mktemp('sharding') / 'results.json'
  proc = subprocess.run([sys.executable, str(CHECK_SCRIPT), str(out)],
                        capture_output=True, text=True, timeout=600,
                        cwd=CHECK_SCRIPT.parents[2])
  if not out.exists():
    pytest.fail(f'sharding_check.py crashed:\n{proc.stdout}\n{proc.stderr}')
  return json.loads(out.read_text())


@pytest.mark.parametrize('check', ['train_step', 'fused_ce', 'param_shardings',
                                   'batch_sharding', 'restore_other_mesh',
                                   'moe_experts'])
def test_on_8_devices(device_checks, check):
  """train_step: data=8 / fsdp=8 / data=2 x fsdp=4 == one device (SGD and
  AdamW, 2 steps); restore_other_mesh: fsdp=8 -> 1 device and 2 x 4, and
  1 device -> fsdp=8, exactly; moe_experts: Gemma 4's experts one per
  device, the sharded forward equal to one device's."""
  assert device_checks[check] == 'ok', device_checks[check]
