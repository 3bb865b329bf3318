"""XLA compiler options for the jitted train, eval and decode steps.

On XLA:CPU (jax 0.10) the default hands matrix products, elementwise work
and reductions to YNNPACK fusions. Its reductions over a long major axis
(a bias or norm-scale gradient summed over 4096 positions) and its small
elementwise fusions run several times slower than XLA's own loops. Handing
it only the matrix products made ReformerLM (LSH) training steps at 4K and
16K tokens ~1.25x faster and batch-8 decoding ~1.2x, while a full-attention
training step at 4K ran 0.88x (benchmarks/compiler_options.py). Other
backends get no options.

Pass them explicitly, `jax.jit(step, compiler_options=compiler.options())`,
or decorate with `compiler.jit`.
An option this jaxlib does not know is dropped (checked once with a tiny
compile), so a newer jax never fails to compile because of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# XLA:CPU: YNNPACK fuses matrix products only (not reductions or elementwise).
CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}


@functools.cache
def _accepted(backend: str) -> dict:
  if backend != 'cpu':
    return {}
  probe = jax.jit(lambda x: x @ x).lower(jnp.ones((2, 2), jnp.float32))
  try:
    probe.compile(compiler_options=CPU_OPTIONS)
  except Exception:  # pylint: disable=broad-except  # An unknown flag or enum value.
    return {}
  return dict(CPU_OPTIONS)


def options(backend: str | None = None) -> dict:
  """The options for `backend` (default: jax's default backend); {} off the CPU."""
  return dict(_accepted(backend or jax.default_backend()))


def jit(fun, **jit_kwargs):
  """`jax.jit(fun, compiler_options=options(), **jit_kwargs)`, made at the first call.

  For module-level decorators: importing the module does not start a backend.
  """
  jitted = None

  @functools.wraps(fun)
  def call(*args, **kwargs):
    nonlocal jitted
    if jitted is None:
      jitted = jax.jit(fun, compiler_options=options(), **jit_kwargs)
    return jitted(*args, **kwargs)

  return call
