"""`TrainingConfig`: every field of a run, declared once.

Config files (`configs/*.py`) return one from `get_config()`; every field is
also a `--flag` of `python -m gemma_mt.train` (`cli.add_fields`), whose help
is the comment beside the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from gemma_mt import lora

OPTIMIZERS = ('sgd', 'adamw', 'adafactor')
SCHEDULES = ('constant', 'cosine', 'linear')
SELECT_BY = ('chrf', 'bleu')
MAX_RATE = 100.0


@dataclasses.dataclass
class TrainingConfig:
  """Everything a run needs; every field can be overridden with --field=value."""

  # Model.
  model: str = 'gemma3_270m'        # a weights.MODELS name, or 'tiny'
  checkpoint: str | None = None     # init from this dir instead of `model`
  init: str = 'pretrained'          # 'pretrained' or 'random' (tests, smoke)
  dtype: str = 'bfloat16'           # compute dtype
  param_dtype: str = 'float32'      # master weights; 'bfloat16' = pure bf16
  attention_impl: str = 'einsum'    # 'einsum', 'jax' or 'cudnn'
  remat: bool = False               # recompute blocks in the backward pass
  # LoRA / QLoRA (lora_rank > 0): the base is frozen, adapters train.
  lora_rank: int = 0                # 0 = full fine-tune
  lora_alpha: float = 16.0          # adapters scaled by alpha / rank
  lora_targets: str = 'q,kv,o,gate_up,down'  # subset of lora.TARGETS
  lora_quant: str | None = None     # QLoRA: 'int8' or 'int4' frozen base
  # Devices: a ('data', 'fsdp') mesh over all devices; -1 = the rest.
  mesh_data: int = -1               # data-parallel axis size
  mesh_fsdp: int = 1                # FSDP axis size (params sharded)
  # Data.
  source: str | None = None         # 'tfds' or 'dir'; default from mtnt_dir
  mtnt_dir: str | None = None       # extracted MTNT release dir
  tfds_data_dir: str | None = None  # TFDS data dir (default ~/tensorflow_datasets)
  mtnt_archive: str | None = None   # local MTNT.1.1.tar.gz for TFDS when offline
  lang_pair: str = 'en-fr'          # MTNT pair
  prompt_format: str = 'plain'      # 'plain', 'chat' or 'translategemma' (gemma_mt.prompts)
  max_seq_len: int = 128            # tokens per row (longer pairs dropped)
  truncate: bool = False            # cut long pairs instead of dropping them
  both_directions: bool = False     # also train the reverse task (fr->en) on the same pairs, with its own prompt
  packing: bool = False             # several pairs per row (segment ids)
  batch_size: int = 4               # rows per optimizer update
  eval_batch_size: int | None = None  # default: batch_size
  num_epochs: int = 1               # passes over the training split
  max_steps: int | None = None      # stop after this many updates
  # Optimizer.
  optimizer: str = 'sgd'            # 'sgd', 'adamw' or 'adafactor'
  learning_rate: float = 1e-4       # peak learning rate
  lr_schedule: str = 'constant'     # after warm-up: 'constant', 'cosine' or 'linear' decay to 0
  warmup_steps: int = 0             # linear warm-up from 0
  weight_decay: float = 0.0         # decoupled weight decay
  grad_clip: float | None = None    # global-norm clipping
  grad_accum_steps: int = 1         # micro-batches per update (same math)
  average_last_k: int = 0           # also score the mean of the params of the last K evaluations (0/1: off); may become best/
  ema_decay: float = 0.0            # also keep an EMA of the params (e.g. 0.99; 0: off); scored like the params, may become best/
  label_smoothing: float = 0.0      # training target: 1 - a on the label, a spread over the vocabulary
  loss_chunk_size: int | None = None  # rows of [rows, vocab] logits at a time; None: the loss's default
  # Loop and outputs.
  workdir: str = 'runs/mtnt'        # metrics, checkpoints, final/
  eval_every_n: int = 20            # validation loss every N steps (0: never)
  eval_max_batches: int | None = None  # validation batches per evaluation
  eval_bleu_every_n: int = 0        # translate valid and score BLEU/chrF every N steps (0: never)
  eval_bleu_sentences: int | None = None  # first N valid pairs (None: all of them)
  eval_bleu_batch_size: int = 64    # sentences per translation batch
  select_by: str = 'chrf'           # keep workdir/best by 'chrf' or 'bleu'
  early_stop_patience: int = 0      # stop after N BLEU evaluations without a new best (0: never)
  log_every_n: int = 10             # train metrics every N steps
  checkpoint_every_n: int = 100     # checkpoint every N steps
  keep_checkpoints: int = 2         # newest checkpoints kept
  resume: bool = False              # continue from the newest checkpoint
  force_resume: bool = False        # resume although the data/batch settings changed
  seed: int = 0                     # data order, init, dropout
  progress: bool = True             # a tqdm progress bar

  def lora_config(self) -> 'lora.LoraConfig | None':
    from gemma_mt import lora  # Here, so that --help does not import jax.
    if self.lora_rank <= 0:
      return None
    targets = tuple(t.strip() for t in self.lora_targets.split(',') if t.strip())
    return lora.LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha,
                           targets=targets, quant=self.lora_quant)

  def check(self) -> None:
    """Raises ValueError naming the first bad field (before anything loads)."""
    check_types(self)
    positive = ('batch_size', 'grad_accum_steps', 'max_seq_len', 'num_epochs',
                'log_every_n', 'checkpoint_every_n', 'keep_checkpoints')
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f'--{name} must be >= 1, got {getattr(self, name)}')
    for name in ('eval_batch_size', 'max_steps', 'eval_max_batches',
                 'loss_chunk_size', 'eval_bleu_sentences',
                 'eval_bleu_batch_size'):
      v = getattr(self, name)
      if v is not None and v < 1:
        raise ValueError(f'--{name} must be >= 1 (or none), got {v}')
    for name in ('eval_every_n', 'warmup_steps', 'lora_rank', 'average_last_k',
                 'eval_bleu_every_n', 'early_stop_patience'):
      if getattr(self, name) < 0:
        raise ValueError(f'--{name} must be >= 0, got {getattr(self, name)}')
    # Upper bounds far past any working value, so that a typo (1e8 for
    # 1e-8) is refused here instead of diverging after the compile.
    if not 0 < self.learning_rate <= MAX_RATE:
      raise ValueError(f'--learning_rate must be in (0, {MAX_RATE}], got '
                       f'{self.learning_rate}')
    if not 0 <= self.weight_decay <= MAX_RATE:
      raise ValueError(f'--weight_decay must be in [0, {MAX_RATE}], got '
                       f'{self.weight_decay}')
    if not 0 <= self.ema_decay < 1:
      raise ValueError(f'--ema_decay must be in [0, 1), got {self.ema_decay}')
    for name in ('ema_decay', 'average_last_k'):
      if getattr(self, name) and not self.eval_bleu_every_n:
        raise ValueError(f'--{name} needs --eval_bleu_every_n > 0 (an '
                         'average is kept only if it scores better)')
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f'--label_smoothing must be in [0, 1), got '
                       f'{self.label_smoothing}')
    workdir = Path(self.workdir)
    if workdir.exists() and not workdir.is_dir():
      raise ValueError(f'--workdir {workdir}: is a file')
    if self.mtnt_dir and not Path(self.mtnt_dir).is_dir():
      raise ValueError(f'--mtnt_dir {self.mtnt_dir}: no such directory')
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(f'batch_size={self.batch_size} is not a multiple of '
                       f'grad_accum_steps={self.grad_accum_steps}')
    if self.lora_quant and self.lora_rank <= 0:
      raise ValueError('lora_quant needs lora_rank > 0')
    self.lora_config()  # Raises on bad targets / quant.
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f'--optimizer must be one of {OPTIMIZERS}, got '
                       f'{self.optimizer!r}')
    if self.lr_schedule not in SCHEDULES:
      raise ValueError(f'--lr_schedule must be one of {SCHEDULES}, got '
                       f'{self.lr_schedule!r}')
    if self.select_by not in SELECT_BY:
      raise ValueError(f'--select_by must be one of {SELECT_BY}, got '
                       f'{self.select_by!r}')
    if self.early_stop_patience and not self.eval_bleu_every_n:
      raise ValueError('--early_stop_patience needs --eval_bleu_every_n > 0')
    if self.mtnt_archive and (self.mtnt_dir or self.source == 'dir'):
      raise ValueError('--mtnt_archive is for the TFDS source; drop it or --mtnt_dir')
    if self.mtnt_archive and not Path(self.mtnt_archive).is_file():
      raise ValueError(f'--mtnt_archive {self.mtnt_archive}: no such file')
    from gemma_mt.data.prompts import FORMATS
    if self.prompt_format not in FORMATS:
      raise ValueError(f'--prompt_format must be one of {FORMATS}, got '
                       f'{self.prompt_format!r}')
    if self.init not in ('pretrained', 'random'):
      raise ValueError(f"--init must be 'pretrained' or 'random', got "
                       f'{self.init!r}')
    from jax import numpy as jnp  # Here, so that --help does not import jax.
    for name in ('dtype', 'param_dtype'):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(f'--{name}: unknown dtype '
                         f'{getattr(self, name)!r}') from None


def _accepts(tp: str, v) -> bool:
  """`v` fits the field annotation `tp` (a string: 'int', 'float | None')."""
  kinds = {'int': int, 'float': (int, float), 'str': str, 'bool': bool}
  options = [t.strip() for t in tp.split('|')]
  if v is None:
    return 'None' in options
  if isinstance(v, bool):
    return 'bool' in options
  return any(isinstance(v, kinds[t]) for t in options if t in kinds)


def check_types(config: TrainingConfig) -> None:
  """Every field holds its declared type and every number is finite: what a
  config file sets is checked like what a flag sets."""
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if not _accepts(f.type, v):
      raise ValueError(f'{f.name} must be {f.type}, got {v!r}')
    if isinstance(v, float) and not math.isfinite(v):
      raise ValueError(f'{f.name} must be finite, got {v!r}')


def load_config_file(path: str | Path) -> TrainingConfig:
  """A python file with `get_config() -> TrainingConfig`.

  Whatever goes wrong inside the file (an exception, `sys.exit`, a misspelled
  field, a wrong type) is one ValueError naming the file and, where there is
  one, the field and the closest real field.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'--config {path}: no such file')
  spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise ValueError('defines no get_config()')
    config = module.get_config()
  except TypeError as e:
    raise ValueError(f'config file {path}: {unknown_field_hint(e)}') from None
  except (Exception, SystemExit) as e:  # Its own code: anything can happen.
    raise ValueError(f'config file {path}: {type(e).__name__}: {e}') from None
  if not isinstance(config, TrainingConfig):
    raise ValueError(f'{path}: get_config() returned a '
                     f'{type(config).__name__}, not a TrainingConfig')
  try:
    check_types(config)
  except ValueError as e:
    raise ValueError(f'config file {path}: {e}') from None
  return config


def unknown_field_hint(e: TypeError) -> str:
  """"unexpected keyword argument 'lerning_rate'" → the closest field."""
  m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
  if not m:
    return f'TypeError: {e}'
  names = [f.name for f in dataclasses.fields(TrainingConfig)]
  close = difflib.get_close_matches(m[1], names, n=1)
  return (f'unknown field {m[1]!r}' +
          (f'; did you mean {close[0]!r}?' if close else ''))
