"""Attention against float64 numpy references; chunked == full; predict == eval."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.layers.attention_core import cached_attention
from tests import contracts

KEY = jax.random.key(0)

def normal(shape, seed=0, scale=1.0):
  """Float32 Gaussian test data from numpy (jax.random compiles per shape: slow)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def init(layer, *inputs):
  """`layer.init` jitted: eager initialisers compile op by op, which is slow."""
  return nn.meta.unbox(jax.jit(layer.init)(KEY, *inputs))


def fake_init(layer, *inputs, seed=0):
  """Variables of the shapes `layer.init` gives, without compiling it: random
  parameters (numpy) and an all-zero cache (what `init` allocates)."""
  shapes = nn.meta.unbox(jax.eval_shape(layer.init, KEY, *inputs))
  rng = np.random.default_rng(seed)
  variables = {'params': jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5, s.dtype), shapes['params'])}
  if 'cache' in shapes:
    variables['cache'] = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                shapes['cache'])
  return variables


# Jitted once per static configuration: much faster than op-by-op dispatch.
attention = jax.jit(tl.dot_product_attention, static_argnames=(
    'causal', 'scale', 'dropout_rate', 'chunk_len', 'return_weights', 'return_details'))


def f64(x):
  return np.asarray(x, np.float64)


def reference_attention(q, k, v, allowed=None, scale=None):
  """Brute-force float64 attention, one (batch, head) at a time.

  q (b, lq, h, d), k (b, lk, h, d), v (b, lk, h, e); allowed (b, h, lq, lk)
  bool or None. Returns (out (b, lq, h, e), weights (b, h, lq, lk),
  logsumexp (b, h, lq)); rows with no allowed key give zeros.
  """
  q, k, v = f64(q), f64(k), f64(v)
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = 1 / np.sqrt(d) if scale is None else scale
  out = np.zeros((b, lq, h, v.shape[-1]))
  weights = np.zeros((b, h, lq, lk))
  lse = np.full((b, h, lq), -1e30)
  for i in range(b):
    for j in range(h):
      for t in range(lq):
        keys = [s for s in range(lk) if allowed is None or allowed[i, j, t, s]]
        if not keys:
          continue
        logits = np.array([q[i, t, j] @ k[i, s, j] * scale for s in keys])
        p = np.exp(logits - logits.max())
        lse[i, j, t] = np.log(p.sum()) + logits.max()
        p /= p.sum()
        weights[i, j, t, keys] = p
        out[i, t, j] = p @ v[i, keys, j]
  return out, weights, lse


def random_qkv(b=2, lq=7, lk=7, h=3, d=4, e=5, seed=0):
  return (normal((b, lq, h, d), seed, 2.0), normal((b, lk, h, d), seed + 1),
          normal((b, lk, h, e), seed + 2))


def causal_allowed(b, h, lq, lk, q_positions=None):
  q_positions = np.arange(lq) if q_positions is None else np.asarray(q_positions)
  allowed = np.arange(lk)[None, :] <= q_positions[:, None]
  return np.broadcast_to(allowed, (b, h, lq, lk))


def padding(b, lk, lengths):
  return np.arange(lk)[None, :] < np.asarray(lengths)[:, None]


class DotProductAttentionTest(parameterized.TestCase):

  @parameterized.product(kind=['none', 'causal', 'padding', 'causal+padding', 'full_mask'],
                         chunk_len=[None, 3, 16])
  def test_matches_float64_reference(self, kind, chunk_len):
    q, k, v = random_qkv()
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    kwargs, allowed = {}, np.ones((b, h, lq, lk), bool)
    if 'causal' in kind:
      kwargs['causal'] = True
      allowed &= causal_allowed(b, h, lq, lk)
    if 'padding' in kind:
      real = padding(b, lk, [5, 0])  # The second row has no real key at all.
      kwargs['mask'] = tl.padding_mask(jnp.asarray(real))
      allowed &= real[:, None, None, :]
    if kind == 'full_mask':
      full = np.random.default_rng(0).random((b, 1, lq, lk)) < 0.6
      kwargs['mask'] = jnp.asarray(full)
      allowed &= full
    result = attention(q, k, v, chunk_len=chunk_len, return_weights=True,
                                      return_details=True, **kwargs)
    out, weights, lse = reference_attention(q, k, v, allowed)
    np.testing.assert_allclose(result.out, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.weights, weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.logsumexp, lse, rtol=1e-5, atol=1e-5)

  @parameterized.parameters((0, 1), (3, 1), (4, 3), (0, 5))
  def test_cached_attention_equals_float64_reference(self, start, length):
    # The cache before the call holds positions < start (later slots hold stale junk that
    # must be ignored); the call's own keys sit at start.. and attend causally.
    max_len = 9
    q, k, v = random_qkv(lq=length, lk=length, seed=1)
    b, _, h, d = q.shape
    cached_k = normal((b, h, d, max_len), seed=2)
    cached_v = normal((b, h, v.shape[-1], max_len), seed=3)
    out = cached_attention(q, k, v, cached_k, cached_v, jnp.int32(start))
    full_k = jnp.transpose(cached_k, (0, 3, 1, 2)).at[:, start:start + length].set(k)
    full_v = jnp.transpose(cached_v, (0, 3, 1, 2)).at[:, start:start + length].set(v)
    allowed = causal_allowed(b, h, length, max_len, q_positions=start + np.arange(length))
    expected, _, _ = reference_attention(q, full_k, full_v, allowed)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  def test_cross_lengths_positions_and_scale(self):
    q, k, v = random_qkv(lq=3, lk=9)
    q_positions = jnp.array([4, 5, 6])  # A predict-mode step at cache position 4.
    out = attention(q, k, v, causal=True, q_positions=q_positions, scale=0.3, chunk_len=1)
    expected, _, _ = reference_attention(q, k, v, causal_allowed(2, 3, 3, 9, [4, 5, 6]), 0.3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  def test_extra_batch_axes(self):
    q, k, v = random_qkv(b=6)
    reshape = lambda x: x.reshape((2, 3) + x.shape[1:])
    out = attention(reshape(q), reshape(k), reshape(v), causal=True, chunk_len=3)
    np.testing.assert_allclose(out.reshape((6,) + out.shape[2:]),
                               attention(q, k, v, causal=True),
                               rtol=1e-6, atol=1e-6)

  def test_softmax_is_stable_for_huge_logits(self):
    q, k, v = random_qkv()
    out = attention(q * 1e4, k, v, causal=True)
    self.assertTrue(bool(jnp.all(jnp.isfinite(out))))
    expected, _, _ = reference_attention(q * 1e4, k, v, causal_allowed(2, 3, 7, 7))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_bfloat16_inputs_keep_dtype_and_softmax_in_float32(self):
    q, k, v = random_qkv()
    out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                    causal=True)
    self.assertEqual(out.dtype, jnp.bfloat16)
    expected, _, _ = reference_attention(q, k, v, causal_allowed(2, 3, 7, 7))
    np.testing.assert_allclose(f64(out.astype(jnp.float32)), expected, atol=0.1)

  @parameterized.parameters((None, 3), ('causal', 4), ('padding', 2), ('causal+padding', 5))
  def test_chunked_gradients_equal_unchunked(self, kind, chunk_len):
    q, k, v = random_qkv(lq=11, lk=11)
    kwargs = {'causal': kind is not None and 'causal' in kind}
    if kind and 'padding' in kind:
      kwargs['mask'] = tl.padding_mask(jnp.asarray(padding(2, 11, [8, 11])))

    def loss(q, k, v, chunk_len):
      out = tl.dot_product_attention(q, k, v, chunk_len=chunk_len, **kwargs)
      return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    chunked = grad(q, k, v, chunk_len)
    grads = grad(q, k, v, None)
    chex.assert_trees_all_close(chunked, grads, rtol=1e-5, atol=1e-6)

  def test_chunked_memory_grows_linearly(self):
    def temp_bytes(length, chunk_len):
      q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
      loss = lambda q, k, v: jnp.sum(tl.dot_product_attention(q, k, v, causal=True,
                                                              chunk_len=chunk_len))
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    full = temp_bytes(2048, None) / temp_bytes(512, None)
    chunked = temp_bytes(2048, 128) / temp_bytes(512, 128)
    self.assertGreater(full, 10)  # Quadratic: 16x for 4x the length.
    self.assertLess(chunked, 5)  # Linear: 4x.

  def test_dropout_is_unbiased_and_reproducible(self):
    q, k, v = random_qkv(b=1, lq=4, lk=4, h=1)
    attend = jax.jit(lambda rng: tl.dot_product_attention(
        q, k, v, causal=True, dropout_rate=0.5, dropout_rng=rng, chunk_len=2))
    np.testing.assert_array_equal(attend(KEY), attend(KEY))
    self.assertFalse(np.allclose(attend(KEY), attend(jax.random.key(1))))
    mean = jnp.mean(jax.vmap(attend)(jax.random.split(KEY, 4000)), axis=0)
    np.testing.assert_allclose(mean, attention(q, k, v, causal=True), atol=0.1)

  def test_clear_errors(self):
    q, k, v = random_qkv()
    with self.assertRaisesRegex(ValueError, 'same heads and width'):
      tl.dot_product_attention(q, k[..., :2], v)
    with self.assertRaisesRegex(ValueError, 'mask must be boolean'):
      tl.dot_product_attention(q, k, v, mask=jnp.ones((2, 1, 1, 7)))
    with self.assertRaisesRegex(ValueError, 'needs a dropout_rng'):
      tl.dot_product_attention(q, k, v, dropout_rate=0.1)
    with self.assertRaisesRegex(ValueError, 'chunk_len must be a positive int'):
      tl.dot_product_attention(q, k, v, chunk_len=0)


def project(x, params, name, h):
  y = f64(x) @ f64(params[name]['kernel']) + f64(params[name]['bias'])
  return y.reshape(y.shape[:-1] + (h, -1))


def reference_layer(params, x, h, allowed, memory=None):
  """Float64 multi-head attention of a layer from its parameters."""
  memory = x if memory is None else memory
  out, _, _ = reference_attention(project(x, params, 'query', h), project(memory, params, 'key', h),
                                  project(memory, params, 'value', h), allowed)
  out = out.reshape(out.shape[:2] + (-1,))
  return out @ f64(params['output']['kernel']) + f64(params['output']['bias'])


class AttentionLayersTest(parameterized.TestCase):

  @parameterized.parameters(None, 3)
  def test_causal_attention_matches_reference(self, chunk_len):
    x = normal((2, 7, 12))
    layer = tl.CausalAttention(n_heads=3, chunk_len=chunk_len, mode='eval')
    variables = init(layer, x)
    self.assertEqual(variables['params']['query']['kernel'].shape, (12, 12))
    expected = reference_layer(variables['params'], x, 3, causal_allowed(2, 3, 7, 7))
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-4, atol=1e-5)

  def test_per_head_widths(self):
    x = normal((1, 5, 8))
    layer = tl.CausalAttention(n_heads=2, d_qk=3, d_v=6, mode='eval')
    variables = fake_init(layer, x)
    p = variables['params']
    self.assertEqual((p['query']['kernel'].shape, p['value']['kernel'].shape,
                      p['output']['kernel'].shape), ((8, 6), (8, 12), (12, 8)))
    expected = reference_layer(p, x, 2, causal_allowed(1, 2, 5, 5))
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-4, atol=1e-5)

  def test_causal_outputs_ignore_future_tokens(self):
    x = normal((2, 9, 8))
    changed = x.at[:, 5:].set(normal((2, 4, 8), 1))
    layer = tl.CausalAttention(n_heads=2, chunk_len=2, mode='eval')
    variables = fake_init(layer, x)
    before, after = layer.apply(variables, x), layer.apply(variables, changed)
    np.testing.assert_allclose(after[:, :5], before[:, :5], rtol=1e-6, atol=1e-6)
    self.assertFalse(np.allclose(after[:, 5:], before[:, 5:]))

  @parameterized.parameters(None, 2)
  def test_bidirectional_attention_with_padding(self, chunk_len):
    x = normal((2, 6, 8))
    mask = jnp.asarray(padding(2, 6, [4, 6]))
    layer = tl.Attention(n_heads=2, chunk_len=chunk_len, mode='eval')
    variables = fake_init(layer, x, mask)
    y, mask_out = layer.apply(variables, x, mask)
    np.testing.assert_array_equal(mask_out, mask)
    allowed = np.broadcast_to(np.asarray(mask)[:, None, None, :], (2, 2, 6, 6))
    np.testing.assert_allclose(y, reference_layer(variables['params'], x, 2, allowed),
                               rtol=1e-4, atol=1e-5)
    # What sits at padded positions does not change the real tokens' outputs.
    changed = x.at[0, 4:].set(100.0)
    np.testing.assert_allclose(layer.apply(variables, changed, mask)[0][0, :4], y[0, :4],
                               rtol=1e-5, atol=1e-5)

  def test_enc_dec_attention_matches_reference(self):
    x = normal((2, 4, 8))
    encoder = normal((2, 6, 10), 1)
    mask = jnp.asarray(padding(2, 6, [3, 6]))
    layer = tl.EncDecAttention(n_heads=2, mode='eval')
    variables = fake_init(layer, x, encoder, mask)
    self.assertEqual(variables['params']['key']['kernel'].shape, (10, 8))
    y, encoder_out, mask_out = layer.apply(variables, x, encoder, mask)
    self.assertIs(encoder_out, encoder)
    self.assertIs(mask_out.dtype, mask.dtype)
    allowed = np.broadcast_to(np.asarray(mask)[:, None, None, :], (2, 2, 4, 6))
    np.testing.assert_allclose(y, reference_layer(variables['params'], x, 2, allowed, encoder),
                               rtol=1e-4, atol=1e-5)

  @parameterized.parameters(((1,) * 7,), ((3, 1, 2, 1),))
  def test_causal_predict_steps_equal_eval(self, step_lengths):
    x = normal((2, 7, 8))
    variables = fake_init(tl.CausalAttention(n_heads=2, mode='eval'), x)
    full = tl.CausalAttention(n_heads=2, mode='eval').apply(variables, x)
    predict = tl.CausalAttention(n_heads=2, max_len=10, mode='predict')
    cache = init(predict, x[:, :1])['cache']
    self.assertEqual(cache['cached_key'].shape, (2, 2, 4, 10))
    self.assertEqual(int(cache['position']), 0)
    self.assertEqual(float(jnp.abs(cache['cached_key']).sum()), 0.0)
    start, step = 0, jax.jit(lambda c, x: predict.apply({**variables, 'cache': c}, x,
                                                          mutable=['cache']))
    for length in step_lengths:
      out, state = step(cache, x[:, start:start + length])
      cache = state['cache']
      np.testing.assert_allclose(out, full[:, start:start + length], rtol=1e-5, atol=1e-5)
      start += length
    self.assertEqual(int(cache['position']), 7)

  def test_enc_dec_predict_caches_keys_and_values(self):
    x = normal((2, 5, 8))
    encoder = normal((2, 6, 8), 1)
    mask = jnp.asarray(padding(2, 6, [3, 6]))
    variables = fake_init(tl.EncDecAttention(n_heads=2, mode='eval'), x, encoder, mask)
    full = tl.EncDecAttention(n_heads=2, mode='eval').apply(variables, x, encoder, mask)[0]
    predict = tl.EncDecAttention(n_heads=2, mode='predict')
    cache = fake_init(predict, x[:, :1], encoder, mask)['cache']
    self.assertFalse(bool(cache['filled']))
    for i in range(5):
      # After the first step the encoder values are not read again.
      feed = encoder if i == 0 else jnp.zeros_like(encoder)
      (out, _, _), state = predict.apply({**variables, 'cache': cache}, x[:, i:i + 1], feed,
                                         mask, mutable=['cache'])
      cache = state['cache']
      np.testing.assert_allclose(out, full[:, i:i + 1], rtol=1e-5, atol=1e-5)
    self.assertTrue(bool(cache['filled']))

  def test_cache_outputs_runs_layer_once_in_predict(self):
    layer = lambda mode: tl.CacheOutputs(cb.Serial(tl.Dense(3), cb.Dup()), mode=mode)
    self.assertEqual((layer('eval').n_in, layer('eval').n_out), (1, 2))
    x = normal((2, 4))
    variables = fake_init(layer('eval'), x)
    expected = layer('eval').apply(variables, x)
    np.testing.assert_allclose(layer('eval').apply(variables, 2 * x)[0], 2 * expected[0] -
                               variables['params']['Serial_0']['Dense_0']['bias'][None],
                               rtol=1e-5, atol=1e-6)
    predict = layer('predict')
    cache = fake_init(predict, x)['cache']
    for feed in (x, 2 * x, 3 * x):
      out, state = predict.apply({**variables, 'cache': cache}, feed, mutable=['cache'])
      cache = state['cache']
      chex.assert_trees_all_close(out, expected)

  def test_dropout_train_only(self):
    x = normal((2, 6, 8))
    train = tl.CausalAttention(n_heads=2, dropout=0.5)
    variables = fake_init(train, x)
    evaluated = tl.CausalAttention(n_heads=2, dropout=0.5, mode='eval').apply(variables, x)
    plain = tl.CausalAttention(n_heads=2).apply(variables, x)
    np.testing.assert_allclose(evaluated, plain, rtol=1e-6)
    a = train.apply(variables, x, rngs={'dropout': KEY})
    self.assertFalse(np.allclose(a, plain))
    np.testing.assert_array_equal(a, train.apply(variables, x, rngs={'dropout': KEY}))

  def test_sow_weights(self):
    x = normal((2, 5, 8))
    layer = tl.CausalAttention(n_heads=2, sow_weights=True, chunk_len=2, mode='eval')
    variables = fake_init(layer, x)
    _, state = layer.apply({'params': variables['params']}, x, mutable=['intermediates'])
    (weights,) = state['intermediates']['attention_weights']
    self.assertEqual(weights.shape, (2, 2, 5, 5))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.triu(np.asarray(weights), 1), 0.0)
    _, state = tl.CausalAttention(n_heads=2, mode='eval').apply(variables, x,
                                                               mutable=['intermediates'])
    self.assertEmpty(state)

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, r"CausalAttention mode must be one of \('train'"):
      tl.CausalAttention(mode='decode')
    with self.assertRaisesRegex(ValueError, 'n_heads must be a positive int'):
      tl.Attention(n_heads=0)
    with self.assertRaisesRegex(ValueError, 'chunk_len must be a positive int or None'):
      tl.CausalAttention(chunk_len=-1)
    x = jnp.zeros((1, 4, 6))
    with self.assertRaisesRegex(ValueError, 'width 6 is not divisible by n_heads=4'):
      init(tl.CausalAttention(n_heads=4), x)
    with self.assertRaisesRegex(ValueError, r'needs mask of shape \(b, l\) = \(1, 4\)'):
      init(tl.Attention(n_heads=2), x, jnp.ones((1, 5), bool))
    with self.assertRaisesRegex(ValueError, 'max_len=3 .* shorter than the input length 4'):
      init(tl.CausalAttention(n_heads=2, max_len=3, mode='predict'), x)


def packed_documents(lengths=(5, 7, 3), d=8, seed=3):
  """Float documents (l_i, d) of different lengths for the packing contract."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for n in lengths]


class PackedAttentionTest(parameterized.TestCase):
  """Packed == unpacked: each document of a packed row attends as if alone."""

  @parameterized.parameters(None, 4)
  def test_causal_attention(self, chunk_len):
    contracts.assert_layer_packed_equals_unpacked(
        lambda **kw: tl.CausalAttention(n_heads=2, chunk_len=chunk_len, **kw),
        packed_documents(), 16)

  @parameterized.parameters(('train', None), ('eval', 3))
  def test_bidirectional_attention(self, mode, chunk_len):
    packed = tl.Attention(n_heads=2, chunk_len=chunk_len, mode=mode, packed=True)
    alone = tl.Attention(n_heads=2, chunk_len=chunk_len, mode=mode)
    docs = packed_documents()
    params = alone.init(KEY, docs[0][None], jnp.ones((1, 5), bool))['params']
    contracts.assert_packed_equals_unpacked(
        lambda p, x, seg, pos: packed.apply({'params': p}, x, seg)[0],
        lambda p, x: alone.apply({'params': p}, x, jnp.ones(x.shape[:2], bool))[0],
        params, docs, 16)

  def test_enc_dec_attention(self):
    decoder_docs, encoder_docs = packed_documents((4, 6)), packed_documents((5, 3), seed=4)
    enc, enc_seg, _ = contracts.pack_documents(encoder_docs, 10)
    packed = tl.EncDecAttention(n_heads=2, packed=True)
    alone = tl.EncDecAttention(n_heads=2)
    params = alone.init(KEY, decoder_docs[0][None], encoder_docs[0][None],
                        jnp.ones((1, 5), bool))['params']

    def packed_fn(p, x, seg, pos):
      return packed.apply({'params': p}, x, seg, enc, enc_seg)[0]

    def alone_fn(p, x):  # Decoder document i reads encoder document i.
      e = encoder_docs[0] if x.shape[1] == 4 else encoder_docs[1]
      return alone.apply({'params': p}, x, e[None], jnp.ones((1, e.shape[0]), bool))[0]

    contracts.assert_packed_equals_unpacked(packed_fn, alone_fn, params, decoder_docs, 12)

  def test_predict_mode_refuses_packing(self):
    with self.assertRaisesRegex(ValueError, "packed=True.*'predict'"):
      tl.CausalAttention(n_heads=2, mode='predict', packed=True)

  def test_segment_ids_must_match(self):
    layer = tl.CausalAttention(n_heads=2, packed=True)
    with self.assertRaisesRegex(ValueError, 'segment_ids int'):
      layer.init(KEY, jnp.ones((1, 4, 8)), jnp.ones((1, 3), jnp.int32))



if __name__ == '__main__':
  absltest.main()
