"""Plumbing shared by the peer benchmark scripts (`trax_reformer.py`, `hf_reformer.py`).

Standard library and numpy only: it is imported by the peers' own interpreters
(the Trax venv and the Hugging Face venv), never by terraflax.

What it provides:
  * `Reporter`: keeps the real stdout for the single JSON result line and points
    file descriptor 1 at stderr, so nothing a library prints (Trax, TensorFlow,
    gym, transformers) can land on stdout. `Reporter.emit(result)` writes the
    line once (from whichever thread gets there first) and flushes it.
  * `MemoryGuard`: a daemon thread that polls this process's resident memory
    and the machine's MemAvailable every 20 ms. When the process goes above
    `--max_memory_gib`, or the machine's free memory drops under
    `--min_free_gib`, it emits the result with `"error": "out of memory"` and
    ends the process with exit code 0 (`os._exit`, so no library can catch it).
    Allocation failures that the libraries raise themselves (MemoryError, torch's
    "can't allocate memory", XLA's RESOURCE_EXHAUSTED) are mapped to the same
    result by `is_out_of_memory`.
  * `add_common_flags`, `axial_shape`, `summarise_steps`: the CLI and settings
    both peers share, so that both measure the same configuration.
"""

import argparse
import json
import math
import os
import resource
import statistics
import sys
import threading
import time

# The issue-12 configuration, shared by both peers.
VOCAB_SIZE = 256
D_MODEL = 256
D_FF = 1024
N_LAYERS = 2
N_HEADS = 4
D_HEAD = 64  # n_heads * d_head == d_model
N_HASHES = 4
CHUNK_LEN = 64
AXIAL_D_EMBS = (64, 192)  # Split of d_model between the two axial position axes.
LEARNING_RATE = 1e-3
DEFAULT_LENGTH = 4096  # train / forward
DEFAULT_DECODE_LENGTH = 512  # decode: the model's maximum length (>= 1 + 256 tokens)

_GIB = 1024 ** 3


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  """Flags both peers understand (same names, same defaults)."""
  parser.add_argument('--mode', choices=('train', 'forward', 'decode'), default='train',
                      help='train: forward+backward+Adam step; forward: forward pass only; '
                           'decode: cached greedy decoding.')
  parser.add_argument('--attention', choices=('lsh', 'full'), default='lsh')
  parser.add_argument('--length', type=int, default=None,
                      help='train/forward: the sequence length (default 4096). decode: the '
                           'model\'s maximum length (default 512): axial position shape, HF\'s '
                           'bucket rule and HF full attention\'s span, Trax\'s cache length.')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--warmup_steps', type=int, default=2,
                      help='Untimed steps (decode: untimed decodes) before the timed ones; the '
                           'first one, which includes compilation, is reported separately.')
  parser.add_argument('--steps', type=int, default=5,
                      help='Timed steps (decode: timed decodes); the median is reported.')
  parser.add_argument('--decode_tokens', type=int, default=256,
                      help='decode: tokens generated per sequence.')
  parser.add_argument('--axial_shape', default='',
                      help='Axial position shape "a,b" with a*b == --length; default: the most '
                           'balanced factorisation (see axial_shape()).')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max_memory_gib', type=float, default=20.0,
                      help='Resident memory above which the run stops as "out of memory".')
  parser.add_argument('--min_free_gib', type=float, default=0.75,
                      help='Machine MemAvailable below which the run stops as "out of memory" '
                           '(protects the other processes on a shared machine).')


def check_common_flags(args: argparse.Namespace) -> None:
  """Validates the shared flags with errors naming the flag."""
  if args.length is None:
    args.length = DEFAULT_DECODE_LENGTH if args.mode == 'decode' else DEFAULT_LENGTH
  for name in ('length', 'batch', 'steps', 'decode_tokens'):
    if getattr(args, name) < 1:
      raise SystemExit(f'--{name} must be >= 1, got {getattr(args, name)}.')
  if args.warmup_steps < 1:
    raise SystemExit(f'--warmup_steps must be >= 1 (the first step compiles), got '
                     f'{args.warmup_steps}.')
  if args.length % CHUNK_LEN:
    raise SystemExit(f'--length must be a multiple of the LSH chunk {CHUNK_LEN}, got '
                     f'{args.length}.')
  if args.mode == 'decode' and args.decode_tokens + 1 > args.length:
    raise SystemExit(f'--decode_tokens ({args.decode_tokens}) + 1 must fit in --length '
                     f'({args.length}).')


def axial_shape(length: int, override: str = '') -> tuple:
  """Axial position shape (a, b), a * b == length.

  Default: the most balanced factorisation, a the largest divisor of `length`
  with a <= sqrt(length): 1K -> (32, 32), 4K -> (64, 64) (Hugging Face's default
  for its default 4096 positions), 16K -> (128, 128), 64K -> (256, 256). Both
  libraries need a * b == length when training (Trax reshapes the embeddings to
  the input shape; Hugging Face asserts it); in eval/predict mode a * b only
  has to cover the positions used.
  """
  if override:
    try:
      shape = tuple(int(v) for v in override.split(','))
    except ValueError:
      raise SystemExit(f'--axial_shape must be two integers "a,b", got {override!r}.')
    if len(shape) != 2 or shape[0] * shape[1] != length:
      raise SystemExit(f'--axial_shape {override!r} must be two integers whose product is '
                       f'--length {length}.')
    return shape
  a = max(d for d in range(1, math.isqrt(length) + 1) if length % d == 0)
  return (a, length // a)


def summarise_steps(step_seconds: list, tokens_per_step: int) -> dict:
  """Median step time and tokens/s = tokens_per_step / median step time."""
  median = statistics.median(step_seconds)
  return {'median_step_seconds': median, 'tokens_per_sec': tokens_per_step / median,
          'step_seconds': [round(s, 6) for s in step_seconds]}


def peak_rss_gib() -> float:
  """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GIB


def _current_rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _mem_available_bytes():
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an exception is an allocation failure (Python, torch or XLA)."""
  if isinstance(error, MemoryError):
    return True
  text = f'{type(error).__name__}: {error}'.lower()
  return any(marker in text for marker in (
      'out of memory', "can't allocate memory", 'resource_exhausted', 'resource exhausted',
      'failed to allocate', 'bad_alloc', 'cannot allocate memory'))


class Reporter:
  """Owns the JSON result line: one line on the real stdout, written once."""

  def __init__(self, base: dict):
    sys.stdout.flush()
    self._out = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)  # Everything else printed to stdout now goes to stderr.
    sys.stdout = sys.stderr
    self.result = dict(base)
    self.result.setdefault('error', None)
    self._lock = threading.Lock()
    self._done = False

  def update(self, **fields) -> None:
    self.result.update(fields)

  def emit(self, **fields) -> bool:
    """Writes the result line (with `fields` merged in); False if already written."""
    with self._lock:
      if self._done:
        return False
      self._done = True
      self.result.update(fields)
      self.result['peak_rss_gib'] = round(peak_rss_gib(), 3)
      self._out.write(json.dumps(self.result) + '\n')
      self._out.flush()
      return True


def start_report(library: str, args: argparse.Namespace) -> Reporter:
  """The Reporter of one run, with the fields every peer reports, guarded against OOM."""
  reporter = Reporter({
      'library': library, 'mode': args.mode, 'attention': args.attention,
      'length': args.length, 'batch': args.batch,
      'decode_tokens': args.decode_tokens if args.mode == 'decode' else None,
      'axial_shape': list(axial_shape(args.length, args.axial_shape)),
      'tokens_per_sec': None, 'median_step_seconds': None, 'step_seconds': [],
      'first_step_seconds': None, 'n_buckets': None})
  MemoryGuard(reporter, args.max_memory_gib, args.min_free_gib)
  return reporter


class MemoryGuard:
  """Stops the process as "out of memory" before it takes the machine down."""

  def __init__(self, reporter: Reporter, max_memory_gib: float, min_free_gib: float,
               poll_seconds: float = 0.02):
    self._reporter = reporter
    self._max = max_memory_gib * _GIB
    self._min_free = min_free_gib * _GIB
    self._poll = poll_seconds
    self._thread = threading.Thread(target=self._run, name='MemoryGuard', daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while True:
      rss = _current_rss_bytes()
      available = _mem_available_bytes()
      reason = None
      if rss > self._max:
        reason = f'resident memory {rss / _GIB:.2f} GiB > --max_memory_gib {self._max / _GIB:g}'
      elif available is not None and available < self._min_free:
        reason = (f'machine MemAvailable {available / _GIB:.2f} GiB < --min_free_gib '
                  f'{self._min_free / _GIB:g} (resident {rss / _GIB:.2f} GiB)')
      if reason:
        if self._reporter.emit(error='out of memory', oom_detail=reason):
          print(f'MemoryGuard: {reason}; stopping.', file=sys.stderr, flush=True)
        os._exit(0)
      time.sleep(self._poll)


def run_guarded(reporter: Reporter, measure) -> None:
  """Runs `measure()` (which fills `reporter.result`), then emits and exits.

  Exit code 0 with the result, or with `"error": "out of memory"`; exit code 1
  with `"error": "<type>: <message>"` for any other failure.
  """
  try:
    measure()
  except BaseException as error:  # pylint: disable=broad-except
    if isinstance(error, KeyboardInterrupt):
      raise
    if is_out_of_memory(error):
      reporter.emit(error='out of memory', oom_detail=f'{type(error).__name__}: {error}'[:500])
      sys.stderr.flush()
      os._exit(0)
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    reporter.emit(error=f'{type(error).__name__}: {error}'[:2000])
    sys.stderr.flush()
    os._exit(1)
  reporter.emit()
  sys.stderr.flush()
  # os._exit skips interpreter teardown (TensorFlow's can take seconds or crash).
  os._exit(0)
