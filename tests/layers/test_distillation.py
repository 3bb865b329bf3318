"""Distillation loss against hand-computed values; the teacher gets no gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import terraflax.layers as tl
from terraflax.layers.distillation import soft_kl

LN3 = math.log(3.0)


class DistillationTest(absltest.TestCase):

  def test_hand_computed_value(self):
    # Position 0: at T = 2 the student's softened distribution is [1/4, 3/4] and the
    # teacher's [3/4, 1/4], so KL = 3/4 ln 3 - 1/4 ln 3 = ln(3) / 2 and T^2 KL = 2 ln 3; the
    # label 0 has p = 1/(1 + 9), so CE = ln 10. Position 1 has weight 0. Position 2 has
    # equal student and teacher logits (KL = 0), label 1 at p = 1/2 (CE = ln 2), weight 2.
    student = jnp.asarray([[[0.0, 2 * LN3], [5.0, -1.0], [1.0, 1.0]]])
    teacher = jnp.asarray([[[2 * LN3, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    targets = jnp.asarray([[0, 1, 1]])
    weights = jnp.asarray([[1.0, 0.0, 2.0]])
    total, weight = tl.distillation_sum(student, teacher, targets, weights, temperature=2.0,
                                        alpha=0.25)
    expected = (0.75 * math.log(10.0) + 0.25 * 2 * LN3) + 2 * (0.75 * math.log(2.0))
    self.assertAlmostEqual(float(total), expected, places=5)
    self.assertEqual(float(weight), 3.0)
    loss = tl.DistillationLoss(temperature=2.0, alpha=0.25).apply({}, student, teacher, targets,
                                                                 weights)
    self.assertAlmostEqual(float(loss), expected / 3.0, places=5)

  def test_alpha_extremes_and_kl_properties(self):
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 5, (2, 3)))
    hard, _ = tl.cross_entropy_sum(student, targets)
    labels_only, _ = tl.distillation_sum(student, teacher, targets, alpha=0.0, temperature=3.0)
    self.assertAlmostEqual(float(labels_only), float(hard), places=5)
    teacher_only, _ = tl.distillation_sum(student, teacher, targets, alpha=1.0, temperature=3.0)
    p = jax.nn.softmax(np.asarray(teacher, np.float64) / 3.0)
    q = jax.nn.softmax(np.asarray(student, np.float64) / 3.0)
    self.assertAlmostEqual(float(teacher_only), 9.0 * float(np.sum(p * np.log(p / q))), places=4)
    np.testing.assert_allclose(soft_kl(teacher, teacher, 2.0), 0.0, atol=1e-6)
    grads = jax.grad(lambda t: tl.distillation_sum(student, t, targets)[0])(teacher)
    np.testing.assert_array_equal(grads, 0.0)  # The teacher is a constant.

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'logits of one shape'):
      tl.distillation_sum(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), int))
    with self.assertRaisesRegex(ValueError, 'temperature > 0'):
      tl.distillation_sum(jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros((1,), int),
                          temperature=0.0)


if __name__ == '__main__':
  absltest.main()
