"""`causal_blocked_attention` (the causal chunked fast path) against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from terraflax.layers import attention_core as ac


def reference(q, k, v, scale):
  """float64 causal attention: out (n, l, h, dv), logsumexp (n, h, l)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('nqhd,nkhd->nhqk', q, k) * scale
  l = q.shape[1]
  logits = np.where(np.tril(np.ones((l, l), bool)), logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  e = np.exp(logits - top)
  total = e.sum(-1, keepdims=True)
  out = np.einsum('nhqk,nkhd->nqhd', e / total, v)
  return out, (top + np.log(total))[..., 0]


class CausalBlockedTest(parameterized.TestCase):

  @parameterized.parameters((96, 8, 8), (96, 8, 2), (64, 16, 1), (40, 8, 8))
  def test_matches_float64_with_gradients(self, length, block, segments):
    ac_segments = ac.MAX_SEGMENTS
    ac.MAX_SEGMENTS = segments
    try:
      keys = jax.random.split(jax.random.key(0), 5)
      q, k = (jax.random.normal(kk, (2, length, 3, 4)) for kk in keys[:2])
      v = jax.random.normal(keys[2], (2, length, 3, 5))
      w_out = np.asarray(jax.random.normal(keys[3], (2, length, 3, 5)), np.float64)
      w_lse = np.asarray(jax.random.normal(keys[4], (2, 3, length)), np.float64)
      out, lse = ac.causal_blocked_attention(q, k, v, scale=0.5, block_len=block)
      ref_out, ref_lse = reference(q, k, v, 0.5)
      np.testing.assert_allclose(out, ref_out, atol=2e-5)
      np.testing.assert_allclose(lse, ref_lse, atol=2e-5)

      def loss(q, k, v):
        out, lse = ac.causal_blocked_attention(q, k, v, scale=0.5, block_len=block)
        return jnp.sum(out * w_out.astype(np.float32)) + jnp.sum(lse * w_lse.astype(np.float32))

      grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
      eps = 1e-6  # Central differences of the float64 reference, in a few coordinates.
      base = [np.asarray(x, np.float64) for x in (q, k, v)]
      rng = np.random.RandomState(0)
      for which in range(3):
        for _ in range(4):
          index = tuple(rng.randint(s) for s in base[which].shape)
          plus = [x.copy() for x in base]
          minus = [x.copy() for x in base]
          plus[which][index] += eps
          minus[which][index] -= eps
          value = lambda xs: sum(np.sum(a * w) for a, w in zip(reference(*xs, 0.5),
                                                                 (w_out, w_lse)))
          numeric = (value(plus) - value(minus)) / (2 * eps)
          self.assertAlmostEqual(float(grads[which][index]), numeric, delta=1e-3)
    finally:
      ac.MAX_SEGMENTS = ac_segments

  def test_dot_product_attention_uses_it_only_where_it_applies(self):
    self.assertEqual(ac._causal_blocks(256, 256, 32), 32)
    self.assertIsNone(ac._causal_blocks(256, 256, None))
    self.assertIsNone(ac._causal_blocks(256, 128, 32))  # Not self-attention.
    self.assertIsNone(ac._causal_blocks(250, 250, 32))  # Not a multiple of the chunk.


if __name__ == '__main__':
  absltest.main()
