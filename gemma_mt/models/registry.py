"""Names and stored configs to model families: the only place that knows
which families exist.

Every other module holds a `ModelConfig` and asks it for its module, cache,
LM head and accounting (`models.ModelConfig`), as gemma's
`gm.nn._transformer_like` gives each config its own `init_cache`.
"""

from __future__ import annotations

from typing import Any

from gemma_mt.models.gemma import TransformerConfig
from gemma_mt.models.gemma4 import Gemma4Config
from gemma_mt.models.layers import param_shapes  # noqa: F401 (public here)

FAMILIES = {c.family: c for c in (TransformerConfig, Gemma4Config)}
NAMES = tuple(n for c in FAMILIES.values() for n in c.NAMES)
# Toy configs of each family for tests and CPU smoke runs (real vocabulary).
TINY = {'tiny': TransformerConfig.tiny, 'tiny_gemma4': Gemma4Config.tiny}


def from_name(name: str):
  """A released architecture by name (`gemma3_270m`, `gemma4_e2b`, ...), or
  a toy of `TINY`."""
  if name in TINY:
    return TINY[name]()
  for cls in FAMILIES.values():
    if name in cls.NAMES:
      return cls.from_name(name)
  raise ValueError(f'unknown model {name!r}; choose one of {sorted(NAMES)}')


def from_dict(d: dict[str, Any]):
  """A config stored by `config.to_dict()` (no `family`: Gemma 1-3, as
  stored before Gemma 4 existed)."""
  family = d.get('family', TransformerConfig.family)
  if family not in FAMILIES:
    raise ValueError(f'unknown model family {family!r}; known: {sorted(FAMILIES)}')
  return FAMILIES[family].from_dict(d)


def resolve(arch):
  """An arch name, or a config as is (an imported model of no named size)."""
  return from_name(arch) if isinstance(arch, str) else arch
