"""Fourier mixing against float64 numpy references (FFT and the cosine-sum definition)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl

KEY = jax.random.key(0)


def cosine_sum(x):
  """Re(DFT2) from its definition: sum_{n,j} x[n, j] cos(2 pi (m n / l + k j / d)), float64."""
  x = np.asarray(x, np.float64)
  _, l, d = x.shape
  n, m = np.arange(l), np.arange(l)
  j, k = np.arange(d), np.arange(d)
  phase_l = 2 * np.pi * np.outer(m, n) / l  # (m, n)
  phase_d = 2 * np.pi * np.outer(k, j) / d  # (k, j)
  # cos(a + b) = cos a cos b - sin a sin b
  return (np.einsum('mn,bnj,kj->bmk', np.cos(phase_l), x, np.cos(phase_d))
          - np.einsum('mn,bnj,kj->bmk', np.sin(phase_l), x, np.sin(phase_d)))


class FourierMixingTest(parameterized.TestCase):

  @parameterized.parameters(((2, 7, 5),), ((1, 16, 8),), ((3, 1, 4),))
  def test_equals_numpy_fft2_real_part(self, shape):
    x = jax.random.normal(KEY, shape)
    layer = tl.FourierMixing()
    variables = layer.init(KEY, x)
    self.assertEqual(jax.tree_util.tree_leaves(variables), [])  # No parameters.
    y = layer.apply(variables, x)
    self.assertEqual((y.shape, y.dtype), (shape, jnp.float32))
    reference = np.real(np.fft.fft2(np.asarray(x, np.float64), axes=(1, 2)))
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reference, cosine_sum(x), atol=1e-9)  # The reference is right.

  def test_bfloat16_in_bfloat16_out(self):
    x = jax.random.normal(KEY, (2, 6, 4)).astype(jnp.bfloat16)
    y = tl.FourierMixing().apply({}, x)
    self.assertEqual(y.dtype, jnp.bfloat16)
    reference = np.real(np.fft.fft2(np.asarray(x, np.float64), axes=(1, 2)))
    np.testing.assert_allclose(np.asarray(y, np.float64), reference, rtol=2e-2, atol=5e-2)

  def test_masked_zeroes_padding_before_mixing(self):
    x = jax.random.normal(KEY, (2, 6, 4))
    mask = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])
    y, mask_out = tl.MaskedFourierMixing().apply({}, x, mask)
    self.assertIs(mask_out, mask)
    x64 = np.asarray(x, np.float64) * np.asarray(mask, np.float64)[:, :, None]
    np.testing.assert_allclose(y, cosine_sum(x64), rtol=1e-4, atol=1e-4)
    # Changing padding values does not change any output.
    noisy = x.at[1, 4:].set(100.0)
    np.testing.assert_allclose(tl.MaskedFourierMixing().apply({}, noisy, mask)[0], y, atol=1e-5)

  def test_bad_shapes_are_clear_errors(self):
    with self.assertRaisesRegex(ValueError, r'\(b, l, d\)'):
      tl.FourierMixing().apply({}, jnp.ones((4, 4)))
    with self.assertRaisesRegex(ValueError, 'mask of shape'):
      tl.MaskedFourierMixing().apply({}, jnp.ones((2, 3, 4)), jnp.ones((2, 4), bool))


if __name__ == '__main__':
  absltest.main()
