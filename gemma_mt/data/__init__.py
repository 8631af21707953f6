"""Data: MTNT (`mtnt`: the TSV and TFDS sources, the dataset builder),
`packing`, `prompts` (the prompt formats, listed once) and `tokenizer`.

    from gemma_mt.data import MTNTDatasetBuilder
"""

import importlib

_EXPORTS = {'MTNTDatasetBuilder': 'mtnt', 'TrainingInput': 'mtnt',
            'GemmaTokenizer': 'tokenizer'}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'),
                   name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
