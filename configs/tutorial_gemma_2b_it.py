"""The setup of Google's "Fine-tune Gemma with JAX and Flax" tutorial.

Gemma 2B-IT from Kaggle (needs KAGGLE_USERNAME/KAGGLE_KEY and the license
accepted), SGD at lr 1e-4, batch 4, max_seq_len 128, one epoch, validation
every 20 steps. The tutorial stops after 100 steps; so do we.
"""

from gemma_mt.train import TrainingConfig


def get_config() -> TrainingConfig:
  return TrainingConfig(
      model='gemma_2b_it', optimizer='sgd', learning_rate=1e-4,
      batch_size=4, max_seq_len=128, num_epochs=1, eval_every_n=20,
      max_steps=100, eval_max_batches=None, log_every_n=10,
      checkpoint_every_n=100, dtype='bfloat16', param_dtype='float32',
      workdir='runs/tutorial_gemma_2b_it')
