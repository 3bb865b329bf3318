"""XLA compiler options for the jitted train, eval and decode steps.

On XLA:CPU (jax 0.10) the default hands matrix products, elementwise work
and reductions to YNNPACK fusions. Its reductions over a long major axis
(a bias or norm-scale gradient summed over 4096 positions) and its small
elementwise fusions run several times slower than XLA's own loops. Handing
it only the matrix products made ReformerLM (LSH) training steps at 4K and
16K tokens ~1.25x faster and batch-8 decoding ~1.2x, while a full-attention
training step at 4K ran 0.88x (benchmarks/compiler_options.py). Other
backends get no options.

Decoding loops (`options(decoding=True)`) also keep XLA:CPU from splitting
each reduction into a windowed partial reduction and a final one (the
`tree_reduction_rewriter` pass, there for the precision of long sums). A
decoding step's reductions are short (a norm over d_model, a softmax over
the cache, the argmax over the vocabulary), and each split one ran as two
kernels: a d_model-128 norm took 0.48 us instead of 0.26, a softmax over 16K
positions 24 us instead of 7.6, and a 0.4 MB model decoded ~15% faster per
token. A sum of 1M floats keeps ~6e-7 relative error (1e-8 split).

Pass them explicitly, `jax.jit(step, compiler_options=compiler.options())`,
or decorate with `compiler.jit` (`compiler.jit(..., decoding=True)`).
An option this jaxlib does not know is dropped (checked once with a tiny
compile), so a newer jax never fails to compile because of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# XLA:CPU: YNNPACK fuses matrix products only (not reductions or elementwise).
CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}
# XLA:CPU decoding loops, added to CPU_OPTIONS: reductions stay one kernel each.
DECODING_CPU_OPTIONS = {'xla_disable_hlo_passes': 'tree_reduction_rewriter'}


def _compiles_with(options_: dict) -> bool:
  probe = jax.jit(lambda x: x @ x).lower(jnp.ones((2, 2), jnp.float32))
  try:
    probe.compile(compiler_options=options_)
  except Exception:  # pylint: disable=broad-except  # An unknown flag or enum value.
    return False
  return True


@functools.cache
def _accepted(backend: str, decoding: bool = False) -> dict:
  if backend != 'cpu':
    return {}
  accepted = dict(CPU_OPTIONS) if _compiles_with(CPU_OPTIONS) else {}
  if decoding and _compiles_with({**accepted, **DECODING_CPU_OPTIONS}):
    accepted.update(DECODING_CPU_OPTIONS)
  return accepted


def options(backend: str | None = None, *, decoding: bool = False) -> dict:
  """The options for `backend` (default: jax's default backend); {} off the CPU.

  `decoding`: for a jitted decoding loop (adds `DECODING_CPU_OPTIONS`).
  """
  return dict(_accepted(backend or jax.default_backend(), decoding))


def jit(fun, *, decoding: bool = False, **jit_kwargs):
  """`jax.jit(fun, compiler_options=options(decoding=decoding), **jit_kwargs)`, made at the
  first call.

  For module-level decorators: importing the module does not start a backend.
  """
  jitted = None

  @functools.wraps(fun)
  def call(*args, **kwargs):
    nonlocal jitted
    if jitted is None:
      jitted = jax.jit(fun, compiler_options=options(decoding=decoding), **jit_kwargs)
    return jitted(*args, **kwargs)

  return call
