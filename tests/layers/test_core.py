"""Core layers against float64 numpy references."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl
from terraflax.layers.core import first_argmax, project_heads

KEY = jax.random.key(0)


def f64(x):
  return np.asarray(x, np.float64)


class DenseEmbeddingTest(absltest.TestCase):

  def test_dense_matches_numpy(self):
    x = jax.random.normal(KEY, (2, 3, 5))
    layer = tl.Dense(7)
    variables = nn.meta.unbox(layer.init(KEY, x))
    p = variables['params']
    self.assertEqual(p['kernel'].shape, (5, 7))
    expected = f64(x) @ f64(p['kernel']) + f64(p['bias'])
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-6)

  def test_dense_bfloat16_compute_float32_params(self):
    x = jnp.ones((2, 4))
    layer = tl.Dense(3, dtype=jnp.bfloat16)
    variables = nn.meta.unbox(layer.init(KEY, x))
    self.assertEqual(variables['params']['kernel'].dtype, jnp.float32)
    self.assertEqual(layer.apply(variables, x).dtype, jnp.bfloat16)

  def test_embedding_lookup_and_attend(self):
    ids = jnp.array([[0, 3, 3, 1]])
    layer = tl.Embedding(5, 4)
    variables = nn.meta.unbox(layer.init(KEY, ids))
    table = f64(variables['params']['embedding'])
    np.testing.assert_allclose(layer.apply(variables, ids), table[np.array([[0, 3, 3, 1]])])
    x = jax.random.normal(KEY, (2, 4))
    np.testing.assert_allclose(layer.apply(variables, x, method='attend'), f64(x) @ table.T,
                               rtol=1e-5, atol=1e-6)

  def test_projection_gradient(self):
    x = jax.random.normal(KEY, (2, 5, 6))
    w = jax.random.normal(jax.random.key(1), (6, 3, 4))
    d_y = jax.random.normal(jax.random.key(2), (2, 5, 3, 4))
    got = jax.vjp(project_heads, x, w)[1](d_y)
    expected = (np.einsum('blhk,dhk->bld', f64(d_y), f64(w)),
                np.einsum('bld,blhk->dhk', f64(x), f64(d_y)))
    for g, e in zip(got, expected):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


class FirstArgmaxTest(absltest.TestCase):

  def test_is_numpys_argmax(self):
    """The first largest entry, ties and -inf rows included; a NaN wins, the first one."""
    x = np.random.default_rng(0).integers(-3, 4, size=(2, 6, 50)).astype(np.float32)
    x[0, 1] = -np.inf
    x[0, 2, [7, 30]] = np.nan
    x[0, 3, 49] = 99.0
    x[0, 4, [0, 49]] = 99.0
    got = jax.jit(first_argmax)(jnp.asarray(x))
    self.assertEqual((got.shape, got.dtype), ((2, 6), jnp.int32))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    self.assertEqual(got[0].tolist()[1:5], [0, 7, 49, 0])
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x[1, 0])), np.argmax(x[1, 0]))


class EmbeddingGradientTest(absltest.TestCase):

  def test_table_gradient_equals_one_hot_reference_without_a_one_hot(self):
    vocab, d, l = 256, 16, 4096
    ids = jax.random.randint(jax.random.key(0), (1, l), 0, vocab)  # many repeats
    dy = jax.random.normal(jax.random.key(1), (1, l, d))
    layer = tl.Embedding(vocab, d)
    params = nn.meta.unbox(layer.init(jax.random.key(2), ids)['params'])
    grad = jax.jit(jax.grad(lambda p, ids: jnp.sum(layer.apply({'params': p}, ids) * dy)))
    got = grad(params, ids)['embedding']
    one_hot = np.eye(vocab, dtype=np.float64)[np.asarray(ids[0])]  # (l, vocab)
    np.testing.assert_allclose(got, one_hot.T @ np.asarray(dy[0], np.float64), rtol=1e-5,
                               atol=1e-5)
    temp = grad.lower(params, ids).compile().memory_analysis().temp_size_in_bytes
    self.assertLess(temp, l * vocab * 4 // 4)  # a quarter of one (l, vocab) float32 one-hot

class NormTest(absltest.TestCase):

  def test_layer_norm_matches_numpy(self):
    x = 3.0 + 2.0 * jax.random.normal(KEY, (2, 5, 8))
    layer = tl.LayerNorm()
    variables = nn.meta.unbox(layer.init(KEY, x))
    variables = jax.tree_util.tree_map(lambda p: p + jax.random.normal(KEY, p.shape), variables)
    p = variables['params']
    x64 = f64(x)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    expected = expected * f64(p['scale']) + f64(p['bias'])
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-4, atol=1e-5)

  def test_rms_norm_matches_numpy(self):
    x = jax.random.normal(KEY, (3, 8))
    layer = tl.RMSNorm()
    variables = nn.meta.unbox(layer.init(KEY, x))
    x64 = f64(x)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-6)

  def test_layer_norm_keeps_bfloat16(self):
    x = jnp.ones((2, 4), jnp.bfloat16)
    layer = tl.LayerNorm()
    self.assertEqual(layer.apply(nn.meta.unbox(layer.init(KEY, x)), x).dtype, jnp.bfloat16)


class DropoutShiftActivationTest(parameterized.TestCase):

  def test_dropout_train_scales_and_drops(self):
    x = jnp.ones((10_000,))
    out = tl.Dropout(0.25, mode='train').apply({}, x, rngs={'dropout': KEY})
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
    self.assertBetween(float(kept.mean()), 0.73, 0.77)

  def test_dropout_shared_axes(self):
    x = jnp.ones((4, 50, 3))
    out = tl.Dropout(0.5, mode='train', shared_axes=(1,)).apply({}, x, rngs={'dropout': KEY})
    np.testing.assert_array_equal(out, jnp.broadcast_to(out[:, :1], out.shape))

  @parameterized.parameters('eval', 'predict')
  def test_dropout_identity_outside_train(self, mode):
    x = jax.random.normal(KEY, (5, 5))
    np.testing.assert_array_equal(tl.Dropout(0.5, mode=mode).apply({}, x), x)

  def test_dropout_rejects_bad_rate(self):
    with self.assertRaisesRegex(ValueError, r'rate must be in \[0, 1\)'):
      tl.Dropout(1.0)

  def test_shift_right(self):
    x = jnp.array([[5, 6, 7], [1, 2, 3]])
    np.testing.assert_array_equal(tl.ShiftRight().apply({}, x), [[0, 5, 6], [0, 1, 2]])
    np.testing.assert_array_equal(tl.ShiftRight(n_positions=2, pad_id=9).apply({}, x),
                                  [[9, 9, 5], [9, 9, 1]])
    np.testing.assert_array_equal(tl.ShiftRight(mode='predict').apply({}, x), x)

  @parameterized.named_parameters(
      ('relu', tl.Relu, lambda x: np.maximum(x, 0)),
      ('sigmoid', tl.Sigmoid, lambda x: 1 / (1 + np.exp(-x))),
      ('tanh', tl.Tanh, np.tanh),
      ('gelu', tl.Gelu, lambda x: 0.5 * x * (1 + np.vectorize(__import__('math').erf)(x / np.sqrt(2)))),
      ('fast_gelu', tl.FastGelu,
       lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))),
      ('softmax', tl.Softmax, lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)),
      ('log_softmax', tl.LogSoftmax, lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))),
  )
  def test_activation(self, factory, reference):
    x = jax.random.normal(KEY, (3, 7)) * 3
    np.testing.assert_allclose(factory().apply({}, x), reference(f64(x)), rtol=1e-5, atol=1e-6)


if __name__ == '__main__':
  absltest.main()
