"""Concatenation with padding, its strip, and Trax's fixed-base positions, against numpy loops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import terraflax.layers as tl
from terraflax.layers import concat

KEY = jax.random.key(0)


def concat_reference(vec_e, vec_d, mask_e):
  """Trax's ConcatWithPadding, one example at a time: encoder row, zeros, decoder from len_e."""
  b, l1, d = vec_e.shape
  l2 = vec_d.shape[1]
  out = np.zeros((b, l1 + l2, d), vec_e.dtype)
  for i in range(b):
    n = int(mask_e[i].sum())
    out[i, :l1] = vec_e[i]
    out[i, n:n + l2] = vec_d[i]
  return out


def fixed_base_reference(weights, start_vec, length, bases=(11, 13, 14, 15), first=0):
  """(length, d): for each position p (from `first`), the digits of p in every base."""
  n_digits = weights.shape[1]
  out = np.zeros((length, start_vec.shape[0]))
  for t in range(length):
    p = first + t
    for i, base in enumerate(bases):
      rest = p
      for j in range(n_digits):
        out[t, j * weights.shape[2]:(j + 1) * weights.shape[2]] += (rest % base) * weights[i, j]
        rest //= base
    if p == 0:
      out[t] += start_vec
  return out


class ConcatWithPaddingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.vec_e = rng.normal(size=(3, 5, 4)).astype(np.float32)
    self.vec_d = rng.normal(size=(3, 3, 4)).astype(np.float32)
    self.mask_e = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)

  def test_concat_equals_the_loop(self):
    layer = tl.ConcatWithPadding()
    got = layer.apply({}, jnp.asarray(self.vec_e), jnp.asarray(self.vec_d),
                      jnp.asarray(self.mask_e))
    self.assertEqual((layer.n_in, layer.n_out), (3, 1))
    np.testing.assert_array_equal(got, concat_reference(self.vec_e, self.vec_d, self.mask_e))

  def test_strip_takes_back_the_decoder_part(self):
    layer = tl.StripFromConcatenateWithPadding()
    vec_ed = concat_reference(self.vec_e, self.vec_d, self.mask_e)
    got = layer.apply({}, jnp.asarray(vec_ed), jnp.asarray(self.mask_e))
    self.assertEqual((layer.n_in, layer.n_out), (2, 1))
    np.testing.assert_array_equal(got, self.vec_d)
    # Any (b, l1 + l2, d) array: the l2 positions from len_e of each row.
    other = np.arange(3 * 8 * 4, dtype=np.float32).reshape(3, 8, 4)
    want = np.stack([other[i, n:n + 3] for i, n in enumerate(self.mask_e.sum(1))])
    np.testing.assert_array_equal(layer.apply({}, jnp.asarray(other), jnp.asarray(self.mask_e)),
                                  want)

  def test_shape_errors_name_the_argument(self):
    with self.assertRaisesRegex(ValueError, r'encoder mask \(b, l1\) must have shape \(3, 5\)'):
      concat.concat_with_padding(jnp.asarray(self.vec_e), jnp.asarray(self.vec_d),
                                 jnp.ones((3, 4), bool))
    with self.assertRaisesRegex(ValueError, r'decoder vectors \(b, l2, d\) must have shape'):
      concat.concat_with_padding(jnp.asarray(self.vec_e), jnp.ones((3, 2, 5)),
                                 jnp.asarray(self.mask_e))
    with self.assertRaisesRegex(ValueError, r'StripFromConcatenateWithPadding needs vectors'):
      concat.strip_from_concatenation(jnp.ones((3, 5, 4)), jnp.asarray(self.mask_e))


class FixedBasePositionalEncodingTest(absltest.TestCase):

  def test_eval_equals_the_digit_loop_and_predict_steps_equal_eval(self):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 16)), jnp.float32)
    layer = tl.FixedBasePositionalEncoding(bases=(3, 5), n_digits=4, mode='eval')
    params = layer.init(KEY, x)['params']
    rng = np.random.default_rng(2)
    params = {'base_weights': jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32),
              'start_vec': jnp.asarray(rng.normal(size=(16,)), jnp.float32)}
    got = layer.apply({'params': params}, x)
    want = np.asarray(x) + fixed_base_reference(np.asarray(params['base_weights']),
                                                np.asarray(params['start_vec']), 6, (3, 5))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    predict = tl.FixedBasePositionalEncoding(bases=(3, 5), n_digits=4, mode='predict')
    cache = predict.init(KEY, x[:, :1])['cache']
    steps = []
    for piece in (x[:, :2], x[:, 2:3], x[:, 3:6]):  # a prefill, then shorter calls
      y, state = predict.apply({'params': params, 'cache': cache}, piece, mutable=['cache'])
      cache = state['cache']
      steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), got, rtol=1e-6, atol=1e-6)

  def test_train_mode_starts_at_random_positions(self):
    x = jnp.zeros((64, 3, 8), jnp.float32)
    layer = tl.FixedBasePositionalEncoding(mode='train', n_digits=2, bases=(11,))
    variables = layer.init({'params': KEY, 'dropout': KEY}, x)
    params = {'base_weights': jnp.ones((1, 2, 4)), 'start_vec': jnp.zeros((8,))}
    y = layer.apply({'params': params}, x, rngs={'dropout': jax.random.key(3)})
    first_digit = np.asarray(y[:, 0, 0])  # The position mod 11 at each row's start.
    self.assertIn(0.0, first_digit)  # Some rows start at 0 (probability 1/2 each) ...
    self.assertGreater(len(set(first_digit.tolist())), 3)  # ... and others elsewhere.
    shapes = jax.tree_util.tree_map(np.shape, nn.meta.unbox(variables['params']))
    self.assertEqual(shapes, {'base_weights': (1, 2, 4), 'start_vec': (8,)})

  def test_bad_width_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, r'input width 12 must be a multiple of n_digits=8'):
      tl.FixedBasePositionalEncoding(mode='eval').init(KEY, jnp.zeros((1, 2, 12)))


if __name__ == '__main__':
  absltest.main()
