"""terraflax.cli in-process: error lines, config-file loading, defaults, override checks."""

import errno
import os
import shutil
import sys
import tempfile

from absl import flags
from absl.testing import absltest

from terraflax import cli
from terraflax import errors
from terraflax.workdir import WorkdirError


class DescribeTest(absltest.TestCase):

  def test_handled_errors_are_one_line(self):
    self.assertEqual(cli.describe(WorkdirError('a\n  b')), 'a b')
    self.assertEqual(cli.describe(OSError(errno.ENOSPC, 'No space left on device', '/w/x')),
                     'no space left on device (/w/x)')
    self.assertEqual(cli.describe(OSError(errno.EROFS, 'Read-only file system', '/w')),
                     'read-only file system (/w)')
    self.assertEqual(cli.describe(flags.IllegalFlagValueError('flag --x=1: bad')),
                     'flag --x=1: bad')

  def test_registered_and_unknown_errors(self):
    class ConfigError(ValueError):
      pass
    self.assertEqual(cli.describe(ConfigError('config.a is bad'), (ConfigError,)),
                     'config.a is bad')
    self.assertIsNone(cli.describe(ConfigError('config.a is bad')))  # Not registered: a bug.
    self.assertIsNone(cli.describe(KeyError('x')))


class ConfigFileTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir)
    self.path = os.path.join(self.dir, 'conf.py')
    with open(self.path, 'w', encoding='utf-8') as f:
      f.write('import ml_collections\n\n'
              'def get_config(arg=None):\n'
              '  config = ml_collections.ConfigDict()\n'
              '  config.model = ml_collections.ConfigDict({"n_hashes": 2, "d_model": 8})\n'
              '  config.train = ml_collections.ConfigDict({"steps": 3})\n'
              '  if arg:\n'
              '    config.train.steps = int(arg)\n'
              '  return config\n')

  def parse(self, argv, defaults=None):
    values = flags.FlagValues()
    holder = cli.define_config_file('config', defaults=defaults, flag_values=values)
    argv = ['prog', *argv]
    with absltest.mock.patch.object(sys, 'argv', argv):
      values(argv)
    return holder.value

  def test_defaults_filled_and_overridable(self):
    config = self.parse([f'--config={self.path}', '--config.init_from=/w',
                         '--config.train.steps=5'],
                        defaults={'init_from': '', 'train.log_every': 100, 'train.steps': 1})
    self.assertEqual(config.init_from, '/w')
    self.assertEqual(config.train.log_every, 100)
    self.assertEqual(config.train.steps, 5)  # The file's value wins over the default.
    self.assertTrue(config.is_locked)

  def test_config_string_argument(self):
    self.assertEqual(self.parse([f'--config={self.path}:7']).train.steps, 7)

  def test_unknown_override(self):
    with self.assertRaisesRegex(cli.CliError, r'config.model.n_hashs is not a field of .*conf.py '
                                r'\(did you mean config.model.n_hashes\?\)'):
      self.parse([f'--config={self.path}', '--config.model.n_hashs=3'])

  def test_missing_and_broken_files(self):
    with self.assertRaisesRegex(cli.CliError, 'no such file'):
      self.parse([f'--config={self.path}x'])
    with open(self.path, 'w', encoding='utf-8') as f:
      f.write('def get_config(:\n')
    with self.assertRaisesRegex(cli.CliError, 'syntax error in .*conf.py line 1'):
      self.parse([f'--config={self.path}'])
    with open(self.path, 'w', encoding='utf-8') as f:
      f.write('def get_config():\n  return 1 / 0\n')
    with self.assertRaisesRegex(cli.CliError, r'get_config\(\) failed: ZeroDivisionError'):
      self.parse([f'--config={self.path}'])

  def test_errors_are_user_errors(self):
    self.assertTrue(issubclass(cli.CliError, errors.UserError))
    self.assertTrue(issubclass(WorkdirError, errors.UserError))


if __name__ == '__main__':
  absltest.main()
