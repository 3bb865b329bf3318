"""A host-side divergence guard fed the logged training loss (no jit changes).

  guard = DivergenceGuard(factor=1e3, window=10, bound=0.0, stop=False)
  message = guard.update(step, loss)   # at each log; None while healthy

`update` returns a warning message when the loss grew by more than `factor`
over the best of the last `window` logged losses, or exceeds `bound` (0:
no bound). NaN/inf losses are the trainer's own health check's business
(TrainingDivergedError); here a non-finite loss also counts as diverging.
The trainer writes `train/diverging: 1` into metrics.jsonl with a loud log
line, and stops (raising) when `stop` is set.
"""

from __future__ import annotations

import collections
import dataclasses
import math


@dataclasses.dataclass
class DivergenceGuard:
  """Watches logged losses; `update(step, loss)` -> a warning message or None.

  factor: a loss above `factor` x the best of the last `window` logs diverges
    (<= 1 is an error; float('inf') turns the ratio test off).
  window: how many previous logged losses the best is taken over (>= 1).
  bound: a loss above `bound` diverges (0: no bound).
  stop: what the trainer should do on a warning (it reads `guard.stop`).
  baseline: a loss every run starts near, e.g. log(vocab_size) (a uniform
    guess's cross-entropy); when > 0 it counts as logged at step 0, so a run
    that diverges before its first log is caught at that log (0: none).
  """

  factor: float = 1e3
  window: int = 10
  bound: float = 0.0
  stop: bool = False
  baseline: float = 0.0

  def __post_init__(self):
    if not self.factor > 1.0:
      raise ValueError(f'DivergenceGuard factor must be > 1, got {self.factor!r}.')
    if not isinstance(self.window, int) or self.window < 1:
      raise ValueError(f'DivergenceGuard window must be a positive int, got {self.window!r}.')
    if not self.bound >= 0.0:
      raise ValueError(f'DivergenceGuard bound must be >= 0 (0: off), got {self.bound!r}.')
    self._recent = collections.deque(maxlen=self.window)
    if self.baseline > 0:
      self._recent.append((0, float(self.baseline)))

  def update(self, step: int, loss: float) -> str | None:
    """Records the loss logged at `step`; a one-line warning if it diverges, else None."""
    loss = float(loss)
    message = None
    if not math.isfinite(loss):
      message = f'train loss is {loss} at step {step}'
    elif self.bound > 0 and loss > self.bound:
      message = (f'train loss {loss:.4g} at step {step} exceeds train.divergence_bound='
                 f'{self.bound:g}')
    elif self._recent:
      best_step, best = min(self._recent, key=lambda item: item[1])
      if best > 0 and loss > self.factor * best:
        message = (f'train loss {loss:.4g} at step {step} is {loss / best:.3g}x the best of '
                   f'the last {len(self._recent)} logs ({best:.4g} at step {best_step}), more '
                   f'than train.divergence_factor={self.factor:g}')
    if math.isfinite(loss):
      self._recent.append((step, loss))
    if message is None:
      return None
    return (f'training is diverging: {message}; try a lower optimizer.learning_rate, a longer '
            'optimizer.warmup_steps or optimizer.grad_clip.')
