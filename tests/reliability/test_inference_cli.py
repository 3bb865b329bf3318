"""`python -m terraflax.decoding` / `terraflax.export`: one clear line per bad input or fault."""

import os

import pytest

from tests.reliability import helpers
from tests.reliability.helpers import assert_one_line_error, assert_quiet_success, run

DECODE, EXPORT = 'terraflax.decoding', 'terraflax.export'


def test_decoding_is_quiet(workdir):
  before = helpers.snapshot(workdir)
  result = run(DECODE, f'--workdir={workdir}', '--prompt=ab', '--max_new_tokens=5')
  assert_quiet_success(result)
  assert not result.stderr.strip()
  assert result.stdout.startswith('ab')
  helpers.assert_unchanged(before, workdir)


# Defect 4: the model's positions.

def test_prompt_plus_new_tokens_beyond_max_len(workdir):
  result = run(DECODE, f'--workdir={workdir}', '--prompt=' + 'a' * 100, '--max_new_tokens=5')
  assert_one_line_error(result, DECODE, 'prompt (100 tokens)', '--max_new_tokens=5',
                        'config.model.max_len=64')
  assert not result.stdout


@pytest.mark.parametrize('flag', ['--max_new_tokens=0', '--temperature=-1', '--top_k=0',
                                  '--top_p=2', '--top_p=0'])
def test_bad_sampling_flags(workdir, flag):
  result = run(DECODE, f'--workdir={workdir}', '--prompt=ab', flag)
  assert_one_line_error(result, DECODE, flag.split('=')[0])


# Defect 2: a damaged latest checkpoint falls back to the older one, in one notice.

def _one_fallback_notice(result):
  notices = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(notices) == 1, result.stderr[-3000:]
  assert 'checkpoint at step 20' in notices[0] and 'trying step 10' in notices[0], notices


def test_decoding_a_damaged_latest_checkpoint(workdir):
  helpers.damage(workdir, 20)
  before = helpers.snapshot(workdir)
  result = run(DECODE, f'--workdir={workdir}', '--prompt=ab', '--max_new_tokens=5')
  assert_quiet_success(result)
  _one_fallback_notice(result)
  helpers.assert_unchanged(before, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']


def test_exporting_a_damaged_latest_checkpoint(workdir, tmp_path):
  helpers.damage(workdir, 20)
  result = run(EXPORT, f'--workdir={workdir}', f'--out={tmp_path / "artifact"}')
  assert_quiet_success(result)
  _one_fallback_notice(result)
  assert (tmp_path / 'artifact' / 'meta.json').exists()


def test_no_intact_checkpoint(workdir):
  helpers.damage(workdir, 10)
  helpers.damage(workdir, 20)
  result = run(DECODE, f'--workdir={workdir}', '--prompt=ab', '--max_new_tokens=5')
  assert_one_line_error(result, DECODE, 'no checkpoint in', 'steps 10, 20')


def test_missing_step(workdir):
  result = run(DECODE, f'--workdir={workdir}', '--step=15', '--max_new_tokens=5')
  assert_one_line_error(result, DECODE, 'no checkpoint at step 15', 'steps 10, 20')


# Paths.

def test_export_under_a_file(workdir, tmp_path):
  (tmp_path / 'file').write_text('x')
  result = run(EXPORT, f'--workdir={workdir}', f'--out={tmp_path / "file" / "artifact"}')
  assert_one_line_error(result, EXPORT, 'not a directory', str(tmp_path / 'file'))


def test_decoding_a_directory_that_is_not_a_workdir(tmp_path):
  result = run(DECODE, f'--workdir={tmp_path}', '--prompt=ab')
  assert_one_line_error(result, DECODE, f'{tmp_path}', 'not a terraflax workdir')


def test_export_without_out(workdir):
  result = run(EXPORT, f'--workdir={workdir}')
  assert_one_line_error(result, EXPORT, '--out')
