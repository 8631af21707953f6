"""A tiny random-init Gemma-3-shaped model: tests and smoke runs (CPU, seconds)."""

from gemma_mt.train import TrainingConfig


def get_config() -> TrainingConfig:
  return TrainingConfig(
      model='tiny', init='random', dtype='float32',
      mtnt_dir='../shared/data/mtnt', max_seq_len=64, batch_size=4,
      learning_rate=1e-2, max_steps=6, eval_every_n=3, eval_max_batches=2,
      log_every_n=1, checkpoint_every_n=3, loss_chunk_size=128,
      workdir='runs/tiny_test', progress=False)
