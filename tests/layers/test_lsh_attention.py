"""LSH self-attention against float64 numpy brute force.

The references enumerate, for every query, the (round, key) pairs it meets in
its chunk windows after sorting by (bucket, position), and take one softmax
over the distinct keys met; they share no code with the layer.
"""

import math
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl
from tests import contracts
from terraflax.layers import lsh_core, lsh_hashing
from terraflax.layers.lsh_attention import _hash_heads, lsh_attend, piece_len

KEY = jax.random.key(0)


def f64(x):
  return np.asarray(x, np.float64)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def attend_to_sets(q, v, sets):
  """q (l, k), v (l, dv), sets[i]: keys i may see (self included or not): (l, dv).

  Self is dropped from each set unless it is the only member; keys are the
  unit-length queries.
  """
  out = np.zeros((q.shape[0], v.shape[1]))
  k = unit(q)
  for i, keys in enumerate(sets):
    others = sorted(j for j in keys if j != i)
    if not others:
      out[i] = v[i]
      continue
    logits = k[others] @ q[i]
    p = np.exp(logits - logits.max())
    out[i] = (p / p.sum()) @ v[others]
  return out


def lsh_sets(buckets, length, chunk_len, before, after, causal):
  """buckets (n, length) -> for each query the set of keys met in any round.

  Positions are padded to a multiple of chunk_len with a bucket above all
  real ones; windows wrap around within a round.
  """
  big_l = -(-length // chunk_len) * chunk_len
  n_chunks = big_l // chunk_len
  sets = [set() for _ in range(length)]
  for round_buckets in buckets:
    key = lambda p: (round_buckets[p] if p < length else math.inf, p)  # noqa: E731
    order = sorted(range(big_l), key=key)
    for s, i in enumerate(order):
      if i >= length:
        continue
      g = s // chunk_len
      for o in range(-before, after + 1):
        chunk = (g + o) % n_chunks
        for j in order[chunk * chunk_len:(chunk + 1) * chunk_len]:
          if j < length and not (causal and j > i):
            sets[i].add(j)
  return sets


def reference_core(q, v, buckets, length, chunk_len, before, after, causal):
  """q (b, l, h, k), v (b, l, h, dv), buckets (b, h, n, l) -> (b, l, h, dv), float64."""
  q, v, buckets = f64(q), f64(v), np.asarray(buckets)
  out = np.zeros((q.shape[0], length, q.shape[2], v.shape[-1]))
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      sets = lsh_sets(buckets[b, h], length, chunk_len, before, after, causal)
      out[b, :, h] = attend_to_sets(q[b, :length, h], v[b, :length, h], sets)
  return out


def dense_set_loss(buckets, length, chunk_len, before, after, causal, cotangent):
  """(q, v) -> sum(out * cotangent), out a dense softmax over each query's LSH set (b = 1).

  Differentiable with JAX: the reference for hand-written backward passes.
  """
  h = buckets.shape[1]
  allowed = np.zeros((1, h, length, length), bool)
  for head in range(h):
    sets = lsh_sets(np.asarray(buckets[0, head, :, :length]), length, chunk_len, before, after,
                    causal)
    for query, keys in enumerate(sets):
      allowed[0, head, query, sorted(keys - {query})] = True
  alone = ~allowed.any(-1).transpose(0, 2, 1)[..., None]

  def dense(q, v):
    q, v = q[:, :length], v[:, :length]
    k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    logits = jnp.where(allowed, jnp.einsum('bihk,bjhk->bhij', q, k), -1e30)
    out = jnp.einsum('bhij,bjhd->bihd', jax.nn.softmax(logits, axis=-1), v)
    return jnp.sum(jnp.where(alone, v, out) * cotangent)

  return dense


def project(params, x):
  """q, v of a layer in float64: (b, l, h, k), (b, l, h, dv)."""
  x = f64(x)
  return (np.einsum('bld,dhk->blhk', x, f64(params['qk'])),
          np.einsum('bld,dhk->blhk', x, f64(params['value'])))


def output(params, o):
  return np.einsum('blhk,hkd->bld', o, f64(params['output']))


def full_sets(length, causal):
  return [set(range(i + 1)) if causal else set(range(length)) for i in range(length)]


def reference_full(params, x, causal):
  """Full shared-QK attention with the self-mask rule, float64: (b, l, d)."""
  q, v = project(params, x)
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      out[b, :, h] = attend_to_sets(q[b, :, h], v[b, :, h], full_sets(q.shape[1], causal))
  return output(params, out)


def make_layer(**kw):
  args = dict(n_heads=2, d_qk=8, d_v=8, n_hashes=2, n_buckets=4, chunk_len=4,
              n_chunks_before=1, n_chunks_after=0, causal=False, mode='eval')
  args.update(kw)
  return tl.LSHSelfAttention(**args)


def make_params(d_model=12, n_heads=2, d_qk=8, d_v=8, seed=0):
  """Random layer parameters, made without compiling the layer's init."""
  rng = np.random.RandomState(seed)
  return {'qk': jnp.asarray(rng.randn(d_model, n_heads, d_qk) / np.sqrt(d_model), jnp.float32),
          'value': jnp.asarray(rng.randn(d_model, n_heads, d_v) / np.sqrt(d_model), jnp.float32),
          'output': jnp.asarray(rng.randn(n_heads, d_v, d_model) / np.sqrt(d_v), jnp.float32)}


def run_layer(layer, params, x, hash_seeds=(1,)):
  """[(y, sown buckets or None)] of jitted eval/train calls, one per hash seed."""
  apply = jax.jit(lambda params, x, rng: layer.apply(
      {'params': params}, x, rngs={'hash': rng}, mutable=['intermediates']))
  results = []
  for seed in hash_seeds:
    y, state = apply(params, x, jax.random.key(seed))
    results.append((y, state['intermediates']['buckets'][0] if layer.sow_weights else None))
  return results if len(hash_seeds) > 1 else results[0]


def bucket_ids(q, rotations, n_buckets):
  """numpy hash: q (l, k), rotations (k, n, r) -> (n, l)."""
  rotated = np.einsum('lk,knr->nlr', f64(q), f64(rotations))
  factors = (n_buckets,) if isinstance(n_buckets, int) else n_buckets
  ids, column, stride = np.zeros(rotated.shape[:2], np.int64), 0, 1
  for f in factors:
    if f > 1:
      part = rotated[..., column:column + f // 2]
      column += f // 2
      ids += stride * np.argmax(np.concatenate([part, -part], -1), -1)
    stride *= f
  return ids


class HashingTest(parameterized.TestCase):

  @parameterized.parameters((8,), ((4, 6),))
  def test_hash_matches_numpy_argmax(self, n_buckets):
    vecs = jax.random.normal(KEY, (2, 3, 20, 5))
    rotations = lsh_hashing.draw_rotations(jax.random.key(1), (2, 3), 5, 4, n_buckets)
    got = np.asarray(jax.jit(lsh_hashing.hash_vectors, static_argnums=2)(
        vecs, rotations, n_buckets))
    for b in range(2):
      for h in range(3):
        np.testing.assert_array_equal(got[b, h], bucket_ids(vecs[b, h], rotations[b, h], n_buckets))
    self.assertLess(got.max(), math.prod(np.atleast_1d(n_buckets)))
    self.assertGreater(len(np.unique(got)), 4)

  def test_layer_hash_of_all_heads_at_once(self):
    q = jax.random.normal(KEY, (2, 20, 3, 5))
    rotations = lsh_hashing.draw_rotations(jax.random.key(1), (2, 3), 5, 2, (4, 6))
    got = np.asarray(jax.jit(_hash_heads, static_argnums=2)(q, rotations, (4, 6)))
    for b in range(2):
      for h in range(3):
        np.testing.assert_array_equal(got[b, h], bucket_ids(q[b, :, h], rotations[b, h], (4, 6)))

  @parameterized.parameters((4, 24), (7, 24), (1, 24), (24, 24))
  def test_hash_in_pieces_equals_numpy_argmax(self, max_piece_len, length):
    # Pieces of 4 (6 of them), of 6 (the largest divisor <= 7), of 1, and one whole piece.
    q = jax.random.normal(KEY, (2, length, 3, 5))
    rotations = lsh_hashing.draw_rotations(jax.random.key(1), (2, 3), 5, 2, (4, 6))
    got = np.asarray(jax.jit(_hash_heads, static_argnums=(2, 3))(q, rotations, (4, 6),
                                                                 max_piece_len))
    for b in range(2):
      for h in range(3):
        np.testing.assert_array_equal(got[b, h], bucket_ids(q[b, :, h], rotations[b, h], (4, 6)))

  def test_piece_len_divides_the_length(self):
    self.assertEqual(piece_len(24, 7), 6)
    self.assertEqual(piece_len(24, 100), 24)
    self.assertEqual(piece_len(13, 4), 1)  # a prime: one position at a time
    self.assertEqual(piece_len(1 << 20, 8192), 8192)

  def test_default_n_buckets_follows_trax_rule(self):
    # 2 * length // chunk_len, factorised above 128 into (2^ceil(log2 sqrt n), ...).
    self.assertEqual(lsh_hashing.default_n_buckets(1024, 64), 32)
    self.assertEqual(lsh_hashing.default_n_buckets(100, 128), 2)
    self.assertEqual(lsh_hashing.default_n_buckets(4096, 64), 128)
    self.assertEqual(lsh_hashing.default_n_buckets(8192, 64), (16, 16))
    self.assertEqual(lsh_hashing.default_n_buckets(16384, 64), (32, 16))
    self.assertEqual(lsh_hashing.default_n_buckets(65536, 128), (32, 32))
    self.assertEqual(lsh_hashing.default_n_buckets(65536, 64), (64, 32))
    self.assertEqual(lsh_hashing.total_buckets((2, 1)), 2)
    self.assertEqual(lsh_hashing.rotation_width((4, 6)), 5)

  @parameterized.parameters((3,), (0,), ((2, 2, 2),), ('x',), ((4, 5),))
  def test_bad_n_buckets(self, n_buckets):
    with self.assertRaisesRegex(ValueError, 'n_buckets'):
      make_layer(n_buckets=n_buckets)


def random_core_inputs(seed, length, n_hashes, b=2, h=2, c=4, d_k=5, d_v=3):
  big_l = -(-length // c) * c
  kq, kv, kb = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, big_l, h, d_k)) * 2
  v = jax.random.normal(kv, (b, big_l, h, d_v))
  buckets = jax.random.randint(kb, (b, h, n_hashes, big_l), 0, 3)
  return q, v, jnp.where(jnp.arange(big_l) < length, buckets, 3)  # Padding: bucket 3.


class CoreTest(parameterized.TestCase):

  @parameterized.parameters(
      # causal, n_hashes, (n_chunks_before, n_chunks_after), length
      (False, 1, (1, 0), 16), (True, 1, (0, 0), 13), (False, 3, (1, 1), 13),
      (True, 3, (2, 1), 13))
  def test_matches_brute_force(self, causal, n_hashes, window, length):
    """Sorting, chunk windows, self-mask, causal mask, padding and repeated meetings."""
    before, after = window
    q, v, buckets = random_core_inputs(length * 7 + n_hashes, length, n_hashes)
    got = jax.jit(lambda q, v, buckets: lsh_attend(  # Both sorts: packed keys or not.
        q, v, buckets, length=length, chunk_len=4, n_chunks_before=before,
        n_chunks_after=after, causal=causal, n_bucket_ids=4 if causal else None))(q, v, buckets)
    expected = reference_core(q, v, buckets[..., :length], length, 4, before, after, causal)
    np.testing.assert_allclose(got[:, :length], expected, rtol=2e-5, atol=2e-5)

  @parameterized.parameters((False, 1, 16), (True, 3, 13))
  def test_gradient_matches_dense_autodiff(self, causal, n_hashes, length):
    """The hand-written backward pass equals autodiff of a dense masked softmax."""
    q, v, buckets = random_core_inputs(n_hashes, length, n_hashes, b=1)
    cotangent = jax.random.normal(jax.random.key(9), (1, length, 2, 3))
    dense = dense_set_loss(buckets, length, 4, 1, 0, causal, cotangent)

    def lsh(q, v):
      out = lsh_attend(q, v, buckets, length=length, chunk_len=4, causal=causal)
      return jnp.sum(out[:, :length] * cotangent)

    expected = jax.jit(jax.grad(dense, argnums=(0, 1)))(q, v)
    got = jax.jit(jax.grad(lsh, argnums=(0, 1)))(q, v)
    for g, e in zip(got, expected):
      np.testing.assert_allclose(g[:, :length], e[:, :length], rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(g[:, length:], 0.0)

  def test_dropout_gradient_matches_finite_differences(self):
    """In float64, the backward pass with dropout agrees with central differences."""
    with jax.enable_x64(True):
      q = jax.random.normal(KEY, (1, 16, 2, 4), jnp.float64)
      v = jax.random.normal(jax.random.key(1), (1, 16, 2, 4), jnp.float64)
      buckets = jax.random.randint(KEY, (1, 2, 2, 16), 0, 3)
      f = jax.jit(lambda q, v, rate=0.3: jnp.sum(jnp.sin(lsh_attend(  # noqa: E731
          q, v, buckets, length=16, chunk_len=4, causal=True, dropout_rate=rate,
          dropout_rng=jax.random.key(7)))), static_argnums=2)
      grads = jax.jit(jax.grad(f, argnums=(0, 1)))(q, v)
      for i, key in enumerate((2, 3)):
        direction = jax.random.normal(jax.random.key(key), q.shape, jnp.float64)
        step = [jnp.zeros_like(q), jnp.zeros_like(v)]
        step[i] = 1e-5 * direction
        numeric = (f(q + step[0], v + step[1]) - f(q - step[0], v - step[1])) / 2e-5
        np.testing.assert_allclose(jnp.sum(grads[i] * direction), numeric, rtol=1e-7)
      self.assertNotAlmostEqual(float(f(q, v)), float(f(q, v, 0.0)), places=3)

  @parameterized.parameters(1, 2, 3)
  def test_several_blocks_per_round(self, block):
    """Loop steps of `block` chunks (as at long lengths): values and gradients unchanged.

    Windows reach 2 chunks back and 1 ahead, so they cross block boundaries
    and wrap around the round; the gradient is compared with one block per
    round (checked against dense autodiff above).
    """
    length, c = 22, 4  # 6 chunks, the last padded.
    q, v, buckets = random_core_inputs(11, length, 3, b=1)
    cotangent = jax.random.normal(jax.random.key(4), (1, 24, 2, 3))

    def loss(q, v):
      out = lsh_attend(q, v, buckets, length=length, chunk_len=c, n_chunks_before=2,
                       n_chunks_after=1, causal=True)
      return jnp.sum(out[:, :length] * cotangent[:, :length]), out

    one_block = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(q, v)
    logits_per_chunk = c * c * 4
    with mock.patch.object(lsh_core, 'BLOCK_LOGITS', block * logits_per_chunk):
      self.assertEqual(lsh_core._block_chunks(6, c, 4), block)
      grads, out = jax.jit(jax.grad(lambda q, v: loss(q, v), argnums=(0, 1), has_aux=True))(q, v)
    expected = reference_core(q, v, buckets[..., :length], length, c, 2, 1, True)
    np.testing.assert_allclose(out[:, :length], expected, rtol=2e-5, atol=2e-5)
    for g, e in zip(grads, one_block[0]):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)

  def test_padding_content_is_never_seen(self):
    q, v, buckets = random_core_inputs(3, 10, 2, b=1)  # 10 real positions of 12.
    noise = jax.random.normal(jax.random.key(2), (1, 2, 2, 1)) * 100
    f = jax.jit(lambda q, v: lsh_attend(q, v, buckets, length=10, chunk_len=4, causal=False))
    np.testing.assert_array_equal(f(q, v)[:, :10],
                                  f(q.at[:, 10:].add(noise), v.at[:, 10:].add(noise))[:, :10])


class LayerTest(parameterized.TestCase):

  @parameterized.parameters(
      # causal, n_hashes, n_chunks_before, length
      (False, 1, 0, 16), (True, 3, 1, 10), (False, 2, 1, 10))
  def test_one_bucket_one_chunk_is_full_attention(self, causal, n_hashes, before, length):
    layer = make_layer(n_buckets=1, chunk_len=16, n_hashes=n_hashes, n_chunks_before=before,
                       causal=causal)
    x, params = jax.random.normal(KEY, (2, length, 12)), make_params()
    y, _ = run_layer(layer, params, x)
    np.testing.assert_allclose(y, reference_full(params, x, causal), rtol=1e-4, atol=1e-5)

  @parameterized.parameters((False, 4, 16), (True, (2, 4), 10))
  def test_layer_matches_brute_force(self, causal, n_buckets, length):
    """Hashing, padding and the output projection, against the brute-force sets."""
    layer = make_layer(n_buckets=n_buckets, n_hashes=3, causal=causal, sow_weights=True)
    x, params = jax.random.normal(KEY, (2, length, 12)), make_params()
    (y, buckets), (other_y, other_buckets) = run_layer(layer, params, x, hash_seeds=(1, 2))
    self.assertEqual(buckets.shape, (2, 2, 3, length))
    self.assertGreater(len(np.unique(np.asarray(buckets))), 1)
    q, v = project(params, x)
    expected = output(params, reference_core(q, v, buckets, length, 4, 1, 0, causal))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # Another `hash` key draws other rotations.
    self.assertFalse(np.array_equal(buckets, other_buckets))
    self.assertFalse(np.allclose(y, other_y))

  def test_clustered_queries_close_to_full_attention(self):
    """More rounds -> closer to full attention when queries form tight clusters."""
    d, n_clusters, length = 16, 8, 128
    centres = np.linalg.qr(np.random.RandomState(0).randn(d, d))[0][:n_clusters] * 4
    labels = np.random.RandomState(1).randint(0, n_clusters, length)
    x = centres[labels] + 0.05 * np.random.RandomState(2).randn(length, d)
    x = jnp.asarray(x[None], jnp.float32)
    params = {'qk': jnp.eye(d)[:, None], 'value': jnp.eye(d)[:, None], 'output': jnp.eye(d)[None]}
    full = reference_full(params, x, causal=False)
    errors = {}
    for n_hashes in (1, 2, 4, 8):
      layer = make_layer(n_heads=1, d_qk=d, d_v=d, n_hashes=n_hashes, n_buckets=8,
                         chunk_len=16)
      apply = jax.jit(jax.vmap(lambda rng: layer.apply(  # noqa: B023
          {'params': params}, x, rngs={'hash': rng})))
      y = apply(jax.random.split(jax.random.key(0), 4))
      errors[n_hashes] = float(np.mean(
          [np.linalg.norm(f64(y_s) - full) / np.linalg.norm(full) for y_s in y]))
    print('relative error vs full attention by n_hashes:', errors)
    self.assertLess(errors[8], 0.06)
    self.assertLess(errors[8], errors[2])
    self.assertLess(errors[2], errors[1])

  def test_causal_output_has_zero_gradient_from_future_inputs(self):
    layer = make_layer(n_hashes=3, n_buckets=8, chunk_len=2, causal=True, d_qk=4, d_v=4)
    x, params = jax.random.normal(KEY, (1, 11, 6)), make_params(6, 2, 4, 4)
    f = lambda x: layer.apply(  # noqa: E731
        {'params': params}, x, rngs={'hash': jax.random.key(3)})[0]
    jac = np.asarray(jax.jit(jax.jacrev(f))(x)[:, :, 0])  # (l_out, d, l_in, d)
    for i in range(11):
      self.assertTrue(np.all(jac[i, :, i + 1:] == 0.0), f'output {i} sees the future')
    # The test is not vacuous: outputs do depend on the past.
    self.assertGreater(np.mean([np.any(jac[i, :, :i] != 0.0) for i in range(1, 11)]), 0.5)

  def test_padding_invariance(self):
    """Length 10 padded to 12 inside equals the core on 12 positions whose last two are noise."""
    layer = make_layer(n_buckets=4, n_hashes=2, causal=True, sow_weights=True)
    x, params = jax.random.normal(KEY, (1, 10, 12)), make_params()
    y, buckets = run_layer(layer, params, x)
    q, v = project(params, x)
    noise = np.random.RandomState(0).randn(1, 2, 2, 8) * 10
    q12, v12 = np.concatenate([q, noise], 1), np.concatenate([v, noise], 1)
    buckets12 = np.concatenate([buckets, np.full((1, 2, 2, 2), 4)], -1)
    o12 = jax.jit(lambda q, v, buckets: lsh_attend(
        q, v, buckets, length=10, chunk_len=4, causal=True))(
            jnp.asarray(q12, jnp.float32), jnp.asarray(v12, jnp.float32), jnp.asarray(buckets12))
    np.testing.assert_allclose(y, output(params, f64(o12[:, :10])), rtol=1e-4, atol=1e-5)

  def test_train_mode_dropout(self):
    x, params = jax.random.normal(KEY, (1, 16, 12)), {'params': make_params()}
    train = make_layer(mode='train', dropout=0.5)
    run = jax.jit(lambda seed: train.apply(
        params, x, rngs={'hash': KEY, 'dropout': jax.random.key(seed)}))
    np.testing.assert_array_equal(run(1), run(1))
    self.assertFalse(np.allclose(run(1), run(2)))

  def test_init_bfloat16_and_grad(self):
    layer = make_layer(dtype=jnp.bfloat16)
    x = jax.random.normal(KEY, (2, 16, 12))
    params = nn.meta.unbox(jax.eval_shape(layer.init, {'params': KEY, 'hash': KEY}, x)['params'])
    self.assertEqual({k: (p.shape, p.dtype) for k, p in params.items()},
                     {'qk': ((12, 2, 8), jnp.float32), 'value': ((12, 2, 8), jnp.float32),
                      'output': ((2, 8, 12), jnp.float32)})
    y = jax.eval_shape(lambda: layer.apply({'params': make_params()}, x, rngs={'hash': KEY}))
    self.assertEqual(y.dtype, jnp.bfloat16)
    loss = lambda p: jnp.sum(  # noqa: E731
        make_layer().apply({'params': p}, x, rngs={'hash': KEY}) ** 2)
    grads = jax.jit(jax.grad(loss))(make_params())
    for g in jax.tree_util.tree_leaves(grads):
      self.assertTrue(np.all(np.isfinite(g)) and np.any(g != 0))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'mode must be one of'):
      make_layer(mode='decode')
    with self.assertRaisesRegex(ValueError, 'causal=True'):
      make_layer(mode='predict')
    with self.assertRaisesRegex(ValueError, 'predict_mem_len=4 must hold'):
      make_layer(mode='predict', causal=True, predict_mem_len=4)
    with self.assertRaisesRegex(ValueError, 'chunk_len must be a positive int'):
      make_layer(chunk_len=0)
    with self.assertRaisesRegex(ValueError, 'dropout'):
      make_layer(dropout=1.0)
    with self.assertRaises(TypeError):
      tl.LSHSelfAttention(2)  # pylint: disable=too-many-function-args
    x = jnp.ones((1, 8, 12))
    with self.assertRaisesRegex(ValueError, "'hash' rng"):
      jax.eval_shape(lambda: make_layer().apply({'params': make_params()}, x))
    with self.assertRaisesRegex(ValueError, r'\(batch, length, d_model\)'):
      jax.eval_shape(lambda: make_layer().apply({'params': make_params()}, x[0]))


def decode(layer, params, x, step=1, seed=5):
  """Predict mode over x, `step` positions per call, in one jitted program.

  Returns the outputs (b, l, d), the final cache and the cache made by init.
  """

  @jax.jit
  def run(params, x):
    cache = first = layer.init({'params': KEY, 'hash': jax.random.key(seed)}, x[:, :1])['cache']

    def one_call(cache, x_t):
      y, state = layer.apply({'params': params, 'cache': cache}, x_t, mutable=['cache'])
      return state['cache'], y

    b, length, d = x.shape
    steps = jnp.moveaxis(x.reshape(b, length // step, step, d), 1, 0)
    cache, ys = jax.lax.scan(one_call, cache, steps)
    return jnp.moveaxis(ys, 0, 1).reshape(b, length, -1), cache, first

  return run(params, x)


class PredictTest(parameterized.TestCase):

  def test_one_bucket_decoding_equals_eval(self):
    """One bucket and windows reaching the start: eval is full causal attention, as is predict."""
    kw = dict(n_buckets=1, n_hashes=3, chunk_len=4, n_chunks_before=2, causal=True)
    x, params = jax.random.normal(KEY, (2, 12, 12)), make_params()
    y_eval, _ = run_layer(make_layer(**kw), params, x)
    y_pred, _, _ = decode(make_layer(mode='predict', predict_mem_len=12, **kw), params, x)
    np.testing.assert_allclose(y_pred, y_eval, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y_pred, reference_full(params, x, True), rtol=1e-4, atol=1e-5)

  def test_prompt_in_one_call_equals_token_by_token(self):
    layer = make_layer(mode='predict', causal=True, n_buckets=8, predict_mem_len=8)
    x, params = jax.random.normal(KEY, (2, 12, 12)), make_params()
    one, cache_one, _ = decode(layer, params, x)
    four, cache_four, _ = decode(layer, params, x, step=4)
    np.testing.assert_allclose(one, four, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(cache_one), jax.tree_util.tree_leaves(cache_four)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  @parameterized.parameters((8, 2, 8), ((2, 4), 3, 12))
  def test_decoding_matches_bucket_rule(self, n_buckets, n_hashes, mem):
    """Each token sees remembered keys sharing a bucket in any round, plus recent ones."""
    c, before, length = 2, 1, 20
    layer = make_layer(mode='predict', causal=True, n_buckets=n_buckets, n_hashes=n_hashes,
                       chunk_len=c, n_chunks_before=before, predict_mem_len=mem)
    x, params = jax.random.normal(KEY, (2, length, 12)), make_params()
    y, cache, first = decode(layer, params, x)
    self.assertEqual(int(first['position']), 0)  # Init makes an empty memory ...
    np.testing.assert_array_equal(first['slot_positions'], -1)
    np.testing.assert_array_equal(first['rotations'], cache['rotations'])  # ... and rotations.
    self.assertEqual(cache['keys'].shape, (2, 2, mem, 8))
    self.assertEqual(int(cache['position']), length)
    q, v = project(params, x)
    expected = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(2):
      for h in range(2):
        ids = bucket_ids(q[b, :, h], cache['rotations'][b, h], n_buckets)  # Drawn at init, kept.
        sets = []
        for i in range(length):
          memory = range(max(0, i - mem + 1), i + 1)
          sets.append({j for j in memory
                       if i - j < c * (before + 1) or np.any(ids[:, j] == ids[:, i])})
        expected[b, :, h] = attend_to_sets(q[b, :, h], v[b, :, h], sets)
    np.testing.assert_allclose(y, output(params, expected), rtol=1e-4, atol=1e-5)


class PackedLSHTest(parameterized.TestCase):
  """Packed == unpacked for LSH attention (XLA path): documents never see each other."""

  def documents(self, lengths=(5, 7, 3), d=8):
    rng = np.random.default_rng(3)
    return [jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for n in lengths]

  @parameterized.parameters(True, False)
  def test_one_bucket(self, causal):
    contracts.assert_layer_packed_equals_unpacked(
        lambda **kw: tl.LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, n_buckets=1, chunk_len=16,
                                         n_chunks_before=0, causal=causal, kernel='xla', **kw),
        self.documents(), 16, rngs={'hash': jax.random.key(2)})

  def test_given_rotations_several_rounds(self):
    # Given rotations (the lsh_rotations collection) hash every token as it hashes alone;
    # one chunk holds every bucket, so each round meets the same keys packed or alone.
    rotations = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 3, 2)), jnp.float32)
    contracts.assert_layer_packed_equals_unpacked(
        lambda **kw: tl.LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, n_hashes=3, n_buckets=4,
                                         chunk_len=16, n_chunks_before=0, causal=True,
                                         kernel='xla', **kw),
        self.documents(), 16, collections={'lsh_rotations': {'rotations': rotations}})

  def test_alone_only_when_alone_per_document(self):
    # A one-token document attends to itself (its output is its own value), even though
    # other documents' keys share its chunk.
    layer = tl.LSHSelfAttention(n_heads=1, d_qk=4, d_v=4, n_buckets=1, chunk_len=8,
                                n_chunks_before=0, causal=True, kernel='xla', packed=True)
    x, seg, _ = contracts.pack_documents(self.documents((3, 1, 4)), 8)
    variables = layer.init({'params': jax.random.key(0), 'hash': jax.random.key(1)}, x, seg)
    alone = tl.LSHSelfAttention(n_heads=1, d_qk=4, d_v=4, n_buckets=1, chunk_len=8,
                                n_chunks_before=0, causal=True, kernel='xla')
    y, _ = layer.apply(variables, x, seg, rngs={'hash': jax.random.key(1)})
    y1 = alone.apply(variables, x[:, 3:4], rngs={'hash': jax.random.key(1)})
    np.testing.assert_allclose(y[:, 3:4], y1, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
