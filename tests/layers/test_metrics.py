"""Weighted losses and metrics against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import terraflax.combinators as cb
import terraflax.layers as tl


class MetricsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # Two positions, vocabulary 2. Position 0: p = softmax([0, ln 3]) = [1/4, 3/4].
    self.logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 0.0]]])
    self.targets = jnp.array([[0, 0]])
    self.weights = jnp.array([[1.0, 0.0]])

  def test_cross_entropy_weighted(self):
    total, weight = tl.cross_entropy_sum(self.logits, self.targets, self.weights)
    self.assertAlmostEqual(float(total), math.log(4.0), places=6)
    self.assertEqual(float(weight), 1.0)
    loss = tl.CrossEntropyLoss().apply({}, self.logits, self.targets, self.weights)
    self.assertAlmostEqual(float(loss), math.log(4.0), places=6)

  def test_accuracy_weighted(self):
    accuracy = tl.Accuracy().apply({}, self.logits, self.targets, jnp.array([[1.0, 3.0]]))
    self.assertAlmostEqual(float(accuracy), 0.75, places=6)  # wrong (w=1), right (w=3)

  def test_loss_layers_compose_on_the_stack(self):
    model = cb.Serial(cb.Branch(tl.CrossEntropyLoss(), tl.Accuracy()))
    loss, accuracy = model.apply({}, self.logits, self.targets, jnp.ones((1, 2)))
    np.testing.assert_allclose(loss, (math.log(4.0) + math.log(1 + math.exp(-2.0))) / 2, rtol=1e-6)
    np.testing.assert_allclose(accuracy, 0.5)

  def test_shape_errors(self):
    with self.assertRaisesRegex(ValueError, r'targets of shape \(1, 2\)'):
      tl.cross_entropy_sum(self.logits, jnp.zeros((1, 3), jnp.int32))


if __name__ == '__main__':
  absltest.main()
