"""Positional encodings: formulas, and predict mode equals the full pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl
from tests import contracts

KEY = jax.random.key(0)


class PositionalTest(parameterized.TestCase):

  def test_sinusoidal_formula(self):
    x = jnp.zeros((1, 6, 4))
    out = np.asarray(tl.PositionalEncoding(max_len=8).apply({}, x))[0]
    p, i = np.arange(6)[:, None], np.array([0, 1])[None, :]
    angle = p / 10000 ** (2 * i / 4)
    np.testing.assert_allclose(out[:, 0::2], np.sin(angle), atol=1e-6)
    np.testing.assert_allclose(out[:, 1::2], np.cos(angle), atol=1e-6)

  def test_axial_is_concatenation_of_factors(self):
    x = jnp.zeros((2, 12, 5))
    layer = tl.AxialPositionalEncoding(shape=(3, 4), d_embs=(2, 3), mode='eval')
    variables = nn.meta.unbox(layer.init(KEY, x))
    a0 = np.asarray(variables['params']['axial_0'])
    a1 = np.asarray(variables['params']['axial_1'])
    expected = np.stack([np.concatenate([a0[p // 4], a1[p % 4]]) for p in range(12)])
    out = layer.apply(variables, x)
    np.testing.assert_allclose(out[0], expected)
    np.testing.assert_allclose(out[1], expected)

  @parameterized.named_parameters(
      ('sinusoidal', lambda mode: tl.PositionalEncoding(max_len=16, mode=mode)),
      ('learned', lambda mode: tl.PositionalEncoding(max_len=16, kind='learned', mode=mode)),
      ('axial', lambda mode: tl.AxialPositionalEncoding(shape=(4, 4), d_embs=(3, 3), mode=mode)),
  )
  def test_predict_token_by_token_equals_eval(self, make):
    x = jax.random.normal(KEY, (2, 9, 6))
    variables = nn.meta.unbox(make('eval').init(KEY, x))
    full = make('eval').apply(variables, x)
    predict = make('predict')
    cache = predict.init(KEY, x[:, :1])['cache']
    self.assertEqual(int(cache['position']), 0)
    for i in range(9):
      out, state = predict.apply({**variables, 'cache': cache}, x[:, i:i + 1], mutable=['cache'])
      cache = state['cache']
      np.testing.assert_allclose(out, full[:, i:i + 1], rtol=1e-6, atol=1e-6)
    self.assertEqual(int(cache['position']), 9)

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, 'max_len=4 is shorter than the input length 5'):
      tl.PositionalEncoding(max_len=4).apply({}, jnp.zeros((1, 5, 2)))
    with self.assertRaisesRegex(ValueError, 'kind must be one of'):
      tl.PositionalEncoding(kind='rotary')
    with self.assertRaisesRegex(ValueError, r'sums to 4, but the input width is 6'):
      tl.AxialPositionalEncoding(shape=(2, 2), d_embs=(2, 2)).init(KEY, jnp.zeros((1, 4, 6)))
    with self.assertRaisesRegex(ValueError, 'covers 4 positions'):
      tl.AxialPositionalEncoding(shape=(2, 2), d_embs=(2, 2)).init(KEY, jnp.zeros((1, 5, 4)))


def packed_documents(lengths=(5, 7, 3), d=8, seed=3):
  """Float documents (l_i, d) of different lengths for the packing contract."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for n in lengths]


class AxialGradientTest(absltest.TestCase):

  def test_axial_gradients_are_sums_over_the_other_axis(self):
    # Position p = 64 i + j reads row i of axial_0 and row j of axial_1.
    shape, d_embs, l = (64, 64), (4, 12), 4096
    dy = jax.random.normal(jax.random.key(1), (1, l, 16))
    layer = tl.AxialPositionalEncoding(shape=shape, d_embs=d_embs)
    x = jnp.zeros((1, l, 16))
    params = nn.meta.unbox(layer.init(jax.random.key(2), x)['params'])
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply({'params': p}, x) * dy)))
    got = grad(params, x)
    grid = np.asarray(dy[0], np.float64).reshape(64, 64, 16)
    np.testing.assert_allclose(got['axial_0'], grid[..., :4].sum(axis=1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got['axial_1'], grid[..., 4:].sum(axis=0), rtol=1e-5, atol=1e-4)
    temp = grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes
    self.assertLess(temp, 2 * l * 16 * 4)  # at most two (l, d) streams: no one-hot (l, 64)

class PackedPositionsTest(parameterized.TestCase):
  """Positions restart per document: each document gets the encodings it gets alone."""

  @parameterized.parameters(
      dict(make=lambda **kw: tl.PositionalEncoding(max_len=16, **kw)),
      dict(make=lambda **kw: tl.PositionalEncoding(max_len=16, kind='learned', **kw)),
      dict(make=lambda **kw: tl.AxialPositionalEncoding(shape=(4, 4), d_embs=(3, 5), **kw)))
  def test_packed_equals_unpacked(self, make):
    for mode in ('train', 'eval'):
      alone, packed = make(mode=mode), make(mode=mode, packed=True)
      docs = packed_documents()
      params = alone.init(jax.random.key(0), docs[0][None]).get('params', {})
      contracts.assert_packed_equals_unpacked(
          lambda p, x, seg, pos, packed=packed: packed.apply({'params': p}, x, seg, pos)[0],
          lambda p, x, alone=alone: alone.apply({'params': p}, x), params, docs, 16)

  def test_shift_right_per_document(self):
    tokens = jnp.array([[5, 6, 7, 8, 9, 3, 0]])
    segments = jnp.array([[1, 1, 2, 2, 2, 3, 0]])
    shifted, same = tl.ShiftRight(packed=True).apply({}, tokens, segments)
    np.testing.assert_array_equal(shifted, [[0, 5, 0, 7, 8, 0, 0]])
    self.assertIs(same, segments)


if __name__ == '__main__':
  absltest.main()
