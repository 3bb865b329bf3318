"""The native feed-forward kernel (terraflax.kernels.ff_cpu) against float64 references.

The reference is the formula act(x W1 + b1) W2 + b2 evaluated in float64 with
JAX, and its gradient by autodiff in float64: no code shared with the kernel.
"""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl
from terraflax.kernels import ff_cpu
from terraflax.layers.feedforward import FeedForward

HAS_COMPILER = shutil.which(os.environ.get('CXX', 'c++').split()[0]) is not None
ACTIVATIONS = {'relu': lambda h: jnp.maximum(h, 0.0),
               'fast_gelu': lambda h: jax.nn.gelu(h, approximate=True)}


def weights(seed, d_in, d_ff, d_out):
  k = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k[0], (d_in, d_ff)) / np.sqrt(d_in),
          jax.random.normal(k[1], (d_ff,)) * 0.5,
          jax.random.normal(k[2], (d_ff, d_out)) / np.sqrt(d_ff),
          jax.random.normal(k[3], (d_out,)) * 0.5)


def reference(activation, x, w1, b1, w2, b2):
  lead = (1,) * (x.ndim - 1)  # explicit broadcasting (rank promotion raises in the suite)
  hidden = ACTIVATIONS[activation](x @ w1 + b1.reshape(lead + b1.shape))
  return hidden @ w2 + b2.reshape(lead + b2.shape)


@absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
class KernelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertTrue(ff_cpu.available(), 'the kernel failed to build (see the warning)')

  @parameterized.product(
      activation=('relu', 'fast_gelu'), save_hidden=(True, False),
      # rows (not a multiple of the 96-row blocks, nor split evenly), widths
      shape=((250, 32, 80, 48), (7, 16, 64, 16), (3, 5, 48, 16, 32),
             # the small-row path (<= 8 rows, decoding): one row over column blocks wider
             # than a thread's share, and 8 rows over blocks that do not divide d_ff
             (1, 32, 8256, 48), (2, 4, 48, 1104, 32)))
  def test_value_and_gradient_match_float64(self, activation, save_hidden, shape):
    *lead, d_in, d_ff, d_out = shape
    x = jax.random.normal(jax.random.key(1), (*lead, d_in)) * 2
    params = weights(2, d_in, d_ff, d_out)
    cotangent = jax.random.normal(jax.random.key(3), (*lead, d_out))

    def native(x, *params):
      y = ff_cpu.feed_forward(x, *params, activation=activation, save_hidden=save_hidden)
      return jnp.sum(y * cotangent), y

    (_, y), grads = jax.jit(jax.value_and_grad(native, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        x, *params)
    with jax.enable_x64(True):
      f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
      loss = lambda x, *p: jnp.sum(reference(activation, x, *p) * f64(cotangent))  # noqa: E731
      expected_y = reference(activation, f64(x), *map(f64, params))
      expected = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(f64(x), *map(f64, params))
      np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
      for got, want in zip(grads, expected):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)

  def test_vmap(self):
    params = weights(0, 16, 32, 16)
    xs = jax.random.normal(jax.random.key(1), (3, 10, 16))
    f = lambda x: ff_cpu.feed_forward(x, *params, activation='relu')  # noqa: E731
    batched = jax.jit(jax.vmap(f))(xs)
    for i in range(3):
      np.testing.assert_allclose(batched[i], f(xs[i]), rtol=1e-6, atol=1e-6)


class LayerTest(parameterized.TestCase):

  def run_both(self, **kw):
    """(value, grads) of the 'cpu' and 'xla' layers on the same parameters."""
    x = jax.random.normal(jax.random.key(0), (2, 40, 32))
    cotangent = jax.random.normal(jax.random.key(1), (2, 40, 32))
    layers = {k: FeedForward(d_model=32, d_ff=64, kernel=k, **kw) for k in ('cpu', 'xla')}
    params = nn.meta.unbox(
        layers['xla'].init({'params': jax.random.key(2), 'dropout': jax.random.key(3)}, x))
    self.assertEqual(jax.tree_util.tree_structure(params),
                     jax.tree_util.tree_structure(nn.meta.unbox(
                         layers['cpu'].init(jax.random.key(2), x))))
    out = {}
    for k, layer in layers.items():
      loss = lambda p, x, layer=layer: jnp.sum(layer.apply(p, x) * cotangent)  # noqa: E731
      out[k] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    return out

  @absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
  @parameterized.parameters(
      dict(activation=tl.FastGelu), dict(activation=tl.Relu, chunk_len=16),
      dict(activation=tl.FastGelu, mode='eval', dropout=0.1))
  def test_cpu_kernel_equals_xla_layers(self, **kw):
    out = self.run_both(**kw)
    np.testing.assert_allclose(out['cpu'][0], out['xla'][0], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(out['cpu'][1]),
                    jax.tree_util.tree_leaves(out['xla'][1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  def lowered(self, **kw):
    layer = FeedForward(d_model=32, d_ff=64, activation=tl.FastGelu, **kw)
    x = jnp.ones((1, 8, 32))
    params = nn.meta.unbox(
        layer.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x))
    return jax.jit(lambda p: layer.apply(p, x, rngs={'dropout': jax.random.key(2)})).lower(
        params).as_text()

  @absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
  def test_dispatch(self):
    self.assertIn(ff_cpu.FORWARD, self.lowered())
    self.assertNotIn(ff_cpu.FORWARD, self.lowered(kernel='xla'))
    self.assertNotIn(ff_cpu.FORWARD, self.lowered(dropout=0.1))  # training dropout
    self.assertIn(ff_cpu.FORWARD, self.lowered(dropout=0.1, mode='eval'))

  def test_cpu_kernel_that_cannot_run_is_an_error(self):
    with self.assertRaisesRegex(ValueError, 'dropout in training'):
      self.lowered(dropout=0.1, kernel='cpu')
    with self.assertRaisesRegex(ValueError, 'activation'):
      layer = FeedForward(d_model=32, d_ff=64, activation=tl.Tanh, kernel='cpu')
      x = jnp.ones((1, 8, 32))
      layer.apply(layer.init(jax.random.key(0), x), x)

  def test_unknown_kernel_name(self):
    with self.assertRaisesRegex(ValueError, 'kernel must be one of'):
      FeedForward(d_model=32, d_ff=64, kernel='gpu')


if __name__ == '__main__':
  absltest.main()
