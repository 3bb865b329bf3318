"""Suite-wide JAX settings: strict numerics, CPU."""

import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Programs compiled again (the same tiny models in several files, the command-line tests'
# subprocesses) load from a compilation cache that the run's processes share: a fresh folder,
# removed when the process that made it ends (the suite ran ~6% faster on 2 cores).
_COMPILATION_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _COMPILATION_CACHE = tempfile.mkdtemp(prefix='terraflax-tests-jit-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _COMPILATION_CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
# The tests compile many tiny programs and run each once or twice, so compiling is most of the
# suite's time. Skipping XLA's backend (LLVM) optimisations makes it 2-3x faster, and XLA:CPU's
# older LLVM IR emitters compile fusions faster than its MLIR fusion emitters (two model test
# classes: 38 s -> 22 s). Subprocesses inherit the flags. Benchmarks never import this file.
_TEST_XLA_FLAGS = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
for _flag in _TEST_XLA_FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
if _COMPILATION_CACHE is not None:  # Also where jax was imported before the environment was set.
  jax.config.update('jax_compilation_cache_dir', _COMPILATION_CACHE)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)

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


def pytest_unconfigure(config):
  del config
  if _COMPILATION_CACHE is not None:
    shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)
