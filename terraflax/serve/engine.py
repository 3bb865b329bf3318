"""Continuous batching: one decode thread steps a fixed number of slots together.

  engine = Engine(served, n_slots=8); engine.start()
  job = Job(ids=[...], max_tokens=16, ...); engine.submit(job)   # events arrive via job.emit
  engine.cancel(job); engine.metrics(); engine.stop()

Each device call runs `steps_per_call` steps of every busy slot on the device
(`model.DecodeStep`, a `lax.scan`): a request's prompt tokens are fed one per
step (forced from a prompt buffer on the device, as `terraflax.decoding` does),
then its sampled tokens; a slot stops on the device at `max_tokens` or the
end-of-sequence id. The host reads the call's tokens once, checks stop strings
and emits the call's tokens together. A submitted request waits in the queue
until a slot is free, and joins at the next call (its slot's cache is reset
in that call); a finished or cancelled one frees its slot. Events are dicts handed to
`job.emit` from the decode thread:

  {'type': 'token', 'token': id, 'text': new text}     per generated token
  {'type': 'done', 'finish_reason': 'length'|'stop', 'text': ..., 'tokens': [...]}
  {'type': 'error', 'message': ...}                    the step failed (the server goes on)

A request ends at `max_tokens`, at the tokenizer's end-of-sequence id (kept in
`tokens`, not in `text`) or when its text contains a stop string (the text is
cut before it). Streamed text holds back what could still turn out to begin a
stop string or an incomplete character, so the pieces add up to `text`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from typing import Callable

import jax
import numpy as np

from terraflax import errors
from terraflax.serve import model as model_lib

_REPLACEMENT = '\ufffd'  # What a tokenizer's decode shows for an incomplete character.


@dataclasses.dataclass(eq=False)
class Job:
  """One completion request and its progress (the decode thread owns the progress fields)."""
  ids: list
  max_tokens: int
  emit: Callable[[dict], None]
  temperature: float = 0.0
  top_k: int = 0  # 0: off.
  top_p: float = 1.0  # 1: off.
  stop: tuple = ()
  prefix: str | None = None
  seed: int = 0
  # Progress.
  position: int = 0
  generated: list = dataclasses.field(default_factory=list)
  sent: str = ''  # Text already emitted.
  finished: bool = False
  cancelled: bool = False
  submitted_at: float = dataclasses.field(default_factory=time.monotonic)


class QueueFull(errors.UserError):
  """The queue holds `max_queue` waiting requests already."""


class Engine:
  """The decode loop over `n_slots` slots; thread-safe `submit`, `cancel`, `metrics`."""

  def __init__(self, served: model_lib.Served, *, n_slots: int = 8, max_queue: int = 1024,
               steps_per_call: int = 8):
    if not isinstance(n_slots, int) or n_slots < 1:
      raise model_lib.ServeError(f'--slots must be a positive int, got {n_slots!r}.')
    self.served = served
    self.n_slots = n_slots
    self.max_queue = max_queue
    self.step = model_lib.DecodeStep(served, n_slots, steps=steps_per_call)
    self.step_count = steps_per_call
    self._prompt_width = self.step.prompt_width
    self._empty_cache = self.step.empty_cache
    self._cache = self._empty_cache()
    self._slots: list[Job | None] = [None] * n_slots
    self._inputs = np.zeros(n_slots, np.int32)  # Each slot's next input token.
    self._queue: collections.deque[Job] = collections.deque()
    self._lock = threading.Condition()
    self._thread = None
    self._running = False
    self._counts = collections.Counter()
    self._seconds = collections.Counter()  # Decode thread: in device calls, in bookkeeping.
    self._recent = collections.deque()  # (time, tokens generated in that step)
    self._started_at = time.monotonic()

  # -- The public, thread-safe side.

  def start(self) -> None:
    self._running = True
    self._thread = threading.Thread(target=self._loop, name='terraflax.serve decode',
                                    daemon=True)
    self._thread.start()

  def stop(self) -> None:
    with self._lock:
      self._running = False
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join()

  def submit(self, job: Job) -> None:
    with self._lock:
      if len(self._queue) >= self.max_queue:
        raise QueueFull(f'the queue already holds {self.max_queue} requests; retry later.')
      self._counts['requests'] += 1
      self._queue.append(job)
      self._lock.notify_all()

  def cancel(self, job: Job) -> None:
    """Drops `job` (a client went away): it leaves the queue or frees its slot next step."""
    with self._lock:
      if not job.finished:
        job.cancelled = True
        if job in self._queue:
          self._queue.remove(job)
          job.finished = True
          self._counts['cancelled'] += 1
        self._lock.notify_all()

  def warmup(self) -> None:
    """Compiles the step (all slots idle: no effect on requests)."""
    with self._lock:
      self._cache = self.step(self._cache, self._batch([False] * self.n_slots))[1]

  def metrics(self) -> dict:
    with self._lock:
      now = self._forget_old()
      window = min(10.0, now - self._started_at) or 1.0
      return {
          'requests': self._counts['requests'],
          'completed': self._counts['completed'],
          'cancelled': self._counts['cancelled'],
          'failed': self._counts['failed'],
          'tokens': self._counts['tokens'],
          'steps': self._counts['steps'],
          'calls': self._counts['calls'],
          'call_seconds': round(self._seconds['device'], 3),
          'host_seconds': round(self._seconds['host'], 3),
          'tokens_per_sec': sum(n for _, n in self._recent) / window,
          'queue_length': len(self._queue),
          'active_slots': sum(job is not None for job in self._slots),
          'slots': self.n_slots,
          'prefixes': self.served.prefix_names,
      }

  # -- The decode thread.

  def _forget_old(self) -> float:
    """Drops step records older than the 10 s tokens/s window (lock held); returns now."""
    now = time.monotonic()
    while self._recent and self._recent[0][0] < now - 10.0:
      self._recent.popleft()
    return now

  def _loop(self) -> None:
    while True:
      with self._lock:
        self._admit()
        while self._running and not any(self._slots):
          self._lock.wait()
          self._admit()
        if not self._running:
          return
        joined = [job is not None and job.position == 0 for job in self._slots]
        batch = self._batch(joined)
      try:
        began = time.perf_counter()
        out, self._cache = self.step(self._cache, batch)
        out = jax.device_get(out)  # The call's one device -> host transfer.
        stepped = time.perf_counter()
        with self._lock:
          self._counts['steps'] += self.step_count
          self._counts['calls'] += 1
          self._inputs = np.array(out['next_tokens'], np.int32)
          generated = 0
          for i, job in enumerate(self._slots):
            if job is None:
              continue
            job.position = int(out['positions'][i])
            for j in np.flatnonzero(out['generated'][:, i]):
              generated += self._advance(i, job, int(out['tokens'][j, i]))
              if job.finished:  # Tokens past a stop string are dropped.
                break
          self._recent.append((time.monotonic(), generated))
          self._forget_old()
          self._seconds['device'] += stepped - began
          self._seconds['host'] += time.perf_counter() - stepped
      except Exception as e:  # pylint: disable=broad-except  # A failed step must not stop serving.
        traceback.print_exc()
        self._fail_all(f'decoding failed: {type(e).__name__}: {e}')

  def _admit(self) -> None:
    """Frees cancelled slots and moves waiting jobs into free ones (lock held)."""
    for i, job in enumerate(self._slots):
      if job is not None and job.cancelled:
        self._slots[i] = None
        job.finished = True
        self._counts['cancelled'] += 1
    while self._queue and None in self._slots:
      job = self._queue.popleft()
      if job.cancelled:
        job.finished = True
        self._counts['cancelled'] += 1
        continue
      self._slots[self._slots.index(None)] = job

  def _batch(self, joined) -> dict:
    s = self.n_slots
    jobs = [(i, job) for i, job in enumerate(self._slots) if job is not None]
    width = self._prompt_width(max((len(job.ids) for _, job in jobs), default=1))
    batch = {'reset': np.asarray(joined, bool), 'tokens': self._inputs.copy(),
             'positions': np.zeros(s, np.int32), 'prompt': np.zeros((s, width), np.int32),
             'prompt_len': np.zeros(s, np.int32), 'ends': np.zeros(s, np.int32),
             'seeds': np.zeros(s, np.uint32),
             'temperature': np.zeros(s, np.float32), 'top_k': np.zeros(s, np.int32),
             'top_p': np.ones(s, np.float32), 'active': np.zeros(s, bool),
             'use_prefix': np.zeros(s, bool),
             'prefix_row': np.zeros(s, np.int32)}
    for i, job in jobs:
      if job.position == 0:
        batch['tokens'][i] = 0  # What ShiftRight puts before the first token.
      batch['active'][i] = True
      batch['positions'][i] = job.position
      batch['prompt'][i, :len(job.ids)] = job.ids
      batch['prompt_len'][i] = len(job.ids)
      batch['ends'][i] = len(job.ids) + job.max_tokens
      batch['seeds'][i] = job.seed
      batch['temperature'][i] = job.temperature
      batch['top_k'][i] = job.top_k
      batch['top_p'][i] = job.top_p
      batch['use_prefix'][i], batch['prefix_row'][i] = self.served.route(job.prefix)
    return batch

  def _advance(self, i: int, job: Job, sampled: int) -> int:
    """Takes slot i's generated token `sampled`; returns 1 (lock held)."""
    job.generated.append(sampled)
    self._counts['tokens'] += 1
    reason = None
    if len(job.generated) >= job.max_tokens:
      reason = 'length'
    if sampled == self.served.eos_id:
      reason = 'stop'
    text, stopped = self._text(job)
    if stopped:
      reason = 'stop'
    ready = text if reason else _stable(text, job.stop)
    delta = ''
    if ready.startswith(job.sent):  # A tokenizer may re-spell earlier text; then wait.
      delta, job.sent = ready[len(job.sent):], ready
    _emit(job, {'type': 'token', 'token': sampled, 'text': delta})
    if reason is not None:
      self._finish(i, job, {'type': 'done', 'finish_reason': reason, 'text': text,
                            'tokens': list(job.generated)})
    return 1

  def _text(self, job: Job) -> tuple[str, bool]:
    """(the generated text, cut before the first stop string; whether one was found)."""
    tokenizer = self.served.tokenizer
    ids = job.generated
    if ids and ids[-1] == self.served.eos_id:
      ids = ids[:-1]
    if tokenizer is None:
      text = ' '.join(str(t) for t in ids)
    else:
      text = tokenizer.decode(ids)
    settled = text.rstrip(_REPLACEMENT)  # A stop string must not match a half-decoded character.
    cuts = [settled.find(s) for s in job.stop if s in settled]
    if cuts:
      return text[:min(cuts)], True
    return text, False

  def _finish(self, i: int, job: Job, event: dict) -> None:
    self._slots[i] = None
    job.finished = True
    self._counts['completed'] += 1
    _emit(job, event)

  def _fail_all(self, message: str) -> None:
    with self._lock:
      for i, job in enumerate(self._slots):
        if job is not None:
          self._slots[i] = None
          job.finished = True
          self._counts['failed'] += 1
          _emit(job, {'type': 'error', 'message': message})
      self._cache = self._empty_cache()


def _emit(job: Job, event: dict) -> None:
  """job.emit(event); a receiver that is gone (its event loop closed) cancels the job."""
  try:
    job.emit(event)
  except Exception:  # pylint: disable=broad-except  # The client's side must not stop decoding.
    job.cancelled = True


def _stable(text: str, stop: tuple) -> str:
  """The part of `text` safe to stream: no trailing incomplete character, and nothing that
  could still become the start of a stop string."""
  text = text.rstrip(_REPLACEMENT)
  hold = 0
  for s in stop:
    for n in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:n]):
        hold = max(hold, n)
        break
  return text[:len(text) - hold]
