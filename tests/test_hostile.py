"""A hostile user's pass, generated from tables: every case is a class of
mistake crossed with every place it can be made.

Each case asserts the exit status, at most 5 lines of stderr with no
traceback naming the offending flag, field or path, and that a byte snapshot
of every file that must not change did not change. Classes:

* outputs aimed at inputs: every output flag of evaluate and export × each
  input, a parent of an input, the working directory, a link to an input,
  and a directory the package did not write;
* bad flag values: each numeric and path flag of evaluate, translate, export
  and train × negative, zero, huge, non-finite, wrong type, missing, a file
  where a dir is wanted and the reverse;
* disk full and permissions: a simulated ENOSPC at each step of the write
  layer, for every kind of output;
* two processes on one workdir or output;
* damaged model dirs: deleted, truncated, bit-flipped and added files;
* config files that raise, exit, misspell or mistype a field;
* HF dirs whose config.json disagrees with their tensors;
* the public Python API called with random argument types.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.tiny import make_tiny_translator, tiny_params

from gemma_mt import cli as cli_lib
from gemma_mt import evaluate as E
from gemma_mt import export as X
from gemma_mt import fs
from gemma_mt import translate as T
from gemma_mt import translator as translator_lib
from gemma_mt import weights
from gemma_mt.decoding.options import SamplingOptions
from gemma_mt.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TSV = 'id\tsource\ttarget\n'


def snapshot(root: Path) -> dict[str, str]:
  """Path → sha256 of every file under `root` (links not followed)."""
  out = {}
  for p in sorted(root.rglob('*')):
    if p.is_file() and not p.is_symlink():
      out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def one_line_error(err: str, *names: str) -> None:
  lines = [l for l in err.splitlines()
           if l.strip() and 'compile cache' not in l]
  assert 1 <= len(lines) <= 5, err
  assert 'Traceback' not in err, err
  for name in names:
    assert name in err, (name, err)


@pytest.fixture(scope='module')
def world(tmp_path_factory, tokenizer):
  """A user's files: a model dir the package wrote, data, a text input, a
  dir of the user's own, and a link to the model."""
  root = tmp_path_factory.mktemp('world')
  model = weights.save(root / 'run' / 'final', 'tiny', tiny_params(), tokenizer)
  data = root / 'data'
  (data / 'valid').mkdir(parents=True)
  rows = ''.join(f'{i}\tHello number {i}.\tBonjour numéro {i}.\n'
                 for i in range(4))
  (data / 'valid' / 'valid.en-fr.tsv').write_text(rows)
  (root / 'd.tsv').write_text(rows)
  (root / 'in.txt').write_text('Hello\nWorld\n')
  (root / 'mine').mkdir()
  (root / 'mine' / 'notes.txt').write_text('the user\'s own words')
  (root / 'link_to_model').symlink_to(model)
  return root


@pytest.fixture
def no_work(world, monkeypatch):
  """In the user's world, where loading a model or training fails the test:
  a refusal must come before any work."""
  monkeypatch.chdir(world)
  monkeypatch.setattr(cli_lib, 'build_translator',
                      lambda a: pytest.fail('loaded a model'))
  from gemma_mt.train import loop
  monkeypatch.setattr(loop, 'train_loop', lambda c: pytest.fail('trained'))


# ------------------------------------------------------ outputs aimed at inputs

def _evaluate_argv(w: Path, flag: str, target: str) -> list[str]:
  argv = ['--tsv', str(w / 'd.tsv'), '--checkpoint', str(w / 'run' / 'final')]
  outs = {'--output': str(w / 'out' / 'h.txt'),
          '--summary': str(w / 'out' / 's.json'), '--report': None}
  outs[flag] = target
  return argv + [a for k, v in outs.items() if v for a in (k, v)]


TARGETS = {  # name → (path under the world, what the message names)
    'the --tsv input': ('d.tsv', '--tsv'),
    'the checkpoint': ('run/final', '--checkpoint'),
    'a file in the checkpoint': ('run/final/gemma_mt.json', '--checkpoint'),
    'the parent of the checkpoint': ('run', '--checkpoint'),
    'a link to the checkpoint': ('link_to_model', '--checkpoint'),
    'the working directory': ('.', 'working directory'),
}


def _out_cases():
  for flag in ('--output', '--summary', '--report'):
    for name in TARGETS:
      if name == 'a file in the checkpoint' and flag != '--output':
        continue
      yield pytest.param('evaluate', flag, name, id=f'evaluate {flag} at {name}')
  for to in ('hf', 'gguf', 'peft'):
    for name in TARGETS:
      if name == 'the --tsv input':  # Not an input of export.
        continue
      yield pytest.param(f'export --to {to}', 'OUT', name,
                         id=f'export {to} OUT at {name}')


@pytest.mark.parametrize('cmd,flag,target', list(_out_cases()))
def test_outputs_aimed_at_inputs_are_refused(cmd, flag, target, world,
                                             no_work, capsys):
  path, named = TARGETS[target]
  path = str(world / path)
  before = snapshot(world)
  if cmd == 'evaluate':
    code = E.main(_evaluate_argv(world, flag, path))
  else:
    to = cmd.split()[-1]
    code = X.main([path, '--to', to, '--checkpoint',
                   str(world / 'run' / 'final'), '--overwrite'])
  assert code == 2
  one_line_error(capsys.readouterr().err, named)
  assert snapshot(world) == before


@pytest.mark.parametrize('to', ['hf', 'peft'])
@pytest.mark.parametrize('overwrite', [False, True])
def test_export_never_replaces_a_dir_it_did_not_write(to, overwrite, world,
                                                      capsys):
  before = snapshot(world)
  argv = [str(world / 'mine'), '--to', to, '--checkpoint',
          str(world / 'run' / 'final')] + ['--overwrite'] * overwrite
  assert X.main(argv) == 2
  one_line_error(capsys.readouterr().err, str(world / 'mine'))
  assert snapshot(world) == before


def test_atomic_dir_replaces_only_its_own(tmp_path):
  """A dir the package wrote is replaced; one with a file the package did
  not write (or without the manifest) never is."""
  d = tmp_path / 'm'
  with fs.atomic_dir(d) as t:
    t.mkdir()
    (t / 'a').write_text('1')
  with fs.atomic_dir(d, overwrite=True) as t:
    t.mkdir()
    (t / 'a').write_text('2')
  assert (d / 'a').read_text() == '2' and fs.verify_dir(d)
  (d / 'user.txt').write_text('mine')
  with pytest.raises(fs.UnsafeOutputError, match='not written by gemma_mt'):
    with fs.atomic_dir(d, overwrite=True) as t:
      pytest.fail('reached the body')
  (d / 'user.txt').unlink()
  (d / fs.MANIFEST).unlink()
  with pytest.raises(fs.UnsafeOutputError, match='not written by gemma_mt'):
    with fs.atomic_dir(d, overwrite=True):
      pytest.fail('reached the body')
  assert (d / 'a').read_text() == '2'


# ---------------------------------------------------------------- bad values

BAD_NUMBERS = {'negative': '-3', 'zero': '0', 'huge': '1e30', 'nan': 'nan',
               'inf': 'inf', 'word': 'four', 'empty': ''}
NUMERIC_FLAGS = {  # cli → flags that take numbers (no default of 0 allowed)
    'translate': ['--batch_size', '--max_new_tokens', '--temperature',
                  '--top_k', '--top_p', '--beam_size', '--max_length_ratio',
                  '--max_input_tokens', '--epsilon', '--mbr'],
    'evaluate': ['--batch_size', '--limit', '--max_new_tokens', '--top_p',
                 '--beam_size'],
    'train': ['--batch_size', '--learning_rate', '--max_seq_len',
              '--num_epochs', '--max_steps', '--warmup_steps',
              '--checkpoint_every_n', '--weight_decay', '--label_smoothing'],
    'serve': ['--port', '--max_queued', '--max_body_bytes',
              '--graceful_timeout', '--body_timeout', '--batch_size',
              '--max_new_tokens', '--temperature'],
}
# Values that a flag may legitimately take.
ALLOWED = {('--temperature', 'zero'), ('--mbr', 'zero'), ('--warmup_steps', 'zero'),
           ('--weight_decay', 'zero'), ('--label_smoothing', 'zero'), ('--max_length_ratio', 'zero'),
           ('--max_length_ratio', 'huge'), ('--max_input_tokens', 'huge')}


# '' means "none" for these (the field's default), as 'none' does.
OPTIONAL = {'--temperature', '--top_k', '--top_p', '--max_length_ratio', '--epsilon',
            '--max_steps', '--limit'}


def _main(cmd):
  from gemma_mt import serve
  return {'translate': T.main, 'evaluate': E.main, 'train': train_main.main,
          'export': X.main, 'serve': serve.main}[cmd]


def _base_argv(cmd, w: Path):
  if cmd == 'translate':
    return ['Hello']
  if cmd == 'evaluate':
    return ['--tsv', str(w / 'd.tsv'), '--output', str(w / 'o' / 'h.txt')]
  if cmd == 'train':
    return ['--mtnt_dir', str(w / 'data'), '--workdir', str(w / 'tw')]
  if cmd == 'serve':
    return []
  return [str(w / 'x'), '--to', 'hf']


def _value_cases():
  for cmd, flags in NUMERIC_FLAGS.items():
    for flag, (kind, value) in itertools.product(flags, BAD_NUMBERS.items()):
      if (flag, kind) in ALLOWED or (kind == 'empty' and flag in OPTIONAL):
        continue
      yield pytest.param(cmd, flag, value, id=f'{cmd} {flag} {kind}')


@pytest.mark.parametrize('cmd,flag,value', list(_value_cases()))
def test_bad_numbers_one_line_before_any_work(cmd, flag, value, world,
                                              no_work, capsys):
  before = snapshot(world)
  code = _main(cmd)(_base_argv(cmd, world) + [f'{flag}={value}'])
  assert code == 2
  one_line_error(capsys.readouterr().err, flag.lstrip('-'))
  assert snapshot(world) == before


PATH_CASES = {  # flag → kinds of wrong path (a file, a dir, missing)
    ('evaluate', '--tsv'): ('dir', 'missing'),
    ('evaluate', '--mtnt_dir'): ('file', 'missing'),
    ('evaluate', '--checkpoint'): ('file', 'missing'),
    ('evaluate', '--compare_checkpoint'): ('file', 'missing'),
    ('evaluate', '--output'): ('dir',),
    ('evaluate', '--summary'): ('dir',),
    ('translate', '--input'): ('dir', 'missing'),
    ('translate', '--checkpoint'): ('file', 'missing'),
    ('export', '--checkpoint'): ('file', 'missing'),
    ('train', '--workdir'): ('file',),
    ('train', '--mtnt_dir'): ('file', 'missing'),
    ('train', '--config'): ('dir', 'missing'),
}


def _path_cases():
  for (cmd, flag), kinds in PATH_CASES.items():
    for kind in kinds:
      yield pytest.param(cmd, flag, kind, id=f'{cmd} {flag} {kind}')


@pytest.mark.parametrize('cmd,flag,kind', list(_path_cases()))
def test_wrong_paths_one_line_before_any_work(cmd, flag, kind, world,
                                              no_work, capsys):
  path = {'file': world / 'in.txt', 'dir': world / 'mine',
          'missing': world / 'nowhere' / 'x'}[kind]
  argv = _base_argv(cmd, world)
  if flag in argv:
    i = argv.index(flag)
    del argv[i:i + 2]
  if cmd == 'translate' and flag == '--input':
    argv = []
  if cmd == 'evaluate' and flag == '--mtnt_dir':
    argv = argv[2:]
  before = snapshot(world)
  code = _main(cmd)(argv + [flag, str(path)])
  assert code == 2
  one_line_error(capsys.readouterr().err, flag)
  assert snapshot(world) == before


# ----------------------------------------------------- disk full, permissions

WRITERS = {
    'model dir': lambda p, tok: weights.save(p, 'tiny', tiny_params(), tok,
                                             overwrite=True),
    'file': lambda p, tok: fs.atomic_write(p, 'new'),
    'gguf': None,  # below: needs a Gemma 3 config
}
FAULTS = {  # where the write layer fails, and how
    'enospc at fsync': ('fsync', errno.ENOSPC),
    'enospc at rename': ('rename', errno.ENOSPC),
    'enospc at replace': ('replace', errno.ENOSPC),
    'eacces at mkdir': ('mkdir', errno.EACCES),
}


def _fault(monkeypatch, where, code):
  def fail(*a, **k):
    raise OSError(code, os.strerror(code))
  if where == 'mkdir':
    monkeypatch.setattr(Path, 'mkdir', fail)
  else:
    monkeypatch.setattr(fs.os, where, fail)


@pytest.mark.parametrize('fault', list(FAULTS))
@pytest.mark.parametrize('writer', ['model dir', 'file'])
def test_disk_full_is_one_line_and_keeps_what_was_there(writer, fault, tmp_path,
                                                        tokenizer, monkeypatch):
  target = tmp_path / 'out'
  WRITERS[writer](target, tokenizer)  # What was there before.
  before = snapshot(tmp_path)
  where, code = FAULTS[fault]
  with monkeypatch.context() as m:
    _fault(m, where, code)
    try:
      WRITERS[writer](target, tokenizer)
    except OSError as e:
      msg = str(e)
    else:
      msg = None
  if msg is not None:  # Else this step is not on this writer's path.
    assert str(target) in msg and '\n' not in msg, msg
    assert snapshot(tmp_path) == before
  assert [p.name for p in tmp_path.iterdir()] == ['out']  # No temporaries.


def test_temporaries_of_killed_writers_are_swept(tmp_path, caplog):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
  stale = fs.temp_path(tmp_path / 'out', pid=int(dead))
  stale.mkdir()
  (stale / 'big').write_bytes(b'x' * 1000)
  orbax = stale.with_name(stale.name + '.orbax-checkpoint-tmp')  # Derived.
  orbax.mkdir()
  kept = [fs.temp_path(tmp_path / 'other', pid=int(dead)),  # Another output's.
          tmp_path / f'.out.tmp-otherhost-{dead}']  # Another host's pid.
  for k in kept:
    k.mkdir()
  with fs.atomic_dir(tmp_path / 'out') as t:
    t.mkdir()
    (t / 'a').write_text('1')
  assert not stale.exists() and not orbax.exists()
  assert all(k.exists() for k in kept)
  assert 'left by a killed process' in caplog.text


def test_file_mode_is_kept(tmp_path):
  p = tmp_path / 'f'
  p.write_text('old')
  p.chmod(0o640)
  fs.atomic_write(p, 'new')
  assert p.read_text() == 'new' and (p.stat().st_mode & 0o777) == 0o640


# ------------------------------------------------------------- concurrency

HOLD = textwrap.dedent('''
    import sys, time
    from gemma_mt import fs
    with fs.RunLock(sys.argv[1], for_output=sys.argv[2] == '1'):
      print('held', flush=True)
      time.sleep(60)
''')


@pytest.mark.parametrize('for_output', [False, True], ids=['workdir', 'output'])
def test_second_process_is_refused_and_dead_holder_taken_over(
    for_output, tmp_path, caplog):
  target = tmp_path / 'w'
  proc = subprocess.Popen([sys.executable, '-c', HOLD, str(target),
                           str(int(for_output))], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'held'
    with pytest.raises(fs.RunLockedError, match=f'pid {proc.pid}'):
      with fs.RunLock(target, for_output=for_output):
        pytest.fail('got a held lock')
  finally:
    proc.kill()
    proc.wait()
  with fs.RunLock(target, for_output=for_output):  # The holder died.
    pass
  assert f'pid {proc.pid}' in caplog.text and 'no longer running' in caplog.text


def test_second_train_on_a_workdir_is_one_line(tmp_path, world, capsys):
  proc = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path), '0'],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'held'
    before = snapshot(tmp_path)
    code = train_main.main(['--config', str(ROOT / 'configs' / 'tiny_test.py'),
                            '--workdir', str(tmp_path),
                            '--mtnt_dir', str(world / 'data')])
  finally:
    proc.kill()
    proc.wait()
  assert code == 2
  one_line_error(capsys.readouterr().err, f'pid {proc.pid}')
  assert snapshot(tmp_path) == before


# ---------------------------------------------------------- damaged model dirs

def _damage(d: Path, how: str) -> str:
  files = sorted((p for p in d.rglob('*') if p.is_file()
                  and p.name != fs.MANIFEST), key=lambda p: -p.stat().st_size)
  f = files[0]
  if how == 'deleted':
    f.unlink()
  elif how == 'truncated':
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif how == 'bit-flipped':
    data = bytearray(f.read_bytes())
    for i in range(min(4096, len(data))):
      data[i] ^= 0xFF
    f.write_bytes(bytes(data))
  return f.name


@pytest.mark.parametrize('how', ['deleted', 'truncated', 'bit-flipped'])
@pytest.mark.parametrize('kind', ['final', 'hf export', 'adapters'])
def test_damaged_model_dirs_are_named_on_load(kind, how, tmp_path, tokenizer,
                                              capsys):
  if kind == 'final':
    d = weights.save(tmp_path / 'final', 'tiny', tiny_params(), tokenizer)
  elif kind == 'hf export':
    from gemma_mt import models
    from gemma_mt.weights import hf
    d = hf.write_dir(tmp_path / 'hf', models.resolve('tiny'), tiny_params(),
                     tokenizer, dtype='float32')
  else:
    import jax

    from gemma_mt import lora, models
    lcfg = lora.LoraConfig(rank=2, alpha=4.0)
    base = weights.save(tmp_path / 'base', 'tiny', tiny_params(), tokenizer)
    lm = lora.apply_lora(models.resolve('tiny').module(), lcfg)
    adapters = lora.init_lora_params(lm, jax.random.key(7, impl='rbg'))
    d = weights.save_adapters(tmp_path / 'ad', 'tiny', adapters, lcfg,
                              base_model='tiny', base_checkpoint=base)
  name = _damage(d, how)
  with pytest.raises(fs.DamagedError, match=name):
    weights.load_dir(d)
  assert T.main(['Hello', '--checkpoint', str(d)]) == 2
  one_line_error(capsys.readouterr().err, name)


# -------------------------------------------------------------- config files

CONFIG_BODIES = {
    'raises': ('raise RuntimeError("boom")', 'boom'),
    'exits 0': ('import sys; sys.exit(0)', 'SystemExit'),
    'misspelled field': ('return TrainingConfig(lerning_rate=1e-3)',
                         "did you mean 'learning_rate'"),
    'wrong type': ('return TrainingConfig(batch_size="four")', 'batch_size'),
    'non-finite': ('return TrainingConfig(learning_rate=float("inf"))',
                   'learning_rate'),
    'returns None': ('return None', 'NoneType'),
    'no get_config': (None, 'get_config'),
    'syntax error': ('return (', 'SyntaxError'),
}


@pytest.mark.parametrize('case', list(CONFIG_BODIES))
def test_config_file_mistakes_are_one_line(case, tmp_path, capsys,
                                           monkeypatch):
  from gemma_mt.train import loop
  monkeypatch.setattr(loop, 'train_loop', lambda c: pytest.fail('trained'))
  body, named = CONFIG_BODIES[case]
  f = tmp_path / 'cfg.py'
  head = 'from gemma_mt.train.config import TrainingConfig\n'
  f.write_text(head + ('x = 1\n' if body is None else
                       f'def get_config():\n  {body}\n'))
  assert train_main.main(['--config', str(f)]) == 2
  one_line_error(capsys.readouterr().err, str(f), named)


# ----------------------------------------------------- HF config vs tensors

@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory, tokenizer):
  from gemma_mt import models
  from gemma_mt.weights import hf
  return hf.write_dir(tmp_path_factory.mktemp('hf') / 'm',
                      models.resolve('tiny'), tiny_params(), tokenizer,
                      dtype='float32')


HF_EDITS = {
    'fewer layers than tensors': ({'num_hidden_layers': 2}, 'not part of'),
    'negative layers': ({'num_hidden_layers': -1}, 'num_hidden_layers'),
    'zero layers': ({'num_hidden_layers': 0}, 'num_hidden_layers'),
    'layers as a string': ({'num_hidden_layers': '3'}, 'num_hidden_layers'),
    'more layers than tensors': ({'num_hidden_layers': 4}, 'missing'),
    'zero heads': ({'num_attention_heads': 0}, 'num_attention_heads'),
    'layer_types too short': ({'layer_types': ['sliding_attention']},
                              'layer_types'),
}


@pytest.mark.parametrize('case', list(HF_EDITS))
def test_hf_config_must_agree_with_tensors(case, hf_dir, tmp_path, capsys):
  d = tmp_path / 'm'
  shutil.copytree(hf_dir, d)
  (d / fs.MANIFEST).unlink()  # A dir from another tool: no checksums.
  cfg = json.loads((d / 'config.json').read_text())
  edit, named = HF_EDITS[case]
  cfg.update(edit)
  if 'num_hidden_layers' in edit and 'layer_types' in cfg and \
      isinstance(edit['num_hidden_layers'], int) and edit['num_hidden_layers'] > 0:
    n = edit['num_hidden_layers']
    cfg['layer_types'] = (cfg['layer_types'] * 2)[:n]
  (d / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=named):
    weights.load_dir(d)
  assert T.main(['Hello', '--checkpoint', str(d)]) == 2
  one_line_error(capsys.readouterr().err, named)


# ------------------------------------------------------- streams, the API

@pytest.mark.parametrize('closed', ['stdout', 'stdin'])
def test_closed_streams_are_one_line(closed, tmp_path):
  redirect = '>&-' if closed == 'stdout' else '<&-'
  argv = '' if closed == 'stdin' else 'Hello'
  cmd = (f'{sys.executable} -m gemma_mt.translate {argv} --no_compile_cache '
         f'{redirect}')
  r = subprocess.run(['bash', '-c', cmd], cwd=ROOT, capture_output=True,
                     text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                     timeout=300)
  assert r.returncode == 2
  one_line_error(r.stderr, closed)


@pytest.fixture(scope='module')
def tr(tokenizer):
  return make_tiny_translator(tokenizer)


def _random_values(rng: random.Random):
  pool = [None, -1, 0, 2.5, float('nan'), True, 'x', b'x', [], {}, {'a': 1},
          ('a',), [None], [b'Hello'], ['\ud800'], [1, 2], object(), ['ok', 3],
          iter(['a']), {'a'}]
  return rng.sample(pool, len(pool))


@pytest.mark.parametrize('seed', range(3))
def test_api_random_argument_types_raise_at_the_boundary(seed, tr, monkeypatch):
  """Any argument of a wrong type or value is a TypeError or ValueError
  raised before the model runs."""
  monkeypatch.setattr(tr.sampler, 'generate',
                      lambda *a, **k: pytest.fail('ran the model'))
  monkeypatch.setattr(type(tr), 'decode',
                      lambda *a, **k: pytest.fail('ran the model'))
  rng = random.Random(seed)
  checked = 0
  for value in _random_values(rng):
    calls = [lambda v=value: tr.translate(v),
             lambda v=value: tr.translate(['Hi'], batch_size=v),
             lambda v=value: SamplingOptions(temperature=v),
             lambda v=value: SamplingOptions(top_p=v),
             lambda v=value: SamplingOptions(max_new_tokens=v)]
    for call in calls:
      try:
        call()
      except (TypeError, ValueError):
        checked += 1
      except pytest.fail.Exception:
        # A value that is valid reached the model (e.g. a list of str):
        # it is only allowed when the argument is valid.
        pass
  assert checked > 40


def test_api_generators_are_read_not_dropped(tr):
  got = tr.translate(s for s in ['Hello', ''])
  assert len(got) == 2 and got[1] == ''


def test_translator_needs_params(tokenizer):
  from gemma_mt import models
  from gemma_mt.translator import Translator
  with pytest.raises(TypeError, match='params'):
    Translator(models.resolve('tiny'), None, tokenizer)


def test_interrupted_translate_keeps_what_it_wrote(tr, monkeypatch, capsys):
  real, calls = tr.decode, []

  def dies_on_second_chunk(prep, *a, **kw):
    calls.append(prep.sources)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(prep, *a, **kw)

  monkeypatch.setattr(tr, 'decode', dies_on_second_chunk)
  monkeypatch.setattr(cli_lib, 'build_translator', lambda a: tr)
  monkeypatch.setattr(T, 'CHUNK', 1)
  monkeypatch.setattr(translator_lib, 'BATCHES_PER_CHUNK', 0)
  assert T.main(['Hello', 'World', 'Again', '--max_new_tokens', '2']) == 130
  out, err = capsys.readouterr()
  assert len(out.splitlines()) == 1
  one_line_error(err, 'the first 1 of 3 translations were written')


@pytest.mark.parametrize('seed', range(2))
def test_load_random_argument_types_raise_at_the_boundary(seed, world):
  rng = random.Random(seed)
  checked = 0
  for value in _random_values(rng):
    for kw in (dict(model=value), dict(checkpoint=value), dict(dtype=value)):
      if kw.get('checkpoint') is None and 'checkpoint' in kw:
        continue
      try:
        weights.load(**{'checkpoint': str(world / 'run' / 'final'), **kw})
      except (TypeError, ValueError, FileNotFoundError):  # 'x': no such dir.
        checked += 1
  assert checked >= 30
