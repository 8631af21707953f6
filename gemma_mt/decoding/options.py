"""How to decode: `SamplingOptions`, the one place for defaults and checks.

The `Translator`, the translate/evaluate CLIs (flags derived from the fields
by `cli.add_fields`) and the JSON interface all build one of these, so a
default or a rule is written once: greedy unless a temperature is given,
top_k / top_p alone imply temperature 1, and every value is range-checked
here with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

DEFAULT_MAX_INPUT_TOKENS = 1024  # prompt tokens a Translator accepts per input

DEFAULT_MAX_NEW_TOKENS = 256
# A translation of one line never needs more; larger budgets only size the
# KV cache (B x (prompt + budget) slots) toward out-of-memory.
MAX_NEW_TOKENS_LIMIT = 8192
MAX_TEMPERATURE = 100.0  # beyond it, sampling is uniform to float precision
# CLI default: French runs ~1.2-1.5x the English token count, so 3x the
# whole prompt never cuts a real translation but bounds a runaway one.
DEFAULT_MAX_LENGTH_RATIO = 3.0


class OptionError(ValueError):
  """A bad sampling option; `field` names it (the JSON API renames it)."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f'{field} {message}')


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x) -> bool:
  return (isinstance(x, numbers.Real) and not isinstance(x, bool)
          and math.isfinite(x))


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """Decoding options of one translate call (validated on construction)."""

  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # new tokens per input, at most
  temperature: float | None = None  # 0 = greedy; None: 1 if top_k/top_p, else 0
  top_k: int | None = None          # sample among the k most likely tokens
  top_p: float | None = None        # nucleus: the smallest set with this mass
  seed: int = 0                     # sampling seed (per input, order-free)
  stop_sequences: tuple[str, ...] = ()  # cut the text at the first of these
  max_length_ratio: float | None = None  # at most ceil(r * prompt tokens) new tokens; 0/None: off
  beam_size: int = 1                # beam search with K beams (1: greedy / sampling)
  length_penalty: float = 0.0       # GNMT alpha: score = logp / ((5 + len) / 6) ** alpha
  mbr: int = 0                      # MBR over the N-best of a beam of N (0/1: off)
  mbr_utility: str = 'chrf'         # MBR utility: 'chrf' or 'bleu' (sacreBLEU)

  FLAG_ALIASES: ClassVar[dict[str, str]] = {'stop_sequences': '--stop'}

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if self.temperature is None:
      sampling = self.top_k is not None or self.top_p is not None
      set_('temperature', 1.0 if sampling else 0.0)
    if isinstance(self.stop_sequences, str):
      raise OptionError('stop_sequences', 'must be a list of strings, not '
                        'one string')
    set_('stop_sequences', tuple(self.stop_sequences))
    if self.max_length_ratio == 0:
      set_('max_length_ratio', None)
    def need(ok: bool, name: str, what: str):
      if not ok:
        raise OptionError(name, f'must be {what}, got {getattr(self, name)!r}')

    opt = lambda x, check: x is None or check(x)
    need(_is_int(self.max_new_tokens)
         and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
         'max_new_tokens', f'an int in [1, {MAX_NEW_TOKENS_LIMIT}]')
    need(_is_num(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
         'temperature', f'a number in [0, {MAX_TEMPERATURE}]')
    need(opt(self.top_k, lambda k: _is_int(k) and k >= 1), 'top_k',
         'None or an int >= 1')
    need(opt(self.top_p, lambda p: _is_num(p) and 0 < p <= 1), 'top_p',
         'None or a number in (0, 1]')
    need(_is_int(self.seed) and 0 <= self.seed < 2**31, 'seed',
         'an int in [0, 2**31)')
    for i, s in enumerate(self.stop_sequences):
      if not isinstance(s, str) or not s:
        raise OptionError(f'stop_sequences[{i}]', f'must be a non-empty '
                          f'string, got {s!r}')
    need(opt(self.max_length_ratio, lambda r: _is_num(r) and r > 0),
         'max_length_ratio', 'None or a number > 0')
    need(_is_int(self.beam_size) and self.beam_size >= 1, 'beam_size',
         'an int >= 1')
    need(_is_num(self.length_penalty) and self.length_penalty >= 0,
         'length_penalty', 'a number >= 0')
    need(_is_int(self.mbr) and self.mbr >= 0, 'mbr', 'an int >= 0')
    need(self.mbr_utility in ('chrf', 'bleu'), 'mbr_utility',
         "'chrf' or 'bleu'")
    if self.search_width > 1 and self.temperature > 0:
      raise OptionError('beam_size', 'and mbr search cannot be combined '
                        'with sampling (temperature > 0)')

  @property
  def search_width(self) -> int:
    """Beams to run: beam_size, widened to mbr's N candidates."""
    return max(self.beam_size, self.mbr)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def replace(self, **kw) -> 'SamplingOptions':
    return dataclasses.replace(self, **kw)

  def limit(self, prompt_tokens: int) -> int:
    """New-token budget of an input whose prompt has `prompt_tokens`."""
    if self.max_length_ratio is None:
      return self.max_new_tokens
    return min(self.max_new_tokens,
               math.ceil(self.max_length_ratio * prompt_tokens))
