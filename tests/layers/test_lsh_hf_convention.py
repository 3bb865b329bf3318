"""LSHSelfAttention(convention='hf') and given rotations, against a float64 numpy reference.

The reference follows Hugging Face's description of LSH attention: bucket ids
offset by round, one stable sort of all rounds together, chunks of the sorted
sequence each attending to itself and its neighbours (wrapping around the
whole sorted sequence), keys normalised to unit length, causal and self
masks by original position, rounds combined by their log-sum-exp weights.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl


def hf_lsh_reference(qk, v, rotations, *, n_buckets, chunk_len, before, after, causal):
  """qk, v (b, h, L, k) float64; rotations (h, k, n, r) -> (b, h, L, dv)."""
  b, h, big_l, _ = qk.shape
  n = rotations.shape[2]
  factors = (n_buckets,) if isinstance(n_buckets, int) else tuple(n_buckets)
  out = np.zeros(v.shape)
  for bi in range(b):
    for hi in range(h):
      rotated = np.einsum('lk,knr->nlr', qk[bi, hi], rotations[hi])
      buckets, column, stride = np.zeros((n, big_l), np.int64), 0, 1
      for f in factors:
        part = rotated[..., column:column + f // 2]
        column += f // 2
        buckets += stride * np.argmax(np.concatenate([part, -part], -1), -1)
        stride *= f
      keys = (buckets + np.arange(n)[:, None] * np.prod(factors)).reshape(-1)
      order = np.argsort(keys * big_l + np.arange(n * big_l) % big_l, kind='stable')
      pos = order % big_l  # original position of each sorted slot
      n_chunks = n * big_l // chunk_len
      slot_out = np.zeros((n * big_l, v.shape[-1]))
      slot_lse = np.zeros(n * big_l)
      for c in range(n_chunks):
        window = []
        for o in range(-before, after + 1):
          cc = (c + o) % n_chunks
          window += list(range(cc * chunk_len, (cc + 1) * chunk_len))
        kpos = pos[window]
        kvec = qk[bi, hi, kpos]
        kvec = kvec / np.linalg.norm(kvec, axis=-1, keepdims=True)
        for s in range(c * chunk_len, (c + 1) * chunk_len):
          logits = kvec @ qk[bi, hi, pos[s]]
          if causal:
            logits = np.where(kpos > pos[s], -1e9, logits)
          logits = np.where(kpos == pos[s], -1e5, logits)
          top = logits.max()
          w = np.exp(logits - top)
          # HF keeps logsumexp in float32, where values near the self logit
          # (-1e5) are rounded to 1/128: kept, as it shows in HF's outputs.
          slot_lse[s] = np.float32(top) + np.float32(np.log(w.sum()))
          slot_out[s] = (w / w.sum()) @ v[bi, hi, kpos]
      per_round = np.zeros((n, big_l, v.shape[-1]))
      lse = np.zeros((n, big_l))
      for s in range(n * big_l):
        per_round[s // big_l, pos[s]] = slot_out[s]
        lse[s // big_l, pos[s]] = slot_lse[s]
      if n > 1:  # HF: exp(lse_r - logsumexp(lse)), logsumexp rounded to float32.
        top = lse.max(0)
        total = np.float32(top) + np.float32(np.log(np.exp(lse - top).sum(0)))
        weights = np.exp(lse - total.astype(np.float64))
      else:
        weights = np.ones_like(lse)
      out[bi, hi] = np.einsum('nl,nld->ld', weights, per_round)
  return out


class HFConventionTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(n_hashes=2, n_buckets=4, before=1, after=0, causal=True),
      dict(n_hashes=3, n_buckets=(2, 4), before=1, after=1, causal=False),
      dict(n_hashes=1, n_buckets=8, before=2, after=0, causal=True),
  )
  def test_matches_numpy_reference(self, n_hashes, n_buckets, before, after, causal):
    rng = np.random.RandomState(0)
    b, length, d, h, k = 2, 16, 6, 2, 4
    x = rng.randn(b, length, d).astype(np.float32)
    params = {'qk': rng.randn(d, h, k).astype(np.float32),
              'value': rng.randn(d, h, k).astype(np.float32),
              'output': np.eye(h * k, d, dtype=np.float32).reshape(h, k, d)}
    width = sum(f // 2 for f in ((n_buckets,) if isinstance(n_buckets, int) else n_buckets))
    rotations = rng.randn(h, k, n_hashes, width).astype(np.float32)
    layer = tl.LSHSelfAttention(n_heads=h, d_qk=k, d_v=k, n_hashes=n_hashes, n_buckets=n_buckets,
                                chunk_len=4, n_chunks_before=before, n_chunks_after=after,
                                causal=causal, mode='eval', convention='hf')
    y = layer.apply({'params': params, 'lsh_rotations': {'rotations': rotations}},
                    jnp.asarray(x))
    x64 = x.astype(np.float64)
    qk = np.einsum('bld,dhk->bhlk', x64, params['qk'])
    v = np.einsum('bld,dhk->bhlk', x64, params['value'])
    o = hf_lsh_reference(qk, v, rotations.astype(np.float64), n_buckets=n_buckets,
                         chunk_len=4, before=before, after=after, causal=causal)
    want = np.einsum('bhlk,hkd->bld', o, params['output'])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)

  def test_given_rotations_per_batch_element_and_errors(self):
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(2, 8, 6), jnp.float32)
    layer = tl.LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, n_hashes=2, n_buckets=4, chunk_len=4,
                                causal=True, mode='eval')
    params = nn.meta.unbox(
        layer.init({'params': jax.random.key(0), 'hash': jax.random.key(1)}, x)['params'])
    shared = rng.randn(2, 4, 2, 2).astype(np.float32)
    y_shared = layer.apply({'params': params, 'lsh_rotations': {'rotations': shared}}, x)
    y_batched = layer.apply({'params': params, 'lsh_rotations': {
        'rotations': np.broadcast_to(shared, (2,) + shared.shape)}}, x)
    np.testing.assert_array_equal(np.asarray(y_shared), np.asarray(y_batched))
    # Given rotations replace the hash stream: no 'hash' rng is needed.
    with self.assertRaisesRegex(
        ValueError, r'given rotations \(lsh_rotations/rotations\) have shape \(2, 4, 2, 3\)'):
      layer.apply({'params': params, 'lsh_rotations': {
          'rotations': np.zeros((2, 4, 2, 3), np.float32)}}, x)
    with self.assertRaisesRegex(ValueError, 'convention must be one of'):
      tl.LSHSelfAttention(convention='trax')

  def test_short_inputs_get_plain_attention(self):
    # HF runs plain (self-masked, causal) attention when length <= chunk_len: no hashing.
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(1, 4, 6), jnp.float32)
    layer = tl.LSHSelfAttention(n_heads=1, d_qk=4, d_v=4, n_hashes=4, n_buckets=8, chunk_len=4,
                                causal=True, mode='eval', convention='hf')
    params = nn.meta.unbox(
        layer.init({'params': jax.random.key(0), 'hash': jax.random.key(1)}, x)['params'])
    y1 = layer.apply({'params': params}, x, rngs={'hash': jax.random.key(5)})
    y2 = layer.apply({'params': params}, x, rngs={'hash': jax.random.key(6)})
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    q = np.einsum('ld,dk->lk', np.asarray(x[0], np.float64), p['qk'][:, 0])
    v = np.einsum('ld,dk->lk', np.asarray(x[0], np.float64), p['value'][:, 0])
    keys = q / np.linalg.norm(q, axis=-1, keepdims=True)
    logits = q @ keys.T
    logits = np.where(np.triu(np.ones((4, 4)), 1) > 0, -1e9, logits)
    np.fill_diagonal(logits, -1e5)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    want = (w / w.sum(-1, keepdims=True)) @ v @ p['output'][0]
    np.testing.assert_allclose(np.asarray(y1[0]), want, rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
