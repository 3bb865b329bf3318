"""The mesh, logical-axis rules, parameter shardings and their checks, and global batches."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest
from jax.sharding import PartitionSpec as P

from terraflax.train import sharding


def boxed(shape, names):
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names=names)


class MeshTest(absltest.TestCase):

  def test_mesh_axes(self):
    mesh = sharding.make_mesh()
    self.assertEqual(dict(mesh.shape), {'data': jax.device_count(), 'fsdp': 1, 'model': 1})

  def test_mesh_shape_from_fsdp_and_tensor_parallel(self):
    config = ml_collections.ConfigDict({'fsdp': 4, 'tensor_parallel': 2})
    self.assertEqual(sharding.mesh_shape(config, 16), {'data': 2, 'fsdp': 4, 'model': 2})
    with self.assertRaisesRegex(sharding.ShardingError,
                                r'sharding\.fsdp=3 x sharding\.tensor_parallel=2 = 6 must '
                                r'divide the number of devices \(8\)'):
      sharding.mesh_shape({'fsdp': 3, 'tensor_parallel': 2}, 8)

  def test_model_parallel_is_a_deprecated_alias(self):
    with self.assertWarnsRegex(DeprecationWarning, 'use config.sharding.tensor_parallel'):
      self.assertEqual(sharding.mesh_shape({'model_parallel': 2}, 8),
                       {'data': 4, 'fsdp': 1, 'model': 2})
    with warnings.catch_warnings(), self.assertRaisesRegex(
        sharding.ShardingError, r'sharding\.model_parallel=3 = 3 must divide'):
      warnings.simplefilter('ignore')  # The error names the field that was set.
      sharding.mesh_shape({'model_parallel': 3}, 8)
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # Unset (0) warns nothing.
      self.assertEqual(sharding.tensor_parallel({'model_parallel': 0, 'tensor_parallel': 4}), 4)
    with warnings.catch_warnings(), self.assertRaisesRegex(
        sharding.ShardingError, r'model_parallel=2 \(deprecated\) and '
        r'sharding\.tensor_parallel=4 disagree'):
      warnings.simplefilter('ignore')
      sharding.tensor_parallel({'model_parallel': 2, 'tensor_parallel': 4})


class RulesTest(absltest.TestCase):

  def test_default_rules_are_the_shared_decisions(self):
    rules = dict(sharding.axis_rules())
    self.assertEqual(rules['batch'], ('data', 'fsdp'))
    self.assertEqual(rules['embed'], 'fsdp')
    for name in ('vocab', 'heads', 'mlp', 'modules'):
      self.assertEqual(rules[name], 'model', name)
    for name in ('length', 'head_dim', 'layers', 'controller', 'kernel'):
      self.assertIsNone(rules[name], name)

  def test_config_rules_override_by_name(self):
    config = ml_collections.ConfigDict({'logical_axis_rules': (('mlp', None),
                                                               ('extra', ['data', 'model']))})
    rules = dict(sharding.axis_rules(config))
    self.assertIsNone(rules['mlp'])
    self.assertEqual(rules['extra'], ('data', 'model'))
    self.assertEqual(rules['heads'], 'model')
    with self.assertRaisesRegex(sharding.ShardingError, r"logical_axis_rules must be pairs.*'x'"):
      sharding.check_rules((('embed', 'x'),))

  def test_logical_names_map_to_mesh_axes(self):
    mesh = sharding.make_mesh()
    abstract = {'dense': {'kernel': boxed((4, 8), ('embed', 'mlp')),
                          'bias': jax.ShapeDtypeStruct((8,), jnp.float32)},
                'qk': boxed((4, 4), ('heads', 'mlp')),
                'stack': boxed((2, 4, 8), ('layers', 'embed', 'unknown'))}
    shardings = sharding.variable_shardings(abstract, mesh)
    self.assertEqual(shardings['dense']['kernel'].spec, P('fsdp', 'model'))
    self.assertEqual(shardings['dense']['bias'].spec, P())
    self.assertEqual(shardings['qk'].spec, P('model', None))  # 'model' used once.
    self.assertEqual(shardings['stack'].spec, P(None, 'fsdp', None))
    custom = sharding.variable_shardings(abstract, mesh, (('mlp', 'model'), ('embed', None)))
    self.assertEqual(custom['dense']['kernel'].spec, P(None, 'model'))

  def test_fsdp_splits_parameters_without_an_fsdp_axis_along_their_largest_free_dim(self):
    def specs(fsdp, tp):
      mesh = jax.sharding.AbstractMesh((8 // (fsdp * tp), fsdp, tp), sharding.MESH_AXES)
      abstract = {'controller': boxed((12, 32, 2048), ('layers', 'controller', 'mlp')),
                  'taps': boxed((12, 3, 3, 64, 48), ('layers', 'kernel', None, None, None)),
                  'odd': boxed((12, 3, 5), ('layers', None, None)),
                  'dense': boxed((64, 2048), ('embed', 'mlp'))}
      return jax.tree.map(lambda s: s.spec, sharding.variable_shardings(abstract, mesh))
    fsdp8 = specs(8, 1)
    self.assertEqual(fsdp8['controller'], P(None, None, 'fsdp'))  # 'mlp' -> a model axis of 1.
    self.assertEqual(fsdp8['taps'], P(None, None, None, 'fsdp', None))  # 64, not the 48 or 12.
    self.assertEqual(fsdp8['odd'], P(None, None, None))  # Nothing divides by 8: replicated.
    self.assertEqual(fsdp8['dense'], P('fsdp', 'model'))  # Already on fsdp: the rules alone.
    mixed = specs(4, 2)
    self.assertEqual(mixed['controller'], P(None, 'fsdp', 'model'))
    self.assertEqual(specs(1, 8)['controller'], P(None, None, 'model'))  # fsdp=1: rules alone.


class CheckTest(absltest.TestCase):

  def test_width_not_divisible_names_the_model_field(self):
    abstract = {'ff': {'kernel': boxed((8, 6), ('embed', 'mlp'))}}
    sizes = {'data': 1, 'fsdp': 2, 'model': 4}
    with self.assertRaisesRegex(sharding.ShardingError,
                                r'config\.model\.d_ff=6 is not divisible by '
                                r'sharding\.tensor_parallel=4 \(parameter ff/kernel'):
      sharding.check_variables(abstract, sizes, model_config={'d_model': 8, 'd_ff': 6})
    with self.assertRaisesRegex(sharding.ShardingError,
                                r"parameter ff/kernel \(8, 6\) with logical axes "
                                r"\('embed', 'mlp'\): axis 'mlp' of size 6 is not divisible"):
      sharding.check_variables(abstract, sizes)
    sharding.check_variables(abstract, {'data': 4, 'fsdp': 2, 'model': 2})  # Divides: fine.
    sharding.check_variables(abstract, sizes, rules=(('mlp', None),))  # Not split: fine.

  def test_fsdp_with_a_parameter_too_small_to_split(self):
    abstract = {'norm': {'scale': boxed((4,), ('embed',))}}
    with self.assertRaisesRegex(sharding.ShardingError,
                                r"parameter norm/scale \(4,\) .* is too small to split: its axis "
                                r"'embed' has 4 entries for sharding\.fsdp=8"):
      sharding.check_variables(abstract, {'data': 1, 'fsdp': 8, 'model': 1})

  def test_batch_must_split_over_data_and_fsdp(self):
    sharding.check_batch(8, 1, {'data': 2, 'fsdp': 4, 'model': 2})
    with self.assertRaisesRegex(sharding.ShardingError,
                                r'batch_size=8 / train\.grad_accum_steps=2 = 4 must be divisible '
                                r'by the 8 devices .*data=2 x sharding\.fsdp=4'):
      sharding.check_batch(8, 2, {'data': 2, 'fsdp': 4, 'model': 1})
    sharding.check_batch(12, 1, {'data': 1, 'fsdp': 4, 'model': 1}, n_processes=2)
    with self.assertRaisesRegex(sharding.ShardingError, r'split over 1 devices .* the 2 '
                                r'processes cannot share'):
      sharding.check_batch(8, 1, {'data': 1, 'fsdp': 1, 'model': 2}, n_processes=2)


class BatchAndBytesTest(absltest.TestCase):

  def test_put_batch_makes_global_arrays(self):
    mesh = sharding.make_mesh()
    batch = {'inputs': np.arange(8, dtype=np.int32).reshape(2, 4)}
    out = sharding.put_batch(batch, mesh)
    self.assertEqual(out['inputs'].sharding.spec, P(('data', 'fsdp')))
    np.testing.assert_array_equal(out['inputs'], batch['inputs'])

  def test_bytes_of_a_tree(self):
    tree = {'a': jnp.zeros((4, 8), jnp.float32), 'b': jnp.zeros((3,), jnp.bfloat16)}
    self.assertEqual(sharding.total_bytes(tree), 4 * 8 * 4 + 3 * 2)
    self.assertEqual(sharding.per_device_bytes(tree), 4 * 8 * 4 + 3 * 2)  # One device: all.


if __name__ == '__main__':
  absltest.main()
