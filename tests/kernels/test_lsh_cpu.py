"""The native LSH kernel (terraflax.kernels.lsh_cpu) against independent references.

Forward: the float64 brute force of tests/layers/test_lsh_attention.py (for
every query, the set of keys met in any round's chunk window, one softmax
over it). Gradients: autodiff of a dense masked softmax over the same sets.
Neither shares code with the kernel or with the XLA path.
"""

import os
import shutil
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl
from terraflax import kernels
from terraflax.kernels import lsh_cpu
from terraflax.layers.lsh_attention import lsh_attend
from tests import contracts
from tests.layers.test_lsh_attention import dense_set_loss, reference_core

HAS_COMPILER = shutil.which(os.environ.get('CXX', 'c++').split()[0]) is not None


def inputs(seed, *, length, n_hashes, n_buckets, b=1, h=2, c=16, d_k=16, d_v=16):
  """q (b, L, h, k), v (b, L, h, dv), buckets (b, h, n, L); padding in bucket n_buckets."""
  big_l = -(-length // c) * c
  kq, kv, kb = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, big_l, h, d_k)) * 2
  v = jax.random.normal(kv, (b, big_l, h, d_v))
  buckets = jax.random.randint(kb, (b, h, n_hashes, big_l), 0, n_buckets)
  return q, v, jnp.where(jnp.arange(big_l) < length, buckets, n_buckets)


def attend(q, v, buckets, *, kernel, n_buckets, **kw):
  return lsh_attend(q, v, buckets, n_bucket_ids=n_buckets + 1, kernel=kernel, **kw)


@absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
class KernelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertTrue(lsh_cpu.available(), 'the kernel failed to build (see the warning)')

  @parameterized.parameters(
      # causal, n_hashes, (before, after), length, n_buckets, b, h, c, d_k, d_v
      (True, 4, (1, 0), 128, 4, 1, 2, 16, 16, 16),   # many repeated meetings
      (False, 2, (1, 1), 96, 3, 2, 1, 16, 32, 16),
      (True, 1, (0, 0), 64, 2, 1, 3, 32, 16, 32),
      (True, 3, (2, 1), 100, 5, 2, 2, 16, 16, 16),  # padding: 112 positions, 100 real
      (True, 9, (1, 0), 48, 2, 1, 1, 16, 16, 16),   # up to 17 meetings: beyond the table
  )
  def test_matches_brute_force(self, causal, n_hashes, window, length, n_buckets, b, h, c,
                               d_k, d_v):
    before, after = window
    q, v, buckets = inputs(length + n_hashes, length=length, n_hashes=n_hashes,
                           n_buckets=n_buckets, b=b, h=h, c=c, d_k=d_k, d_v=d_v)
    got = jax.jit(lambda q, v: attend(
        q, v, buckets, kernel='cpu', n_buckets=n_buckets, length=length, chunk_len=c,
        n_chunks_before=before, n_chunks_after=after, causal=causal))(q, v)
    expected = reference_core(q, v, buckets[..., :length], length, c, before, after, causal)
    np.testing.assert_allclose(got[:, :length], expected, rtol=2e-5, atol=2e-5)

  @parameterized.parameters((True, 4, (1, 0), 100), (False, 2, (1, 1), 64))
  def test_gradient_matches_dense_autodiff(self, causal, n_hashes, window, length):
    """The kernel's backward pass equals autodiff of a dense softmax over the met sets."""
    before, after = window
    c, h = 16, 2
    q, v, buckets = inputs(n_hashes, length=length, n_hashes=n_hashes, n_buckets=3, h=h)
    cotangent = jax.random.normal(jax.random.key(9), (1, length, h, 16))
    dense = dense_set_loss(buckets, length, c, before, after, causal, cotangent)

    def native(q, v):
      out = attend(q, v, buckets, kernel='cpu', n_buckets=3, length=length, chunk_len=c,
                   n_chunks_before=before, n_chunks_after=after, causal=causal)
      return jnp.sum(out[:, :length] * cotangent)

    expected = jax.jit(jax.grad(dense, argnums=(0, 1)))(q, v)
    got = jax.jit(jax.grad(native, argnums=(0, 1)))(q, v)
    for g, e in zip(got, expected):
      np.testing.assert_allclose(g[:, :length], e[:, :length], rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(g[:, length:], 0.0)

  def test_same_as_xla_path_with_several_units_and_rounds(self):
    """Outputs and gradients of both implementations, 2 x 3 (batch, head) units."""
    q, v, buckets = inputs(5, length=160, n_hashes=4, n_buckets=6, b=2, h=3)
    cotangent = jax.random.normal(jax.random.key(1), v.shape)

    def loss(q, v, kernel):
      out = attend(q, v, buckets, kernel=kernel, n_buckets=6, length=160, chunk_len=16,
                   causal=True)
      return jnp.sum(out * cotangent), out

    results = {k: jax.jit(jax.value_and_grad(lambda q, v, k=k: loss(q, v, k), argnums=(0, 1),
                                             has_aux=True))(q, v) for k in ('cpu', 'xla')}
    (_, out_cpu), grads_cpu = results['cpu']
    (_, out_xla), grads_xla = results['xla']
    np.testing.assert_allclose(out_cpu, out_xla, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_cpu, grads_xla):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  def test_vmap(self):
    q, v, buckets = inputs(3, length=64, n_hashes=2, n_buckets=4)
    f = lambda q, v: attend(q, v, buckets, kernel='cpu', n_buckets=4, length=64,  # noqa: E731
                            chunk_len=16, causal=True)
    scales = jnp.array([1.0, 0.5, 2.0])
    batched = jax.jit(jax.vmap(lambda s: f(q * s, v)))(scales)
    for i, s in enumerate(scales):
      np.testing.assert_allclose(batched[i], f(q * s, v), rtol=1e-6, atol=1e-6)


class DispatchTest(parameterized.TestCase):

  def layer_hlo(self, **kw):
    layer = tl.LSHSelfAttention(n_heads=2, d_qk=16, d_v=16, n_hashes=2, n_buckets=4,
                                chunk_len=16, causal=True, mode='eval', **kw)
    x = jnp.ones((1, 64, 8))
    params = jax.eval_shape(layer.init, {'params': jax.random.key(0),
                                         'hash': jax.random.key(1)}, x)
    return jax.jit(lambda p, x: layer.apply(p, x, rngs={'hash': jax.random.key(2)})).lower(
        params, x).as_text()

  @absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
  def test_auto_uses_the_kernel_on_the_cpu_and_xla_when_asked(self):
    self.assertIn(lsh_cpu.FORWARD, self.layer_hlo())
    self.assertNotIn(lsh_cpu.FORWARD, self.layer_hlo(kernel='xla'))
    with kernels.xla_only():
      self.assertNotIn(lsh_cpu.FORWARD, self.layer_hlo())

  @parameterized.parameters(
      (dict(chunk_len=4), 'multiples of 16'),
      (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), 'dropout'),
  )
  def test_cpu_kernel_that_cannot_run_is_an_error(self, change, message):
    q, v, buckets = inputs(0, length=64, n_hashes=2, n_buckets=4)
    kw = dict(length=64, chunk_len=16, causal=True) | change
    with self.assertRaisesRegex(ValueError, message):
      attend(q, v, buckets, kernel='cpu', n_buckets=4, **kw)

  def test_unknown_kernel_name(self):
    with self.assertRaisesRegex(ValueError, "kernel must be one of"):
      tl.LSHSelfAttention(kernel='gpu')

  def test_failed_build_falls_back_with_a_warning(self):
    with tempfile.TemporaryDirectory() as tmp:
      with mock.patch.dict(os.environ, {'CXX': '/nonexistent/c++', 'TERRAFLAX_CACHE_DIR': tmp}):
        with self.assertLogs(level='WARNING') as logs:
          loaded = kernels.load.__wrapped__('lsh_cpu', (lsh_cpu.FORWARD, lsh_cpu.BACKWARD))
      self.assertEqual(os.listdir(tmp), [])  # no half-written library left behind
    self.assertFalse(loaded)
    self.assertIn('using the XLA path', logs.output[0])


@absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
class PackedKernelTest(parameterized.TestCase):
  """The kernel's segment-ids operand: documents of a packed row never see each other."""

  def documents(self, lengths):
    rng = np.random.default_rng(11)
    return [jnp.asarray(rng.normal(size=(n, 16)), jnp.float32) for n in lengths]

  @parameterized.parameters(True, False)
  def test_packed_equals_unpacked(self, causal):
    # Given rotations hash each token as alone, and one chunk holds every bucket.
    rotations = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 3, 2)), jnp.float32)
    contracts.assert_layer_packed_equals_unpacked(
        lambda **kw: tl.LSHSelfAttention(n_heads=2, d_qk=16, d_v=16, n_hashes=3, n_buckets=4,
                                         chunk_len=32, n_chunks_before=0, causal=causal,
                                         kernel='cpu', **kw),
        self.documents((10, 14, 7)), 32,
        collections={'lsh_rotations': {'rotations': rotations}}, modes=('eval',))

  def test_matches_xla_with_many_chunks(self):
    x, seg, _ = contracts.pack_documents(self.documents((40, 30, 20)), 96)
    results = []
    for kernel in ('cpu', 'xla'):
      layer = tl.LSHSelfAttention(n_heads=2, d_qk=16, d_v=16, n_hashes=2, n_buckets=4,
                                  chunk_len=16, n_chunks_before=1, causal=True, kernel=kernel,
                                  packed=True)
      params = layer.init({'params': jax.random.key(0), 'hash': jax.random.key(1)}, x,
                          seg)['params']

      def loss(p, x, layer=layer):
        y = layer.apply({'params': p}, x, seg, rngs={'hash': jax.random.key(2)})[0]
        return jnp.sum(y * y)

      results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x))
    for got, want in zip(jax.tree_util.tree_leaves(results[0]),
                         jax.tree_util.tree_leaves(results[1])):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


if __name__ == '__main__':
  absltest.main()


class ScratchBytesTest(absltest.TestCase):

  def test_scratch_is_twenty_bytes_per_position_and_thread_at_four_hashes(self):
    # By hand: per position the chunk of each of 4 rounds and the backward row term (5 int32 /
    # float32 = 20 bytes), plus the window buffers of 2 chunks of 64 (under 1 MiB).
    size = dict(n_hashes=4, padded_length=1 << 20, chunk_len=64, d_qk=64, d_v=64,
                n_chunks_before=1, n_chunks_after=0)
    one = lsh_cpu.scratch_bytes(**size, n_threads=1)
    self.assertBetween(one, 20 * 2 ** 20, 21 * 2 ** 20)
    self.assertEqual(lsh_cpu.scratch_bytes(**size, n_threads=16), 16 * one)
    forward = lsh_cpu.scratch_bytes(**size, n_threads=1, backward=False)
    self.assertBetween(forward, 16 * 2 ** 20, 17 * 2 ** 20)
