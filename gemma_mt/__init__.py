"""gemma_mt: fine-tune Gemma for English->French on MTNT, then translate.

    import gemma_mt
    pt = gemma_mt.load('gemma3_270m')                 # config, params, tokenizer
    translator = gemma_mt.Translator(pt.config, pt.params, pt.tokenizer)
    translator.translate(['Hello, my name is Morgane.'])

Names are imported on first use (the CLIs' `--help` needs no jax).
"""

import importlib

_EXPORTS = {
    'load': 'gemma_mt.weights', 'save': 'gemma_mt.weights',
    'Transformer': 'gemma_mt.models.gemma',
    'TransformerConfig': 'gemma_mt.models.gemma',
    'Gemma4Config': 'gemma_mt.models.gemma4',
    'ModelConfig': 'gemma_mt.models',
    'Translator': 'gemma_mt.translator',
    'SamplingOptions': 'gemma_mt.decoding.options',
    'TrainingConfig': 'gemma_mt.train.config',
    'train_loop': 'gemma_mt.train.loop',
    'MTNTDatasetBuilder': 'gemma_mt.data.mtnt',
    'GemmaTokenizer': 'gemma_mt.data.tokenizer',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
