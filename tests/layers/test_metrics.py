"""Weighted losses and metrics against hand-computed values."""

import math

import jax
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


class ChunkedLmSumsTest(absltest.TestCase):
  """chunked_lm_sums == the sums of the whole logits (values and gradients)."""

  def setUp(self):
    super().setUp()
    self.key = jax.random.key(0)

  def _case(self, b, l):
    k1, k2, k3, k4 = jax.random.split(self.key, 4)
    hidden = (jax.random.normal(k1, (b, l, 4)), jax.random.normal(k2, (b, l, 3)))
    w = jax.random.normal(k3, (7, 5))
    targets = jax.random.randint(k4, (b, l), 0, 5)
    weights = (jnp.arange(b * l).reshape(b, l) % 3 != 0).astype(jnp.float32)
    return hidden, w, targets, weights

  @staticmethod
  def _head(w):
    return lambda x1, x2: jnp.tanh(jnp.concatenate([x1, x2], axis=-1)) @ w

  def _full(self, hidden, w, targets, weights):
    logits = self._head(w)(*hidden)
    loss, weight = tl.cross_entropy_sum(logits, targets, weights)
    correct, _ = tl.accuracy_sum(logits, targets, weights)
    return {'loss_sum': loss, 'correct_sum': correct, 'weight_sum': weight}

  def test_equals_whole_logits(self):
    # 12 positions: chunks of 4 (a divisor <= 5); 13: prime, padded to 16 in chunks of 8; one chunk.
    for b, l, chunk_len in ((2, 12, 5), (1, 13, 8), (2, 6, 16)):
      hidden, w, targets, weights = self._case(b, l)
      got = jax.jit(lambda hidden, w, targets, weights, c=chunk_len: tl.chunked_lm_sums(
          self._head(w), hidden, targets, weights, chunk_len=c, token_losses=True))(
              hidden, w, targets, weights)
      want = self._full(hidden, w, targets, weights)
      for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=f'{name} {b} {l}')
      log_probs = jax.nn.log_softmax(self._head(w)(*hidden))
      nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
      np.testing.assert_allclose(got['token_losses'], nll, rtol=1e-5, atol=1e-6)

  def test_gradients_equal_whole_logits(self):
    hidden, w, targets, weights = self._case(2, 12)

    def chunked(hidden, w):
      return tl.chunked_lm_sums(self._head(w), hidden, targets, weights, chunk_len=4)['loss_sum']

    def full(hidden, w):
      return self._full(hidden, w, targets, weights)['loss_sum']

    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, w)
    want = jax.grad(full, argnums=(0, 1))(hidden, w)
    for g, ref in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)

  def test_no_whole_logits_in_the_compiled_gradient(self):
    # 4096 positions, vocabulary 512: whole logits would be 8 MiB, each chunk of 256 is 0.5 MiB.
    l, v = 4096, 512
    hidden = (jnp.zeros((1, l, 8)),)
    w = jnp.zeros((8, v))
    targets, weights = jnp.zeros((1, l), jnp.int32), jnp.ones((1, l))

    def loss(hidden, w):
      return tl.chunked_lm_sums(lambda x: x @ w, hidden, targets, weights,
                                chunk_len=256)['loss_sum']

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, w).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    self.assertLess(temp, l * v * 4 // 2)  # well below one whole (l, v) float32 array
