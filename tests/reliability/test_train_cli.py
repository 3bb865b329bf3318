"""`python -m terraflax.train`: bad inputs and faults end in one clear line; nothing is lost."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.reliability import helpers
from tests.reliability.helpers import TINY, assert_one_line_error, train

CLI = 'terraflax.train'


# Defect 1: a rejected resume must not touch config.json (or anything else).


def test_resume_with_a_changed_model_is_refused(workdir):
  before = helpers.snapshot(workdir)
  result = train(workdir, '--config.model.d_model=64')
  assert_one_line_error(result, CLI, 'model.d_model: 32 -> 64')
  helpers.assert_unchanged(before, workdir)



def test_resume_with_another_optimizer_is_refused(workdir):
  before = helpers.snapshot(workdir)
  result = train(workdir, '--config.optimizer.name=sgd')
  assert_one_line_error(result, CLI, "optimizer.name: 'adam' -> 'sgd'")
  helpers.assert_unchanged(before, workdir)



def test_resume_with_changed_optimizer_settings_is_refused(workdir):
  before = helpers.snapshot(workdir)
  result = train(workdir, '--config.optimizer.b1=0.8')
  assert_one_line_error(result, CLI, 'optimizer.b1: 0.9 -> 0.8')
  helpers.assert_unchanged(before, workdir)


def test_full_disk_while_writing_config_keeps_the_old_one(workdir):
  before = helpers.snapshot(workdir)
  result = train(workdir, fault='config_enospc')
  assert_one_line_error(result, CLI, 'no space left on device',
                        os.path.join(workdir, 'config.json'))
  helpers.assert_unchanged(before, workdir)


def test_read_only_file_system(tmp_path):
  result = train(str(tmp_path / 'run'), fault='config_erofs')
  assert_one_line_error(result, CLI, 'read-only file system', 'config.json')


def test_full_disk_during_a_save(workdir):
  before = helpers.snapshot(workdir)
  result = train(workdir, '--config.train.steps=30', fault='save_enospc')
  assert_one_line_error(result, CLI, 'no space left on device',
                        os.path.join(workdir, 'checkpoints', '30'))
  # train.steps may change on resume, so config.json may be rewritten (atomically).
  helpers.assert_unchanged(before, workdir,
                           may_change=('metrics.jsonl', 'tensorboard', 'config.json'))
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['model']['d_model'] == 32


# Defect 2: a damaged latest checkpoint.


def test_damaged_latest_checkpoint_resumes_from_the_older_one(workdir):
  helpers.damage(workdir, 20)
  before = helpers.snapshot(os.path.join(workdir, 'checkpoints', '10'))
  result = train(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  notices = [line for line in result.stderr.splitlines() if 'step 20' in line]
  assert len(notices) == 1 and 'trying step 10' in notices[0], result.stderr[-3000:]
  assert 'Resumed from the checkpoint at step 10' in result.stdout
  helpers.assert_unchanged(before, os.path.join(workdir, 'checkpoints', '10'))
  # The damaged step is kept, out of orbax's way, and step 20 is written afresh.
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', '20'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']



def test_eval_only_on_a_damaged_latest_checkpoint_scores_the_older_one(workdir):
  helpers.damage(workdir, 20)
  result = train(workdir, '--config.eval.only=True')
  helpers.assert_quiet_success(result)
  notices = result.stderr.strip().splitlines()
  assert len(notices) == 1 and 'step 20' in notices[0] and 'trying step 10' in notices[0]


# Defect 3: one trainer per workdir.


def test_second_trainer_on_a_workdir_refuses_at_once(tmp_path):
  workdir = str(tmp_path / 'run')
  args = [sys.executable, '-m', 'terraflax.train', f'--config={helpers.CONFIG}',
          f'--workdir={workdir}', *TINY, '--config.train.steps=100000',
          '--config.train.log_every=1']
  first = subprocess.Popen(args, cwd=helpers.ROOT, env=helpers.env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    lock = os.path.join(workdir, '.lock')
    deadline = time.time() + 120
    metrics = os.path.join(workdir, 'metrics.jsonl')  # Training without a lock: give up.
    while (not os.path.exists(lock) and not os.path.exists(metrics) and first.poll() is None
           and time.time() < deadline):
      time.sleep(0.05)
    assert os.path.exists(lock), 'the first trainer never took the lock'
    # Refused at once, not after waiting for the first: it fails while the first still runs.
    second = helpers.run('terraflax.train', *args[3:], timeout=120)
    assert_one_line_error(second, CLI, f'pid {first.pid}', lock)
    assert first.poll() is None, 'the first trainer stopped'
    first.send_signal(signal.SIGTERM)  # It saves a checkpoint and exits 0.
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert len(steps) == len(set(steps)), steps


# Defect 6: quiet divergence.


def test_divergence_is_reported(tmp_path):
  workdir = str(tmp_path / 'run')
  result = train(workdir, '--config.optimizer.learning_rate=1e6', '--config.train.log_every=5')
  assert 'training is diverging' in result.stdout + result.stderr
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    assert any(json.loads(line).get('train/diverging') == 1 for line in f)


# Item 5: one line where a traceback was.

def test_unknown_override_names_the_closest_field(tmp_path):
  result = train(str(tmp_path / 'run'), '--config.model.n_hashs=3',
                 config=str(helpers.ROOT / 'configs' / 'default.py'))
  assert_one_line_error(result, CLI, 'config.model.n_hashs is not a field of',
                        'did you mean config.model.attention.n_hashes?')
  assert not (tmp_path / 'run').exists()


def test_generic_field_on_a_config_that_does_not_declare_it(trained, tmp_path):
  result = train(str(tmp_path / 'run'), f'--config.init_from={trained}',
                 '--config.train.steps=3')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'from {trained} (step 20)' in result.stdout


def test_missing_config_file(tmp_path):
  result = train(str(tmp_path / 'run'), config='configs/no_such_config.py')
  assert_one_line_error(result, CLI, '--config=configs/no_such_config.py: no such file')


def test_config_file_with_a_syntax_error(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n  pass\n')
  result = train(str(tmp_path / 'run'), config=str(bad))
  assert_one_line_error(result, CLI, f'syntax error in {bad} line 1')


def test_workdir_under_a_file(tmp_path):
  (tmp_path / 'file').write_text('x')
  result = train(str(tmp_path / 'file' / 'run'))
  assert_one_line_error(result, CLI, 'not a directory', str(tmp_path / 'file'))


def test_traceback_on_request(tmp_path):
  result = train(str(tmp_path / 'run'), config='configs/no_such_config.py',
                 TERRAFLAX_TRACEBACK='1')
  assert result.returncode != 0
  assert 'Traceback' in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f'{CLI}: --config=')


# Errors that were already clear, kept clear.

def test_wrong_type_for_a_field(tmp_path):
  result = train(str(tmp_path / 'run'), '--config.train.steps=abc')
  assert_one_line_error(result, CLI, '--config.train.steps=abc')


def test_d_model_not_divisible_by_n_heads(workdir):
  before = helpers.snapshot(workdir)
  result = train(workdir, '--config.model.d_model=30')
  assert_one_line_error(result, CLI, 'config.model.d_model=30', 'config.model.n_heads=4')
  helpers.assert_unchanged(before, workdir)


def test_missing_workdir():
  result = helpers.run(CLI, f'--config={helpers.CONFIG}')
  assert_one_line_error(result, CLI, '--workdir')
