"""Our exports in other runtimes, as their users run them: transformers and
PEFT (PyTorch, .venv-hf) and llama.cpp (.venv-llama), each in its own
environment (scripts/setup_interop_env.sh), through tests/support/interop/*_client.py.
And the way back: what we export, we import unchanged.
"""

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gemma_mt import export, lora, models, weights
from gemma_mt.data import prompts
from gemma_mt.decoding.options import SamplingOptions
from gemma_mt.models import gemma as M
from gemma_mt.models import layers  # noqa: E402
from gemma_mt.translator import Translator
from gemma_mt.weights import gguf, hf, peft

ROOT = Path(__file__).resolve().parents[2]
HF_PY, LLAMA_PY = ROOT / '.venv-hf/bin/python', ROOT / '.venv-llama/bin/python'
V = 512
SENTENCES = ["I don't think that's what he meant.",
             "This is the best game I've played this year!",
             'Can someone explain why the sky is blue?',
             'Thanks for the help, it works now.']


def small(base, **kw):
  return base.replace(vocab_size=V, embed_dim=64, hidden_dim=96, num_heads=4,
                      head_dim=16, query_pre_attn_scalar=16**-0.5, **kw)


CONFIGS = {  # One per transformers class and layout we write.
    'gemma1_mqa': small(M.TransformerConfig.gemma_2b(), num_kv_heads=1,
                        attention_types=('global',) * 2),
    'gemma1_mha': small(M.TransformerConfig.gemma_2b(), num_kv_heads=4,
                        attention_types=('global',) * 2),
    'gemma2': small(M.TransformerConfig.gemma2_2b(), num_kv_heads=2,
                    sliding_window_size=3, attention_types=('local', 'global') * 2
                    ).replace(query_pre_attn_scalar=32**-0.5),
    'gemma3': M.TransformerConfig.tiny(vocab_size=V),
    'gemma3_27b_style': M.TransformerConfig.tiny(
        vocab_size=V, global_rope_scale=8.0, head_dim=8,
        query_pre_attn_scalar=(64 / 4)**-0.5),
}
# llama.cpp's gemma3 fixes the 5:1 layer pattern; its vocab must be the
# tokenizer's.
LLAMA_CFG = M.TransformerConfig.tiny(attention_types=('local',) * 5 + ('global',))


def random_params(cfg, seed=0):
  """Random weights of `cfg`'s shapes (numpy: fast for a 262k vocab), norm
  scales non-zero (the 1 + w convention), large enough for clear argmaxes."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
      models.param_shapes(cfg.module()))


@functools.cache
def _apply(cfg):
  return jax.jit(M.Transformer(cfg).apply)


def logits(cfg, params, tokens):
  tokens = jnp.asarray(tokens)
  L = tokens.shape[1]
  out, _ = _apply(cfg)(
      {'params': params}, tokens, jnp.broadcast_to(jnp.arange(L), tokens.shape),
      layers.causal_mask(jnp.ones(tokens.shape, bool)))
  return np.asarray(out)


def greedy(cfg, params, prompt, n):
  """Argmax continuation by full causal forwards over one fixed-length
  buffer (one compile; checks the weights, not our decoder)."""
  buf = np.zeros((1, 64), np.int32)
  buf[0, :len(prompt)] = prompt
  out, cur = [], len(prompt)
  for _ in range(n):
    t = int(logits(cfg, params, buf)[0, cur - 1].argmax())
    out.append(t)
    buf[0, cur], cur = t, cur + 1
    if t in (1, 106):  # EOS, <end_of_turn>: where llama.cpp stops.
      break
  return out


def client(python: Path, script: str, request: dict, tmp_path: Path) -> dict:
  if not python.exists():
    pytest.skip(f'{python.parent.parent.name} missing: run '
                'scripts/setup_interop_env.sh (scripts/test.sh does)')
  req, out = tmp_path / f'{script}.json', tmp_path / f'{script}.npz'
  req.write_text(json.dumps(request))
  run = subprocess.run([str(python), str(ROOT / 'tests/support/interop' / script),
                        str(req), str(out)], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  return dict(np.load(out))


def as_bf16(params):
  return jax.tree.map(
      lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
      params)


def max_delta(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float32)
                                       - np.asarray(y, np.float32)))), a, b)))


# ------------------------------------------------------------ Hugging Face


@pytest.mark.parametrize('name', CONFIGS)
def test_hf_export_equals_transformers(name, tokenizer, tmp_path, monkeypatch):
  cfg = CONFIGS[name]
  params = random_params(cfg)
  if name == 'gemma3':  # Shards and an index, as transformers writes them.
    monkeypatch.setattr(hf, 'SHARD_BYTES', 200_000)
  out = hf.write_dir(tmp_path / 'hf', cfg, params, tokenizer, dtype='float32')
  assert (out / hf.INDEX_FILE).is_file() == (name == 'gemma3')
  assert hf.num_tensors(cfg) == sum(1 for _ in hf.params_to_hf(params, cfg))
  tokens = np.random.default_rng(0).integers(1, V, (2, 12))  # > the windows
  theirs = client(HF_PY, 'hf_client.py', {'model': str(out),
                                          'tokens': tokens.tolist()}, tmp_path)
  ours = logits(cfg, params, tokens)
  err = np.abs(theirs['logits'] - ours).max()
  print(f'\n{name}: max |Δlogit| transformers vs ours = {err:.1e} '
        f'(|logit| up to {np.abs(ours).max():.1f})')
  assert err < 1e-4
  cfg2, back, _ = hf.read_dir(out)  # And back: the same model, bit for bit.
  assert cfg2 == cfg
  assert max_delta(back, params) == 0.0


@pytest.mark.slow
def test_real_270m_in_transformers(tokenizer, tmp_path):
  """The shipped 270M exported as bf16 safetensors: transformers' logits
  equal ours on the same bf16 weights, its greedy translations are ours,
  AutoTokenizer tokenizes as we do, and importing the export gives back
  exactly those weights."""
  pre = weights.load('gemma3_270m')
  t0 = time.time()
  out = hf.write_dir(tmp_path / 'hf', pre.config, pre.params, pre.tokenizer)
  secs = time.time() - t0
  size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
  ps = [prompts.prompt_ids(tokenizer, s).tolist() for s in SENTENCES]
  theirs = client(HF_PY, 'hf_client.py', {
      'model': str(out), 'tokens': [ps[0]], 'greedy': ps, 'max_new_tokens': 16,
      'texts': SENTENCES}, tmp_path)
  bf16 = as_bf16(pre.params)
  ours = logits(pre.config, bf16, [ps[0]])
  err = np.abs(theirs['logits'] - ours).max()
  print(f'\n270M bf16 export: {size:.0f} MB in {secs:.1f}s; max |Δlogit| '
        f'transformers vs ours = {err:.1e} (|logit| up to {np.abs(ours).max():.0f})')
  assert err < 2e-3
  ours = Translator(pre.config, bf16, tokenizer, batch_size=4).translate(
      SENTENCES, SamplingOptions(max_new_tokens=16, guard=False))
  for i, p in enumerate(ps):  # Their greedy tokens up to our stop (newline).
    ids = theirs[f'greedy_{i}'].tolist()
    stop = next((j for j, t in enumerate(ids) if t in (1, 106, 107)), len(ids))
    assert tokenizer.decode(ids[:stop]).strip() == ours[i], i
    assert theirs[f'text_{i}'].tolist() == tokenizer.tokenize(
        SENTENCES[i], add_eos=False).tolist()
  print('translations (identical):', ours)
  back = weights.load_dir(out)
  assert back.arch == 'gemma3_270m' and back.prompt_format == 'plain'
  assert max_delta(back.params, bf16) == 0.0


def test_hf_import_of_a_multimodal_dir(tokenizer, tmp_path, caplog):
  """Gemma 3 4B+ / TranslateGemma dirs: a nested text_config, the decoder
  under model.language_model, a vision tower (skipped, with a warning), a
  vocab with 64 image rows (cut), defaults left out of the config."""
  cfg = M.TransformerConfig.tiny(global_rope_scale=8.0)
  params = random_params(cfg)
  flat = dict(hf.params_to_hf(params, cfg, prefix='model.language_model.'))
  emb = 'model.language_model.embed_tokens.weight'
  flat[emb] = np.concatenate([flat[emb], np.ones((64, 64), np.float32)])
  flat['model.vision_tower.vision_model.post_layernorm.weight'] = np.ones(8, np.float32)
  from safetensors.numpy import save_file
  tmp_path.joinpath('mm').mkdir()
  save_file(flat, tmp_path / 'mm' / hf.WEIGHTS_FILE)
  text = hf.config_to_hf(cfg, tokenizer)
  for k in ('rope_theta', 'rope_local_base_freq'):  # Gemma3TextConfig defaults.
    del text[k]
  (tmp_path / 'mm' / hf.CONFIG_FILE).write_text(json.dumps({
      'model_type': 'gemma3', 'architectures': ['Gemma3ForConditionalGeneration'],
      'text_config': text | {'vocab_size': 262_208}, 'vision_config': {}}))
  (tmp_path / 'mm' / 'tokenizer.model').write_bytes(
      tokenizer.serialized_model_proto())
  (tmp_path / 'mm' / 'tokenizer_config.json').write_text(json.dumps({
      'chat_template': "{{ messages[0]['content'][0]['source_lang_code'] }}"}))
  with caplog.at_level('WARNING'):
    pre = weights.load_dir(tmp_path / 'mm')
  assert 'vision' in caplog.text
  assert pre.config == cfg and pre.prompt_format == 'translategemma'
  assert max_delta(pre.params, params) == 0.0


# ------------------------------------------------------------------- GGUF


@pytest.mark.parametrize('outtype', gguf.OUTTYPES)
def test_gguf_export_reads_back(outtype, tokenizer, tmp_path):
  """Our importer (and `gguf`'s reader) get back what we wrote: exactly for
  f32 (up to the rounding of llama.cpp's 1 + w norms), to the dtype's
  rounding for f16/bf16, to half a Q8_0 step (absmax/127 per 32 values,
  the scale itself in float16)."""
  cfg = LLAMA_CFG
  params = random_params(cfg)
  path = gguf.write_gguf(tmp_path / 'm.gguf', cfg, params, tokenizer, outtype,
                         chat_template=prompts.chat_template('chat'))
  back = gguf.params_from_gguf(path, expect=gguf.expected_fields(cfg))
  meta = gguf.read_metadata(gguf.open_reader(path), path)
  assert meta['block_count'] == 6 and meta['attention.key_length'] == 16
  for (kp, w), b in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                        jax.tree.leaves(back)):
    w = np.asarray(w, np.float32)
    if w.ndim == 1 or outtype == 'f32':  # Norms stay f32.
      bound = 1e-6 * (1 + np.abs(w))
    elif outtype in ('f16', 'bf16'):
      bound = np.abs(w) * (2**-10 if outtype == 'f16' else 2**-7)
    else:  # Q8_0: blocks of 32 along each HF row, scale = absmax / 127.
      bound = _q8_bound(jax.tree_util.keystr(kp), w, cfg)
    assert np.all(np.abs(b - w) <= bound + 1e-7), jax.tree_util.keystr(kp)
  if outtype != 'q8_0':
    return
  rebuilt = gguf.tokenizer_from_gguf(path)  # (Reading 262k pieces is slow.)
  for s in SENTENCES + ['<start_of_turn> et\ttabs  \n', 'émoji 🙂']:
    assert rebuilt.tokenize(s).tolist() == tokenizer.tokenize(s).tolist()


@pytest.mark.parametrize('outtype', ['f32', 'q8_0'])
def test_gguf_export_is_verified_on_load(outtype, tokenizer, tmp_path):
  """A GGUF carries the CRC-32 of its tensors: any flipped byte in any
  tensor is named on load (or by the held reader), and the restored file
  verifies."""
  cfg = LLAMA_CFG
  path = gguf.write_gguf(tmp_path / 'm.gguf', cfg, random_params(cfg),
                         tokenizer, outtype)
  reader = gguf.open_reader(path)  # Memory-mapped: it sees in-place flips.
  assert gguf.verify_tensors(reader, path) is True
  spans = [(int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
  rng = np.random.default_rng(0)

  def flip(at):
    with open(path, 'r+b') as f:
      f.seek(at)
      b = f.read(1)[0]
      f.seek(at)
      f.write(bytes([b ^ 0x10]))

  for k, i in enumerate(rng.choice(len(spans), 3, replace=False)):
    start, n = spans[i]
    at = start + int(rng.integers(n))
    flip(at)
    with pytest.raises(gguf.GGUFError, match='checksum mismatch') as e:
      if k == 0:  # The load path checks (opening a GGUF is slow: once).
        gguf.params_from_gguf(path)
      else:
        gguf.verify_tensors(reader, path)
    assert str(path) in str(e.value)
    flip(at)
  assert gguf.verify_tensors(reader, path) is True  # Others load it: reads_back.


def _q8_bound(key, w, cfg):
  """Half a Q8_0 step per value, blocks taken along the GGUF rows."""
  rows = {  # Our weight -> (to GGUF rows, back).
      'q_einsum': (lambda x: x.transpose(0, 2, 1).reshape(-1, cfg.embed_dim),
                   lambda r: r.reshape(w.shape[0], w.shape[2], w.shape[1]).transpose(0, 2, 1)),
      'attn_vec_einsum': (lambda x: x.reshape(-1, cfg.embed_dim).T,
                          lambda r: r.T.reshape(w.shape)),
      'linear': (lambda x: x.T, lambda r: r.T),
  }
  if 'kv_einsum' in key:
    return np.stack([_q8_bound("['q_einsum']", x, cfg) for x in w])
  if 'gating_einsum' in key or 'input_embedding' in key:
    fwd, inv = (lambda x: x.reshape(-1, x.shape[-1])), (lambda r: r.reshape(w.shape))
  else:
    fwd, inv = next(v for k, v in rows.items() if f"'{k}'" in key)
  r = fwd(w)
  blocks = r.reshape(r.shape[0], -1, 32)
  step = np.abs(blocks).max(-1, keepdims=True) / 127
  # Half a step, plus the scale's own float16 rounding (times |q| <= 127).
  bound = step * (0.5 + 127 * 2**-11)
  return inv(np.broadcast_to(bound, blocks.shape).reshape(r.shape))


def test_llama_cpp_runs_our_gguf(tokenizer, tmp_path):
  """llama.cpp (llama-cpp-cffi's CPU build) loads an f32 export: logits equal
  ours to 1e-3 of their range (ggml approximates GELU), greedy tokens
  equal, same tokenization, and it carries the chat template."""
  cfg = LLAMA_CFG
  params = random_params(cfg)
  path = gguf.write_gguf(tmp_path / 'm.gguf', cfg, params, tokenizer, 'f32',
                         chat_template=prompts.chat_template('chat'))
  ps = [prompts.prompt_ids(tokenizer, s, prompt_format='chat').tolist()
        for s in SENTENCES[:2]]
  theirs = client(LLAMA_PY, 'llama_client.py', {
      'model': str(path), 'greedy': ps, 'max_new_tokens': 8,
      'texts': SENTENCES}, tmp_path)
  for i, p in enumerate(ps):
    ours = logits(cfg, params, [p])[0, -1]
    err = np.abs(theirs[f'logits_{i}'] - ours).max()
    print(f'\nllama.cpp f32 vs ours: max |Δlogit| = {err:.1e} '
          f'(|logit| up to {np.abs(ours).max():.1f})')
    assert err < 1e-3 * np.abs(ours).max()  # Its CPU GELU is approximate.
    assert theirs[f'greedy_{i}'].tolist() == greedy(cfg, params, p, 8)
  for i, s in enumerate(SENTENCES):
    assert theirs[f'text_{i}'].tolist() == tokenizer.tokenize(s, add_eos=False).tolist()
  assert bytes(theirs['chat_template']).decode() == prompts.chat_template('chat')


@pytest.mark.slow
def test_real_270m_in_llama_cpp(tokenizer, tmp_path):
  """The shipped 270M as a bf16 GGUF: llama.cpp's greedy tokens are ours on
  the same weights. (Q8_0: llama.cpp also quantizes activations to 8 bits,
  so its greedy path may leave ours; measured in the closing notes.)"""
  pre = weights.load('gemma3_270m')
  t0 = time.time()
  path = gguf.write_gguf(tmp_path / 'm.gguf', pre.config, pre.params, tokenizer,
                         'bf16')
  print(f'\n270M bf16 GGUF: {path.stat().st_size / 1e6:.0f} MB in '
        f'{time.time() - t0:.1f}s')
  ps = [prompts.prompt_ids(tokenizer, s).tolist() for s in SENTENCES]
  theirs = client(LLAMA_PY, 'llama_client.py', {
      'model': str(path), 'greedy': ps, 'max_new_tokens': 12}, tmp_path)
  bf16 = as_bf16(pre.params)
  for i, p in enumerate(ps):
    assert theirs[f'greedy_{i}'].tolist() == greedy(pre.config, bf16, p, 12), i


# ------------------------------------------------------------------- PEFT


def test_peft_export_equals_peft_merge(tokenizer, tmp_path):
  """Adapters (all five targets) exported for PEFT: PEFT loads them onto our
  HF export of the base, and its merged model's logits are ours."""
  cfg = CONFIGS['gemma3'].replace(num_kv_heads=2)
  base = random_params(cfg)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = lora.init_lora_params(lora.apply_lora(M.Transformer(cfg), lcfg),
                                   jax.random.key(3))
  keys = iter(jax.random.split(jax.random.key(4), 100))
  adapters = jax.tree.map(  # B starts at zero: make every adapter count.
      lambda x: np.asarray(x + 0.3 * jax.random.normal(next(keys), x.shape)),
      adapters)
  base_dir = hf.write_dir(tmp_path / 'base', cfg, base, tokenizer, dtype='float32')
  out = peft.write_peft(tmp_path / 'peft', cfg, adapters, lcfg, str(base_dir))
  config = json.loads((out / peft.CONFIG_FILE).read_text())
  assert sorted(config['target_modules']) == sorted(
      ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])
  tokens = np.random.default_rng(1).integers(1, V, (2, 10))
  theirs = client(HF_PY, 'hf_client.py', {
      'model': str(base_dir), 'adapter': str(out), 'tokens': tokens.tolist()},
      tmp_path)
  merged = lora.apply_adapters(base, adapters, lcfg)
  ours = logits(cfg, merged, tokens)
  plain = logits(cfg, base, tokens)
  err = np.abs(theirs['logits'] - ours).max()
  print(f'\nPEFT merge vs ours: max |Δlogit| = {err:.1e} (the adapters move '
        f'logits by up to {np.abs(ours - plain).max():.1f})')
  assert err < 1e-4 and np.abs(ours - plain).max() > 1.0


# -------------------------------------------------------------------- CLI


def test_export_cli(tokenizer, tmp_path, capsys):
  """`python -m gemma_mt.export` to HF, GGUF and PEFT from training outputs;
  one-line refusals that leave existing files as they were."""
  model = weights.save(tmp_path / 'final', LLAMA_CFG, random_params(LLAMA_CFG),
                       tokenizer, prompt_format='chat')
  assert export.main(['--checkpoint', str(model), '--to', 'hf',
                      str(tmp_path / 'hf')]) == 0
  assert 'wrote' in capsys.readouterr().err
  back = weights.load_dir(tmp_path / 'hf')
  assert back.prompt_format == 'chat' and back.config == LLAMA_CFG
  assert json.loads((tmp_path / 'hf/generation_config.json').read_text())[
      'eos_token_id'] == [1, 106]
  assert '<start_of_turn>' in json.loads(
      (tmp_path / 'hf/tokenizer_config.json').read_text())['chat_template']
  before = (tmp_path / 'hf/model.safetensors').stat().st_mtime_ns
  assert export.main(['--checkpoint', str(model), '--to', 'hf',
                      str(tmp_path / 'hf')]) == 2
  assert 'exists; pass --overwrite' in capsys.readouterr().err
  assert (tmp_path / 'hf/model.safetensors').stat().st_mtime_ns == before
  assert export.main(['--checkpoint', str(model), '--to', 'gguf', '--outtype',
                      'bf16', str(tmp_path / 'm.gguf')]) == 0
  assert gguf.tokenizer_from_gguf(tmp_path / 'm.gguf').vocab_size == 262_144
  assert export.main(['--checkpoint', str(model), '--to', 'peft',
                      str(tmp_path / 'p')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: --to peft needs a LoRA adapter dir')
  tiny3 = weights.save(tmp_path / 'tiny3', 'tiny', random_params(
      M.TransformerConfig.tiny()), tokenizer)
  assert export.main(['--checkpoint', str(tiny3), '--to', 'gguf',
                      str(tmp_path / 't.gguf')]) == 2
  assert 'layer pattern is not 5 local : 1 global' in capsys.readouterr().err
  assert not (tmp_path / 't.gguf').exists()
  lcfg = lora.LoraConfig(rank=2)
  adapters = lora.init_lora_params(lora.apply_lora(M.Transformer(LLAMA_CFG), lcfg),
                                   jax.random.key(0))
  ad = weights.save_adapters(tmp_path / 'ad', LLAMA_CFG, adapters, lcfg,
                             base_model='tiny', base_checkpoint=model)
  assert export.main(['--checkpoint', str(ad), '--to', 'peft', '--base',
                      str(tmp_path / 'hf'), str(tmp_path / 'p')]) == 0
  assert json.loads((tmp_path / 'p' / peft.CONFIG_FILE).read_text())[
      'base_model_name_or_path'] == str(tmp_path / 'hf')


def test_hf_dir_trains_and_translates(tokenizer, tmp_path, mtnt_dir, capsys):
  """`--checkpoint HF_DIR` in train (full and LoRA) and translate: the
  format is recognised by itself; an unnamed size travels as its config."""
  import dataclasses

  from gemma_mt import translate
  from gemma_mt.train import config as config_lib
  from gemma_mt.train import loop
  cfg = LLAMA_CFG
  hf_dir = hf.write_dir(tmp_path / 'hf', cfg, random_params(cfg), tokenizer,
                        dtype='float32')
  run = config_lib.load_config_file(ROOT / 'configs/tiny_test.py')
  run = dataclasses.replace(
      run, init='pretrained', checkpoint=str(hf_dir), mtnt_dir=str(mtnt_dir),
      max_steps=2, eval_every_n=0, checkpoint_every_n=2, batch_size=2,
      max_seq_len=48, workdir=str(tmp_path / 'run'))
  half = weights.load_dir(hf_dir, dtype=jnp.bfloat16).params
  assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
  loop.train_loop(run)
  final = weights.load_dir(tmp_path / 'run/final')
  assert final.config == cfg
  loop.train_loop(dataclasses.replace(run, lora_rank=2,
                                      workdir=str(tmp_path / 'lora')))
  assert weights.load_dir(tmp_path / 'lora/adapters').config == cfg
  capsys.readouterr()
  assert translate.main(['--checkpoint', str(hf_dir), '--max_new_tokens', '3',
                         'Hello there', 'Good night']) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-v']))
