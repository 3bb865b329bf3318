"""FeedForward / FeedForwardBlock against a float64 numpy reference.

The native path must find its LayerNorm and Dense layers by role, whatever
their position in the block: the reordered blocks below would be misread by
position.
"""

import os
import shutil

import flax.linen as nn
import jax
import numpy as np
from absl.testing import absltest

import terraflax.layers as tl
from terraflax.combinators.base import LayerError
from terraflax.kernels import ff_cpu
from terraflax.layers.feedforward import FeedForwardBlock

HAS_COMPILER = shutil.which(os.environ.get('CXX', 'c++').split()[0]) is not None


def f64(x):
  return np.asarray(x, np.float64)


def random_params(params, seed):
  """The same tree with every leaf drawn from N(0, 0.5^2) (biases and scales too)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [0.5 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])


def reference(x, norm, first, second):
  """LayerNorm, Dense, relu, Dense in float64 (dropout is off)."""
  x = f64(x)
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  y = y * f64(norm['scale']) + f64(norm['bias'])
  h = np.maximum(y @ f64(first['kernel']) + f64(first['bias']), 0.0)
  return h @ f64(second['kernel']) + f64(second['bias'])


def reordered_block(kernel, *, train_dropout=False, extra=None):
  """LayerNorm, Dense(64), Relu, Dense(32), Dropout, Dropout (+ `extra` at the end).

  FeedForward's own order has a Dropout before the second Dense.
  """
  norm, first, second = tl.LayerNorm(), tl.Dense(64), tl.Dense(32)
  mode = 'train' if train_dropout else 'eval'
  layers = [norm, first, tl.Relu(), second, tl.Dropout(0.1, mode=mode),
            tl.Dropout(0.1, mode=mode)] + ([extra] if extra is not None else [])
  return FeedForwardBlock(*layers, roles={'norm': norm, 'first': first, 'second': second},
                          activation_name='relu', label='FeedForward', kernel=kernel)


class FeedForwardBlockTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.x = jax.random.normal(jax.random.key(0), (2, 8, 32))

  def params(self, block):
    return random_params(nn.meta.unbox(block.init(jax.random.key(1), self.x)), seed=2)

  def test_feed_forward_matches_reference(self):
    for kernel in ('xla', 'auto'):
      layer = tl.FeedForward(d_model=32, d_ff=64, kernel=kernel, mode='eval', dropout=0.1)
      variables = self.params(layer)
      p = variables['params']
      expected = reference(self.x, p['LayerNorm_0'], p['Dense_1'], p['Dense_4'])
      np.testing.assert_allclose(layer.apply(variables, self.x), expected, rtol=1e-4, atol=1e-4)

  @absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
  def test_native_path_finds_its_layers_by_name_in_any_order(self):
    block = reordered_block('cpu')
    variables = self.params(block)
    p = variables['params']
    self.assertEqual(sorted(p), ['Dense_1', 'Dense_3', 'LayerNorm_0'])
    lowered = jax.jit(lambda v: block.apply(v, self.x)).lower(variables).as_text()
    self.assertIn(ff_cpu.FORWARD, lowered)  # The native path really runs.
    expected = reference(self.x, p['LayerNorm_0'], p['Dense_1'], p['Dense_3'])
    np.testing.assert_allclose(block.apply(variables, self.x), expected, rtol=1e-4, atol=1e-4)

  @absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
  def test_native_path_sees_every_dropout_and_extra_layers(self):
    block = reordered_block('auto', train_dropout=True)  # Dropouts where no position expects.
    variables = nn.meta.unbox(block.init(jax.random.key(1), self.x))
    rngs = {'dropout': jax.random.key(3)}
    lowered = jax.jit(lambda v: block.apply(v, self.x, rngs=rngs)).lower(variables).as_text()
    self.assertNotIn(ff_cpu.FORWARD, lowered)
    with self.assertRaisesRegex(ValueError, 'dropout in training'):
      reordered_block('cpu', train_dropout=True).apply(variables, self.x, rngs=rngs)
    block = reordered_block('cpu', extra=tl.Tanh())
    with self.assertRaisesRegex(ValueError, 'one activation.*Tanh'):
      block.apply(nn.meta.unbox(block.init(jax.random.key(1), self.x)), self.x)

  def test_roles_must_name_its_layers(self):
    norm, first, second = tl.LayerNorm(), tl.Dense(64), tl.Dense(32)
    with self.assertRaisesRegex(LayerError, "roles must map each of .*'second'"):
      FeedForwardBlock(norm, first, tl.Relu(), second, roles={'norm': norm, 'first': first})
    with self.assertRaisesRegex(LayerError, 'roles must map'):
      FeedForwardBlock(norm, first, tl.Relu(), roles={'norm': norm, 'first': first,
                                                      'second': tl.Dense(32, name='other')})


  def test_chunked_gradients_equal_unchunked_without_the_whole_hidden(self):
    # chunk_len takes effect in the backward pass too: the same gradients, and the compiled
    # gradient holds no (b, l, d_ff) hidden state (XLA: checkpointed chunks in a scan; the
    # native kernel: recomputed block by block).
    x = jax.random.normal(jax.random.key(3), (1, 1024, 32))
    kernels = ('xla', 'auto') if HAS_COMPILER else ('xla',)
    for kernel in kernels:
      whole = tl.FeedForward(d_model=32, d_ff=512, kernel=kernel, mode='train')
      chunked = tl.FeedForward(d_model=32, d_ff=512, kernel=kernel, mode='train', chunk_len=128)
      variables = self.params(whole)

      def grads(layer, variables=variables):
        return jax.jit(jax.grad(lambda v, x: (layer.apply(v, x) ** 2).sum(), argnums=(0, 1)))
      want, got = grads(whole)(variables, x), grads(chunked)(variables, x)
      for g, ref in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4, err_msg=kernel)
      temp = {name: grads(layer).lower(variables, x).compile().memory_analysis().temp_size_in_bytes
              for name, layer in (('whole', whole), ('chunked', chunked))}
      hidden = 1024 * 512 * 4  # one whole (b, l, d_ff) float32 hidden state
      self.assertLess(temp['chunked'], hidden, kernel)
      self.assertGreater(temp['whole'], hidden, kernel)

if __name__ == '__main__':
  absltest.main()
