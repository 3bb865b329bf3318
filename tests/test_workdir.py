"""terraflax.workdir: atomic config.json, the workdir lock, resume conflicts, restore fallback."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import ml_collections
import numpy as np

from terraflax import workdir as workdir_lib
from terraflax.workdir import WorkdirError, WorkdirLock


def _config(**train):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict({'name': 'TransformerLM', 'd_model': 32,
                                            'attention_type': ('lsh', 'full')})
  config.train = ml_collections.ConfigDict({'steps': 20, 'batch_size': 4, 'log_every': 10,
                                            **train})
  config.optimizer = ml_collections.ConfigDict({'name': 'adam', 'learning_rate': 1e-3})
  config.sample = ml_collections.ConfigDict({'prompt': 'a'})
  return config


def _files(directory):
  return sorted(os.listdir(directory))


class _TestCase(absltest.TestCase):

  def tempdir(self):
    path = tempfile.mkdtemp(prefix='terraflax_workdir_test_')
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def tempfile(self):
    path = os.path.join(self.tempdir(), 'a_file')
    with open(path, 'w', encoding='utf-8') as f:
      f.write('x')
    return path


class WriteConfigTest(_TestCase):

  def test_writes_and_reads_back(self):
    workdir = self.tempdir()
    workdir_lib.write_config(workdir, _config())
    self.assertEqual(workdir_lib.read_config(workdir).train.steps, 20)
    self.assertEqual(_files(workdir), ['config.json'])

  def test_failure_leaves_the_old_file_byte_identical(self):
    workdir = self.tempdir()
    workdir_lib.write_config(workdir, _config())
    path = os.path.join(workdir, 'config.json')
    with open(path, 'rb') as f:
      before = f.read()
    for name in ('fsync', 'replace'):
      def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      with absltest.mock.patch.object(workdir_lib.os, name, fail):
        with self.assertRaisesRegex(WorkdirError, f'cannot write {path}: no space left on device'):
          workdir_lib.write_config(workdir, _config(steps=99))
      with open(path, 'rb') as f:
        self.assertEqual(f.read(), before, name)
      self.assertEqual(_files(workdir), ['config.json'], name)  # The temp file is gone.

  def test_unwritable_directory(self):
    parent = self.tempfile()  # A regular file: nothing can go below it.
    with self.assertRaisesRegex(WorkdirError, 'cannot write .*config.json: not a directory'):
      workdir_lib.write_config(os.path.join(parent, 'run'), _config())


class WorkdirLockTest(_TestCase):

  def _write_lock(self, workdir, pid, host):
    with open(os.path.join(workdir, '.lock'), 'w', encoding='utf-8') as f:
      json.dump({'pid': pid, 'host': host, 'started': '2026-01-01T00:00:00+00:00'}, f)

  def test_acquire_release(self):
    workdir = os.path.join(self.tempdir(), 'new')
    with WorkdirLock(workdir) as lock:
      with open(lock.path, encoding='utf-8') as f:
        owner = json.load(f)
      self.assertEqual((owner['pid'], owner['host']), (os.getpid(), socket.gethostname()))
      self.assertIn('started', owner)
    self.assertFalse(os.path.exists(lock.path))
    with WorkdirLock(workdir):  # Free again.
      pass

  def test_live_owner_refused(self):
    workdir = self.tempdir()
    owner = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
      self._write_lock(workdir, owner.pid, socket.gethostname())
      lock_file = os.path.join(workdir, '.lock')
      with self.assertRaisesRegex(WorkdirError,
                                  f'in use by pid {owner.pid} on .*lock file {lock_file}'):
        WorkdirLock(workdir).acquire()
      self.assertTrue(os.path.exists(lock_file))  # Not touched.
    finally:
      owner.kill()
      owner.wait()

  def test_held_lock_refuses_a_second_holder(self):
    workdir = self.tempdir()
    with WorkdirLock(workdir):
      with self.assertRaisesRegex(WorkdirError, f'in use by pid {os.getpid()}'):
        WorkdirLock(workdir).acquire()

  def test_other_host_refused(self):
    workdir = self.tempdir()
    self._write_lock(workdir, 1, 'some-other-host')
    with self.assertRaisesRegex(WorkdirError, 'in use by pid 1 on some-other-host'):
      WorkdirLock(workdir).acquire()

  def test_stale_lock_taken_over(self):
    workdir = self.tempdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    self._write_lock(workdir, dead.pid, socket.gethostname())
    with absltest.mock.patch.object(workdir_lib.errors, 'notice') as notice:
      with WorkdirLock(workdir) as lock:
        with open(lock.path, encoding='utf-8') as f:
          self.assertEqual(json.load(f)['pid'], os.getpid())
    notice.assert_called_once()
    self.assertIn(f'stale lock {lock.path} of pid {dead.pid}', notice.call_args[0][0])

  def test_workdir_under_a_file(self):
    parent = self.tempfile()
    with self.assertRaisesRegex(WorkdirError, 'cannot create the workdir .*: not a directory'):
      WorkdirLock(os.path.join(parent, 'run')).acquire()


class ResumeConflictsTest(_TestCase):

  def test_same_config_through_json(self):
    workdir = self.tempdir()
    workdir_lib.write_config(workdir, _config())
    self.assertEqual(workdir_lib.resume_conflicts(workdir_lib.read_config(workdir), _config()),
                     [])

  def test_lists_exactly_the_changed_fields(self):
    workdir = self.tempdir()
    workdir_lib.write_config(workdir, _config())
    new = _config(steps=40, log_every=5, batch_size=8)  # steps, log_every may change.
    new.model.d_model = 64
    new.optimizer.name = 'sgd'
    new.sample.prompt = 'b'  # May change.
    new.model.dropout = 0.1  # Only in the new config.
    self.assertEqual(
        workdir_lib.resume_conflicts(workdir_lib.read_config(workdir), new),
        ["model.d_model: 32 -> 64", "model.dropout: '<absent>' -> 0.1",
         "optimizer.name: 'adam' -> 'sgd'", 'train.batch_size: 4 -> 8'])

  def test_resumable_fields(self):
    for field in workdir_lib.RESUMABLE_FIELDS:
      self.assertTrue(workdir_lib.may_change_on_resume(field.replace('*', 'anything')), field)
    for field in ('train.batch_size', 'optimizer.learning_rate', 'model.d_model', 'seed',
                  'train.stepsize', 'evaluation.x'):
      self.assertFalse(workdir_lib.may_change_on_resume(field), field)


class _FakeManager:

  def __init__(self, steps, directory='/w/checkpoints'):
    self.steps, self.directory = steps, directory

  def all_steps(self):
    return list(self.steps)


class RestoreWithFallbackTest(_TestCase):

  def test_falls_back_and_logs_one_line(self):
    lines = []

    def restore(step):
      if step == 30:
        raise ValueError('DATA_LOSS: truncated\nmore detail')
      return f'state {step}'

    step, state = workdir_lib.restore_with_fallback(_FakeManager([10, 20, 30]), restore,
                                                    what='the state', log=lines.append)
    self.assertEqual((step, state), (20, 'state 20'))
    self.assertLen(lines, 1)
    self.assertIn('step 30 in /w/checkpoints (ValueError: DATA_LOSS: truncated); trying step 20',
                  lines[0])

  def test_none_restores(self):
    def restore(step):
      raise OSError(f'bad {step}')
    lines = []
    with self.assertRaisesRegex(WorkdirError, r'no checkpoint in /w/checkpoints restores the '
                                r'state \(steps 10, 20; newest error: step 20: OSError: bad 20'):
      workdir_lib.restore_with_fallback(_FakeManager([10, 20]), restore, what='the state',
                                        log=lines.append)
    self.assertLen(lines, 2)

  def test_no_checkpoint_and_missing_step(self):
    with self.assertRaisesRegex(WorkdirError, '/w/checkpoints holds no checkpoint'):
      workdir_lib.restore_with_fallback(_FakeManager([]), lambda s: s, what='x')
    with self.assertRaisesRegex(WorkdirError, 'no checkpoint at step 5; it has steps 10, 20'):
      workdir_lib.restore_with_fallback(_FakeManager([10, 20]), lambda s: s, what='x', step=5)

  def test_explicit_step_does_not_fall_back(self):
    def restore(step):
      raise ValueError('broken')
    with self.assertRaisesRegex(WorkdirError, r'\(steps 10, 20; newest error: step 20'):
      workdir_lib.restore_with_fallback(_FakeManager([10, 20]), restore, what='x', step=20,
                                        log=lambda line: None)


class LoadParamsTest(_TestCase):
  """Real orbax checkpoints: a truncated newest step falls back to the older intact one."""

  def _workdir(self):
    workdir = self.tempdir()
    workdir_lib.write_config(workdir, _config())
    for step in (10, 20):
      workdir_lib.save_params(workdir, step, {'w': np.full((3, 4), step, np.float32)})
    return workdir

  def _truncate(self, workdir, step):
    path = os.path.join(workdir, 'checkpoints', str(step), 'params', '_METADATA')
    with open(path, 'r+b') as f:
      f.truncate(5)

  def test_intact(self):
    _, params, step = workdir_lib.load_params(self._workdir())
    self.assertEqual(step, 20)
    np.testing.assert_array_equal(params['w'], np.full((3, 4), 20, np.float32))

  def test_truncated_latest_falls_back(self):
    workdir = self._workdir()
    self._truncate(workdir, 20)
    with absltest.mock.patch.object(workdir_lib.errors, 'notice') as notice:
      _, params, step = workdir_lib.load_params(workdir)
    self.assertEqual(step, 10)
    np.testing.assert_array_equal(params['w'], np.full((3, 4), 10, np.float32))
    notice.assert_called_once()
    self.assertIn('checkpoint at step 20', notice.call_args[0][0])
    self.assertTrue(os.path.isdir(os.path.join(workdir, 'checkpoints', '20')))  # Kept.

  def test_set_aside_moves_the_damaged_newer_steps(self):
    workdir = self._workdir()
    self._truncate(workdir, 20)
    manager = workdir_lib.make_manager(workdir, async_save=False)
    lines = []

    def restore(step):
      return manager.restore(step, args=workdir_lib.ocp.args.Composite(
          params=workdir_lib.ocp.args.StandardRestore()))['params']

    try:
      step, params = workdir_lib.restore_with_fallback(manager, restore, what='parameters',
                                                       log=lines.append, set_aside=True)
      self.assertEqual(step, 10)
      np.testing.assert_array_equal(params['w'], np.full((3, 4), 10, np.float32))
      self.assertEqual(manager.all_steps(), [10])
      manager.save(20, args=workdir_lib.ocp.args.Composite(
          params=workdir_lib.ocp.args.StandardSave({'w': np.zeros((3, 4), np.float32)})))
      manager.wait_until_finished()
    finally:
      manager.close()
    self.assertLen(lines, 2)
    self.assertIn(os.path.join(workdir, 'damaged_checkpoints', '20'), lines[1])
    self.assertTrue(os.path.exists(
        os.path.join(workdir, 'damaged_checkpoints', '20', 'params', '_METADATA')))
    self.assertEqual(workdir_lib.load_params(workdir)[2], 20)

  def test_none_intact(self):
    workdir = self._workdir()
    self._truncate(workdir, 10)
    self._truncate(workdir, 20)
    with absltest.mock.patch.object(workdir_lib.errors, 'notice'):
      with self.assertRaisesRegex(WorkdirError, r'restores parameters \(steps 10, 20;'):
        workdir_lib.load_params(workdir)


if __name__ == '__main__':
  absltest.main()
