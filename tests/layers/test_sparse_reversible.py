"""Recorded SparseFF choices in a reversible stack: forward records, reverse and backward replay."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.layers.sparse_reversible import AdvanceSlot, ReplayedHalfResidual, StartRecord

KEY = jax.random.key(0)
D_MODEL, D_FF, N_EL = 8, 16, 4
N_BLOCKS = D_FF // N_EL
B, L = 2, 3


def sparse_ff(mode, **kw):
  return tl.SparseFF(d_ff=D_FF, n_elements_in_block=N_EL, d_lowrank=3, mode=mode, replay=True,
                     **kw)


def randomise(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + 0.3 * rng.standard_normal(p.shape), jnp.float32),
      params)


def np_controller_argmax(p, x):
  """The controller's choices (b, l, k) in float64."""
  z = np.asarray(x, np.float64) @ np.asarray(p['controller_lowrank']['kernel'], np.float64)
  c = p['controller_logits']
  logits = z @ np.asarray(c['kernel'], np.float64) + np.asarray(c['bias'], np.float64)
  return logits.reshape(x.shape[:-1] + (N_BLOCKS, N_EL)).argmax(-1)


def np_sparse_ff(p, x, choices):
  """The feed-forward with one unit per block, the given ones, in float64."""
  f64 = lambda a: np.asarray(a, np.float64)
  h = np.maximum(f64(x) @ f64(p['kernel_in']).T + f64(p['bias_in']), 0)
  mask = np.eye(N_EL)[np.asarray(choices)].reshape(h.shape)
  return (h * mask) @ f64(p['kernel_out']) + f64(p['bias_out'])


def inputs(n_records=3, slot=1, seed=0):
  x1, x2 = jax.random.normal(jax.random.key(seed), (2, B, L, D_MODEL))
  record = jnp.full((n_records, B, L, N_BLOCKS), -1, jnp.int8)
  return x1, x2, jnp.asarray(slot, jnp.int32), record


class ReplayedHalfResidualTest(absltest.TestCase):

  def test_forward_records_and_reverse_replays_the_record(self):
    layer = ReplayedHalfResidual(sparse_ff('eval'))
    x1, x2, slot, record = inputs()
    record = record.at[0].set(2)  # Another layer's entry: left alone.
    params = randomise(nn.meta.unbox(layer.init(KEY, x1, x2, slot, record)['params']))
    p = params['SparseFF_0']
    y1, x2_out, slot_out, record_out = layer.apply({'params': params}, x1, x2, slot, record)
    choices = np_controller_argmax(p, x2)
    np.testing.assert_array_equal(record_out[1], choices)
    np.testing.assert_array_equal(record_out[0], 2)
    np.testing.assert_array_equal(record_out[2], -1)
    self.assertEqual(record_out.dtype, jnp.int8)
    np.testing.assert_array_equal(x2_out, x2)
    self.assertEqual(int(slot_out), 1)
    np.testing.assert_allclose(y1, np.asarray(x1) + np_sparse_ff(p, x2, choices), rtol=1e-5,
                               atol=1e-5)
    # reverse rebuilds x1 with the recorded choices, whatever the controller says.
    rebuilt = layer.apply({'params': params}, y1, x2, slot, record_out, method='reverse')
    np.testing.assert_allclose(rebuilt[0], x1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rebuilt[3], record_out)  # The entry stays for replay.
    other = (choices + 1) % N_EL
    tampered = record_out.at[1].set(other.astype(np.int8))
    rebuilt = layer.apply({'params': params}, y1, x2, slot, tampered, method='reverse')
    np.testing.assert_allclose(rebuilt[0], np.asarray(y1) - np_sparse_ff(p, x2, other),
                               rtol=1e-5, atol=1e-5)

  def test_backward_pass_replays_the_record(self):
    """Choices pre-filled in the record (not the controller's) drive the backward pass too."""

    def stack(reversible):
      block = [ReplayedHalfResidual(sparse_ff('train', quant_prob=1.0, temperature=0.5)),
               cb.ReversibleSwap(), AdvanceSlot()]
      return cb.ReversibleSerial(block, n_repeats=3, reversible=reversible)

    x1, x2, slot, record = inputs(slot=0)
    rngs = {'sparse': jax.random.key(3)}
    params = randomise(nn.meta.unbox(
        stack(True).init({'params': KEY, **rngs}, x1, x2, slot, record)['params']))
    forced = jnp.asarray(np.random.default_rng(0).integers(-1, N_EL, record.shape), jnp.int8)

    def loss(params, x1, x2, reversible, record):
      y1, y2, slot_out, record_out = stack(reversible).apply(
          {'params': params}, x1, x2, slot, record, rngs=rngs)
      return jnp.sum(jnp.sin(y1) * jnp.cos(y2)), (slot_out, record_out)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    g_rev, (slot_out, record_out) = grad(params, x1, x2, True, forced)
    g_plain, _ = grad(params, x1, x2, False, forced)
    self.assertEqual(int(slot_out), 3)
    np.testing.assert_array_equal(np.where(forced >= 0, record_out, forced), forced)
    self.assertTrue(np.all(np.asarray(record_out) >= 0))
    for a, b in zip(jax.tree_util.tree_leaves(g_rev), jax.tree_util.tree_leaves(g_plain)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The forced choices matter: the controller's own give other gradients.
    g_free, _ = grad(params, x1, x2, True, record)
    self.assertFalse(np.allclose(g_free[1], g_rev[1], atol=1e-3))

  def test_start_record_and_advance_slot(self):
    x = jnp.zeros((B, L, D_MODEL))
    layer = StartRecord(n_records=5, n_blocks=N_BLOCKS, n_elements_in_block=N_EL)
    y, slot, record = layer.apply({}, x)
    self.assertIs(y, x)
    self.assertEqual((slot.shape, slot.dtype), ((), jnp.int32))
    self.assertEqual((record.shape, record.dtype), ((5, B, L, N_BLOCKS), jnp.int8))
    np.testing.assert_array_equal(record, -1)
    wide = StartRecord(n_records=1, n_blocks=2, n_elements_in_block=200).apply({}, x)[2]
    self.assertEqual(wide.dtype, jnp.int32)
    advanced = AdvanceSlot().apply({}, x, x, slot)
    self.assertEqual(int(advanced[2]), 1)
    self.assertEqual(int(AdvanceSlot().apply({}, *advanced, method='reverse')[2]), 0)

  def test_clear_errors(self):
    with self.assertRaisesRegex(cb.LayerError,
                                r'ReplayedHalfResidual needs layers \[x, recorded\]'):
      ReplayedHalfResidual(tl.Dense(4))
    with self.assertRaisesRegex(ValueError, 'StartRecord n_records must be a positive int'):
      StartRecord(n_records=0, n_blocks=2)


if __name__ == '__main__':
  absltest.main()
