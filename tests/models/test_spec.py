"""terraflax.models.spec: config.model -> ModelSpec -> a model in any mode, its abstract init."""

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest

from terraflax import rng as rng_lib
from terraflax import workdir as workdir_lib
from terraflax.models import spec as spec_lib
from terraflax.train import config as config_lib
from terraflax.train import data as data_lib

TINY = {'name': 'tests.train.tiny_models:TinyLM', 'vocab_size': 7, 'd_model': 8, 'd_ff': 16,
        'dtype': 'float32'}


def config_of(model, data_name='duplication', seq_len=6):
  return ml_collections.ConfigDict({'model': dict(model),
                                    'data': {'name': data_name, 'seq_len': seq_len}})


def Renamed(*, width, mode='train'):  # pylint: disable=invalid-name
  """A factory whose old configs called `width` `old_width` (translated by upgrade_kwargs)."""
  del mode
  return nn.Dense(width)


Renamed.upgrade_kwargs = lambda kwargs: {('width' if k == 'old_width' else k): v
                                         for k, v in kwargs.items()}


class ModelSpecTest(absltest.TestCase):

  def test_from_config_resolves_the_factory_kwargs_and_task(self):
    spec = spec_lib.ModelSpec.from_config(config_of(TINY))
    self.assertEqual(spec.name, TINY['name'])
    self.assertEqual(spec.kwargs['dtype'], jnp.float32)  # dtype names become dtypes.
    self.assertNotIn('name', spec.kwargs)
    self.assertEqual(spec.task, 'lm')
    self.assertEqual(spec_lib.ModelSpec.from_config(config_of(TINY, 'reverse')).task, 'seq2seq')
    self.assertEqual(spec_lib.ModelSpec.from_config(config_of(TINY, 'tokens')).task, 'lm')
    for mode in ('train', 'eval', 'predict'):
      self.assertEqual(spec.build(mode).layers[1].mode, mode)  # TinyLM's ShiftRight.
    with self.assertRaisesRegex(ValueError, "mode must be one of .* got 'test'"):
      spec.build('test')

  def test_abstract_variables_match_a_real_init(self):
    spec = spec_lib.ModelSpec.from_config(config_of(TINY))
    abstract = spec.abstract_variables(3, 6)
    real = spec.build('train').init(rng_lib.stream_keys(jax.random.key(0)),
                                    jnp.zeros((3, 6), jnp.int32))
    self.assertEqual(jax.tree_util.tree_structure(abstract), jax.tree_util.tree_structure(real))
    for a, r in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(real)):
      self.assertEqual((a.shape, a.dtype), (r.shape, r.dtype))

  def test_model_inputs_by_task(self):
    batch = {'inputs': np.zeros((2, 3)), 'targets': np.ones((2, 3))}
    lm = spec_lib.ModelSpec.from_config(config_of(TINY))
    seq2seq = spec_lib.ModelSpec.from_config(config_of(TINY, 'reverse'))
    self.assertLen(lm.model_inputs(batch), 1)
    self.assertIs(seq2seq.model_inputs(batch)[1], batch['targets'])

  def test_errors_name_the_field_and_become_config_errors(self):
    cases = [({'name': 'NoSuchModel'}, r"config\.model\.name='NoSuchModel'.*no factory"),
             (dict(TINY, d_modle=8), r"config\.model\.d_modle is not an argument.*'d_model'"),
             (dict(TINY, mode='eval'), r'config\.model\.mode must not be set'),
             (dict(TINY, dtype='float33'), r'config\.model\.dtype must be a dtype name'),
             ({k: v for k, v in TINY.items() if k != 'd_ff'}, r'config\.model\.d_ff is required')]
    for model, message in cases:
      with self.subTest(model=model):
        with self.assertRaisesRegex(spec_lib.ModelSpecError, message):
          spec_lib.ModelSpec.from_config(config_of(model))
        with self.assertRaisesRegex(config_lib.ConfigError, message):
          config_lib.model_spec(config_of(model))
    self.assertTrue(issubclass(spec_lib.ModelSpecError, ValueError))

  def test_upgrade_kwargs_runs_before_the_signature_check(self):
    spec = spec_lib.ModelSpec.from_config(config_of(
        {'name': 'tests.models.test_spec:Renamed', 'old_width': 5}))
    self.assertEqual(dict(spec.kwargs), {'width': 5})
    self.assertEqual(spec.with_kwargs(width=3).kwargs, {'width': 3})
    self.assertEqual(spec.kwargs, {'width': 5})  # with_kwargs copies.

  def test_the_task_table_is_the_data_sets(self):
    self.assertIs(data_lib.TASKS, spec_lib.TASKS)
    self.assertEqual(set(spec_lib.TASKS), set(data_lib.DATASETS))
    data = data_lib.make_data(ml_collections.ConfigDict(
        {'name': 'reverse', 'seq_len': 6, 'vocab_size': 5, 'eval_examples': 4}), 0)
    self.assertEqual(data.info.task, spec_lib.TASKS['reverse'])

  def test_load_workdir_restores_what_was_saved(self):
    spec = spec_lib.ModelSpec.from_config(config_of(TINY))
    params = nn.meta.unbox(spec.build('eval').init(
        rng_lib.stream_keys(jax.random.key(3)), jnp.zeros((1, 6), jnp.int32))['params'])
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'run')
      os.makedirs(workdir)
      workdir_lib.write_config(workdir, config_of(TINY))
      workdir_lib.save_params(workdir, 7, params)
      config, loaded_spec, loaded = spec_lib.load_workdir(workdir)
    self.assertEqual(config.model.name, TINY['name'])
    self.assertEqual(loaded_spec.kwargs, spec.kwargs)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
      np.testing.assert_array_equal(a, b)


class PackedSpecTest(absltest.TestCase):
  """config.data.pack: a packed LM in 'train'/'eval', unpacked in 'predict', same parameters."""

  MODEL = {'name': 'TransformerLM', 'vocab_size': 7, 'd_model': 8, 'd_ff': 8, 'n_layers': 1,
           'n_heads': 2, 'max_len': 8}

  def test_pack_builds_packed_models_with_the_same_parameters(self):
    config = config_of(self.MODEL, 'bytes', seq_len=8)
    config.data.pack = True
    spec = spec_lib.ModelSpec.from_config(config)
    self.assertTrue(spec.packed)
    self.assertEqual(spec.build('train').n_in, 3)
    self.assertEqual(spec.build('predict').n_in, 1)
    self.assertEqual(spec.build('eval', packed=False).n_in, 1)
    unpacked = spec_lib.ModelSpec.from_config(config_of(self.MODEL, 'bytes', seq_len=8))
    shapes = lambda v: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), nn.meta.unbox(v))
    self.assertEqual(shapes(spec.abstract_variables(2, 8)['params']),
                     shapes(unpacked.abstract_variables(2, 8)['params']))
    tokens = jnp.ones((2, 8), jnp.int32)
    batch = {'inputs': tokens, 'targets': tokens, 'segment_ids': tokens, 'positions': tokens}
    self.assertLen(spec.model_inputs(batch), 3)
    self.assertLen(spec.example_inputs(2, 8), 3)
    self.assertLen(spec.example_inputs(2, 8, mode='predict'), 1)

  def test_pack_needs_a_packed_language_model(self):
    for model, data_name in ((self.MODEL, 'listops'), (TINY, 'bytes')):
      config = config_of(model, data_name)
      config.data.pack = True
      with self.assertRaisesRegex(spec_lib.ModelSpecError, 'config.data.pack=True needs'):
        spec_lib.ModelSpec.from_config(config)


if __name__ == '__main__':
  absltest.main()
