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
MAX_MBR = 256  # candidates per source; MBR's cost grows with their square
MBR_CANDIDATES = ('beam', 'sample', 'both')
MBR_UTILITIES = ('chrf', 'bleu', 'chrf+bleu')
# Epsilon sampling's cut for MBR candidates (Freitag et al. 2023, "Epsilon
# sampling rocks": 0.02 gave the best MBR candidates).
MBR_EPSILON = 0.02


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
  epsilon: float | None = None      # epsilon sampling: drop tokens below this probability
  mbr: int = 0                      # MBR over N candidates (0/1: off)
  mbr_candidates: str = 'beam'      # 'beam' (N-best of a beam of N), 'sample' (N epsilon samples), 'both' (half each)
  mbr_utility: str = 'chrf'         # MBR utility: 'chrf', 'bleu' or 'chrf+bleu' (their mean)
  guard: bool = True                # never answer with a copy of the source or another language when a candidate in the target language exists

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
    need(opt(self.epsilon, lambda e: _is_num(e) and 0 < e < 1), 'epsilon',
         'None or a number in (0, 1)')
    need(_is_int(self.mbr) and 0 <= self.mbr <= MAX_MBR, 'mbr',
         f'an int in [0, {MAX_MBR}]')
    need(self.mbr_candidates in MBR_CANDIDATES, 'mbr_candidates',
         ' or '.join(map(repr, MBR_CANDIDATES)))
    need(self.mbr_utility in MBR_UTILITIES, 'mbr_utility',
         ' or '.join(map(repr, MBR_UTILITIES)))
    need(isinstance(self.guard, bool), 'guard', 'true or false')
    if self.mbr_candidates == 'both' and 1 < self.mbr < 4:
      raise OptionError('mbr', "must be >= 4 with mbr_candidates='both' "
                        '(a beam of N/2 and N/2 samples)')
    if self.search_width > 1 and self.temperature > 0:
      raise OptionError('beam_size', 'and beam candidates for mbr cannot be '
                        'combined with sampling (temperature > 0); sampled '
                        "MBR candidates are mbr_candidates='sample'")

  @property
  def search_width(self) -> int:
    """Beams to run: beam_size, widened to mbr's N beam candidates."""
    beam_mbr = {'beam': self.mbr, 'sample': 0,
                'both': self.mbr // 2}[self.mbr_candidates]
    return max(self.beam_size, beam_mbr)

  @property
  def mbr_samples(self) -> int:
    """Sampled MBR candidates per source (0: none)."""
    if self.mbr <= 1:
      return 0
    return {'beam': 0, 'sample': self.mbr,
            'both': self.mbr - self.mbr // 2}[self.mbr_candidates]

  def candidate_sampling(self) -> 'SamplingOptions':
    """The options that draw the sampled MBR candidates: this temperature
    (1 if greedy) and epsilon (MBR_EPSILON if unset), no search."""
    return self.replace(
        temperature=self.temperature or 1.0, beam_size=1, mbr=0,
        epsilon=self.epsilon if self.epsilon is not None else MBR_EPSILON)

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
