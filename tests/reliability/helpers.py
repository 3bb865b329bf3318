"""Shared pieces of the CLI reliability tests (the fixtures are in conftest.py).

Every test runs a command line in a subprocess and checks the exit code, that
stderr is one `terraflax.<cli>: ...` line naming the offending thing (no
traceback, no absl/orbax logging), and that the files that existed before are
unchanged (`snapshot` / `assert_unchanged`).
"""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FAULT_HOOK = pathlib.Path(__file__).resolve().parent / 'fault_hook'
CONFIG = str(ROOT / 'configs' / 'transformer_lm.py')
TINY = ('--config.train.steps=20', '--config.train.batch_size=4', '--config.data.seq_len=64',
        '--config.optimizer.warmup_steps=2', '--config.model.d_model=32',
        '--config.model.d_ff=64', '--config.model.n_layers=1', '--config.model.max_len=64',
        '--config.train.checkpoint_every=10', '--config.train.eval_batches=1',
        '--config.sample.max_new_tokens=0')


def env(fault: str = '', **extra) -> dict:
  paths = [str(ROOT)] + ([str(FAULT_HOOK)] if fault else [])
  out = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(paths))
  out.pop('TERRAFLAX_TRACEBACK', None)
  out.update(extra)
  if fault:
    out['TERRAFLAX_FAULT'] = fault
  return out


def run(module: str, *args: str, fault: str = '', timeout: int = 300,
        **env_extra) -> subprocess.CompletedProcess:
  """`python -m <module> args...` from the repository root."""
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT,
                        env=env(fault, **env_extra), capture_output=True, text=True,
                        timeout=timeout, check=False)


def train(workdir: str, *overrides: str, config: str = CONFIG, **kwargs):
  return run('terraflax.train', f'--config={config}', f'--workdir={workdir}', *TINY,
             *overrides, **kwargs)


def snapshot(directory) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory` ({} if it does not exist)."""
  out = {}
  for dirpath, _, filenames in os.walk(directory):
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_unchanged(before: dict[str, str], directory, *, may_change=()) -> None:
  """Every file in `before` still exists under `directory` with the same bytes, and no
  temporary file is left behind. Paths starting with one of `may_change` are not
  compared (logs a run appends to, a config.json a permitted resume rewrites)."""
  after = snapshot(directory)
  changed = sorted(p for p, digest in before.items()
                   if after.get(p) != digest and not p.startswith(tuple(may_change)))
  assert not changed, f'changed or removed: {changed}'
  temporary = sorted(p for p in set(after) - set(before) if p.endswith('.tmp'))
  assert not temporary, f'temporary files left: {temporary}'


def assert_one_line_error(result, cli: str, *needles: str) -> str:
  """Non-zero exit; stderr is one `terraflax.<cli>: ...` line containing every needle
  (notices `terraflax: ...` may precede it); returns that line."""
  assert result.returncode != 0, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith(f'{cli}: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  others = [line for line in lines if line not in errors and not line.startswith('terraflax: ')]
  assert not others, result.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def assert_quiet_success(result) -> None:
  """Exit 0 and nothing on stderr but `terraflax: ...` notices (no absl/orbax logging)."""
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  others = [line for line in result.stderr.splitlines()
            if line.strip() and not line.startswith('terraflax: ')]
  assert not others, result.stderr[-3000:]


def damage(workdir: str, step: int) -> None:
  """Truncates one file of a checkpoint's params (its metadata), as a crash or a bad disk can."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'params', '_METADATA')
  with open(path, 'r+b') as f:
    f.truncate(5)
