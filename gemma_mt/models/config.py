"""What every family's config shares: released names, the dict form kept in
`config.json`, and `replace`.

A family's config is a frozen dataclass that inherits this, lists its
released names in `NAMES` (each a classmethod, plus `tiny` for tests) and
implements the rest of `models.ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self


class FamilyConfig:
  family: ClassVar[str]
  NAMES: ClassVar[tuple[str, ...]]

  @property
  def num_layers(self) -> int:
    return len(self.attention_types)

  def replace(self, **kw) -> Self:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_name(cls, name: str) -> Self:
    if name not in cls.NAMES + ('tiny',):
      raise ValueError(f'unknown model {name!r}; choose one of {cls.NAMES}')
    return getattr(cls, name)()

  def name(self) -> str | None:
    """The released model name of exactly this config, if any."""
    return next((n for n in self.NAMES if getattr(type(self), n)() == self),
                None)

  def to_dict(self) -> dict[str, Any]:
    return {'family': self.family, **dataclasses.asdict(self)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Self:
    d = {k: v for k, v in d.items() if k != 'family'}
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - names):
      raise ValueError(f'unknown model config fields {unknown}')
    return cls(**{**d, 'attention_types': tuple(d['attention_types'])})
