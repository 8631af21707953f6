"""The training loop: resume equality (incl. SIGKILL), NaN stop, CLI, outputs.

Runs the tiny random-init config on the offline MTNT copy for a few steps.
A persistent XLA cache (per test session) lets the repeated runs, in-process
and in subprocesses, compile the train step only once.
"""

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt import fs, sharding, weights
from gemma_mt.train import checkpoints as ckpt_lib
from gemma_mt.train import config as config_lib
from gemma_mt.train import loop, steps
from gemma_mt.train import main as train_main
from gemma_mt.train import state as state_lib

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / 'configs' / 'tiny_test.py'
# Small and quick: batch 2 x 48 tokens, 4 steps, checkpoints every 2.
OVERRIDES = dict(batch_size=2, max_seq_len=48, max_steps=4, eval_every_n=2,
                 eval_max_batches=1, checkpoint_every_n=2, log_every_n=1,
                 optimizer='adamw', learning_rate=1e-3, progress=False)


@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory):
  path = tmp_path_factory.mktemp('xla_cache')
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (str(path), 0, 0)):
    jax.config.update(n, v)
  yield path
  for n, v in old.items():
    jax.config.update(n, v)


def tiny_config(workdir, mtnt_dir, **kw):
  cfg = config_lib.load_config_file(TINY)
  return dataclasses.replace(cfg, workdir=str(workdir), mtnt_dir=str(mtnt_dir),
                             **(OVERRIDES | kw))


def cli_args(workdir, mtnt_dir, **kw):
  args = ['--config', str(TINY), f'--workdir={workdir}',
          f'--mtnt_dir={mtnt_dir}']
  args += [f'--{k}={v}' for k, v in (OVERRIDES | kw).items()]
  return args


def run_cli(args, xla_cache, env_extra=None, **popen_kw):
  env = dict(os.environ, **(env_extra or {}), JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(xla_cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return subprocess.Popen([sys.executable, '-m', 'gemma_mt.train', *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen_kw)


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, mtnt_dir, xla_cache):
  workdir = tmp_path_factory.mktemp('full')
  params = loop.train_loop(tiny_config(workdir, mtnt_dir))
  return workdir, jax.device_get(params)


def test_uninterrupted_run_outputs(uninterrupted):
  workdir, params = uninterrupted
  import json
  records = [json.loads(l) for l in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  valid = [r['step'] for r in records if r['split'] == 'valid']
  train = [r for r in records if r['split'] == 'train']
  assert valid == [0, 2, 4]  # Before the first step, then every 2.
  assert [r['step'] for r in train] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) and r['tokens_per_s'] > 0 for r in train)
  assert (workdir / 'loss.png').stat().st_size > 1000
  assert list((workdir / 'tensorboard').iterdir())
  ckpts = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert ckpts == [2, 4]
  # The tuned model loads like any model dir.
  loaded = weights.load_dir(workdir / 'final')
  assert loaded.arch == 'tiny'
  assert loaded.tokenizer.vocab_size == 262_144
  assert_trees_equal(loaded.params, params)


def _largest_file(d):
  return max((p for p in d.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _overwrite(path, data):
  with open(path, 'r+b') as f:
    f.seek(min(4096, path.stat().st_size // 2))
    f.write(data)


DAMAGE = {
    'flipped_bytes': lambda d: _overwrite(_largest_file(d / 'state'), b'\xff' * 4096),
    'truncated': lambda d: os.truncate(_largest_file(d / 'state'), 100),
    'emptied_meta': lambda d: [p.write_text('') for p in (d / 'meta').rglob('*')
                               if p.is_file()],
    'deleted_state': lambda d: shutil.rmtree(d / 'state'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(damage, uninterrupted, tmp_path,
                                              mtnt_dir, xla_cache, caplog):
  """Resume checks each checkpoint's CRCs: a damaged newest one is named
  and moved aside, the older one resumes, and the run ends as if nothing
  had happened."""
  workdir, expect = uninterrupted
  shutil.copytree(workdir / 'checkpoints', tmp_path / 'checkpoints')
  shutil.copytree(workdir / 'checkpoints.crc', tmp_path / 'checkpoints.crc')
  DAMAGE[damage](tmp_path / 'checkpoints' / '4')
  with caplog.at_level('WARNING'):
    got = loop.train_loop(tiny_config(tmp_path, mtnt_dir, resume=True))
  assert f"checkpoint {tmp_path / 'checkpoints' / '4'} is damaged" in caplog.text
  assert (tmp_path / 'checkpoints' / '4.damaged').is_dir()
  assert_trees_equal(jax.device_get(got), expect)  # Resumed from step 2.


def test_sigkill_then_resume_cli(uninterrupted, tmp_path, mtnt_dir,
                                 xla_cache):
  """A real kill -9 after the step-2 checkpoint; the resumed run matches."""
  _, expect = uninterrupted
  args = cli_args(tmp_path, mtnt_dir)
  proc = run_cli(args, xla_cache)
  ckpt = tmp_path / 'checkpoints' / '2'
  deadline = time.time() + 300
  while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  assert not (tmp_path / 'final').exists()
  proc = run_cli(args + ['--resume'], xla_cache)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  assert 'resumed from step 2' in out
  loaded = weights.load_dir(tmp_path / 'final')
  assert_trees_equal(loaded.params, expect)
  assert (tmp_path / 'loss.png').exists()


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, mtnt_dir,
                                                  monkeypatch, xla_cache):
  real = steps.make_train_step

  def poisoned(*a, **kw):
    step_fn, count = real(*a, **kw), [0]

    def wrapped(state, batch):
      state, m = step_fn(state, batch)
      count[0] += 1
      if count[0] == 3:
        m = dict(m, loss=jnp.float32(jnp.nan))
      return state, m
    return wrapped

  monkeypatch.setattr(steps, 'make_train_step', poisoned)
  cfg = tiny_config(tmp_path, mtnt_dir, eval_every_n=0)
  with pytest.raises(loop.TrainingDivergedError,
                     match=r'at step 3 .*last good checkpoint: step 2'):
    loop.train_loop(cfg)
  ckpts = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  assert ckpts == ['2']
  assert not (tmp_path / 'final').exists()
  before = (tmp_path / 'config.json').read_bytes()
  with pytest.raises(ValueError, match='--resume'):
    # Never silently restarts over checkpoints, nor rewrites the run's files.
    loop.train_loop(dataclasses.replace(cfg, learning_rate=0.5))
  assert (tmp_path / 'config.json').read_bytes() == before
  with pytest.raises(ValueError, match='--resume: no checkpoint in'):
    loop.train_loop(tiny_config(tmp_path / 'new', mtnt_dir, resume=True))
  assert not (tmp_path / 'new' / 'config.json').exists()
  # The kept checkpoint restores, finite.
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1))
  state = state_lib.init_train(cfg, mesh).state
  mngr = ckpt_lib.checkpoint_manager(cfg)
  state, data_step = ckpt_lib.restore_checkpoint(mngr, 2, state)
  mngr.close()
  assert data_step == 2
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state.params))


def _tree_files(d: Path) -> dict:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*'))
          if p.is_file()}


@pytest.mark.parametrize('change,message', [
    (dict(batch_size=4), r"data settings differ .*--batch_size 2 → 4.*--force_resume"),
    (dict(max_seq_len=64), r"--max_seq_len 48 → 64"),
    (dict(optimizer='sgd'), r"other settings \(--optimizer 'adamw' → 'sgd'\)"),
    (dict(lora_rank=4), r"--lora_rank 0 → 4"),
])
def test_resume_refuses_changed_settings_and_changes_nothing(
    change, message, uninterrupted, tmp_path, mtnt_dir):
  workdir, _ = uninterrupted
  shutil.copytree(workdir, tmp_path / 'run')
  before = _tree_files(tmp_path / 'run')
  with pytest.raises(ValueError, match=message):
    loop.train_loop(tiny_config(tmp_path / 'run', mtnt_dir, resume=True, **change))
  assert _tree_files(tmp_path / 'run') == before


def test_force_resume_goes_on_with_new_data_settings(uninterrupted, tmp_path,
                                                     mtnt_dir, xla_cache, caplog):
  workdir, _ = uninterrupted
  shutil.copytree(workdir, tmp_path / 'run')
  killed_save = tmp_path / 'run' / 'checkpoints' / '6.orbax-checkpoint-tmp'
  killed_save.mkdir()  # What a save killed by disk full leaves.
  (killed_save / 'junk').write_bytes(b'x' * 100)
  with caplog.at_level('INFO'):
    loop.train_loop(tiny_config(tmp_path / 'run', mtnt_dir, resume=True,
                                force_resume=True, max_seq_len=64, max_steps=5))
  assert 'resumed from step 4' in caplog.text
  assert not killed_save.exists()
  import json
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['max_seq_len'] == 64


def test_checkpoint_of_another_model_is_named_not_moved(uninterrupted, tmp_path,
                                                        mtnt_dir):
  """Without config.json to compare, the checkpoint's own tree metadata
  names the first array that differs; the checkpoints stay where they are."""
  workdir, _ = uninterrupted
  shutil.copytree(workdir, tmp_path / 'run')
  (tmp_path / 'run' / 'config.json').unlink()
  before = _tree_files(tmp_path / 'run' / 'checkpoints')
  with pytest.raises(ValueError, match=r'written by another model, optimizer or '
                     r'LoRA config: the checkpoint has \d+ arrays, \d+ expected'):
    loop.train_loop(tiny_config(tmp_path / 'run', mtnt_dir, resume=True,
                                optimizer='sgd'))
  assert _tree_files(tmp_path / 'run' / 'checkpoints') == before


def test_failed_start_leaves_no_workdir(tmp_path, mtnt_dir):
  with pytest.raises(ValueError, match='--mtnt_dir .*no_mtnt: no such directory'):
    loop.train_loop(tiny_config(tmp_path / 'new', tmp_path / 'no_mtnt'))
  assert not (tmp_path / 'new').exists()
  (tmp_path / 'empty_mtnt').mkdir()
  with pytest.raises(FileNotFoundError, match='MTNT file not found'):
    loop.train_loop(tiny_config(tmp_path / 'new', tmp_path / 'empty_mtnt'))
  assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(
    signum, uninterrupted, tmp_path, mtnt_dir, monkeypatch, xla_cache, capsys):
  """A signal during step 3 (no checkpoint due): the run saves step 3, ends
  with one line (exit 130) that holds the resume command, and that command
  ends where an uninterrupted run ends."""
  real = steps.make_train_step

  def signalling(*a, **kw):
    step_fn, count = real(*a, **kw), [0]

    def wrapped(state, batch):
      count[0] += 1
      if count[0] == 3:
        os.kill(os.getpid(), signum)
      return step_fn(state, batch)
    return wrapped

  argv = cli_args(tmp_path, mtnt_dir)
  with monkeypatch.context() as m:
    m.setattr(steps, 'make_train_step', signalling)
    assert train_main.main(argv) == 130
  err = [l for l in capsys.readouterr().err.splitlines()
         if l.startswith('interrupted')]
  assert len(err) == 1, err
  assert f'{signal.Signals(signum).name} at step 3: checkpoint saved' in err[0]
  command = err[0].split('resume with: ')[1]
  assert command.endswith('--resume')
  assert (tmp_path / 'checkpoints' / '3').is_dir()
  assert not (tmp_path / 'final').exists()
  assert train_main.main(shlex.split(command)[3:]) == 0
  assert_trees_equal(weights.load_dir(tmp_path / 'final').params,
                     uninterrupted[1])


# Where a signal can land in a run: (module, function, which call). Inside the
# step loop it is honoured at the next step boundary; outside (set-up, the
# first validation, the final save) it interrupts there.
SIGNAL_POINTS = {
    'loading the model': (loop, 'init_model', 1),
    'validation before step 1': (loop, 'validation_loss', 1),
    'validation at step 2': (loop, 'validation_loss', 2),
    'checkpoint save at step 2': (ckpt_lib, 'save_checkpoint', 1),
    'writing final/': (fs, 'write_manifest', 1),
}


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize('point', SIGNAL_POINTS)
def test_a_signal_anywhere_leaves_a_run_its_command_completes(
    point, signum, uninterrupted, tmp_path, mtnt_dir, monkeypatch, xla_cache,
    capsys, default_sigint):
  """Generated over the points of a run: exit 130, one line, no traceback,
  nothing half-written; the command in that line (resume, or start again
  when nothing was saved) ends where an uninterrupted run ends."""
  module, attr, at = SIGNAL_POINTS[point]
  real, calls = getattr(module, attr), [0]

  def signalling(*a, **kw):
    calls[0] += 1
    if calls[0] == at:
      os.kill(os.getpid(), signum)
    return real(*a, **kw)

  workdir = tmp_path / 'run'
  argv = cli_args(workdir, mtnt_dir)
  with monkeypatch.context() as m:
    m.setattr(module, attr, signalling)
    assert train_main.main(argv) == 130
  assert calls[0] >= at
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  lines = [l for l in err.splitlines() if l.startswith('interrupted')]
  assert len(lines) == 1, err
  assert not (workdir / 'final').exists()
  assert not list(workdir.glob('.*tmp*')) if workdir.exists() else True
  command = lines[0].split(' with: ')[1]
  assert command.endswith('--resume') == bool(ckpt_lib.saved_steps(workdir))
  assert train_main.main(shlex.split(command)[3:]) == 0
  assert_trees_equal(weights.load_dir(workdir / 'final').params,
                     uninterrupted[1])


def test_resume_refuses_changed_training_data(tmp_path, mtnt_dir, xla_cache):
  data = tmp_path / 'mtnt'
  shutil.copytree(mtnt_dir, data)
  loop.train_loop(tiny_config(tmp_path / 'run', data, max_steps=2))
  train = data / 'train' / 'train.en-fr.tsv'
  rows = train.read_text().splitlines(keepends=True)
  train.write_text(''.join(rows[:300][::-1]))  # Fewer rows, reordered.
  before = _tree_files(tmp_path / 'run')
  with pytest.raises(ValueError, match='training data changed'):
    loop.train_loop(tiny_config(tmp_path / 'run', data, resume=True))
  assert _tree_files(tmp_path / 'run') == before


def test_blown_up_params_are_divergence_and_never_saved(tmp_path, mtnt_dir,
                                                       xla_cache, monkeypatch):
  """lr 1e30 (past what the config accepts, as a library caller can set
  it): the loss of step 1 is finite (it is computed before the update) but
  the params it leaves are not sane; nothing is saved."""
  cfg = tiny_config(tmp_path, mtnt_dir, optimizer='sgd', learning_rate=1.0,
                    checkpoint_every_n=1, eval_every_n=0)
  cfg.learning_rate = 1e30
  monkeypatch.setattr(type(cfg), 'check', lambda self: None)
  with pytest.raises(loop.TrainingDivergedError,
                     match=r'diverged at step 1 .*param_norm=.*no checkpoint '
                           r'was written'):
    loop.train_loop(cfg)
  assert not list((tmp_path / 'checkpoints').glob('[0-9]*'))


def test_parse_args_types_and_errors():
  cfg = train_main.parse_args(
      ['--config', str(TINY), '--max_steps', '7', '--learning_rate=0.5',
       '--grad_clip=none', '--remat', '--packing=false', '--mtnt_dir', '/'])
  assert (cfg.max_steps, cfg.learning_rate, cfg.grad_clip, cfg.remat,
          cfg.packing, cfg.mtnt_dir, cfg.model) == (7, 0.5, None, True, False,
                                                    '/', 'tiny')
  assert train_main.parse_args(['--max_steps=none']).max_steps is None
  assert train_main.parse_args([]).model == 'gemma3_270m'
  assert train_main.parse_args(['--packing', '--seed', '3']).packing


@pytest.mark.parametrize('argv,message', [
    (['--lr=1'], 'error: unrecognized arguments: --lr=1'),
    (['--batch_size=four'], "--batch_size: expects int, got 'four'"),
    (['--remat=maybe'], "--remat: expects true/false, got 'maybe'"),
    (['--config', 'nope.py'], 'error: --config nope.py: no such file'),
    (['--batch_size', '-2'], 'error: --batch_size must be >= 1, got -2'),
    (['--grad_accum_steps', '0'], '--grad_accum_steps must be >= 1'),
    (['--learning_rate', '-1'], '--learning_rate must be in (0, 100.0], got -1.0'),
    (['--dtype', 'float99'], "--dtype: unknown dtype 'float99'"),
    (['--optimizer', 'lion'], '--optimizer must be one of'),
    (['--lr_schedule', 'step'], '--lr_schedule must be one of'),
])
def test_main_reports_bad_options_in_one_line(argv, message, capsys):
  assert train_main.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.count('\n') == 1, err


def test_configs_load():
  for name in ('mtnt_gemma3_270m', 'tutorial_gemma_2b_it', 'tiny_test'):
    cfg = config_lib.load_config_file(ROOT / 'configs' / f'{name}.py')
    cfg.check()
  tut = config_lib.load_config_file(ROOT / 'configs' / 'tutorial_gemma_2b_it.py')
  assert (tut.model, tut.optimizer, tut.learning_rate, tut.batch_size,
          tut.max_seq_len, tut.eval_every_n) == ('gemma_2b_it', 'sgd', 1e-4, 4,
                                                 128, 20)
  with pytest.raises(ValueError, match='multiple'):
    dataclasses.replace(tut, grad_accum_steps=3).check()


# ------------------------------------------------------------------ LoRA


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory, mtnt_dir, xla_cache):
  workdir = tmp_path_factory.mktemp('lora')
  cfg = tiny_config(workdir, mtnt_dir, lora_rank=4, lora_alpha=8.0,
                    prompt_format='chat')
  merged = loop.train_loop(cfg)
  return cfg, workdir, jax.device_get(merged)


def test_lora_trains_adapters_only(lora_run):
  cfg, workdir, merged = lora_run
  base = weights.load_dir(workdir / 'base')
  # Checkpoints hold the adapters and their optimizer state, nothing else.
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(workdir / 'checkpoints' / '4' / 'state')
  meta = getattr(meta, 'item_metadata', meta)
  keys = [jax.tree_util.keystr(k) for k, _ in
          jax.tree_util.tree_leaves_with_path(dict(meta)['params'])]
  assert keys and all(k.endswith(("_lora_a']", "_lora_b']")) for k in keys)
  # Merged = base + alpha/rank * A @ B; the adapters dir reloads to it.
  from gemma_mt import lora
  adapters, lcfg, _ = weights.adapters.load(workdir / 'adapters')
  assert (lcfg.rank, lcfg.alpha) == (4, 8.0)
  assert lora.count_params(adapters) < 0.2 * lora.count_params(base.params)
  assert_trees_equal(weights.load_dir(workdir / 'adapters').params, merged)
  assert_trees_equal(weights.load_dir(workdir / 'final').params, merged)
  # Trained in the chat format: both outputs say so, for translate/evaluate.
  assert weights.load_dir(workdir / 'adapters').prompt_format == 'chat'
  assert weights.load_dir(workdir / 'final').prompt_format == 'chat'
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(merged), jax.tree.leaves(base.params))]
  assert any(moved)
  # Untargeted weights (embedding, norms) are the base's, bit for bit.
  np.testing.assert_array_equal(merged['embedder']['input_embedding'],
                                base.params['embedder']['input_embedding'])


def test_lora_resume_equals_uninterrupted(lora_run, tmp_path, mtnt_dir,
                                          xla_cache):
  cfg, _, expect = lora_run
  cfg = dataclasses.replace(cfg, workdir=str(tmp_path))
  loop.train_loop(dataclasses.replace(cfg, max_steps=2))
  got = loop.train_loop(dataclasses.replace(cfg, resume=True))
  assert_trees_equal(jax.device_get(got), expect)


def test_qlora_int4_run_reloads_exactly(tmp_path, mtnt_dir, xla_cache):
  cfg = tiny_config(tmp_path, mtnt_dir, lora_rank=4, lora_quant='int4',
                    max_steps=2, eval_every_n=2)
  merged = jax.device_get(loop.train_loop(cfg))
  # load_dir quantizes the base as training did, then merges.
  assert_trees_equal(weights.load_dir(tmp_path / 'adapters').params, merged)
  with pytest.raises(ValueError, match='lora_rank'):
    dataclasses.replace(cfg, lora_rank=0).check()
  with pytest.raises(ValueError, match='targets'):
    dataclasses.replace(cfg, lora_targets='q,ffn').check()


# ----------------------------------------------- 8 fake devices (subprocess)


def test_sharded_run_equals_one_device_and_resumes_on_one(
    tmp_path, mtnt_dir, xla_cache):
  """data=2 x fsdp=4 on 8 CPU devices == 1 device; its checkpoint resumes
  on 1 device (a mesh-changing restore inside the loop)."""
  kw = dict(batch_size=8, dtype='float32', optimizer='sgd', learning_rate=0.1)
  ref = jax.device_get(loop.train_loop(
      tiny_config(tmp_path / 'one', mtnt_dir, **kw)))
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = run_cli(cli_args(tmp_path / 'eight', mtnt_dir, mesh_data=2,
                          mesh_fsdp=4, **kw), xla_cache, env_extra=env)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "8 device(s), mesh {'data': 2, 'fsdp': 4}" in out
  eight = weights.load_dir(tmp_path / 'eight' / 'final').params
  for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
  # Resume the 8-device run's step-2 checkpoint on this single device.
  import shutil
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'eight' / 'checkpoints', resumed / 'checkpoints')
  shutil.rmtree(resumed / 'checkpoints' / '4')
  got = loop.train_loop(tiny_config(resumed, mtnt_dir, resume=True, **kw))
  for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_batch_must_split_over_the_mesh(tmp_path, mtnt_dir):
  cfg = tiny_config(tmp_path, mtnt_dir, batch_size=2, grad_accum_steps=2)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1))
  loop.check_mesh(cfg, mesh)  # 1 row per micro-batch on 1 device: ok.
  fake = type('M', (), {'shape': {'data': 2, 'fsdp': 1}})()
  with pytest.raises(ValueError, match=r'batch_size / grad_accum_steps = 1 '
                     r'rows does not split over the 2 devices'):
    loop.check_mesh(cfg, fake)


# ----------------------------------------------- translation quality


def _records(workdir, split):
  import json
  lines = (Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if r['split'] == split]


def _best(workdir):
  import json
  best = json.loads((Path(workdir) / 'best.json').read_text())
  return {k: best[k] for k in ('step', 'bleu', 'bleu_intl', 'chrf', 'runaway')}


BLEU_KW = dict(eval_bleu_every_n=2, eval_bleu_sentences=3,
               eval_bleu_batch_size=4)


def test_bleu_evaluation_keeps_the_best_and_resume_keeps_it(
    tmp_path, mtnt_dir, xla_cache):
  loop.train_loop(tiny_config(tmp_path / 'a', mtnt_dir, **BLEU_KW))
  q = _records(tmp_path / 'a', 'valid_translation')
  assert [r['step'] for r in q] == [0, 2, 4]
  assert all({'bleu', 'bleu_intl', 'chrf', 'runaway'} <= set(r) for r in q)
  top = max(q, key=lambda r: (r['chrf'], -r['step']))  # Ties: the first.
  assert _best(tmp_path / 'a')['step'] == top['step']
  assert _best(tmp_path / 'a')['chrf'] == top['chrf']
  assert weights.load_dir(tmp_path / 'a' / 'best').arch == 'tiny'
  # Stopped after step 2 and resumed: the same record of the best.
  loop.train_loop(tiny_config(tmp_path / 'b', mtnt_dir, max_steps=2, **BLEU_KW))
  loop.train_loop(tiny_config(tmp_path / 'b', mtnt_dir, resume=True, **BLEU_KW))
  assert _best(tmp_path / 'b') == _best(tmp_path / 'a')


def test_averages_compete_for_best_with_the_training_levers(
    tmp_path, mtnt_dir, xla_cache):
  """ema_decay and average_last_k score their averages at every evaluation
  beside the params; best/ is the best of them (by chrF) and says which.
  Run with label smoothing and both directions on, which must just train."""
  loop.train_loop(tiny_config(tmp_path, mtnt_dir, ema_decay=0.5,
                              average_last_k=2, label_smoothing=0.1,
                              both_directions=True, **BLEU_KW))
  raw = _records(tmp_path, 'valid_translation')
  ema = _records(tmp_path, 'valid_translation_ema')
  last = _records(tmp_path, 'valid_translation_last_k')
  assert [r['step'] for r in raw] == [r['step'] for r in ema] == [0, 2, 4]
  assert [r['step'] for r in last] == [2, 4]  # A mean needs two evaluations.
  assert all({'copied', 'off_target'} <= set(r) for r in raw + ema + last)
  assert raw[0]['chrf'] == ema[0]['chrf']  # The average starts at the init.
  best = json.loads((tmp_path / 'best.json').read_text())
  pool = [(r['chrf'], 'params', r['step']) for r in raw]
  pool += [(r['chrf'], 'ema', r['step']) for r in ema]
  pool += [(r['chrf'], 'last_2', r['step']) for r in last]
  assert best['chrf'] == max(c for c, _, _ in pool)
  assert (best['chrf'], best['weights'], best['step']) in pool
  assert weights.load_dir(tmp_path / 'best').arch == 'tiny'


@pytest.mark.parametrize('damage', ['deleted', 'bit-flipped'])
def test_resume_forgets_a_damaged_best_and_never_names_it(
    damage, tmp_path, mtnt_dir, xla_cache, caplog):
  loop.train_loop(tiny_config(tmp_path, mtnt_dir, max_steps=2, **BLEU_KW))
  best = tmp_path / 'best'
  if damage == 'deleted':
    shutil.rmtree(best)
  else:
    f = max((p for p in best.rglob('*') if p.is_file()),
            key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[:4096] = bytes(b ^ 0xFF for b in data[:4096])
    f.write_bytes(bytes(data))
  with caplog.at_level('INFO'):
    loop.train_loop(tiny_config(tmp_path, mtnt_dir, resume=True, **BLEU_KW))
  assert 'forgetting the best record' in caplog.text
  # The next evaluation set a new best, which is there and loads.
  assert _best(tmp_path)['step'] == 4
  assert weights.load_dir(best).arch == 'tiny'


def test_early_stop_after_patience(tmp_path, mtnt_dir, xla_cache, monkeypatch):
  from gemma_mt.train import quality
  chrfs = iter([30.0, 20.0, 25.0, 40.0])  # Best at step 0, then worse.
  monkeypatch.setattr(quality.QualityTracker, 'score', lambda self, p: dict(
      bleu=1.0, bleu_intl=1.0, chrf=next(chrfs), runaway=0, copied=0,
      off_target=0, seconds=0.0))
  cfg = tiny_config(tmp_path, mtnt_dir, early_stop_patience=2,
                    eval_bleu_every_n=1, max_steps=4)
  loop.train_loop(cfg)
  assert [r['step'] for r in _records(tmp_path, 'valid_translation')] == [0, 1, 2]
  assert _records(tmp_path, 'train')[-1]['step'] == 2
  assert _best(tmp_path)['step'] == 0 and (tmp_path / 'final').is_dir()


def test_sigkill_keeps_the_best_record(tmp_path, mtnt_dir, xla_cache):
  """kill -9 after step 2's BLEU evaluation, then --resume: best.json is the
  best over every evaluation of both processes, not of the second alone."""
  args = cli_args(tmp_path, mtnt_dir, **BLEU_KW)
  proc = run_cli(args, xla_cache)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline and not (
      metrics.exists() and
      any(r['step'] == 2 for r in _records(tmp_path, 'valid_translation'))):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  proc = run_cli(args + ['--resume'], xla_cache)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  q = _records(tmp_path, 'valid_translation')
  assert [r['step'] for r in q] == [0, 2, 4]
  top = max(q, key=lambda r: (r['chrf'], -r['step']))
  assert (_best(tmp_path)['step'], _best(tmp_path)['chrf']) == (top['step'],
                                                                 top['chrf'])
