"""Prefix attention against a float64 numpy reference; predict == eval; swapping prefix sets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.layers as tl
import terraflax.models as tm
from terraflax.layers import prefix as prefix_lib
from terraflax.models.attention import Full
from tests import contracts

KEY = jax.random.key(0)


def f64(x):
  return np.asarray(x, np.float64)


def randomise(params, seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, p.dtype), params)


def reference_attention(params, x, n_heads, mask=None, causal=False):
  """float64 multi-head attention over [prefix; keys], the prefix visible to every query."""
  x = f64(x)
  b, l, d = x.shape
  width = d // n_heads

  def project(name):
    return (x @ f64(params[name]['kernel']) + f64(params[name]['bias'])).reshape(
        b, l, n_heads, width)

  q, k, v = project('query'), project('key'), project('value')
  n = params['prefix_key'].shape[0]
  k = np.concatenate([np.broadcast_to(f64(params['prefix_key'])[None], (b, n, n_heads, width)),
                      k], axis=1)
  v = np.concatenate([np.broadcast_to(f64(params['prefix_value'])[None], (b, n, n_heads, width)),
                      v], axis=1)
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(width)
  allowed = np.ones((b, 1, l, n + l), bool)
  if causal:
    allowed[:, :, :, n:] &= np.tril(np.ones((l, l), bool))[None, None]
  if mask is not None:
    allowed[:, :, :, n:] &= np.asarray(mask)[:, None, None, :]
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, l, d)
  return out @ f64(params['output']['kernel']) + f64(params['output']['bias'])


class PrefixAttentionTest(parameterized.TestCase):

  @parameterized.parameters(None, 2)
  def test_causal_matches_reference(self, chunk_len):
    x = jax.random.normal(KEY, (2, 5, 8))
    layer = tl.PrefixCausalAttention(n_heads=2, n_prefix=3, chunk_len=chunk_len, mode='eval')
    params = randomise(nn.meta.unbox(layer.init(KEY, x)['params']))
    self.assertEqual(params['prefix_key'].shape, (3, 2, 4))
    self.assertEqual(params['prefix_value'].shape, (3, 2, 4))
    y = layer.apply({'params': params}, x)
    np.testing.assert_allclose(y, reference_attention(params, x, 2, causal=True), rtol=1e-4,
                               atol=1e-5)

  def test_bidirectional_with_padding_matches_reference(self):
    x = jax.random.normal(KEY, (2, 5, 8))
    mask = jnp.asarray([[True] * 5, [True] * 3 + [False] * 2])
    layer = tl.PrefixAttention(n_heads=2, n_prefix=2, mode='eval')
    params = randomise(nn.meta.unbox(layer.init(KEY, x, mask)['params']))
    y, mask_out = layer.apply({'params': params}, x, mask)
    self.assertIs(mask_out, mask)
    np.testing.assert_allclose(y, reference_attention(params, x, 2, mask=mask), rtol=1e-4,
                               atol=1e-5)

  def test_keeps_the_base_layers_parameter_paths(self):
    x = jax.random.normal(KEY, (1, 4, 8))
    base = jax.eval_shape(tl.CausalAttention(n_heads=2).init, KEY, x)['params']
    with_prefix = jax.eval_shape(tl.PrefixCausalAttention(n_heads=2, n_prefix=2).init, KEY,
                                 x)['params']
    self.assertEqual(set(with_prefix) - set(base), {'prefix_key', 'prefix_value'})
    self.assertEqual(jax.tree_util.tree_structure(base),
                     jax.tree_util.tree_structure(prefix_lib.split_prefix(with_prefix)[0]))
    self.assertEqual(tl.PrefixCausalAttention(n_prefix=1).label, 'CausalAttention')

  def test_rejects_bad_n_prefix(self):
    with self.assertRaisesRegex(ValueError, 'n_prefix must be a positive int'):
      tl.PrefixCausalAttention(n_prefix=0)


class PrefixLMTest(absltest.TestCase):
  LM = dict(vocab_size=11, d_model=8, d_ff=16, n_layers=2, n_heads=2, dropout=0.0, max_len=12)

  def test_predict_steps_equal_eval_logits(self):
    x = jnp.asarray(np.random.default_rng(0).integers(1, 11, (2, 7)), jnp.int32)
    eval_model = tm.TransformerLM(mode='eval', attention=Full(n_prefix=3), **self.LM)
    params = randomise(nn.meta.unbox(jax.eval_shape(eval_model.init, KEY, x)['params']), scale=0.3)
    self.assertEqual(
        params['Repeat_3']['Serial_0']['Residual_0']['CausalAttention_1']['prefix_key'].shape,
        (2, 3, 2, 4))  # Per layer (scanned), per prefix position, head and width.
    full = eval_model.apply({'params': params}, x)
    predict = tm.TransformerLM(mode='predict', attention=Full(n_prefix=3), **self.LM)
    shifted = jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]
    steps = contracts.predict_one_at_a_time(predict, params, shifted, KEY)
    np.testing.assert_allclose(steps, full, rtol=1e-4, atol=1e-4)

  def test_one_base_serves_several_prefix_sets(self):
    x = jnp.asarray(np.random.default_rng(1).integers(1, 11, (2, 6)), jnp.int32)
    model = tm.TransformerLM(mode='eval', attention=Full(n_prefix=2), **self.LM)
    params = randomise(nn.meta.unbox(jax.eval_shape(model.init, KEY, x)['params']), scale=0.3)
    base, prefix_a = prefix_lib.split_prefix(params)
    prefix_b = randomise(prefix_a, seed=7, scale=1.0)
    out_a = model.apply({'params': prefix_lib.merge_prefix(base, prefix_a)}, x)
    out_b = model.apply({'params': prefix_lib.merge_prefix(base, prefix_b)}, x)
    np.testing.assert_array_equal(out_a, model.apply({'params': params}, x))  # Round trip.
    self.assertGreater(float(jnp.abs(out_a - out_b).max()), 1e-3)
    n_prefix_params = sum(p.size for p in jax.tree_util.tree_leaves(prefix_a))
    self.assertEqual(n_prefix_params, 2 * 2 * 2 * 8)  # layers * n_prefix * (key, value) * d
    with self.assertRaisesRegex(ValueError, 'non-prefix leaves'):
      prefix_lib.merge_prefix(base, base)
    with self.assertRaisesRegex(ValueError, 'already holds prefix'):
      prefix_lib.merge_prefix(params, prefix_a)
    with self.assertRaisesRegex(ValueError, 'no prefix_key'):
      prefix_lib.split_prefix(base)


def packed_documents(lengths=(5, 7, 3), d=8, seed=3):
  """Float documents (l_i, d) of different lengths for the packing contract."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for n in lengths]


class PackedPrefixTest(parameterized.TestCase):

  def test_causal_packed_equals_unpacked(self):
    contracts.assert_layer_packed_equals_unpacked(
        lambda **kw: tl.PrefixCausalAttention(n_heads=2, n_prefix=3, prefix_init_scale=1.0,
                                              chunk_len=4, **kw),
        packed_documents(), 16)

  def test_bidirectional_packed_equals_unpacked(self):
    packed = tl.PrefixAttention(n_heads=2, n_prefix=2, prefix_init_scale=1.0, packed=True)
    alone = tl.PrefixAttention(n_heads=2, n_prefix=2, prefix_init_scale=1.0)
    docs = packed_documents()
    params = alone.init(jax.random.key(0), docs[0][None], jnp.ones((1, 5), bool))['params']
    contracts.assert_packed_equals_unpacked(
        lambda p, x, seg, pos: packed.apply({'params': p}, x, seg)[0],
        lambda p, x: alone.apply({'params': p}, x, jnp.ones(x.shape[:2], bool))[0],
        params, docs, 16)


if __name__ == '__main__':
  absltest.main()
