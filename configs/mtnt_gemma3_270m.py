"""Gemma 3 270M (embedded, no download) on MTNT en->fr, the tutorial's recipe.

Data from TFDS by default; offline: --mtnt_dir ../shared/data/mtnt.
"""

from gemma_mt.train import TrainingConfig


def get_config() -> TrainingConfig:
  return TrainingConfig(
      model='gemma3_270m', optimizer='sgd', learning_rate=1e-4,
      batch_size=4, max_seq_len=128, num_epochs=1, eval_every_n=20,
      eval_max_batches=None, log_every_n=10, checkpoint_every_n=200,
      keep_checkpoints=2, dtype='bfloat16', param_dtype='float32',
      workdir='runs/mtnt_gemma3_270m')
