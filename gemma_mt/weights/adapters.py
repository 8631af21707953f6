"""LoRA adapter dirs: the adapters alone (a few MB) plus which base they adapt.

Layout: `adapters/` (orbax, adapter leaves only), `lora.json` (the
`LoraConfig`) and `gemma_mt.json` (`arch`, `config`, `prompt_format`,
`base_model`, `base_checkpoint`).
`weights.load_dir` reloads the base and merges the adapters into it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from gemma_mt import fs
from gemma_mt.lora import LoraConfig
from gemma_mt.weights import orbax_io

ADAPTERS_DIR, CONFIG_FILE = 'adapters', 'lora.json'


def is_adapter_dir(path: str | os.PathLike) -> bool:
  return (Path(path) / CONFIG_FILE).is_file()


def save(path: str | os.PathLike, meta: dict, adapters: Any,
         lora_config: LoraConfig, *, base_model: str,
         base_checkpoint: str | os.PathLike | None = None,
         overwrite: bool = False) -> Path:
  """Writes an adapter dir atomically (a killed save leaves nothing);
  `meta`: the architecture and prompt format (`weights.model_meta`)."""
  with fs.atomic_dir(path, overwrite) as tmp:
    tmp.mkdir()
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / ADAPTERS_DIR, adapters)
      ckptr.wait_until_finished()
    (tmp / CONFIG_FILE).write_text(lora_config.to_json())
    orbax_io.write_meta(tmp, {
        **meta, 'base_model': base_model,
        'base_checkpoint': None if base_checkpoint is None
        else str(Path(base_checkpoint).expanduser().absolute())})
  return Path(path).expanduser().absolute()


def load(path: str | os.PathLike) -> tuple[Any, LoraConfig, dict]:
  """(adapters, lora_config, meta) of an adapter dir."""
  path = Path(path).expanduser().absolute()
  if not is_adapter_dir(path):
    raise FileNotFoundError(f'no LoRA adapters at {path} (no {CONFIG_FILE})')
  meta = orbax_io.read_meta(path)
  if meta is None:
    raise FileNotFoundError(f'{path}: LoRA adapters without '
                            f'{orbax_io.META_FILE} (which base model they '
                            'belong to)')
  lora_config = LoraConfig.from_json((path / CONFIG_FILE).read_text())
  with ocp.StandardCheckpointer() as ckptr:
    adapters = ckptr.restore(path / ADAPTERS_DIR)
  return adapters, lora_config, meta
