"""Fixtures of the CLI reliability tests: one tiny trained workdir per module, copied per test."""

import pathlib
import shutil
import sys

import pytest

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tests.reliability import helpers  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> str:
  """A workdir trained for 20 steps (checkpoints at 10 and 20): copy it, never change it."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  result = helpers.train(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture
def workdir(trained, tmp_path) -> str:
  """A private copy of the trained workdir."""
  copy = str(tmp_path / 'run')
  shutil.copytree(trained, copy)
  return copy
