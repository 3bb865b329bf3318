"""Metrics output: `metrics.jsonl`, TensorBoard event files (no TensorFlow) and stdout.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`{"step": 100, "train/loss": ..., "lr": ...}`); on resume, lines past the
restored step are dropped so the file reads as if the run had never stopped.
TensorBoard events come from `tensorboardX`, with `purge_step` doing the same
for the event files.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax

METRICS_FILE = 'metrics.jsonl'
# Keys whose values depend on wall-clock time; everything else is reproducible.
TIMING_KEYS = ('tokens_per_sec', 'steps_per_sec', 'train/mfu')


def read_metrics(workdir: str) -> list[dict]:
  """The JSON objects of `workdir/metrics.jsonl`, in order."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'


class MetricsWriter:
  """Appends scalars to metrics.jsonl and TensorBoard; prints progress lines."""

  def __init__(self, workdir: str, *, resume_step: int = 0, total_steps: int = 0):
    self.workdir = workdir
    self.total_steps = total_steps
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, METRICS_FILE)
    self._truncate_after(resume_step)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError:  # Event files are optional; metrics.jsonl is not.
      print('tensorboardX is not installed: no TensorBoard event files.', flush=True)
    else:
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                               purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int) -> None:
    """Drops lines for steps after `step` (written after the last checkpoint)."""
    if not os.path.exists(self._path):
      return
    kept = [m for m in read_metrics(self.workdir) if m.get('step', 0) <= step]
    with open(self._path, 'w', encoding='utf-8') as f:
      for m in kept:
        f.write(json.dumps(m) + '\n')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """One JSON line `{"step": step, **scalars}` and the same scalars to TensorBoard."""
    if not self.active:
      return
    record = {'step': int(step)}
    record.update({k: float(v) for k, v in sorted(scalars.items())})
    with open(self._path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in record.items():
        if key != 'step' and math.isfinite(value):
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    if self.active and self._tb is not None:
      self._tb.add_text(tag, text, int(step))
      self._tb.flush()

  def progress(self, step: int, scalars: Mapping[str, float], seconds_per_step: float) -> None:
    """`step 100/1000 | loss 2.3456 | acc 0.412 | 12,345 tokens/s | MFU 31.2% | lr 0.001 |
    ETA 1m23s` on stdout."""
    if not self.active:
      return
    parts = [f'step {step}/{self.total_steps}']
    if 'train/loss' in scalars:
      parts.append(f'loss {scalars["train/loss"]:.4f}')
    if 'train/accuracy' in scalars:
      parts.append(f'acc {scalars["train/accuracy"]:.3f}')
    if 'tokens_per_sec' in scalars:
      parts.append(f'{scalars["tokens_per_sec"]:,.0f} tokens/s')
    if 'train/mfu' in scalars:
      parts.append(f'MFU {100 * scalars["train/mfu"]:.1f}%')
    parts.append(f'lr {scalars.get("lr", float("nan")):.3g}')
    parts.append(f'ETA {format_duration((self.total_steps - step) * seconds_per_step)}')
    print(' | '.join(parts), flush=True)

  def info(self, message: str) -> None:
    if self.active:
      print(message, flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
