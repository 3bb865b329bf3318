"""LocalSelfAttention against a float64 numpy reference; predict == eval; clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl
from terraflax.layers.local_attention import local_attend
from tests import contracts


def reference(q, k, v, *, chunk_len, before, after, causal, length):
  """float64 brute force of HF's rule: chunk i sees chunks i-before..i+after (mod C)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, big_l, h, _ = q.shape
  n_chunks = big_l // chunk_len
  out = np.zeros(q.shape[:3] + v.shape[-1:])
  for i in range(big_l):
    chunk = i // chunk_len
    keys = []
    for o in range(-before, after + 1):  # Window slots, repeats kept (as HF's concatenation).
      c = (chunk + o) % n_chunks
      keys += list(range(c * chunk_len, (c + 1) * chunk_len))
    keys = [j for j in keys if j < length and (not causal or j <= i)]
    logits = np.einsum('bhk,bjhk->bhj', q[:, i], k[:, keys])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[:, i] = np.einsum('bhj,bjhd->bhd', w, v[:, keys])
  return out


class LocalAttendTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(before=1, after=0, causal=True, length=16),
      dict(before=2, after=1, causal=False, length=16),
      dict(before=1, after=1, causal=True, length=13),  # padding at the end
      dict(before=3, after=0, causal=True, length=16),  # window wider than the chunks: repeats
  )
  def test_matches_numpy(self, before, after, causal, length):
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(2, 16, 2, 3).astype(np.float32) for _ in range(3))
    got = local_attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), length=length,
                       chunk_len=4, n_chunks_before=before, n_chunks_after=after, causal=causal)
    want = reference(q, k, v, chunk_len=4, before=before, after=after, causal=causal,
                     length=length)
    np.testing.assert_allclose(np.asarray(got)[:, :length], want[:, :length], rtol=1e-5,
                               atol=1e-5)


class LocalSelfAttentionTest(absltest.TestCase):

  def test_layer_projections_and_predict_equals_eval(self):
    x = jnp.asarray(np.random.RandomState(1).randn(2, 14, 8), jnp.float32)
    fields = dict(n_heads=2, d_qk=3, d_v=5, chunk_len=4, n_chunks_before=1)
    layer = tl.LocalSelfAttention(**fields, mode='eval')
    params = nn.meta.unbox(layer.init(jax.random.key(0), x)['params'])
    self.assertEqual({k: v.shape for k, v in params.items()},
                     {'query': (8, 2, 3), 'key': (8, 2, 3), 'value': (8, 2, 5),
                      'output': (2, 5, 8)})
    y = layer.apply({'params': params}, x)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(x, np.float64)
    xs = np.pad(xs, ((0, 0), (0, 2), (0, 0)))  # The layer pads 14 to a multiple of 4 inside.
    q, k, v = (np.einsum('bld,dhk->blhk', xs, p[n]) for n in ('query', 'key', 'value'))
    o = reference(q, k / np.sqrt(3), v, chunk_len=4, before=1, after=0, causal=True,
                  length=14)[:, :14]
    want = np.einsum('blhk,hkd->bld', o, p['output'])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)

    predict = tl.LocalSelfAttention(**fields, mode='predict')
    outs = contracts.predict_one_at_a_time(predict, params, x)
    np.testing.assert_allclose(outs, np.asarray(y), rtol=1e-5, atol=1e-5)

  def test_bad_fields(self):
    with self.assertRaisesRegex(ValueError, 'chunk_len must be a positive int'):
      tl.LocalSelfAttention(chunk_len=0)
    with self.assertRaisesRegex(ValueError, 'n_chunks_before must be an int >= 0'):
      tl.LocalSelfAttention(n_chunks_before=-1)
    with self.assertRaisesRegex(ValueError, 'decodes causally'):
      tl.LocalSelfAttention(mode='predict', causal=False)
    with self.assertRaisesRegex(ValueError, 'mode must be one of'):
      tl.LocalSelfAttention(mode='serve')


def packed_documents(lengths=(5, 7, 3), d=8, seed=3):
  """Float documents (l_i, d) of different lengths for the packing contract."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for n in lengths]


class PackedLocalAttentionTest(parameterized.TestCase):

  @parameterized.parameters(((6, 4), 12, 1), ((5, 5, 5), 16, 2))
  def test_packed_equals_unpacked(self, lengths, row, n_chunks_before):
    # The windows stay where the row puts them, so a document sees what it sees alone when
    # it starts on a chunk boundary (6, 4), or when it is no longer than the shortest causal
    # reach chunk_len * n_chunks_before + 1 = 5. Alone, each has at least a window's chunks
    # (fewer would repeat a chunk in its window).
    contracts.assert_layer_packed_equals_unpacked(
        lambda **kw: tl.LocalSelfAttention(n_heads=2, d_qk=4, d_v=4, chunk_len=2,
                                           n_chunks_before=n_chunks_before, **kw),
        packed_documents(lengths), row)


if __name__ == '__main__':
  absltest.main()
