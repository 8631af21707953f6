"""LoRA adapters as a Hugging Face PEFT adapter dir (what PEFT and vLLM load
onto the HF base): `adapter_config.json` + `adapter_model.safetensors`.

Our adapters (qwix) sit on the fused einsum weights; PEFT's on the
separate projections. A fused A (shared input side) is copied to each
projection it feeds and B is split, which is exact: q/k/v share x, and
gate/up share x. PEFT's `lora_B @ lora_A * alpha / r` then equals our
`A @ B * alpha / rank` laid out as the HF weight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gemma_mt.fs import atomic_dir
from gemma_mt.lora import LoraConfig
from gemma_mt.models.gemma import TransformerConfig

CONFIG_FILE, WEIGHTS_FILE = 'adapter_config.json', 'adapter_model.safetensors'


def adapter_tensors(adapters: Any, cfg: TransformerConfig
                    ) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
  """(module path, HF projection, lora_A [r, in], lora_B [out, r])."""
  N, H = cfg.num_heads, cfg.head_dim
  a = lambda x: np.asarray(x, np.float32)
  # [r, n, H] -> [n * H, r]: B of an einsum with heads on the output side.
  heads = lambda b: b.transpose(1, 2, 0).reshape(-1, b.shape[0])
  for i in range(cfg.num_layers):
    p, attn_path = adapters.get(f'layer_{i}', {}), f'model.layers.{i}.self_attn'
    attn, mlp = p.get('attn', {}), p.get('mlp', {})
    if 'qkv_einsum' in attn:
      A, B = a(attn['qkv_einsum']['w_lora_a']), a(attn['qkv_einsum']['w_lora_b'])
      for j, n in enumerate('qkv'):
        yield attn_path, f'{n}_proj', A.T, heads(B[:, j])
    if 'q_einsum' in attn:
      A, B = a(attn['q_einsum']['w_lora_a']), a(attn['q_einsum']['w_lora_b'])
      yield attn_path, 'q_proj', A.T, heads(B)
    if 'kv_einsum' in attn:
      A, B = a(attn['kv_einsum']['w_lora_a']), a(attn['kv_einsum']['w_lora_b'])
      yield attn_path, 'k_proj', A.T, heads(B[:, 0])
      yield attn_path, 'v_proj', A.T, heads(B[:, 1])
    if 'attn_vec_einsum' in attn:  # A [N, H, r] (input side), B [r, D].
      A = a(attn['attn_vec_einsum']['w_lora_a'])
      yield (attn_path, 'o_proj', A.reshape(N * H, -1).T,
             a(attn['attn_vec_einsum']['w_lora_b']).T)
    mlp_path = f'model.layers.{i}.mlp'
    if 'gating_einsum_lora_a' in mlp:  # A [D, r], B [r, 2, F].
      A, B = a(mlp['gating_einsum_lora_a']), a(mlp['gating_einsum_lora_b'])
      yield mlp_path, 'gate_proj', A.T, B[:, 0].T
      yield mlp_path, 'up_proj', A.T, B[:, 1].T
    if 'linear_lora_a' in mlp:  # A [F, r], B [r, D].
      yield (mlp_path, 'down_proj', a(mlp['linear_lora_a']).T,
             a(mlp['linear_lora_b']).T)


def write_peft(path: str | os.PathLike, cfg: TransformerConfig, adapters: Any,
               lora_config: LoraConfig, base_model: str, *,
               overwrite: bool = False) -> Path:
  """Writes the PEFT dir atomically; `base_model`: the HF base it adapts
  (a hub id or the dir `export --to hf` wrote)."""
  from safetensors.numpy import save_file

  tensors, targets = {}, set()
  for module, proj, A, B in adapter_tensors(adapters, cfg):
    key = f'base_model.model.{module}.{proj}'
    tensors[f'{key}.lora_A.weight'] = np.ascontiguousarray(A)
    tensors[f'{key}.lora_B.weight'] = np.ascontiguousarray(B)
    targets.add(proj)
  if not tensors:
    raise ValueError('no LoRA adapters in the given tree')
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': str(base_model),
      'r': lora_config.rank, 'lora_alpha': lora_config.alpha,
      'lora_dropout': lora_config.dropout, 'target_modules': sorted(targets),
      'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False,
      'inference_mode': True, 'init_lora_weights': True,
  }
  with atomic_dir(path, overwrite) as tmp:
    tmp.mkdir()
    save_file(tensors, tmp / WEIGHTS_FILE, metadata={'format': 'pt'})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
  return Path(path).expanduser().absolute()
