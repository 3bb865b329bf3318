"""LSH self-attention against float64 numpy brute force.

The references enumerate, for every query, the (round, key) pairs it meets in
its chunk windows after sorting by (bucket, position), and take one softmax
over the distinct keys met; they share no code with the layer.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl
from terraflax.layers import lsh_hashing
from terraflax.layers.lsh_attention import lsh_attend

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


def run_layer(layer, x, hash_seed=1):
  variables = layer.init({'params': KEY, 'hash': KEY}, x)
  y, state = layer.apply(variables, x, rngs={'hash': jax.random.key(hash_seed)},
                         mutable=['intermediates'])
  buckets = state['intermediates']['buckets'][0] if layer.sow_weights else None
  return variables['params'], y, buckets


class HashingTest(parameterized.TestCase):

  @parameterized.parameters((8,), ((4, 6),), ((2, 1),), (1,))
  def test_hash_matches_numpy_argmax(self, n_buckets):
    vecs = jax.random.normal(KEY, (2, 3, 20, 5))
    rotations = lsh_hashing.draw_rotations(jax.random.key(1), (2, 3), 5, 4, n_buckets)
    got = np.asarray(lsh_hashing.hash_vectors(vecs, rotations, n_buckets))
    rotated = np.einsum('bhlk,bhknr->bhnlr', f64(vecs), f64(rotations))
    factors = (n_buckets,) if isinstance(n_buckets, int) else n_buckets
    expected, column, stride = np.zeros(got.shape, np.int64), 0, 1
    for f in factors:
      if f > 1:
        part = rotated[..., column:column + f // 2]
        column += f // 2
        expected += stride * np.argmax(np.concatenate([part, -part], -1), -1)
      stride *= f
    np.testing.assert_array_equal(got, expected)
    self.assertLess(got.max(), math.prod(factors))

  def test_default_n_buckets_follows_trax_rule(self):
    # 2 * length // chunk_len, factorised above 128 into (2^ceil(log2 sqrt n), ...).
    self.assertEqual(lsh_hashing.default_n_buckets(1024, 64), 32)
    self.assertEqual(lsh_hashing.default_n_buckets(100, 128), 2)
    self.assertEqual(lsh_hashing.default_n_buckets(4096, 64), 128)
    self.assertEqual(lsh_hashing.default_n_buckets(8192, 64), (16, 16))
    self.assertEqual(lsh_hashing.default_n_buckets(16384, 64), (32, 16))
    self.assertEqual(lsh_hashing.default_n_buckets(65536, 128), (32, 32))
    self.assertEqual(lsh_hashing.default_n_buckets(65536, 64), (64, 32))

  @parameterized.parameters((3,), (0,), ((2, 2, 2),), ('x',), ((4, 5),))
  def test_bad_n_buckets(self, n_buckets):
    with self.assertRaisesRegex(ValueError, 'n_buckets'):
      make_layer(n_buckets=n_buckets)


class CoreTest(parameterized.TestCase):

  @parameterized.product(
      causal=(False, True), n_hashes=(1, 3), window=((1, 0), (0, 0), (1, 1), (2, 0)),
      length=(16, 13))
  def test_matches_brute_force(self, causal, n_hashes, window, length):
    """Sorting, chunk windows, self-mask, causal mask, padding and duplicate meetings."""
    before, after = window
    b, h, k, c = 2, 2, 5, 4
    big_l = -(-length // c) * c
    kq, kv, kb = jax.random.split(jax.random.key(length * 7 + n_hashes), 3)
    q = jax.random.normal(kq, (b, big_l, h, k)) * 2
    v = jax.random.normal(kv, (b, big_l, h, 3))
    buckets = jax.random.randint(kb, (b, h, n_hashes, big_l), 0, 3)
    buckets = jnp.where(jnp.arange(big_l) < length, buckets, 3)
    got = lsh_attend(q, v, buckets, length=length, chunk_len=c, n_chunks_before=before,
                     n_chunks_after=after, causal=causal)
    expected = reference_core(q, v, buckets[..., :length], length, c, before, after, causal)
    np.testing.assert_allclose(got[:, :length], expected, rtol=2e-5, atol=2e-5)

  @parameterized.parameters((False, 1, 16), (True, 3, 13), (True, 2, 16))
  def test_gradient_matches_dense_autodiff(self, causal, n_hashes, length):
    """The hand-written backward pass equals autodiff of a dense masked softmax."""
    b, h, c = 1, 2, 4
    big_l = -(-length // c) * c
    kq, kv, kb, kg = jax.random.split(jax.random.key(n_hashes), 4)
    q = jax.random.normal(kq, (b, big_l, h, 5))
    v = jax.random.normal(kv, (b, big_l, h, 3))
    buckets = jax.random.randint(kb, (b, h, n_hashes, big_l), 0, 3)
    buckets = jnp.where(jnp.arange(big_l) < length, buckets, 3)
    cotangent = jax.random.normal(kg, (b, length, h, 3))
    allowed = np.zeros((b, h, length, length), bool)
    for i in range(b):
      for j in range(h):
        sets = lsh_sets(np.asarray(buckets[i, j, :, :length]), length, c, 1, 0, causal)
        for query, keys in enumerate(sets):
          allowed[i, j, query, sorted(keys - {query})] = True

    def dense(q, v):
      q, v = q[:, :length], v[:, :length]
      k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
      logits = jnp.where(allowed, jnp.einsum('bihk,bjhk->bhij', q, k), -1e30)
      out = jnp.einsum('bhij,bjhd->bihd', jax.nn.softmax(logits, axis=-1), v)
      alone = ~allowed.any(-1).transpose(0, 2, 1)[..., None]
      return jnp.sum(jnp.where(alone, v, out) * cotangent)

    def lsh(q, v):
      out = lsh_attend(q, v, buckets, length=length, chunk_len=c, causal=causal)
      return jnp.sum(out[:, :length] * cotangent)

    expected = jax.grad(dense, argnums=(0, 1))(q, v)
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
      f = lambda q, v, rate=0.3: jnp.sum(jnp.sin(lsh_attend(  # noqa: E731
          q, v, buckets, length=16, chunk_len=4, causal=True, dropout_rate=rate,
          dropout_rng=jax.random.key(7))))
      grads = jax.grad(f, argnums=(0, 1))(q, v)
      for i, key in enumerate((2, 3)):
        direction = jax.random.normal(jax.random.key(key), q.shape, jnp.float64)
        step = [jnp.zeros_like(q), jnp.zeros_like(v)]
        step[i] = 1e-5 * direction
        numeric = (f(q + step[0], v + step[1]) - f(q - step[0], v - step[1])) / 2e-5
        np.testing.assert_allclose(jnp.sum(grads[i] * direction), numeric, rtol=1e-7)
      self.assertNotAlmostEqual(float(f(q, v)), float(f(q, v, 0.0)))

  def test_padding_content_is_never_seen(self):
    q = jax.random.normal(KEY, (1, 12, 2, 4))
    v = jax.random.normal(jax.random.key(1), (1, 12, 2, 4))
    buckets = jnp.concatenate(
        [jax.random.randint(KEY, (1, 2, 2, 10), 0, 4), jnp.full((1, 2, 2, 2), 4)], -1)
    noise = jax.random.normal(jax.random.key(2), (1, 2, 2, 4)) * 100
    other_q = q.at[:, 10:].set(noise)
    other_v = v.at[:, 10:].set(noise)
    for causal in (False, True):
      a = lsh_attend(q, v, buckets, length=10, chunk_len=4, causal=causal)
      b = lsh_attend(other_q, other_v, buckets, length=10, chunk_len=4, causal=causal)
      np.testing.assert_array_equal(a[:, :10], b[:, :10])


class LayerTest(parameterized.TestCase):

  @parameterized.product(causal=(False, True), n_hashes=(1, 3), before=(0, 1),
                         length=(10, 16))
  def test_one_bucket_one_chunk_is_full_attention(self, causal, n_hashes, before, length):
    layer = make_layer(n_buckets=1, chunk_len=16, n_hashes=n_hashes, n_chunks_before=before,
                       causal=causal)
    x = jax.random.normal(KEY, (2, length, 12))
    params, y, _ = run_layer(layer, x)
    np.testing.assert_allclose(y, reference_full(params, x, causal), rtol=1e-4, atol=1e-5)

  @parameterized.product(causal=(False, True), n_buckets=(4, (2, 4)), length=(10, 16))
  def test_layer_matches_brute_force(self, causal, n_buckets, length):
    layer = make_layer(n_buckets=n_buckets, n_hashes=3, causal=causal, sow_weights=True)
    x = jax.random.normal(KEY, (2, length, 12))
    params, y, buckets = run_layer(layer, x)
    self.assertEqual(buckets.shape, (2, 2, 3, length))
    q, v = project(params, x)
    expected = output(params, reference_core(q, v, buckets, length, 4, 1, 0, causal))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # The buckets are the hash of the queries: every round really hashes.
    self.assertGreater(len(np.unique(np.asarray(buckets))), 1)

  def test_rotations_are_fresh_per_call(self):
    layer = make_layer(sow_weights=True, n_buckets=8)
    x = jax.random.normal(KEY, (1, 16, 12))
    _, y1, b1 = run_layer(layer, x, hash_seed=1)
    _, y2, b2 = run_layer(layer, x, hash_seed=2)
    self.assertFalse(np.array_equal(b1, b2))
    self.assertFalse(np.allclose(y1, y2))

  def test_clustered_queries_close_to_full_attention(self):
    """More rounds -> closer to full attention when queries form tight clusters."""
    d, n_clusters, length = 16, 8, 128
    centres = np.linalg.qr(np.random.RandomState(0).randn(d, d))[0][:n_clusters] * 4
    labels = np.random.RandomState(1).randint(0, n_clusters, length)
    x = centres[labels] + 0.05 * np.random.RandomState(2).randn(length, d)
    x = jnp.asarray(x[None], jnp.float32)
    errors = {}
    for n_hashes in (1, 2, 4, 8):
      layer = make_layer(n_heads=1, d_qk=d, d_v=d, n_hashes=n_hashes, n_buckets=8,
                         chunk_len=16)
      variables = layer.init({'params': KEY, 'hash': KEY}, x)
      params = dict(variables['params'], qk=jnp.eye(d)[:, None], value=jnp.eye(d)[:, None],
                    output=jnp.eye(d)[None])
      full = reference_full(params, x, causal=False)
      err = []
      for seed in range(4):
        y = layer.apply({'params': params}, x, rngs={'hash': jax.random.key(seed)})
        err.append(np.linalg.norm(f64(y) - full) / np.linalg.norm(full))
      errors[n_hashes] = float(np.mean(err))
    print('relative error vs full attention by n_hashes:', errors)
    self.assertLess(errors[8], 0.06)
    self.assertLess(errors[8], errors[2])
    self.assertLess(errors[8], errors[1])
    self.assertLess(errors[4], errors[1])

  @parameterized.parameters(1, 3)
  def test_causal_gradient_never_reaches_the_past(self, n_hashes):
    layer = make_layer(n_hashes=n_hashes, n_buckets=8, chunk_len=2, causal=True, d_qk=4, d_v=4)
    x = jax.random.normal(KEY, (1, 11, 6))
    variables = layer.init({'params': KEY, 'hash': KEY}, x)
    f = lambda x: layer.apply(variables, x, rngs={'hash': jax.random.key(3)})[0]  # noqa: E731
    jac = np.asarray(jax.jacrev(f)(x)[:, :, 0])  # (l_out, d, l_in, d)
    for i in range(11):
      self.assertTrue(np.all(jac[i, :, i + 1:] == 0.0), f'output {i} sees the future')
    # The test is not vacuous: outputs do depend on the past.
    self.assertGreater(np.mean([np.any(jac[i, :, :i] != 0.0) for i in range(1, 11)]), 0.5)

  def test_padding_invariance(self):
    """Length 10 padded to 12 inside equals the explicit padded core on 12 positions."""
    layer = make_layer(n_buckets=4, n_hashes=2, causal=True, sow_weights=True)
    x = jax.random.normal(KEY, (1, 10, 12))
    params, y, buckets = run_layer(layer, x)
    q, v = project(params, x)
    noise = np.random.RandomState(0).randn(1, 2, 2, 8) * 10
    q12, v12 = np.concatenate([q, noise], 1), np.concatenate([v, noise], 1)
    buckets12 = np.concatenate([buckets, np.full((1, 2, 2, 2), 4)], -1)
    o12 = lsh_attend(jnp.asarray(q12, jnp.float32), jnp.asarray(v12, jnp.float32),
                     jnp.asarray(buckets12), length=10, chunk_len=4, causal=True)
    np.testing.assert_allclose(y, output(params, f64(o12[:, :10])), rtol=1e-4, atol=1e-5)

  def test_train_mode_dropout(self):
    layer = make_layer(mode='train', attention_dropout=0.5)
    x = jax.random.normal(KEY, (1, 16, 12))
    variables = layer.init({'params': KEY, 'hash': KEY}, x)
    run = lambda seed: layer.apply(variables, x, rngs={  # noqa: E731
        'hash': KEY, 'dropout': jax.random.key(seed)})
    np.testing.assert_array_equal(run(1), run(1))
    self.assertFalse(np.allclose(run(1), run(2)))
    plain = make_layer(mode='eval').apply(variables, x, rngs={'hash': KEY})
    self.assertFalse(np.allclose(run(1), plain))

  def test_bfloat16_compute_and_jit_grad(self):
    layer = make_layer(dtype=jnp.bfloat16)
    x = jax.random.normal(KEY, (2, 16, 12))
    variables = layer.init({'params': KEY, 'hash': KEY}, x)
    self.assertEqual(variables['params']['qk'].dtype, jnp.float32)
    self.assertEqual(layer.apply(variables, x, rngs={'hash': KEY}).dtype, jnp.bfloat16)
    loss = lambda p: jnp.sum(make_layer().apply({'params': p}, x, rngs={'hash': KEY}) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(variables['params'])
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
    with self.assertRaisesRegex(ValueError, 'attention_dropout'):
      make_layer(attention_dropout=1.0)
    with self.assertRaises(TypeError):
      tl.LSHSelfAttention(2)  # pylint: disable=too-many-function-args
    layer = make_layer()
    x = jnp.ones((1, 8, 12))
    variables = layer.init({'params': KEY}, x)
    with self.assertRaisesRegex(ValueError, "'hash' rng"):
      layer.apply(variables, x)


def decode(layer, params, x, step=1, seed=5):
  """Runs `layer` (predict mode) over x, `step` positions per call: (b, l, d)."""
  cache = layer.init({'params': KEY, 'hash': jax.random.key(seed)}, x[:, :1])['cache']
  outputs = []
  apply = jax.jit(lambda cache, x_t: layer.apply(
      {'params': params, 'cache': cache}, x_t, mutable=['cache']))
  for t in range(0, x.shape[1], step):
    y, state = apply(cache, x[:, t:t + step])
    cache = state['cache']
    outputs.append(y)
  return jnp.concatenate(outputs, 1), cache


class PredictTest(parameterized.TestCase):

  @parameterized.parameters((1, 16), (3, 16), (2, 12))
  def test_one_bucket_decoding_equals_eval(self, n_hashes, mem):
    """One bucket and windows reaching the start: eval is full causal attention, as is predict."""
    kw = dict(n_buckets=1, n_hashes=n_hashes, chunk_len=4, n_chunks_before=2, causal=True)
    x = jax.random.normal(KEY, (2, 12, 12))
    params, y_eval, _ = run_layer(make_layer(**kw), x)
    y_pred, _ = decode(make_layer(mode='predict', predict_mem_len=mem, **kw), params, x)
    np.testing.assert_allclose(y_pred, y_eval, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y_pred, reference_full(params, x, True), rtol=1e-4, atol=1e-5)

  def test_prompt_in_one_call_equals_token_by_token(self):
    layer = make_layer(mode='predict', causal=True, n_buckets=8, predict_mem_len=8)
    x = jax.random.normal(KEY, (2, 12, 12))
    params = layer.init({'params': KEY, 'hash': KEY}, x[:, :1])['params']
    one, cache_one = decode(layer, params, x)
    four, cache_four = decode(layer, params, x, step=4)
    np.testing.assert_allclose(one, four, rtol=1e-5, atol=1e-6)
    chex_equal = jax.tree_util.tree_map(np.testing.assert_allclose, cache_one, cache_four)
    del chex_equal

  @parameterized.parameters((8, 2, 8), ((2, 4), 3, 12))
  def test_decoding_matches_bucket_rule(self, n_buckets, n_hashes, mem):
    """Each token sees remembered keys sharing a bucket in any round, plus recent ones."""
    c, before, length = 2, 1, 20
    layer = make_layer(mode='predict', causal=True, n_buckets=n_buckets, n_hashes=n_hashes,
                       chunk_len=c, n_chunks_before=before, predict_mem_len=mem)
    x = jax.random.normal(KEY, (2, length, 12))
    params = layer.init({'params': KEY, 'hash': KEY}, x[:, :1])['params']
    y, cache = decode(layer, params, x)
    self.assertEqual(int(cache['position']), length)
    q, v = project(params, x)
    rotations = f64(cache['rotations'])  # Drawn once, at init, and kept.
    expected = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(2):
      for h in range(2):
        rotated = np.einsum('lk,knr->nlr', q[b, :, h], rotations[b, h])
        factors = (n_buckets,) if isinstance(n_buckets, int) else n_buckets
        ids, column, stride = 0, 0, 1
        for f in factors:
          part = rotated[..., column:column + f // 2]
          column += f // 2
          ids = ids + stride * np.argmax(np.concatenate([part, -part], -1), -1)
          stride *= f
        sets = []
        for i in range(length):
          memory = range(max(0, i - mem + 1), i + 1)
          sets.append({j for j in memory
                       if i - j < c * (before + 1) or np.any(ids[:, j] == ids[:, i])})
        expected[b, :, h] = attend_to_sets(q[b, :, h], v[b, :, h], sets)
    np.testing.assert_allclose(y, output(params, expected), rtol=1e-4, atol=1e-5)

  def test_init_does_not_advance(self):
    layer = make_layer(mode='predict', causal=True, predict_mem_len=8)
    cache = layer.init({'params': KEY, 'hash': KEY}, jnp.ones((1, 1, 12)))['cache']
    self.assertEqual(int(cache['position']), 0)
    np.testing.assert_array_equal(cache['slot_positions'], -1)


if __name__ == '__main__':
  absltest.main()
