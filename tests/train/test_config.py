"""Config validation: each bad config gives one error naming the field; configs/*.py load."""

import glob
import os
import pathlib
import tempfile

import ml_collections
from absl.testing import absltest, parameterized

from terraflax.train import config as config_lib
from tests.train.tiny_models import sharded_lm_config, tiny_lm_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def with_changes(changes, deletions=()):
  config = tiny_lm_config()
  for path, value in changes.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = value
  for path in deletions:
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    del node[leaf]
  return config


class ValidateTest(parameterized.TestCase):

  def test_good_config_resolves_defaults_and_model(self):
    experiment = config_lib.validate_config(tiny_lm_config(), n_devices=1, n_processes=1)
    self.assertEqual(experiment.config.train.grad_accum_steps, 1)  # A default filled in.
    self.assertEqual(experiment.config.optimizer.b2, 0.98)
    self.assertEqual(experiment.data.info.vocab_size, 16)
    self.assertIn('params', experiment.abstract_variables)
    self.assertEqual(experiment.spec.build('eval').layers[1].mode, 'eval')

  @parameterized.named_parameters(
      ('negative_batch', {'train.batch_size': -3},
       r'^config\.train\.batch_size must be a positive int, got -3\.$'),
      ('float_steps', {'train.steps': 2.5},
       r'config\.train\.steps must be a positive int, got 2\.5'),
      ('bool_is_not_int', {'train.log_every': True}, r'config\.train\.log_every must be'),
      ('string_lr', {'optimizer.learning_rate': 'fast'},
       r"config\.optimizer\.learning_rate must be a positive number, got 'fast'"),
      ('unknown_optimizer', {'optimizer.name': 'lion'},
       r"config\.optimizer\.name must be one of "
       r"\('adam', 'adamw', 'adafactor', 'sgd'\), got 'lion'"),
      ('fraction_range', {'data.eval_fraction': 1.5},
       r'config\.data\.eval_fraction must be a number in \[0, 1\), got 1\.5'),
      ('unknown_train_field', {'train.batch_sise': 8},
       r"config\.train\.batch_sise is not a known field \(did you mean 'train\.batch_size'\?\)"),
      ('unknown_section', {'trainer': ml_collections.ConfigDict({'steps': 1})},
       r"config\.trainer is not a config section \(did you mean 'train'\?\)"),
      ('unknown_data_name', {'data.name': 'imagenet'}, r'config\.data\.name must be one of'),
      ('heads_divide_d_model', {'model.n_heads': 3},
       r'config\.model\.d_model=16 must be divisible by config\.model\.n_heads=3'),
      ('unknown_model_field', {'model.n_hashes': 4},
       r"config\.model\.n_hashes is not an argument of tests\.train\.tiny_models:TinyLM "
       r"\(did you mean 'n_heads'\?\); valid model fields: name, chunk_len, d_ff, d_model, "
       r"dropout, dtype, max_len, n_heads"),
      ('mode_is_the_trainers', {'model.mode': 'eval'}, r'config\.model\.mode must not be set'),
      ('bad_dtype', {'model.dtype': 'float13'}, r"config\.model\.dtype must be a dtype name"),
      ('unknown_factory', {'model.name': 'tests.train.tiny_models:TinyLn'},
       r"has no factory 'TinyLn' \(did you mean 'TinyLM'\?\)"),
      ('unimportable_module', {'model.name': 'no_such_pkg.models:LM'},
       r"config\.model\.name='no_such_pkg\.models:LM': cannot import"),
      ('vocab_too_small', {'model.vocab_size': 8},
       r"config\.model\.vocab_size=8 is smaller than the vocabulary of data\.name='duplication'"),
      ('max_len_too_short', {'model.max_len': 8},
       r'config\.model\.max_len=8 is shorter than config\.data\.seq_len=16'),
      ('chunking', {'model.chunk_len': 6},
       r'config\.model\.\* .* cannot take inputs of shape \(8, 16\) .*data\.seq_len=16.*'
       r'not a multiple of chunk_len=6'),
      ('accum_divides_batch', {'train.grad_accum_steps': 3},
       r'config\.train\.batch_size=8 must be divisible by train\.grad_accum_steps=3'),
      ('adam_weight_decay', {'optimizer.weight_decay': 0.1},
       r"config\.optimizer\.weight_decay is not applied by adam; use optimizer\.name='adamw'"),
      ('fractions_sum', {'data.eval_fraction': 0.6, 'data.test_fraction': 0.5},
       r'config\.data\.eval_fraction \+ data\.test_fraction must be < 1'),
      ('odd_duplication', {'data.seq_len': 15}, r'config\.data\.seq_len must be even'),
      ('missing_bytes_path', {'data.name': 'bytes', 'model.vocab_size': 256},
       r'config\.data\.path is empty'),
      ('absent_bytes_path', {'data.name': 'bytes', 'model.vocab_size': 256,
                             'data.path': '/nonexistent/corpus'},
       r"config\.data\.path='/nonexistent/corpus' does not exist"),
      ('eval_smaller_than_batch', {'data.eval_examples': 4},
       r'config\.data\.eval_examples=4 .* fewer than one batch'),
      ('bad_axis_rule',
       {'sharding': ml_collections.ConfigDict({'logical_axis_rules': (('embed', 'x'),)})},
       r'config\.sharding\.logical_axis_rules must be pairs'),
  )
  def test_bad_config(self, changes, message):
    with self.assertRaisesRegex(config_lib.ConfigError, message):
      config_lib.validate_config(with_changes(changes), n_devices=1, n_processes=1)

  def test_required_fields(self):
    with self.assertRaisesRegex(config_lib.ConfigError, r'config\.train\.steps is required'):
      config_lib.validate_config(with_changes({}, deletions=['train.steps']), n_devices=1)
    with self.assertRaisesRegex(config_lib.ConfigError, r'config\.model\.name is required'):
      config_lib.validate_config(with_changes({}, deletions=['model.name']), n_devices=1)
    with self.assertRaisesRegex(config_lib.ConfigError, r'config\.model\.d_ff is required by'):
      config_lib.validate_config(with_changes({}, deletions=['model.d_ff']), n_devices=1)

  def test_batch_must_divide_over_data_parallel_devices(self):
    config = with_changes({'train.batch_size': 12, 'data.eval_examples': 24})
    with self.assertRaisesRegex(
        config_lib.ConfigError,
        r'^config\.train\.batch_size=12 must be divisible by the 8 devices the batch is split '
        r'over \(data=8 x sharding\.fsdp=1\)\.$'):
      config_lib.validate_config(config, n_devices=8, n_processes=1)
    config = with_changes({'train.batch_size': 16, 'sharding': ml_collections.ConfigDict(
        {'model_parallel': 2})})
    with self.assertWarns(DeprecationWarning):  # model_parallel: tensor_parallel's old name.
      config_lib.validate_config(config, n_devices=8, n_processes=1)  # 16 over 4 data shards.
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'sharding\.tensor_parallel=3 = 3 must divide the number of '
                                r'devices \(8\)'):
      config_lib.validate_config(with_changes({'sharding': ml_collections.ConfigDict(
          {'tensor_parallel': 3})}), n_devices=8, n_processes=1)

  def test_sharded_widths_must_divide_their_mesh_axes(self):
    config = sharded_lm_config(**{'model.d_ff': 6, 'sharding': ml_collections.ConfigDict(
        {'tensor_parallel': 4})})
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'^config\.model\.d_ff=6 is not divisible by '
                                r'sharding\.tensor_parallel=4 \(parameter blocks/w_in'):
      config_lib.validate_config(config, n_devices=8, n_processes=1)
    config = sharded_lm_config(**{'sharding': ml_collections.ConfigDict({'fsdp': 8})})
    config_lib.validate_config(config, n_devices=8, n_processes=1)  # d_model 16 over 8.
    config = sharded_lm_config(**{'model.d_model': 4, 'sharding': ml_collections.ConfigDict(
        {'fsdp': 8})})
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'config\.model\.d_model=4 is not divisible by sharding\.fsdp=8'):
      config_lib.validate_config(config, n_devices=8, n_processes=1)

  def test_terraflax_models_names(self):
    config = with_changes({'model.name': 'NoSuchModel'})
    with self.assertRaisesRegex(config_lib.ConfigError, r"config\.model\.name='NoSuchModel'"):
      config_lib.validate_config(config, n_devices=1, n_processes=1)


  def test_classifier_on_listops(self):
    config = tiny_lm_config()
    config.model = ml_collections.ConfigDict({
        'name': 'tests.train.tiny_models:TinyClassifier', 'vocab_size': 16, 'd_model': 8,
        'n_classes': 10})
    config.data = ml_collections.ConfigDict({'name': 'listops', 'seq_len': 32, 'max_len': 32,
                                             'min_len': 4, 'max_depth': 3, 'eval_examples': 16})
    experiment = config_lib.validate_config(config, n_devices=1, n_processes=1)
    self.assertEqual(experiment.data.info.task, 'classification')
    config.model.n_classes = 9
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'config\.model\.n_classes=9 must equal the 10 classes'):
      config_lib.validate_config(config, n_devices=1, n_processes=1)
    del config.model['n_classes']
    config.model.d_model = 10
    config.model.name = 'tests.train.tiny_models:TinyLM'
    config.model.d_ff = 8
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'returns logits of shape \(8, 32, 16\) .* needs \(8, 10\)'):
      config_lib.validate_config(config, n_devices=1, n_processes=1)

class ConfigFilesTest(parameterized.TestCase):

  @parameterized.parameters(*sorted(glob.glob(str(ROOT / 'configs' / '*.py'))))
  def test_config_file_passes_the_schema(self, path):
    module_dir, name = os.path.split(path)
    config = config_lib.load_sibling(os.path.join(module_dir, 'x.py'), name[:-3])
    config = config_lib.check_fields(config)
    if not config.data.path and config.data.name == 'bytes':  # reformer_enwik8: set by the user.
      config.data.path = __file__
    config_lib.check_combinations(config, n_devices=1, n_processes=1)
    self.assertIsInstance(config.model.name, str)
    kwargs = dict(config_lib.model_spec(config).kwargs)
    self.assertNotIn('mode', kwargs)
    if 'd_model' in kwargs and 'n_heads' in kwargs:
      self.assertEqual(kwargs['d_model'] % kwargs['n_heads'], 0)
    if 'max_len' in kwargs:
      self.assertGreaterEqual(kwargs['max_len'], config.data.seq_len)

  def test_every_config_field_is_commented(self):
    for path in glob.glob(str(ROOT / 'configs' / '*.py')):
      for number, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith('config.') and '=' in stripped and 'ConfigDict()' not in stripped \
            and 'load_sibling' not in stripped:
          self.assertIn('#', stripped, f'{path}:{number} has no comment: {stripped}')

  def test_default_config_reads_the_standard_library(self):
    config = config_lib.load_sibling(str(ROOT / 'configs' / 'x.py'), 'default')
    self.assertTrue(os.path.isdir(config.data.path))
    self.assertEqual(config.model.name, 'ReformerLM')
    with tempfile.TemporaryDirectory() as d:  # The whole schema also round-trips through JSON.
      from terraflax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
      workdir_lib.write_config(d, config_lib.check_fields(config))
      self.assertEqual(workdir_lib.read_config(d).data.path, config.data.path)


if __name__ == '__main__':
  absltest.main()
