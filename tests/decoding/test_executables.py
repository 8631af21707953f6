"""The store of compiled decoders: what decides an executable decides its
file, a new sampler loads instead of compiling, and the outputs agree."""

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mt.decoding import continuous, executables
from gemma_mt.decoding import sampler as S
from gemma_mt.models import gemma as M
from gemma_mt.models import layers

V = 512
MODEL = M.Transformer(M.TransformerConfig.tiny(vocab_size=V))
PROMPTS = [np.random.default_rng(1).integers(2, V, n).astype(np.int32)
           for n in (3, 9, 5, 12, 7)]


def params():
  mask = jnp.ones((1, 4), bool)
  p = MODEL.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                 layers.positions_from_mask(mask), layers.causal_mask(mask))
  return jax.tree.map(lambda x: x * 3 if x.ndim > 1 else x + 0.1, p['params'])


def test_signature_tells_apart_what_changes_an_executable():
  x = np.zeros((2, 3), np.float32)
  base = executables.signature((x, {'a': 1}))
  others = [(x.astype(np.float16), {'a': 1}), (np.zeros((3, 2), np.float32), {'a': 1}),
            (x, {'b': 1}), (x, {'a': 1.0}), (x, [1]), (jnp.asarray(x), {'a': 1}),
            (x, {'a': np.int32(1)})]
  sigs = {executables.signature(o) for o in others}
  assert base not in sigs and len(sigs) == len(others)
  assert executables.signature((x.copy() + 1, {'a': 7})) == base  # Values do not.


def test_a_new_sampler_loads_what_an_earlier_one_compiled(tmp_path):
  """Static, sampled and continuous decoding: the second sampler compiles
  nothing and returns the same ids; other params dtypes or another model
  compile afresh; without a store nothing is written."""
  p = params()
  store = executables.ExecutableStore(tmp_path)

  def run(sampler, full=True):
    out = [x.tolist() for x in sampler.generate(PROMPTS, max_new_tokens=6)]
    return out + ([x.tolist() for x in sampler.generate(
        PROMPTS, max_new_tokens=6, temperature=1.0, top_k=5, seed=3)] +
                  [x.tolist() for x in continuous.generate(
                      sampler, PROMPTS, max_new_tokens=6, slots=2)] if full else [])

  def sampler(params, model=MODEL, **kw):
    return S.Sampler(model, params, pad_id=0, stop_ids=[1], batch_size=4, **kw)

  first = sampler(p, store=store)
  want = run(first)
  n = first.num_compiles
  assert n >= 4 and first.num_loaded == 0 and len(list(tmp_path.glob('*.exe'))) == n
  again = sampler(p, store=store)
  assert run(again) == want and (again.num_compiles, again.num_loaded) == (0, n)
  assert run(sampler(p, store=None)) == want  # Same ids as compiled afresh.

  bf16 = sampler(jax.tree.map(lambda x: x.astype(jnp.bfloat16), p), store=store)
  run(bf16, full=False)
  other = sampler(p, store=store, model=M.Transformer(MODEL.config, remat=True))
  run(other, full=False)
  assert bf16.num_loaded == other.num_loaded == 0
  assert len(list(tmp_path.glob('*.exe'))) == n + bf16.num_compiles + other.num_compiles

  with executables.using(tmp_path / 'default') as default:
    assert sampler(p).store is default and executables.default() is default
  assert executables.default() is None and sampler(p).store is None


def test_settings_that_change_a_compile_change_the_file(tmp_path, monkeypatch):
  """XLA_FLAGS, jax's matmul precision, the static part and donation each
  lead to another file; the same inputs to the same one."""
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  store = executables.ExecutableStore(tmp_path)
  args = (np.zeros(3, np.float32),)
  base = store.path('key', args)
  with jax.default_matmul_precision('highest'):
    precision = store.path('key', args)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=true')
  flags = store.path('key', args)
  monkeypatch.delenv('XLA_FLAGS')
  others = {precision, flags, store.path('other', args),
            store.path('key', args, donate=(0,))}
  assert len(others) == 4 and base not in others
  assert store.path('key', (np.ones(3, np.float32),)) == base


def test_the_store_never_stops_a_decode(tmp_path, caplog):
  """A store that cannot be written (its dir is a file) warns once and
  decodes; a file another user owns is neither unpickled nor replaced;
  damaged and truncated files are compiled again. Same ids every time."""
  import os
  p = params()
  blocked = tmp_path / 'file'
  blocked.write_text('not a dir')

  def run(store):
    s = S.Sampler(MODEL, p, pad_id=0, stop_ids=[1], batch_size=4, store=store)
    return [x.tolist() for x in s.generate(PROMPTS[:2], max_new_tokens=3)], s

  with caplog.at_level('WARNING'):
    want, s = run(executables.ExecutableStore(blocked / 'exe'))
  assert s.num_compiles == 1 and 'not kept' in caplog.text
  assert blocked.read_text() == 'not a dir'
  store = executables.ExecutableStore(tmp_path / 'exe')
  run(store)
  f, = (tmp_path / 'exe').glob('*.exe')
  good = f.read_bytes()
  other = lambda: os.chown(f, os.getuid() + 1, -1)
  for damage in (other,
                 lambda: f.write_bytes(good[:len(good) // 2]),
                 lambda: f.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))):
    f.write_bytes(good)
    os.chown(f, os.getuid(), -1)
    damage()
    ids, s = run(store)
    assert ids == want and (s.num_loaded, s.num_compiles) == (0, 1)
    if damage is other:
      assert f.stat().st_uid != os.getuid() and f.read_bytes() == good
  ids, s = run(store)  # Replaced by the last compile.
  assert ids == want and (s.num_loaded, s.num_compiles) == (1, 0)


def test_overlapping_compiles_restore_the_xla_cache_once():
  """The decoders of a call compile side by side, each past XLA's cache:
  the cache stays off until the last one ends, then is as it was."""
  import threading
  from jax._src import compilation_cache as cc
  before = cc._cache_checked, cc._cache_used
  entered, leave_a, leave_b = threading.Barrier(3), threading.Event(), threading.Event()

  def block(leave):
    with executables.past_xla_cache():
      entered.wait()
      leave.wait()

  threads = [threading.Thread(target=block, args=(e,)) for e in (leave_a, leave_b)]
  for t in threads:
    t.start()
  entered.wait()
  assert (cc._cache_checked, cc._cache_used) == (True, False)
  leave_a.set()
  threads[0].join()
  assert (cc._cache_checked, cc._cache_used) == (True, False)  # B still in.
  leave_b.set()
  threads[1].join()
  assert (cc._cache_checked, cc._cache_used) == before


def test_ready_compiles_side_by_side_as_one_by_one(tmp_path):
  """`Sampler.ready` (threads) keeps every executable it compiles, and a
  decoder made ready that way decodes as one compiled on demand."""
  p = params()
  sp = S.Sampler(MODEL, p, pad_id=0, stop_ids=[1], batch_size=2,
                 store=executables.ExecutableStore(tmp_path))
  limits = np.full(len(PROMPTS), 6)
  mode, sampling = sp.sampling_args()
  dec = continuous.ContinuousDecoder.for_prompts(sp, 2, mode, sampling, PROMPTS, limits)
  dec.ready()
  assert sp.num_compiles == 1 + 1 + len(dec.prompt_widths)  # empty, chunk, inserts
  assert len(list(tmp_path.glob('*.exe'))) == sp.num_compiles  # All kept.
  got = dec.generate(PROMPTS, limits)
  assert sp.num_compiles == 1 + 1 + len(dec.prompt_widths)  # Nothing more.
  want = S.Sampler(MODEL, p, pad_id=0, stop_ids=[1], batch_size=2,
                   store=None).generate(PROMPTS, max_new_tokens=6)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)
