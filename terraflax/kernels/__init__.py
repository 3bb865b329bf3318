"""Native CPU kernels: C++ sources compiled on first use and called through XLA's FFI.

XLA:CPU runs small batched matrix products, gathers and masks (LSH
attention's chunk windows) far below the machine's matmul rate; a kernel
that keeps one chunk's logits in cache and does everything in one pass is
about twice as fast. Each kernel is a `.cc` file next to this one, built
with the system C++ compiler for this machine (`-O3 -march=native`) the
first time it is needed and kept in a cache directory:

  $TERRAFLAX_CACHE_DIR, else $XDG_CACHE_HOME/terraflax, else ~/.cache/terraflax

keyed by the source, the flags, jaxlib's version and the CPU's features, so
a shared home directory never runs a library built for another CPU. `$CXX`
picks the compiler (default `c++`).

When a kernel cannot be built (no compiler, or a compile error) `load`
returns False, logs why once, and the layers use their XLA path: the
kernels are a speed-up, never a requirement. Layers choose per call (for
instance `LSHSelfAttention(kernel='auto' | 'xla' | 'cpu')`), and nothing
native is used off the CPU or while `xla_only()` is active (as
`terraflax.export` does, since an exported function must run without this
package).

Under a device mesh (SPMD), XLA cannot split a custom call by itself: it
would gather the whole batch on every device. Each kernel call is therefore
wrapped by `spmd.partitioned` (`jax.experimental.custom_partitioning`, with
a Shardy sharding rule), which declares every operand's layout: batch (for
the feed-forward kernel, the rows = batch * length), heads (LSH), hidden
width (the feed-forward d_ff), or whole. Each device then runs the kernel on
its own batch shard, over whatever mesh axes shard the batch ('data',
'fsdp'); LSH also on its heads shard (the axes that shard heads, e.g.
'model'), and the feed-forward kernel on its shard of d_ff where the weights
shard it (tensor parallel over 'model'): the output is summed over those
shards (`psum`, b2 added on the first) and so is the input gradient, while
the weight gradients are summed over the batch shards. Everything else is
made whole before the call: the length (a length-sharded input is gathered
along the length first; its batch stays split), the LSH rounds and widths,
the weights' other axes (fsdp's embed axis is all-gathered), and a d_ff
whose shards would not be multiples of `LANES` (the weights are then
gathered, and each device of a 'model' group computes the same rows). The
custom VJPs are unchanged (each of their kernel calls is partitioned), so
gradients under a mesh equal the single-device ones; with one device, or
inside `shard_map`, the kernels run as they did. Any operand the layouts do
not list is taken to be batch-leading, so a new per-example operand needs
no new rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile

import jax

FLAGS = ('-O3', '-march=native', '-std=c++17', '-ffp-contract=fast', '-fno-math-errno',
         '-shared', '-fPIC')

_XLA_ONLY = contextvars.ContextVar('terraflax_xla_only', default=False)


@contextlib.contextmanager
def xla_only():
  """Within this block, layers trace their XLA paths (no native custom calls)."""
  token = _XLA_ONLY.set(True)
  try:
    yield
  finally:
    _XLA_ONLY.reset(token)


def native_allowed() -> bool:
  """Whether a layer traced now may call a native kernel: on the CPU, outside `xla_only`."""
  return not _XLA_ONLY.get() and jax.default_backend() == 'cpu'


# The kernels' vector width: the sizes they take (widths, chunk lengths) are multiples of it.
LANES = 16

# A layer's `kernel` field: 'auto' takes the native kernel where it applies, else XLA;
# 'xla' always XLA; 'cpu' the native kernel or an error naming what prevents it.
KERNELS = ('auto', 'xla', 'cpu')


def check_kernel(owner: str, kernel: str) -> None:
  if kernel not in KERNELS:
    raise ValueError(f'{owner} kernel must be one of {KERNELS}, got {kernel!r}.')


def use_native(owner: str, kernel: str, why_not: str | None, available) -> bool:
  """Whether `owner` runs its native kernel now.

  `why_not`: what already rules the kernel out for this call (sizes, dtype,
  dropout), or None; `available`: the kernel's build-and-register check.
  Adds the backend and build checks; kernel='cpu' turns any reason into an error.
  """
  check_kernel(owner, kernel)
  if kernel == 'xla':
    return False
  if why_not is None and not native_allowed():
    why_not = 'the default backend is not the CPU (or kernels.xla_only() is active)'
  if why_not is None and not available():
    why_not = 'the native library could not be built (see the warning logged)'
  if why_not is not None and kernel == 'cpu':
    raise ValueError(f"{owner} kernel='cpu' cannot run here: {why_not}. Use kernel='auto' "
                     "(falls back to XLA) or 'xla'.")
  return why_not is None


def cache_dir() -> str:
  if os.environ.get('TERRAFLAX_CACHE_DIR'):
    return os.environ['TERRAFLAX_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'terraflax')


def _cpu_features() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line
  except OSError:
    pass
  return platform.processor()


def _build(source: str, compiler: str) -> str:
  """Compiles `source` into the cache (atomically); returns the library's path."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  here = os.path.dirname(source)
  code = b''
  for path in [source] + sorted(os.path.join(here, f) for f in os.listdir(here)
                                if f.endswith('.h')):  # The shared headers count too.
    with open(path, 'rb') as f:
      code += f.read()
  key = hashlib.sha256(b'\0'.join([
      code, ' '.join(FLAGS).encode(), compiler.encode(), jaxlib.__version__.encode(),
      platform.machine().encode(), _cpu_features().encode()])).hexdigest()[:16]
  name = os.path.splitext(os.path.basename(source))[0]
  target = os.path.join(cache_dir(), f'{name}-{key}.so')
  if os.path.exists(target):
    return target
  os.makedirs(cache_dir(), exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix='.so', dir=cache_dir())
  os.close(fd)
  command = [*shlex.split(compiler), *FLAGS, '-isystem', jax.ffi.include_dir(), source,
             '-o', partial]
  try:
    subprocess.run(command, check=True, capture_output=True, text=True)
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


@functools.cache
def load(name: str, symbols: tuple[str, ...]) -> bool:
  """Builds `name`.cc if needed and registers its handlers as FFI targets; False on failure.

  `symbols` are the handler symbols; each is registered for the CPU under
  the same name.
  """
  source = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + '.cc')
  compiler = os.environ.get('CXX', 'c++')
  try:
    library = ctypes.cdll.LoadLibrary(_build(source, compiler))
    for symbol in symbols:
      jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform='cpu')
  except (OSError, subprocess.CalledProcessError, AttributeError) as e:
    detail = getattr(e, 'stderr', '') or str(e)
    logging.warning('terraflax: native kernel %s unavailable, using the XLA path (%s: %s)',
                    name, type(e).__name__, detail.strip()[-2000:])
    return False
  return True
