"""One error path for every command line: one line on stderr, a non-zero exit.

  python -m terraflax.train | terraflax.decoding | terraflax.export | terraflax.models.convert

`run(main, name='terraflax.decoding')` replaces `absl.app.run(main)`. A problem
the user can fix prints as ONE line, `terraflax.decoding: <what> (<path or
field>)`, and exits with status 1, no traceback:

  - the project's errors: `terraflax.errors.UserError` subclasses (WorkdirError,
    ...) and the types the entry point registers (`user_errors=`, e.g. the
    trainer's ConfigError);
  - absl flag errors (a missing required flag, a value out of its bounds, a
    validator's message, an unknown flag);
  - config-file problems (`define_config_file`): a missing file, a syntax
    error, `get_config()` failing, and an override of a field the config does
    not have, with the closest field name:
      config.model.n_hashs is not a field of configs/reformer.py (did you mean
      config.model.n_hashes?)
  - OSError: 'no space left on device', 'read-only file system', 'not a
    directory' ... with the path.

Anything else is a bug and keeps its traceback. `--verbosity=N` (any value) or
the environment variable TERRAFLAX_TRACEBACK=1 prints the traceback of handled
errors too. absl's and orbax's INFO/WARNING logging is hidden unless
`--verbosity` is given (the tools print their own results and notices).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from terraflax import errors
from terraflax import workdir as workdir_lib

TRACEBACK_ENV = 'TERRAFLAX_TRACEBACK'


class CliError(errors.UserError):
  """A command-line problem found while parsing flags or loading the config file."""


# ----------------------------------------------------------------------------
# The config file flag.

def define_config_file(name: str = 'config', *, defaults: dict[str, Any] | None = None,
                       help_string: str = 'Path to a configs/*.py file.',
                       flag_values: flags.FlagValues = flags.FLAGS):
  """`--<name>=configs/X.py[:arg]` with `--<name>.a.b=value` overrides; returns the FlagHolder.

  Like `config_flags.DEFINE_config_file(name, lock_config=True)`, but the file
  is loaded with clear errors (`CliError`), `defaults` ({'init_from': '',
  'train.log_every': 100, ...}: dotted field -> value) are filled into the
  loaded config where it lacks them BEFORE the overrides apply (so generic
  fields are overridable on every config), and an override naming a field the
  config does not have is one line with the closest field name.
  """
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=True)
  flag_values[name].parser = _ConfigFileParser(name, dict(defaults or {}))
  return holder


def _load_module(module_name: str, path: str):
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flat_fields(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Dotted names of every leaf field of `config` ('model.d_model', 'train.steps', ...)."""
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      out.extend(flat_fields(value, f'{prefix}{key}.'))
    else:
      out.append(f'{prefix}{key}')
  return out


def closest_field(field: str, fields: list[str]) -> str | None:
  """The field of `fields` most like `field`: by the whole dotted name, or by the last part
  within the same section ('model.n_hashs' -> 'model.attention.n_hashes'); None below 0.6."""
  def score(candidate):
    whole = difflib.SequenceMatcher(None, field, candidate).ratio()
    if candidate.split('.')[0] != field.split('.')[0]:
      return whole
    leaf = difflib.SequenceMatcher(None, field.split('.')[-1], candidate.split('.')[-1]).ratio()
    return max(whole, leaf)
  best = max(fields, key=score, default=None)
  return best if best is not None and score(best) >= 0.6 else None


def _has_field(config, path: str) -> bool:
  node = config
  for part in path.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _override_names(flag_name: str, argv: Iterable[str]) -> list[str]:
  """['model.d_model', ...]: the fields `--<flag_name>.a.b=...` overrides in `argv`."""
  pattern = re.compile(r'^--?(?:no)?' + re.escape(flag_name) + r'\.([^=]+)')
  return [m.group(1) for m in map(pattern.match, argv) if m]


class _ConfigFileParser(flags.ArgumentParser):
  """Loads `path[:arg]`'s `get_config(*arg)`, fills defaults, checks the overrides, locks."""

  def __init__(self, name: str, defaults: dict[str, Any]):
    self.name = name
    self.defaults = defaults

  def flag_type(self):
    return 'config object'

  def parse(self, argument):
    path, *args = argument.split(':', 1)
    flag = f'--{self.name}={argument}'
    if not path:
      raise CliError(f'{flag}: give the path of a config file (configs/NAME.py).')
    if not os.path.isfile(path):
      what = 'is a directory' if os.path.isdir(path) else 'no such file'
      raise CliError(f'{flag}: {what} ({os.path.abspath(path)}).')
    try:
      module = _load_module(f'{self.name}_config', path)
    except SyntaxError as e:
      raise CliError(f'{flag}: syntax error in {path} line {e.lineno}: {e.msg}.') from e
    except Exception as e:  # pylint: disable=broad-except  # The user's file failed to run.
      raise CliError(f'{flag}: running {path} failed: {type(e).__name__}: {e}') from e
    if not callable(getattr(module, 'get_config', None)):
      raise CliError(f'{flag}: {path} defines no get_config().')
    try:
      config = module.get_config(*args)
    except Exception as e:  # pylint: disable=broad-except
      raise CliError(f'{flag}: {path}: get_config() failed: {type(e).__name__}: {e}') from e
    if not isinstance(config, ml_collections.ConfigDict):
      raise CliError(f'{flag}: {path}: get_config() returned a {type(config).__name__}, not an '
                     'ml_collections.ConfigDict.')
    with config.unlocked():
      for field, value in self.defaults.items():
        if not _has_field(config, field):
          set_field(config, field, value)
    # Left alone, ml_collections' _ConfigFlag._parse would fail on such an override in
    # config_path.get_type (a bare AttributeError, a traceback): check them here first.
    fields = flat_fields(config)
    for field in _override_names(self.name, sys.argv if _ARGV is None else _ARGV):
      if not _has_field(config, field):
        close = closest_field(field, fields)
        hint = f' (did you mean {self.name}.{close}?)' if close else ''
        raise CliError(f'{self.name}.{field} is not a field of {path}{hint}.')
    config.lock()
    return config


def set_field(config, field: str, value) -> None:
  """config.a.b = value for field 'a.b', making the missing sections."""
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    if part not in node:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  node[leaf] = value


# ----------------------------------------------------------------------------
# Running a main.

_ARGV: list[str] | None = None  # The argv being parsed (the config flag reads its overrides).


def _wants_traceback(argv=None) -> bool:
  if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
    return True
  if argv is not None:
    return any(re.match(r'^--?(v|verbosity)(=|$)', a) for a in argv[1:])
  try:
    return flags.FLAGS['verbosity'].present > 0
  except (KeyError, flags.UnparsedFlagAccessError):
    return False


def describe(e: BaseException, user_errors: tuple[type, ...] = ()) -> str | None:
  """The one-line message for a handled error, or None for one that is a bug."""
  if isinstance(e, (errors.UserError, flags.Error, app.UsageError) + tuple(user_errors)):
    message = str(e).strip()
  elif isinstance(e, OSError):
    path = e.filename if e.filename is not None else ''
    if e.errno is None:
      message = str(e).strip()
    else:
      message = workdir_lib.os_error_text(e) + (f' ({path})' if path else '')
  else:
    return None
  return ' '.join(message.split()) or type(e).__name__  # One line.


def _fail(name: str, e: BaseException, user_errors, argv=None):
  message = describe(e, user_errors)
  if message is None:
    raise e
  if _wants_traceback(argv):
    traceback.print_exception(e)
  sys.exit(f'{name}: {message}')


def quiet_logging() -> None:
  """Hides absl/orbax INFO and WARNING logging unless `--verbosity` was given.

  Also drops the 'Event loop is closed' tracebacks that tensorstore's reader
  threads print (through `sys.unraisablehook`) when orbax gives up on a damaged
  checkpoint while other reads are still in flight: the failure itself is
  reported in one line by `workdir.restore_with_fallback`.
  """
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)
    sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)


def _drop_closed_loop_errors(hook):
  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return
    hook(unraisable)
  return unraisablehook


def run(main: Callable[[list[str]], Any], *, name: str, user_errors: Iterable[type] = (),
        flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
  """`absl.app.run(main)` with one error line per handled error (see the module docstring).

  `name` starts every message ('terraflax.decoding'); `user_errors` are more
  exception types printed as one line (the trainer's ConfigError); the
  default `flags_parser` parses `flags.FLAGS`.
  """
  handled = tuple(user_errors)

  def parse(argv):
    global _ARGV
    _ARGV = list(argv)
    try:
      if flags_parser is not None:
        return flags_parser(argv)
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except  # _fail re-raises bugs.
      _fail(name, e, handled, argv)
    finally:
      _ARGV = None

  def wrapped(argv):
    quiet_logging()
    try:
      if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except  # _fail re-raises bugs.
      _fail(name, e, handled)

  app.run(wrapped, flags_parser=parse)
