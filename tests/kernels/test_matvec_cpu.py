"""The few-row streaming product (terraflax.kernels.matvec_cpu) against float64 references.

The reference is x @ w in NumPy float64: no code shared with the kernel.
Shapes cover 1..8 rows, depths that are not multiples of the kernel's
4-row steps, one to three products per call, and matrices big enough to be
split between threads (each thread's partial sums added at the end).
"""

import os
import shutil
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.models as tm
from terraflax import decoding
from terraflax import kernels
from terraflax.kernels import matvec_cpu
from tests.contracts import assert_float32_near_float64 as close

HAS_COMPILER = shutil.which(os.environ.get('CXX', 'c++').split()[0]) is not None


@absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
class KernelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertTrue(matvec_cpu.available())

  @parameterized.parameters(
      (1, 7, (16,)),              # depth below one 8-row step
      (3, 130, (48, 16, 32)),     # three products, a depth tail of 2 after 8-row steps
      (8, 64, (96,)),             # the most rows
      (1, 333, (512, 512, 256)),  # > 256 KiB of weights: split between threads, depth tail 1
      (2, 1024, (4096,)),         # one 16 MiB matrix over threads
  )
  def test_matches_float64(self, rows, d_in, widths):
    rng = np.random.default_rng(rows + d_in)
    x = rng.normal(size=(rows, d_in)).astype(np.float32)
    ws = [rng.normal(size=(d_in, m)).astype(np.float32) for m in widths]
    ys = jax.jit(matvec_cpu.matmul)(x, *ws)
    self.assertLen(ys, len(ws))
    for y, w in zip(ys, ws):
      self.assertEqual(y.shape, (rows, w.shape[1]))
      close(self, y, x.astype(np.float64) @ w.astype(np.float64))

  def test_leading_axes_and_vmap(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 1, 48)).astype(np.float32)
    w = rng.normal(size=(48, 32)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    (y,) = matvec_cpu.matmul(jnp.asarray(x), w)
    close(self, y, want)
    close(self, jax.vmap(lambda r: matvec_cpu.matmul(r, w)[0])(x), want)

  def test_unsupported_says_why(self):
    x = jnp.ones((1, 32))
    self.assertIsNone(matvec_cpu.unsupported(x, jnp.ones((32, 16))))
    self.assertIn('multiple of 16', matvec_cpu.unsupported(x, jnp.ones((32, 10))))
    self.assertIn('at most 8 rows', matvec_cpu.unsupported(jnp.ones((9, 32)), jnp.ones((32, 16))))
    self.assertIn('float32', matvec_cpu.unsupported(x, jnp.ones((32, 16), jnp.bfloat16)))
    self.assertIn('1 to 8', matvec_cpu.unsupported(x))

  def test_decoding_streams_dense_layers_only_when_allowed(self):
    """decode_step routes float32 Dense layers through the kernel; xla_only() does not."""
    model = tm.TransformerLM(vocab_size=32, d_model=32, d_ff=64, n_layers=2, n_heads=2,
                             dropout=0.0, max_len=8, mode='predict')
    params = tm.TransformerLM(vocab_size=32, d_model=32, d_ff=64, n_layers=2, n_heads=2,
                              dropout=0.0, max_len=8).init(
                                  jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
    cache = decoding.init_cache(model, 1)
    tokens = jnp.array([3], jnp.int32)
    # Products this small stay XLA dots (their weights are under _STREAM_MIN_BYTES)...
    default = jax.jit(lambda p, c, t: decoding.decode_step(model, p, c, t))
    self.assertNotIn(matvec_cpu.TARGET, default.lower(params, cache, tokens).as_text())
    # ...and stream once the threshold is below them.
    with mock.patch.object(decoding, '_STREAM_MIN_BYTES', 32 * 32 * 4):
      step = jax.jit(lambda p, c, t: decoding.decode_step(model, p, c, t))
      hlo = step.lower(params, cache, tokens).compile().as_text()
      got, got_cache = step(params, cache, tokens)
    # One call per layer for query/key/value, one for the output projection, one for the head.
    self.assertEqual(hlo.count(f'custom_call_target="{matvec_cpu.TARGET}"'), 2 * 2 + 1)
    with kernels.xla_only():
      plain = jax.jit(lambda p, c, t: decoding.decode_step(model, p, c, t))
      self.assertNotIn(matvec_cpu.TARGET, plain.lower(params, cache, tokens).as_text())
      want, want_cache = plain(params, cache, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    for a, b in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
