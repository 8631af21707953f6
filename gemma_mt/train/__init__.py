"""Fine-tuning: config, state, loss and steps, checkpoints, metrics, the loop.

    from gemma_mt.train import TrainingConfig, train_loop
    train_loop(TrainingConfig(mtnt_dir='../shared/data/mtnt', max_steps=20))

Modules: `config` (TrainingConfig), `optimizer`, `state` (TrainState and
its init), `loss` (fused cross-entropy), `steps` (jitted train/validation
steps), `checkpoints`, `metrics`, `loop` (train_loop), `main` (the CLI).
Names below are imported on first use, so `--help` starts fast.
"""

import importlib

_EXPORTS = {'TrainingConfig': 'config', 'train_loop': 'loop', 'Model': 'state',
            'TrainState': 'state', 'init_train': 'state', 'main': 'main'}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'),
                   name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
