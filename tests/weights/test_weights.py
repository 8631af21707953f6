"""Weights: GGUF conversion, orbax params checkpoints, Kaggle/local loaders.

The real-weights tests share one session fixture that converts the embedded
GGUF once into a fresh per-session cache (so the first-call conversion path is
exercised every run) and then re-loads it from that cache.
"""

import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mt.models.gemma import TransformerConfig
from gemma_mt.weights import embedded as embedded_lib
from gemma_mt.weights import gguf as gguf_lib
from gemma_mt.weights import kaggle, orbax_io
from gemma_mt.weights.embedded import embedded_gguf_path

gm = pytest.importorskip('gemma.gm')
from gemma.gm.ckpts import _compat as gm_compat  # noqa: E402

BF16 = jnp.dtype(jnp.bfloat16)
SENTENCES = [
    'The cat is sleeping on the sofa in the living room.',
    'I would like to book a table for two people tonight.',
    'Paris is the capital and most populous city of France.',
    'Le chat dort sur le canapé dans le salon.',
    'Je voudrais réserver une table pour deux personnes ce soir.',
    'Paris est la capitale et la ville la plus peuplée de France.',
]


def _same(a, b) -> bool:
  """Same tree structure, dtypes and exact values."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(
      x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(la, lb))


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


# ------------------------------------------------------------ real weights


@pytest.fixture(scope='session')
def embedded(tmp_path_factory):
  """(params, cache_dir, stats) of the first, converting, load."""
  cache = tmp_path_factory.mktemp('gemma_mt_cache')
  # Reuse the assembled GGUF of the default cache (assembling is not under
  # test here); the converted params go to the fresh cache.
  os.symlink(embedded_gguf_path(), cache / embedded_gguf_path().name)
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t0 = time.perf_counter()
  params = embedded_lib.load_gemma3_270m(cache)
  stats = {'first_load_s': time.perf_counter() - t0,
           'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                          / 2**20, 'peak_rss_before_gb': rss0 / 2**20}
  print(f'\nembedded 270M first load (convert+cache+load): {stats}')
  return params, cache, stats


@pytest.fixture(scope='module')
def reference_shapes():
  model = gm.nn.Gemma3_270M()
  tokens = jnp.zeros((1, 4), jnp.int32)
  return _shapes(jax.eval_shape(model.init, jax.random.key(0), tokens)
                 ['params'])


@pytest.mark.slow
def test_converted_tree_matches_official(embedded, reference_shapes):
  params, _, _ = embedded
  assert _shapes(params) == reference_shapes
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype('float32')}


@pytest.mark.slow
def test_converted_params_predict_text(embedded, tokenizer):
  """Official model + converted params: low next-token NLL on en/fr text."""
  params, _, _ = embedded
  seqs = [tokenizer.tokenize(s, add_eos=False) for s in SENTENCES]
  assert all(s[0] == tokenizer.bos_id == 2 for s in seqs)
  length = max(map(len, seqs))
  tokens = np.zeros((len(seqs), length), np.int32)  # 0 = <pad>.
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
  logits = gm.nn.Gemma3_270M().apply({'params': params}, tokens=tokens).logits
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  mask = tokens[:, 1:] != 0
  mean_nll = float((nll * mask).sum() / mask.sum())
  print(f'\nmean next-token NLL: {mean_nll:.3f} nats/token over '
        f'{int(mask.sum())} tokens')
  assert mean_nll < 3.5  # A wrong mapping gives ~8+.


@pytest.mark.slow
def test_cache_second_load_is_fast_and_equal(embedded):
  params, cache, stats = embedded
  t0 = time.perf_counter()
  again = embedded_lib.load_gemma3_270m(cache)
  seconds = time.perf_counter() - t0
  print(f'\nembedded 270M load from cache: {seconds:.2f} s '
        f'(first load {stats["first_load_s"]:.1f} s)')
  assert seconds < 15 and seconds < stats['first_load_s'] / 2
  assert _same(params, again)
  del again
  bf16 = embedded_lib.load_gemma3_270m(cache, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(bf16)} == {BF16}
  np.testing.assert_array_equal(
      bf16['final_norm']['scale'],
      params['final_norm']['scale'].astype(jnp.bfloat16))
  # No temp dirs left behind by the atomic cache write.
  assert not [p for p in cache.iterdir() if '.tmp-' in p.name]


# ------------------------------------------------------- small checkpoints


def _tiny_params(seed=0, layers=2, num_heads=2, num_kv_heads=1):
  """A random params tree in the official layout, with tiny dims."""
  rng = np.random.default_rng(seed)
  d, hidden, head, vocab = 8, 16, 4, 32
  r = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
  params = {'embedder': {'input_embedding': r(vocab, d)},
            'final_norm': {'scale': r(d)}}
  for i in range(layers):
    params[f'layer_{i}'] = {
        'attn': {'q_einsum': {'w': r(num_heads, d, head)},
                 'kv_einsum': {'w': r(2, num_kv_heads, d, head)},
                 'attn_vec_einsum': {'w': r(num_heads, head, d)},
                 '_query_norm': {'scale': r(head)},
                 '_key_norm': {'scale': r(head)}},
        'mlp': {'gating_einsum': r(2, hidden, d), 'linear': r(hidden, d)},
        **{n: {'scale': r(d)} for n in ('pre_attention_norm',
                                        'post_attention_norm', 'pre_ffw_norm',
                                        'post_ffw_norm')},
    }
  return params


def _kaggle_flat(params):
  """The flat `transformer/...` layout of the Kaggle Flax releases."""
  flat = gm_compat.flatten_and_remap_params(params)
  return {f'transformer/{k}': v for k, v in flat.items()}


def _write_orbax(path, tree):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path.absolute(), tree)


def test_save_load_roundtrip_exact(tmp_path):
  params = _tiny_params()
  params['embedder']['input_embedding'] = (
      params['embedder']['input_embedding'].astype(jnp.bfloat16))
  out = orbax_io.save_params(tmp_path / 'ckpt', params, tokenizer=b'spm')
  assert _same(orbax_io.load_params(out), params)
  loaded, tok = orbax_io.load_checkpoint_dir(out)
  assert _same(loaded, params) and tok.read_bytes() == b'spm'
  as_bf16 = orbax_io.load_params(out, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(as_bf16)} == {BF16}
  as_f32 = orbax_io.load_params(out, dtype=jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(as_f32)} == {np.dtype('float32')}
  with pytest.raises(FileExistsError):
    orbax_io.save_params(out, params)
  orbax_io.save_params(out, _tiny_params(seed=1), overwrite=True)
  assert _same(orbax_io.load_params(out), _tiny_params(seed=1))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']


def test_load_params_sharding(tmp_path):
  params = _tiny_params()
  path = orbax_io.save_params(tmp_path / 'ckpt', params)
  dev = jax.devices()[-1]
  one = jax.sharding.SingleDeviceSharding(dev)
  loaded = orbax_io.load_params(path, sharding=one)
  assert all(x.devices() == {dev} for x in jax.tree.leaves(loaded))
  loaded = orbax_io.load_params(path, sharding=jax.tree.map(lambda _: one,
                                                               params))
  assert _same(loaded, params)


@pytest.mark.parametrize('layout', ['flat', 'stacked', 'wrapped', 'nested'])
def test_official_layouts_normalize(tmp_path, layout):
  params = _tiny_params(layers=4)
  tree = {'flat': lambda: _kaggle_flat(params),
          'stacked': lambda: gm_compat.stack_params(_kaggle_flat(params), 2),
          'wrapped': lambda: {'transformer': params},
          'nested': lambda: params}[layout]()
  if layout == 'stacked':
    assert any('stacked_layers' in k for k in tree)
  (tmp_path / 'model').mkdir()
  _write_orbax(tmp_path / 'model' / 'ckpt', tree)
  (tmp_path / 'model' / 'tokenizer.model').write_bytes(b'tok')
  loaded, tok = orbax_io.load_checkpoint_dir(tmp_path / 'model')
  assert _same(loaded, params)
  assert tok == tmp_path / 'model' / 'tokenizer.model'


def _prepare_kaggle_cache(root, handle, version, params, subdir):
  """Lays out kagglehub's cache exactly as a finished model_download does."""
  base = root / 'models' / handle
  model_dir = base / str(version)
  model_dir.mkdir(parents=True)
  _write_orbax(model_dir / subdir, _kaggle_flat(params))
  (model_dir / 'tokenizer.model').write_bytes(b'kaggle-tok')
  (base / f'{version}.complete').touch()  # kagglehub's completion marker.


@pytest.fixture
def kaggle_cache(tmp_path, monkeypatch):
  root = tmp_path / 'kagglehub'
  monkeypatch.setenv('KAGGLEHUB_CACHE', str(root))
  for var in ('KAGGLE_USERNAME', 'KAGGLE_KEY', 'KAGGLE_API_TOKEN'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('KAGGLE_CONFIG_DIR', str(tmp_path / 'no_kaggle_config'))
  return root


def test_load_kaggle_from_prepared_cache(kaggle_cache):
  params = _tiny_params(seed=3)
  _prepare_kaggle_cache(kaggle_cache, 'google/gemma/flax/2b-it', 3, params,
                        '2b-it')
  loaded, tok = kaggle.load_kaggle('google/gemma/flax/2b-it/3')
  assert _same(loaded, params)
  assert tok.read_bytes() == b'kaggle-tok'
  # Unversioned handle offline: newest complete version in the cache.
  loaded, _ = kaggle.load_kaggle('google/gemma/flax/2b-it')
  assert _same(loaded, params)


def test_load_kaggle_without_access_says_what_to_do(kaggle_cache):
  with pytest.raises(RuntimeError) as e:
    kaggle.load_kaggle('google/gemma-3/flax/gemma3-270m')
  msg = str(e.value)
  for hint in ('KAGGLE_USERNAME', 'KAGGLE_KEY', 'kagglehub.login()',
               'license', '--checkpoint'):
    assert hint in msg


# ---------------------------------------------------------------- errors


def test_missing_paths_raise_clearly(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match='nope'):
    orbax_io.load_params(missing)
  with pytest.raises(FileNotFoundError, match='nope'):
    orbax_io.load_checkpoint_dir(missing)
  with pytest.raises(gguf_lib.GGUFError, match='nope'):
    gguf_lib.params_from_gguf(missing)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(orbax_io.CheckpointError, match='empty'):
    orbax_io.load_checkpoint_dir(tmp_path / 'empty')
  with pytest.raises(orbax_io.CheckpointError, match='not an orbax'):
    orbax_io.load_params(tmp_path / 'empty')


def _write_gguf(path, arch, block_count):
  import gguf
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(block_count)
  writer.add_embedding_length(640)
  writer.add_feed_forward_length(2048)
  writer.add_head_count(4)
  writer.add_head_count_kv(1)
  writer.add_key_length(256)
  writer.add_tensor('output_norm.weight', np.ones(640, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_bad_gguf_metadata_names_file_and_field(tmp_path):
  llama = tmp_path / 'llama.gguf'
  _write_gguf(llama, 'llama', 18)
  with pytest.raises(gguf_lib.GGUFError,
                     match=r'llama\.gguf.*general\.architecture'):
    gguf_lib.params_from_gguf(llama)
  small = tmp_path / 'small.gguf'
  _write_gguf(small, 'gemma3', 2)
  with pytest.raises(gguf_lib.GGUFError,
                     match=r'small\.gguf.*gemma3\.block_count.*expected 18'):
    gguf_lib.params_from_gguf(small, expect=gguf_lib.expected_fields(TransformerConfig.gemma3_270m()))
  with pytest.raises(gguf_lib.GGUFError, match="token_embd' is missing"):
    gguf_lib.params_from_gguf(small)
  junk = tmp_path / 'junk.gguf'
  junk.write_bytes(b'not a gguf at all')
  with pytest.raises(gguf_lib.GGUFError, match='junk.gguf'):
    gguf_lib.params_from_gguf(junk)


def test_killed_conversion_leaves_no_cache(tmp_path, monkeypatch):
  """A crash before the final rename leaves no (half) cache behind."""
  target = embedded_lib.embedded_cache_path(tmp_path)
  real_rename = os.rename

  def rename(src, dst):
    if os.fspath(dst) == os.fspath(target):
      raise KeyboardInterrupt  # "Killed" right before publishing the cache.
    return real_rename(src, dst)

  monkeypatch.setattr(gguf_lib, 'params_from_gguf',
                      lambda *a, **k: _tiny_params())
  monkeypatch.setattr(embedded_lib, 'embedded_gguf_path', lambda _: None)
  monkeypatch.setattr(os, 'rename', rename)
  with pytest.raises(KeyboardInterrupt):
    embedded_lib.load_gemma3_270m(tmp_path)
  assert list(tmp_path.iterdir()) == []
  monkeypatch.setattr(os, 'rename', real_rename)
  assert _same(embedded_lib.load_gemma3_270m(tmp_path), _tiny_params())
