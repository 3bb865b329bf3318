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

# The files that take longest start first (pytest-xdist runs each class or module on one worker,
# in this order, see setup.cfg), so that no worker is left running one of them at the end while
# the other waits. Longest first; every other file follows in the usual order.
SLOW_FIRST = (
    'tests/train/test_sharded_training.py',
    'tests/test_notebooks.py',
    'tests/models/test_convert_trax.py',
    'tests/train/test_trainer.py',
    'tests/kernels/test_spmd.py',
    'tests/models/test_transformer.py',
    'tests/models/test_reformer.py',
    'tests/models/test_terraformer.py',
    'tests/models/test_concat_terraformer.py',
    'tests/models/test_convert_trax_terraformer.py',
    'tests/models/test_bert.py',
    'tests/train/test_steps.py',
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: i for i, path in enumerate(SLOW_FIRST)}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  items.sort(key=lambda item: rank.get(
      os.path.relpath(str(item.path), root).replace(os.sep, '/'), len(rank)))
