"""Hugging Face checkpoint dirs (transformers' layout), in and out.

A dir holds `config.json`, `model.safetensors` (or shards named by
`model.safetensors.index.json`) and the tokenizer. Gemma 1, 2 and 3 text
decoders map one to one onto the official Flax tree: q/k/v/o projections
are our einsum weights reshaped, the gate/up pair is our stacked
`gating_einsum`, and both sides store RMSNorm scales as `1 + w`'s `w`. For
Gemma 3 4B+ (and TranslateGemma) the multimodal dir's text decoder is read
and its vision tower skipped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from gemma_mt.data.tokenizer import GemmaTokenizer
from gemma_mt.fs import atomic_dir
from gemma_mt.models.gemma import GLOBAL, LOCAL, TransformerConfig
from gemma_mt.weights.orbax_io import CheckpointError, write_meta

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
SHARD_BYTES = 4 << 30  # transformers' default max shard size (5 GB) and a margin.

_ARCHS = {'gemma': 'GemmaForCausalLM', 'gemma2': 'Gemma2ForCausalLM',
          'gemma3_text': 'Gemma3ForCausalLM'}
# Gemma3TextConfig's defaults: hub configs of the 4B+ models omit these.
_GEMMA3_DEFAULTS = dict(
    vocab_size=262_208, num_attention_heads=8, num_key_value_heads=4,
    head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None,
    final_logit_softcapping=None, attn_logit_softcapping=None,
    sliding_window_pattern=6)
_HF_LAYER = {GLOBAL: 'full_attention', LOCAL: 'sliding_attention'}


def is_hf_dir(path: str | os.PathLike) -> bool:
  path = Path(path)
  return (path / CONFIG_FILE).is_file() and (
      (path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file())


# ------------------------------------------------------------------ configs


def config_to_hf(cfg: TransformerConfig, tokenizer: GemmaTokenizer) -> dict:
  """transformers' config.json for `cfg` (raises if it cannot say `cfg`)."""
  kind = cfg.hf_model_type()
  d: dict[str, Any] = {
      'architectures': [_ARCHS[kind]], 'model_type': kind,
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.embed_dim,
      'intermediate_size': cfg.hidden_dim,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim,
      'hidden_activation': 'gelu_pytorch_tanh', 'rms_norm_eps': 1e-6,
      'attention_bias': False, 'attention_dropout': 0.0,
      'tie_word_embeddings': True, 'torch_dtype': 'bfloat16',
      'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id,
      'pad_token_id': tokenizer.pad_id,
  }
  qpas = cfg.query_pre_attn_scalar**-2
  qpas = round(qpas) if abs(qpas - round(qpas)) < 1e-6 * qpas else qpas
  if kind == 'gemma':
    _require(cfg, abs(qpas - cfg.head_dim) < 1e-6 * cfg.head_dim,
             'Gemma 1 scales queries by head_dim ** -0.5')
    _require(cfg, set(cfg.attention_types) == {GLOBAL}, 'global layers only')
    _require(cfg, cfg.final_logit_softcap is None
             and cfg.attn_logits_soft_cap is None, 'no soft-caps')
    _require(cfg, cfg.use_post_ffw_norm is False, 'no post-FFW norm')
    d.update(hidden_act='gelu_pytorch_tanh', max_position_embeddings=8192,
             rope_theta=cfg.global_rope_base)
  else:
    d.update(query_pre_attn_scalar=qpas,
             final_logit_softcapping=cfg.final_logit_softcap,
             attn_logit_softcapping=cfg.attn_logits_soft_cap,
             sliding_window=cfg.sliding_window_size,
             layer_types=[_HF_LAYER[t] for t in cfg.attention_types])
    _require(cfg, cfg.use_post_attn_norm and cfg.use_post_ffw_norm,
             'Gemma 2/3 have post-attention and post-FFW norms')
  if kind == 'gemma2':
    _require(cfg, cfg.local_rope_base == cfg.global_rope_base
             and cfg.local_rope_scale == cfg.global_rope_scale == 1,
             'Gemma 2 has one RoPE base and no scaling')
    d.update(rope_theta=cfg.global_rope_base, max_position_embeddings=8192,
             cache_implementation='hybrid')
  if kind == 'gemma3_text':
    _require(cfg, cfg.local_rope_scale == 1, 'no local RoPE scaling')
    d.update(rope_theta=cfg.global_rope_base,
             rope_local_base_freq=cfg.local_rope_base,
             rope_scaling=None if cfg.global_rope_scale == 1 else
             {'rope_type': 'linear', 'factor': cfg.global_rope_scale},
             max_position_embeddings=131_072 if cfg.global_rope_scale > 1
             else 32_768)
  return d


def _require(cfg: TransformerConfig, ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f'cannot write this config as {cfg.hf_model_type()}: {what}')


_INT_FIELDS = ('num_hidden_layers', 'vocab_size', 'hidden_size',
               'intermediate_size', 'num_attention_heads', 'head_dim',
               'num_key_value_heads', 'sliding_window')


def config_from_hf(d: dict, where: str = CONFIG_FILE) -> TransformerConfig:
  """Our config of a transformers config.json (the text part of Gemma 3's)."""
  kind = d.get('model_type')
  if kind == 'gemma3' and 'text_config' in d:  # 4B+ / TranslateGemma.
    log.warning('%s: a multimodal Gemma 3; loading its text decoder '
                '(the vision tower is skipped)', where)
    d, kind = d['text_config'], 'gemma3_text'
  if kind not in _ARCHS:
    raise CheckpointError(f'{where}: model_type {kind!r} is not a Gemma text '
                          f'decoder we read ({", ".join(_ARCHS)}, gemma3)')
  if kind == 'gemma3_text':
    d = _GEMMA3_DEFAULTS | {k: v for k, v in d.items() if v is not None or
                            k.endswith('softcapping') or k == 'rope_scaling'}

  def get(key):
    if key not in d:
      raise CheckpointError(f'{where}: field {key!r} is missing')
    v = d[key]
    if key in _INT_FIELDS and (isinstance(v, bool) or not isinstance(v, int)
                               or v < 1):
      raise CheckpointError(f'{where}: {key} {v!r} is not a positive integer')
    return v

  n = get('num_hidden_layers')
  for key in _INT_FIELDS:
    if key in d and d[key] is not None:
      get(key)
  head_dim = d.get('head_dim') or get('hidden_size') // get('num_attention_heads')
  kw: dict[str, Any] = dict(
      vocab_size=get('vocab_size'), embed_dim=get('hidden_size'),
      hidden_dim=get('intermediate_size'), num_heads=get('num_attention_heads'),
      head_dim=head_dim, num_kv_heads=get('num_key_value_heads'),
      query_pre_attn_scalar=float(d.get('query_pre_attn_scalar', head_dim))**-0.5)
  act = d.get('hidden_activation') or d.get('hidden_act')
  if act not in (None, 'gelu_pytorch_tanh', 'gelu'):
    raise CheckpointError(f'{where}: hidden_activation {act!r} is not Gemma\'s')
  rope = float(d.get('rope_theta', 10_000.0))
  if kind == 'gemma':
    return TransformerConfig(attention_types=(GLOBAL,) * n, **kw,
                             local_rope_base=rope, global_rope_base=rope)
  types = d.get('layer_types')
  if types is None:  # Older configs: a period (Gemma 3) or alternation (2).
    period = d.get('sliding_window_pattern', 2) if kind == 'gemma3_text' else 2
    types = ['full_attention' if (i + 1) % period == 0 else 'sliding_attention'
             for i in range(n)]
  ours = {v: k for k, v in _HF_LAYER.items()}
  if len(types) != n or not set(types) <= set(ours):
    raise CheckpointError(f'{where}: layer_types must be {n} (num_hidden_layers) '
                          f'of {sorted(ours)}')
  kw.update(attention_types=tuple(ours[t] for t in types),
            final_logit_softcap=d.get('final_logit_softcapping'),
            attn_logits_soft_cap=d.get('attn_logit_softcapping'),
            sliding_window_size=get('sliding_window'),
            use_post_attn_norm=True, use_post_ffw_norm=True)
  if kind == 'gemma2':
    return TransformerConfig(**kw, local_rope_base=rope, global_rope_base=rope)
  scaling = d.get('rope_scaling') or {}
  if scaling and scaling.get('rope_type', scaling.get('type')) != 'linear':
    raise CheckpointError(f'{where}: rope_scaling {scaling} is not linear')
  return TransformerConfig(
      **kw, use_qk_norm=True, transpose_gating_einsum=True,
      local_rope_base=float(d['rope_local_base_freq']), global_rope_base=rope,
      global_rope_scale=float(scaling.get('factor', 1.0)))


def named_config(cfg: TransformerConfig, vocab: int) -> TransformerConfig:
  """`cfg` without embedding rows past the tokenizer's `vocab` (Gemma 3
  4B+'s 64 image placeholders), padded as the released Flax config if it is
  one (HF Gemma 1/2: 256,000 rows; Flax: 256,128)."""
  cfg = cfg.replace(vocab_size=min(cfg.vocab_size, vocab))
  for v in (256_128, 262_144):
    named = cfg.replace(vocab_size=v)
    if named.name() is not None and abs(cfg.vocab_size - v) <= 128:
      return named
  return cfg


# ------------------------------------------------------------------ tensors


def params_to_hf(params: Any, cfg: TransformerConfig,
                 prefix: str = 'model.') -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) of every HF tensor, one at a time (numpy, C-contiguous:
  safetensors writes an array's memory as is)."""
  for name, x in _hf_tensors(params, cfg, prefix):
    yield name, np.ascontiguousarray(x)


def _hf_tensors(params, cfg, prefix):
  N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  a = lambda x: np.asarray(x)
  proj = lambda w, n: a(w).transpose(0, 2, 1).reshape(n * H, D)  # [n,D,H]
  yield prefix + 'embed_tokens.weight', a(params['embedder']['input_embedding'])
  for i in range(cfg.num_layers):
    p, b = params[f'layer_{i}'], f'{prefix}layers.{i}.'
    attn = p['attn']
    if 'qkv_einsum' in attn:
      q, k, v = a(attn['qkv_einsum']['w'])
    else:
      q, (k, v) = attn['q_einsum']['w'], a(attn['kv_einsum']['w'])
    yield b + 'self_attn.q_proj.weight', proj(q, N)
    yield b + 'self_attn.k_proj.weight', proj(k, K)
    yield b + 'self_attn.v_proj.weight', proj(v, K)
    yield b + 'self_attn.o_proj.weight', a(attn['attn_vec_einsum']['w']).reshape(N * H, D).T
    if cfg.use_qk_norm:
      yield b + 'self_attn.q_norm.weight', a(attn['_query_norm']['scale'])
      yield b + 'self_attn.k_norm.weight', a(attn['_key_norm']['scale'])
    gate, up = a(p['mlp']['gating_einsum'])
    if not cfg.transpose_gating_einsum:
      gate, up = gate.T, up.T
    yield b + 'mlp.gate_proj.weight', gate
    yield b + 'mlp.up_proj.weight', up
    yield b + 'mlp.down_proj.weight', a(p['mlp']['linear']).T
    for ours, theirs in _norm_names(cfg).items():
      yield b + theirs + '.weight', a(p[ours]['scale'])
  yield prefix + 'norm.weight', a(params['final_norm']['scale'])


def num_tensors(cfg: TransformerConfig) -> int:
  """How many tensors `params_to_hf` yields (for progress bars)."""
  norms = len(_norm_names(cfg))  # (Checks the family first.)
  per_layer = 7 + 2 * cfg.use_qk_norm + norms
  return 2 + cfg.num_layers * per_layer


def _norm_names(cfg: TransformerConfig) -> dict[str, str]:
  if cfg.hf_model_type() == 'gemma':  # Gemma 1's "post attention" norm is pre-FFW.
    return {'pre_attention_norm': 'input_layernorm',
            'pre_ffw_norm': 'post_attention_layernorm'}
  return {'pre_attention_norm': 'input_layernorm',
          'post_attention_norm': 'post_attention_layernorm',
          'pre_ffw_norm': 'pre_feedforward_layernorm',
          'post_ffw_norm': 'post_feedforward_layernorm'}


def params_from_hf(get: Callable[[str, tuple[int, ...]], np.ndarray],
                   cfg: TransformerConfig, prefix: str, rows: int) -> dict:
  """The official tree from `get(name, shape)` (numpy); the embedding is
  cut or zero-padded from its `rows` to `cfg.vocab_size`."""
  N, K, H, D, F = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.embed_dim, cfg.hidden_dim)
  unproj = lambda w, n: w.reshape(n, H, D).transpose(0, 2, 1)
  table = get(prefix + 'embed_tokens.weight', (rows, D))
  emb = np.zeros((cfg.vocab_size, D), table.dtype)
  emb[:min(rows, cfg.vocab_size)] = table[:cfg.vocab_size]
  params: dict = {'embedder': {'input_embedding': emb},
                  'final_norm': {'scale': get(prefix + 'norm.weight', (D,))}}
  for i in range(cfg.num_layers):
    b = f'{prefix}layers.{i}.'
    q = unproj(get(b + 'self_attn.q_proj.weight', (N * H, D)), N)
    k, v = (unproj(get(b + f'self_attn.{n}_proj.weight', (K * H, D)), K)
            for n in 'kv')
    o = get(b + 'self_attn.o_proj.weight', (D, N * H)).T.reshape(N, H, D)
    attn: dict = {'attn_vec_einsum': {'w': np.ascontiguousarray(o)}}
    if cfg.use_qkv_einsum:
      attn['qkv_einsum'] = {'w': np.stack([q, k, v])}
    else:
      attn['q_einsum'] = {'w': np.ascontiguousarray(q)}
      attn['kv_einsum'] = {'w': np.stack([k, v])}
    if cfg.use_qk_norm:
      attn['_query_norm'] = {'scale': get(b + 'self_attn.q_norm.weight', (H,))}
      attn['_key_norm'] = {'scale': get(b + 'self_attn.k_norm.weight', (H,))}
    gate = get(b + 'mlp.gate_proj.weight', (F, D))
    up = get(b + 'mlp.up_proj.weight', (F, D))
    gating = np.stack([gate, up]) if cfg.transpose_gating_einsum else \
        np.stack([gate.T, up.T])
    layer = {'attn': attn, 'mlp': {
        'gating_einsum': gating,
        'linear': np.ascontiguousarray(get(b + 'mlp.down_proj.weight', (D, F)).T)}}
    for ours, theirs in _norm_names(cfg).items():
      layer[ours] = {'scale': get(b + theirs + '.weight', (D,))}
    params[f'layer_{i}'] = layer
  return params


# ------------------------------------------------------------------ dirs


def _weight_files(path: Path) -> list[Path]:
  index = path / INDEX_FILE
  if index.is_file():
    try:
      names = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f'{index}: not a safetensors index ({e})') from None
    files = [path / n for n in names]
    if missing := [f.name for f in files if not f.is_file()]:
      raise CheckpointError(f'{index}: shard(s) missing: {", ".join(missing)}')
    return files
  return [path / WEIGHTS_FILE]


def read_dir(path: str | os.PathLike, dtype: Any = np.float32
             ) -> tuple[TransformerConfig, dict, GemmaTokenizer]:
  """(config, numpy params, tokenizer) of a Hugging Face Gemma dir."""
  from safetensors import safe_open

  path = Path(path).expanduser()
  try:
    hf_config = json.loads((path / CONFIG_FILE).read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path / CONFIG_FILE}: unreadable ({e})') from None
  cfg = config_from_hf(hf_config, str(path / CONFIG_FILE))
  handles = {}
  for f in _weight_files(path):
    try:
      h = safe_open(str(f), framework='np')
    except Exception as e:  # safetensors raises its own SafetensorError.
      raise CheckpointError(f'{f}: not a safetensors file ({e})') from None
    handles.update({k: h for k in h.keys()})
  embed = [k for k in handles if k.endswith('embed_tokens.weight')
           and 'vision' not in k]
  if len(embed) != 1:
    raise CheckpointError(f'{path}: no text decoder embedding '
                          '(…embed_tokens.weight) in the safetensors')
  prefix = embed[0].removesuffix('embed_tokens.weight')
  if skipped := sorted({'.'.join(k.split('.')[:2]) for k in handles
                        if not k.startswith(prefix) and k != 'lm_head.weight'}):
    log.warning('%s: skipping %s (not the text decoder)', path,
                ', '.join(skipped))
  rows = handles[embed[0]].get_slice(embed[0]).get_shape()[0]
  tokenizer = read_tokenizer(path)
  cfg = named_config(cfg.replace(vocab_size=rows), tokenizer.vocab_size)
  check_sizes(cfg, path / CONFIG_FILE)
  dtype = np.dtype(dtype)
  used = set()

  def get(name, shape):
    if name not in handles:
      raise CheckpointError(f'{path}: tensor {name!r} is missing')
    x = handles[name].get_tensor(name)
    if tuple(x.shape) != shape:
      raise CheckpointError(f'{path}: tensor {name!r} has shape '
                            f'{tuple(x.shape)}, expected {shape}')
    used.add(name)
    return x.astype(dtype)

  params = params_from_hf(get, cfg, prefix, rows)
  # Every text-decoder tensor must be read: one left over means config.json
  # describes a smaller model than the weights (a layer count, say).
  # lm_head.weight is the tied embedding, which some exports also store.
  if unused := sorted(k for k in handles if k.startswith(prefix)
                      and k not in used):
    more = f' and {len(unused) - 3} more' if len(unused) > 3 else ''
    raise CheckpointError(
        f'{path}: tensors {", ".join(unused[:3])}{more} are not part of the '
        f'model config.json describes ({cfg.num_layers} layers); the config '
        'and the weights disagree')
  return cfg, params, tokenizer


def check_sizes(cfg: TransformerConfig, where: Path) -> None:
  """Every size of the config is positive, so no model is built empty."""
  sizes = {'num_hidden_layers': cfg.num_layers, 'vocab_size': cfg.vocab_size,
           'hidden_size': cfg.embed_dim, 'intermediate_size': cfg.hidden_dim,
           'num_attention_heads': cfg.num_heads, 'head_dim': cfg.head_dim,
           'num_key_value_heads': cfg.num_kv_heads}
  if bad := [f'{k} {v}' for k, v in sizes.items() if v < 1]:
    raise CheckpointError(f'{where}: {", ".join(bad)}: sizes must be >= 1')


def read_tokenizer(path: Path) -> GemmaTokenizer:
  if (path / 'tokenizer.model').is_file():
    return GemmaTokenizer.from_file(path / 'tokenizer.model')
  raise CheckpointError(f'{path}: no tokenizer.model (the SentencePiece '
                        'model every Gemma release ships)')


def write_dir(path: str | os.PathLike, cfg: TransformerConfig, params: Any,
              tokenizer: GemmaTokenizer, *, dtype: str = 'bfloat16',
              overwrite: bool = False, prompt: dict | None = None,
              meta: dict | None = None,
              progress: Callable[[Iterator], Iterator] = lambda it: it) -> Path:
  """Writes a dir `transformers.AutoModelForCausalLM.from_pretrained` loads.

  Weights in `dtype` (bfloat16, float16 or float32), sharded past
  SHARD_BYTES with an index (each shard written as it fills, so host memory
  holds one shard, not the model); the SentencePiece tokenizer with its HF config; `prompt`
  (`export._prompt`) as chat template and extra stop id; `meta` as our
  gemma_mt.json. Written to a temp dir and renamed, so a killed export
  leaves nothing.
  """
  import ml_dtypes
  from safetensors.numpy import save_file

  np_dtype = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32,
              'float16': np.float16}[dtype]
  hf_config = config_to_hf(cfg, tokenizer) | {'torch_dtype': dtype}
  with atomic_dir(path, overwrite) as tmp:
    tmp.mkdir()
    shards: list[list[str]] = []  # Tensor names per shard, written as filled.
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
      save_file(shard, tmp / f'shard-{len(shards)}', metadata={'format': 'pt'})
      shards.append(list(shard))
      shard.clear()

    for name, x in progress(params_to_hf(params, cfg)):
      x = np.ascontiguousarray(x.astype(np_dtype))
      if shard and size + x.nbytes > SHARD_BYTES:
        flush()
        size = 0
      shard[name] = x
      size, total = size + x.nbytes, total + x.nbytes
    flush()
    if len(shards) == 1:
      (tmp / 'shard-0').rename(tmp / WEIGHTS_FILE)
    else:
      weight_map = {}
      for i, names in enumerate(shards):
        file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        (tmp / f'shard-{i}').rename(tmp / file)
        weight_map |= dict.fromkeys(names, file)
      (tmp / INDEX_FILE).write_text(json.dumps(
          {'metadata': {'total_size': total}, 'weight_map': weight_map},
          indent=2) + '\n')
    _write_json(tmp / CONFIG_FILE, hf_config)
    _write_json(tmp / 'generation_config.json', generation_config(
        tokenizer, prompt))
    write_tokenizer(tmp, tokenizer, prompt)
    if meta is not None:
      write_meta(tmp, meta)
  return Path(path).expanduser().absolute()


def generation_config(tokenizer: GemmaTokenizer, prompt: dict | None) -> dict:
  eos = [tokenizer.eos_id]
  if prompt and prompt.get('stop'):
    eos += [tokenizer.processor.PieceToId(prompt['stop'])]
  return {'bos_token_id': tokenizer.bos_id, 'pad_token_id': tokenizer.pad_id,
          'eos_token_id': eos if len(eos) > 1 else eos[0],
          'do_sample': False}


def write_tokenizer(path: Path, tokenizer: GemmaTokenizer,
                    prompt: dict | None = None) -> None:
  """tokenizer.model + the config that makes AutoTokenizer a Gemma one."""
  (path / 'tokenizer.model').write_bytes(tokenizer.serialized_model_proto())
  piece = tokenizer.processor.IdToPiece
  config = {
      'tokenizer_class': 'GemmaTokenizer', 'add_bos_token': True,
      'add_eos_token': False, 'bos_token': piece(tokenizer.bos_id),
      'eos_token': piece(tokenizer.eos_id), 'pad_token': piece(tokenizer.pad_id),
      'unk_token': piece(tokenizer.processor.unk_id()),
      'clean_up_tokenization_spaces': False, 'model_max_length': 1 << 20,
      'padding_side': 'left'}
  if prompt and prompt.get('chat_template'):
    config['chat_template'] = prompt['chat_template']
  _write_json(path / 'tokenizer_config.json', config)
  _write_json(path / 'special_tokens_map.json', {
      k: config[k] for k in ('bos_token', 'eos_token', 'pad_token', 'unk_token')})


def _write_json(path: Path, d: dict) -> None:
  path.write_text(json.dumps(d, indent=2) + '\n')


def prompt_format_of(path: Path) -> str:
  """TranslateGemma dirs (their chat template asks for language codes) are
  prompted its way; any other HF dir the plain way."""
  try:
    template = json.loads((path / 'tokenizer_config.json').read_text()).get(
        'chat_template') or ''
  except (OSError, ValueError):
    template = ''
  if not template and (path / 'chat_template.jinja').is_file():
    template = (path / 'chat_template.jinja').read_text()
  return 'translategemma' if 'source_lang_code' in template else 'plain'
