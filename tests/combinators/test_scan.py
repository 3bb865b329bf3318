"""Repeat equals the unrolled stack; Chunk equals the unchunked layer."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax import rng

KEY = jax.random.key(0)


class Noise(cb.Layer):
  """[x] -> [x + uniform noise drawn from the rng stream `stream`]."""

  stream: str = 'dropout'

  @nn.compact
  def __call__(self, x):
    return x + jax.random.uniform(self.make_rng(self.stream), x.shape)


def block():
  return cb.Residual(tl.LayerNorm(), tl.Dense(6), tl.Relu(), tl.Dense(4))


class RepeatTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_equals_unrolled_serial(self, remat):
    repeat = cb.Repeat(block(), 3, remat=remat)
    x = jax.random.normal(KEY, (2, 5, 4))
    variables = nn.meta.unbox(repeat.init(KEY, x))
    stacked = variables['params']['Residual_0']
    self.assertEqual(stacked['Dense_1']['kernel'].shape, (3, 4, 6))
    blocks = [block() for _ in range(3)]
    unrolled = cb.Serial(*blocks)
    unrolled_params = {b.name: jax.tree_util.tree_map(lambda p, i=i: p[i], stacked)
                       for i, b in enumerate(blocks)}
    expected = unrolled.apply({'params': unrolled_params}, x)

    def loss(params, apply):
      return jnp.sum(apply(params, x) ** 2)

    chex.assert_trees_all_close(repeat.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
    grads = jax.grad(loss)(variables, repeat.apply)
    unrolled_grads = jax.grad(loss)({'params': unrolled_params}, unrolled.apply)
    for i, b in enumerate(blocks):
      chex.assert_trees_all_close(
          jax.tree_util.tree_map(lambda g, i=i: g[i], grads['params']['Residual_0']),
          unrolled_grads['params'][b.name], rtol=1e-5, atol=1e-6)

  def test_many_items_and_dropout_rngs_differ_per_copy(self):
    layer = cb.Repeat(cb.Parallel(tl.Dropout(0.5), None), 4)
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    x = jnp.ones((1000,))
    out, untouched = layer.apply({}, x, x, rngs={'dropout': KEY})
    chex.assert_trees_all_equal(untouched, x)
    # Four independent masks of keep rate 1/2: survivors ~ 1000/16, each scaled by 16.
    survivors = int(jnp.sum(out > 0))
    self.assertBetween(survivors, 30, 100)
    self.assertTrue(bool(jnp.all((out == 0) | (out == 16.0))))

  @parameterized.parameters(False, True)
  def test_shared_params_equal_one_instance_applied_n_times(self, remat):
    shared = block()
    repeat = cb.Repeat(shared, 3, remat=remat, share_params=True)
    x = jax.random.normal(KEY, (2, 5, 4))
    variables = nn.meta.unbox(repeat.init(KEY, x))
    one = variables['params']['Residual_0']
    self.assertEqual(one['Dense_1']['kernel'].shape, (4, 6))  # One set, no leading axis.
    single = block()
    apply_once = lambda p, y: single.apply({'params': p}, y)

    def expected(params):
      y = x
      for _ in range(3):
        y = apply_once(params, y)
      return y

    chex.assert_trees_all_close(repeat.apply(variables, x), expected(one), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda v: jnp.sum(repeat.apply(v, x) ** 2))(variables)
    reference = jax.grad(lambda p: jnp.sum(expected(p) ** 2))(one)
    chex.assert_trees_all_close(grads['params']['Residual_0'], reference, rtol=1e-4, atol=1e-5)

  def test_shared_params_keep_one_cache_per_application(self):
    repeat = cb.Repeat(tl.CausalAttention(n_heads=2, max_len=4, mode='predict'), 3,
                       share_params=True)
    variables = nn.meta.unbox(repeat.init(KEY, jnp.ones((1, 1, 4))))
    self.assertEqual(variables['params']['CausalAttention_0']['query']['kernel'].shape, (4, 4))
    self.assertEqual(variables['cache']['CausalAttention_0']['cached_key'].shape, (3, 1, 2, 2, 4))

  def test_rejects_layer_with_unequal_counts(self):
    with self.assertRaisesRegex(cb.LayerError, 'n_in == n_out'):
      cb.Repeat(cb.Add(), 2)
    with self.assertRaisesRegex(cb.LayerError, 'n >= 1'):
      cb.Repeat(tl.Dense(2), 0)


class ChunkTest(parameterized.TestCase):

  @parameterized.parameters(1, 3, 4, 10, 16)
  def test_equals_unchunked_with_gradients(self, chunk_len):
    chunked = tl.FeedForward(d_model=4, d_ff=8, chunk_len=chunk_len)
    plain = tl.FeedForward(d_model=4, d_ff=8)
    x = jax.random.normal(KEY, (2, 10, 4))
    variables = plain.init(KEY, x)
    # Chunking does not rename parameters.
    self.assertEqual(jax.tree_util.tree_structure(chunked.init(KEY, x)),
                     jax.tree_util.tree_structure(variables))
    chex.assert_trees_all_close(chunked.apply(variables, x), plain.apply(variables, x),
                                rtol=1e-5, atol=1e-6)
    g_chunked = jax.grad(lambda v: jnp.sum(jnp.sin(chunked.apply(v, x))))(variables)
    g_plain = jax.grad(lambda v: jnp.sum(jnp.sin(plain.apply(v, x))))(variables)
    chex.assert_trees_all_close(g_chunked, g_plain, rtol=1e-5, atol=1e-6)

  def test_serial_semantics_label_and_many_items(self):
    layer = cb.Chunk(cb.Branch(tl.Dense(3), None), cb.Parallel(tl.Relu(), tl.Tanh()),
                     chunk_len=2, label='Mixer')
    self.assertEqual((layer.n_in, layer.n_out), (1, 2))
    model = cb.Serial(layer)
    x = jax.random.normal(KEY, (2, 5, 3))
    variables = nn.meta.unbox(model.init(KEY, x))
    self.assertEqual(list(variables['params']), ['Mixer_0'])
    kernel = variables['params']['Mixer_0']['Branch_0']['Dense_0']['kernel']
    bias = variables['params']['Mixer_0']['Branch_0']['Dense_0']['bias']
    relu, tanh = model.apply(variables, x)
    chex.assert_trees_all_close(relu, jax.nn.relu(x @ kernel + bias[None, None]), rtol=1e-5,
                                atol=1e-6)
    chex.assert_trees_all_close(tanh, jnp.tanh(x), rtol=1e-6)

  @parameterized.parameters(*rng.NOISE_STREAMS)
  def test_every_noise_stream_is_split_per_chunk(self, stream):
    layer = cb.Chunk(Noise(stream=stream), chunk_len=2)
    out = layer.apply({}, jnp.zeros((1, 6, 3)), rngs={stream: KEY})
    first, second, third = out[:, 0:2], out[:, 2:4], out[:, 4:6]
    self.assertFalse(jnp.allclose(first, second) or jnp.allclose(second, third))

  def test_rejects_bad_chunk_len(self):
    with self.assertRaisesRegex(cb.LayerError, 'chunk_len >= 1 or None'):
      cb.Chunk(tl.Dense(2), chunk_len=0)


if __name__ == '__main__':
  absltest.main()
