"""Fault injection for the reliability tests' subprocesses (on PYTHONPATH only there).

TERRAFLAX_FAULT (comma-separated) picks the faults:
  config_enospc   renaming anything onto a `config.json` fails with ENOSPC
  config_erofs    ... with EROFS (a read-only file system)
  save_enospc     orbax CheckpointManager.save fails with ENOSPC (a full disk during a save)
Real faults need privileges (a full or read-only mount); these raise the same OSError at
the same call.
"""

import errno
import importlib.abc
import importlib.machinery
import os
import sys

_FAULTS = set(filter(None, os.environ.get('TERRAFLAX_FAULT', '').split(',')))


def _os_error(code, path):
  return OSError(code, os.strerror(code), path)


if _FAULTS & {'config_enospc', 'config_erofs'}:
  _real_replace = os.replace
  _code = errno.ENOSPC if 'config_enospc' in _FAULTS else errno.EROFS

  def _replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == 'config.json':
      raise _os_error(_code, os.fspath(dst))
    return _real_replace(src, dst, *args, **kwargs)

  os.replace = _replace


class _PatchOrbaxSave(importlib.abc.MetaPathFinder):
  """After `orbax.checkpoint.checkpoint_manager` loads, its CheckpointManager.save raises."""

  TARGET = 'orbax.checkpoint.checkpoint_manager'

  def find_spec(self, name, path, target=None):
    if name != self.TARGET:
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
      return None
    exec_module = spec.loader.exec_module

    def patched_exec(module):
      exec_module(module)

      def save(self, step, *args, **kwargs):
        raise _os_error(errno.ENOSPC, os.path.join(str(self.directory), str(step)))

      module.CheckpointManager.save = save

    spec.loader.exec_module = patched_exec
    return spec


if 'save_enospc' in _FAULTS:
  sys.meta_path.insert(0, _PatchOrbaxSave())
