"""The mesh, parameter shardings from logical axis names, and global batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from jax.sharding import PartitionSpec as P

from terraflax.train import sharding


class ShardingTest(absltest.TestCase):

  def test_mesh_axes(self):
    mesh = sharding.make_mesh()
    self.assertEqual(dict(mesh.shape), {'data': jax.device_count(), 'model': 1})
    with self.assertRaisesRegex(ValueError, r'model_parallel=3 must divide'):
      sharding.make_mesh(3, devices=[jax.devices()[0]] * 4)

  def test_logical_names_map_to_mesh_axes(self):
    mesh = sharding.make_mesh()
    abstract = {
        'dense': {'kernel': nn.Partitioned(jax.ShapeDtypeStruct((4, 8), jnp.float32),
                                           names=('embed', 'mlp')),
                  'bias': jax.ShapeDtypeStruct((8,), jnp.float32)},
    }
    shardings = sharding.variable_shardings(abstract, mesh, (('mlp', 'model'), ('embed', None)))
    self.assertEqual(shardings['dense']['kernel'].spec, P(None, 'model'))
    self.assertEqual(shardings['dense']['bias'].spec, P())
    unruled = sharding.variable_shardings(abstract, mesh)
    self.assertEqual(unruled['dense']['kernel'].spec, P(None, None))

  def test_put_batch_makes_global_arrays(self):
    mesh = sharding.make_mesh()
    batch = {'inputs': np.arange(8, dtype=np.int32).reshape(2, 4)}
    out = sharding.put_batch(batch, mesh)
    self.assertEqual(out['inputs'].sharding.spec, P('data'))
    np.testing.assert_array_equal(out['inputs'], batch['inputs'])


if __name__ == '__main__':
  absltest.main()
