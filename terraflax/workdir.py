"""A training workdir's files, read and written in one place.

  WORKDIR/config.json     the resolved config the run was started with
  WORKDIR/checkpoints/    orbax CheckpointManager steps: params, opt_state, train, data
  WORKDIR/.lock           while a trainer runs: its pid, host and start time

Decoding, export, conversion and the trainer all reach a workdir through this
module; it builds no model (parameters are restored as stored), so it sits
below `terraflax.train` and `terraflax.decoding` alike.

Nothing here loses what a workdir holds: `write_config` replaces config.json
atomically (the old file survives any failure), `WorkdirLock` keeps a second
trainer out, `resume_conflicts` lets the trainer refuse a changed config
before writing anything, and `restore_with_fallback` falls back to an older
checkpoint when the newest cannot be read (never deleting one). Failures raise
`WorkdirError`, a one-line message naming the path.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import tempfile
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp

from terraflax import errors

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'  # Steps set aside by a resume that fell back past them.
CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
ITEM_NAMES = ('params', 'opt_state', 'train', 'data')

# Fields a resumed run may change (dotted names; 'x.*' is a whole section): they
# steer the loop, logging, evaluation and start-up, not the state a checkpoint
# holds. The learning-rate schedule's length derives from train.steps (the
# optimizer is built from `optimizer.*` and train.steps), so a longer run
# stretches its schedule: that is accepted with train.steps. Every other field
# (the model, data, optimizer settings, seed, batch size...) must match
# config.json, or the resume is refused (`resume_conflicts`).
RESUMABLE_FIELDS = (
    'train.steps', 'train.log_every', 'train.eval_every', 'train.eval_batches',
    'train.checkpoint_every', 'train.keep_checkpoints', 'train.async_checkpoints',
    'train.peak_flops', 'train.divergence_factor', 'train.divergence_window',
    'train.divergence_bound', 'train.stop_on_divergence',
    'sample.*', 'eval.*', 'distributed.*', 'sharding.*',
)


class WorkdirError(errors.UserError, RuntimeError):
  """A workdir cannot be used as asked (locked, unwritable, no restorable checkpoint)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def has_checkpoints(workdir: str) -> bool:
  """Whether `WORKDIR/checkpoints` holds a step directory (read-only: creates nothing)."""
  directory = checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `WORKDIR/checkpoints`, keeping the last `keep`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEM_NAMES)


def os_error_text(e: OSError) -> str:
  """'no space left on device', 'read-only file system', ...: an OSError's reason, lowercase."""
  if e.errno == errno.ENOSPC:
    return 'no space left on device'
  reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
  return reason[:1].lower() + reason[1:]


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """`WORKDIR/config.json`: the resolved config (defaults filled in), replaced atomically.

  Written to a temporary file in the same directory, flushed to disk, then
  renamed over config.json: on any failure the old config.json is untouched,
  the temporary file is removed, and `WorkdirError` names the path.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  text = config.to_json_best_effort(indent=2, sort_keys=True) + '\n'
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(prefix=f'.{CONFIG_FILE}.', suffix='.tmp', dir=workdir)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
    _fsync_dir(workdir)
  except OSError as e:
    raise WorkdirError(f'cannot write {path}: {os_error_text(e)}') from e
  finally:
    if tmp is not None:
      try:
        os.unlink(tmp)
      except OSError:
        pass


def _fsync_dir(path: str) -> None:
  """Makes a rename in `path` durable (best effort: not every file system allows it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir!r} is not a terraflax workdir.')
  try:
    with open(path, encoding='utf-8') as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise WorkdirError(f'{path} is not valid JSON (line {e.lineno}: {e.msg}); the workdir\'s '
                       'config is damaged.') from None


# ----------------------------------------------------------------------------
# One trainer per workdir.

def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` ... : at most one trainer per workdir.

  Creates `WORKDIR/.lock` (O_CREAT|O_EXCL) holding this process's pid, host
  and start time, and removes it on exit. A lock left by a dead process on
  this host (stale) is taken over with a notice; a live owner, or one on
  another host, raises `WorkdirError` at once naming its pid, host and the
  lock file. Creates the workdir if needed.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._held = None

  def acquire(self) -> 'WorkdirLock':
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f'cannot create the workdir {self.workdir}: {os_error_text(e)}') from e
    mine = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      except OSError as e:
        raise WorkdirError(f'cannot create the lock file {self.path}: {os_error_text(e)}') from e
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(mine, f)
      self._held = mine
      return self
    raise WorkdirError(f'cannot take the lock file {self.path}: another process keeps '
                       'replacing it.')

  def _take_over_if_stale(self) -> None:
    """Removes the lock file if its owner is dead on this host; else raises WorkdirError."""
    try:
      with open(self.path, encoding='utf-8') as f:
        owner = json.load(f)
      pid, host = int(owner['pid']), str(owner['host'])
    except FileNotFoundError:
      return  # Released meanwhile: try again.
    except (OSError, ValueError, KeyError, TypeError):
      raise WorkdirError(f'{self.workdir} is locked by an unreadable lock file {self.path}; if '
                         'no trainer runs there, delete it.') from None
    started = owner.get('started', '?')
    if host != socket.gethostname() or _pid_alive(pid):
      raise WorkdirError(f'{self.workdir} is in use by pid {pid} on {host} (since {started}; '
                         f'lock file {self.path}); wait for that run, or delete the lock file if '
                         'it is gone.')
    errors.notice(f'taking over the stale lock {self.path} of pid {pid} on {host} (since '
                  f'{started}), which is no longer running.')
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if self._held is None:
      return
    try:
      with open(self.path, encoding='utf-8') as f:
        owner = json.load(f)
      if owner.get('pid') == self._held['pid'] and owner.get('host') == self._held['host']:
        os.unlink(self.path)
    except (OSError, ValueError):
      pass
    self._held = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------
# Resuming with a changed config.

def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  out = {}
  if isinstance(tree, dict):
    for key, value in tree.items():
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        out.update(_flat(value, f'{prefix}{key}.'))
      else:
        out[f'{prefix}{key}'] = _plain(value)
  return out


def _plain(value: Any) -> Any:
  """JSON's view of a value (tuples are lists), so a stored and a new config compare."""
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def may_change_on_resume(field: str) -> bool:
  """Whether dotted `field` is in `RESUMABLE_FIELDS`."""
  return any(field == f or (f.endswith('.*') and field.startswith(f[:-1]))
             for f in RESUMABLE_FIELDS)


_ABSENT = '<absent>'


def resume_conflicts(stored_config, new_config) -> list[str]:
  """['model.d_model: 32 -> 64', ...]: the fields that differ and may not change on resume.

  Both are resolved configs (defaults filled in, as `config.json` holds them:
  `train.config.check_fields(config)`); a field only one side has counts as
  changed ('<absent>' on the other). Fields in `RESUMABLE_FIELDS` are ignored.
  Sorted by field name; empty when the run may resume.
  """
  old, new = _flat(stored_config), _flat(new_config)
  out = []
  for field in sorted(set(old) | set(new)):
    a, b = old.get(field, _ABSENT), new.get(field, _ABSENT)
    if a != b and not may_change_on_resume(field):
      out.append(f'{field}: {a!r} -> {b!r}')
  return out


# ----------------------------------------------------------------------------
# Restoring, with a fallback to older steps.

def _first_line(e: BaseException, limit: int = 200) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else ''
  line = f'{type(e).__name__}: {line}' if line else type(e).__name__
  return line if len(line) <= limit else line[:limit - 3] + '...'


def restore_with_fallback(manager: ocp.CheckpointManager, restore_fn: Callable[[int], Any], *,
                          what: str, step: int | None = None,
                          log: Callable[[str], None] | None = None,
                          set_aside: bool = False) -> tuple[int, Any]:
  """(step, restore_fn(step)) for the newest step of `manager` that restores.

  Tries the latest step; when `restore_fn` raises, logs ONE line naming the
  damaged step and tries the next older one (nothing is deleted). Given
  `step`, only that step is tried. Raises `WorkdirError` naming the
  checkpoint directory and the existing steps when none restores, or when
  there is no checkpoint. `what` names the thing restored in messages
  ('parameters', 'the training state'); `log` takes each one-line report
  (default `terraflax.errors.notice`: stderr).

  `set_aside=True` (a trainer about to save again; never readers) moves the
  damaged steps newer than the one restored out of the manager's directory
  into `WORKDIR/damaged_checkpoints/<step>` (renamed, not deleted; one more
  log line) and reloads the manager, so that saving those steps again works.
  """
  log = errors.notice if log is None else log
  directory = str(manager.directory)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise WorkdirError(f'{directory} holds no checkpoint to restore {what} from.')
  if step is not None:
    if step not in steps:
      raise WorkdirError(f'{directory} has no checkpoint at step {step}; it has steps '
                         f'{", ".join(map(str, sorted(steps)))}.')
    candidates = [step]
  else:
    candidates = steps
  failures = []
  for i, s in enumerate(candidates):
    try:
      restored = restore_fn(s)
    except Exception as e:  # pylint: disable=broad-except  # Any restore failure: try older.
      failures.append(f'step {s}: {_first_line(e)}')
      later = (f'; trying step {candidates[i + 1]}' if i + 1 < len(candidates) else '')
      log(f'cannot restore {what} from the checkpoint at step {s} in {directory} '
          f'({_first_line(e)}){later}.')
      continue
    if set_aside and i:
      _set_aside(manager, candidates[:i], log)
    return s, restored
  raise WorkdirError(f'no checkpoint in {directory} restores {what} (steps '
                     f'{", ".join(map(str, sorted(steps)))}; newest error: {failures[0]}).')


def _set_aside(manager, steps, log) -> None:
  """Renames the step directories `steps` of `manager` into DAMAGED_DIR beside it; reloads."""
  directory = os.fspath(manager.directory)
  target_dir = os.path.join(os.path.dirname(directory), DAMAGED_DIR)
  moved = []
  for step in steps:
    source = os.path.join(directory, str(step))
    if not os.path.isdir(source):
      continue
    target = os.path.join(target_dir, str(step))
    n = 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(target_dir, f'{step}.{n}')
    try:
      os.makedirs(target_dir, exist_ok=True)
      os.rename(source, target)
    except OSError as e:
      raise WorkdirError(f'cannot move the damaged checkpoint {source} aside to {target}: '
                         f'{os_error_text(e)}') from e
    moved.append(target)
  if moved:
    log(f'moved the damaged checkpoint(s) aside (kept, not deleted): {", ".join(moved)}.')
    manager.reload()


def save_params(workdir: str, step: int, params) -> None:
  """A checkpoint of `params` alone at `step`, written before returning (`load_params`
  reads it): how models made outside the trainer (converted ones) become workdirs."""
  manager = make_manager(workdir, async_save=False)
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
  manager.wait_until_finished()
  manager.close()


def load_params(workdir: str, step: int | None = None, abstract_params=None):
  """(config, params, step) of the latest restorable (or the given) checkpoint in `workdir`.

  Restores just the `params` item onto the default device: shaped like
  `abstract_params` (a tree of `jax.ShapeDtypeStruct`, e.g. a model's abstract
  init) when given, else as stored. A damaged latest step is reported in one
  line and the next older one used (`restore_with_fallback`).
  """
  config = read_config(workdir)
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f'{checkpoint_dir(workdir)} does not exist: {workdir!r} holds no '
                            'checkpoint.')
  manager = make_manager(workdir, read_only=True, async_save=False)
  target = None
  if abstract_params is not None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)

  def restore(s):
    return manager.restore(s, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))['params']

  try:
    step, params = restore_with_fallback(manager, restore, what='parameters', step=step)
  finally:
    manager.close()
  return config, params, step
