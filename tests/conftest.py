"""Suite-wide JAX settings: strict numerics, CPU, one compilation cache per run."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests compile many tiny programs and run each once or twice: skipping XLA's backend
# (LLVM) optimisations makes compiling 2-3x faster, which is most of the suite's time.
# Subprocesses inherit it. Benchmarks never import this file.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()
# Many tests compile the same program again (a CLI subprocess reloading the model that a test
# trained, a run resumed, the same tiny model in several files): JAX's compilation cache in a
# directory made empty for this run (the first process to load this file makes it and removes it
# at exit; pytest-xdist workers and test subprocesses inherit the variable) compiles each once.
# Nothing survives the run, so a clean clone times the same as a warm one.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='terraflax-test-jax-cache-')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')

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
    'tests/models/test_bert.py',
    'tests/train/test_steps.py',
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: i for i, path in enumerate(SLOW_FIRST)}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  items.sort(key=lambda item: rank.get(
      os.path.relpath(str(item.path), root).replace(os.sep, '/'), len(rank)))
