"""One policy for SIGINT and SIGTERM across the CLIs.

A long run (training) turns the first signal into a request that it honours
at a safe point (the next step boundary: a checkpoint, then `Interrupted`);
a second signal interrupts at once. Runs without safe points (evaluate,
translate) take the signal as `KeyboardInterrupt` and say what they kept.
`cli.main_guard` turns both into one line and exit status 130.
"""

from __future__ import annotations

import signal
import threading

EXIT_CODE = 130  # 128 + SIGINT, as shells report an interrupted command


class Interrupted(Exception):
  """A run stopped by a signal; its message says what was kept."""


def name(signum: int) -> str:
  return signal.Signals(signum).name


class StopRequest:
  """`with StopRequest() as stop:` ... `if stop.requested: ...`.

  Outside the main thread (where Python cannot install handlers) it never
  requests a stop, and signals keep their default behaviour.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, object] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    if self.signum is not None:  # A second signal: the user insists.
      raise Interrupted(f'a second {name(signum)}: stopped at once; the '
                        'checkpoints saved before are kept')
    self.signum = signum

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old.clear()
