"""SIGTERM as a flag the training loop checks after every step (saves, then exits 0)."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopSignal:
  """`with StopSignal() as stop:` turns SIGTERM into `stop.requested = True`."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def preempted(step: int, local_flag: bool) -> bool:
  """True on every process once any process has been asked to stop."""
  if jax.process_count() == 1:
    return local_flag
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # No preemption service: fall back to the local flag.
    return local_flag
