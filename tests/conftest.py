"""Suite-wide JAX settings: strict numerics, CPU."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests compile many tiny programs and run each once or twice: skipping XLA's backend
# (LLVM) optimisations makes compiling 2-3x faster, which is most of the suite's time.
# Subprocesses inherit it. Benchmarks never import this file.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
