"""MultiplicativeDense, ModularCausalConv and the sparse QKV attention against float64 numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl
from tests import contracts

KEY = jax.random.key(0)


def f64(x):
  return np.asarray(x, np.float64)


def randomise(variables, seed=1):
  """Non-zero biases and generic values for every parameter."""
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda p: (np.asarray(p) + 0.3 * rng.standard_normal(p.shape)).astype(np.float32),
      variables['params'])
  return {**variables, 'params': params}


def stepper(layer):
  """A jitted predict step: (variables, x) -> (y, {'cache': ...})."""
  return jax.jit(lambda variables, x: layer.apply(variables, x, mutable=['cache']))


def n_params(variables):
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables['params']))


class MultiplicativeDenseTest(parameterized.TestCase):

  @parameterized.named_parameters(('square', 12, None, 3), ('wider', 12, 20, 4),
                                  ('one_module', 6, None, 1))
  def test_equals_einsum_definition_in_float64(self, d_in, d_out, n_modules):
    x = jax.random.normal(KEY, (2, 5, d_in))
    layer = tl.MultiplicativeDense(n_modules=n_modules, d_out=d_out)
    variables = randomise(nn.meta.unbox(layer.init(KEY, x)))
    p = variables['params']
    d_out = d_out or d_in
    d_module = d_out // n_modules
    self.assertEqual(p['gating'].shape, (d_in, n_modules))
    self.assertEqual(p['kernel'].shape, (d_in, d_module))
    gating, kernel, x64 = f64(p['gating']), f64(p['kernel']), f64(x)
    expected = np.zeros((2, 5, n_modules, d_module))
    for s in range(n_modules):
      for m in range(d_module):
        expected[..., s, m] = (x64 * gating[:, s] * kernel[:, m]).sum(-1)
    expected = expected.reshape(2, 5, d_out) + f64(p['bias'])
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)

  def test_parameter_count(self):
    d, n_modules = 64, 8
    layer = tl.MultiplicativeDense(n_modules=n_modules)
    variables = nn.meta.unbox(layer.init(KEY, jnp.zeros((1, 1, d))))
    self.assertEqual(n_params(variables), d * (n_modules + d // n_modules) + d)
    no_bias = tl.MultiplicativeDense(n_modules=n_modules, use_bias=False)
    self.assertEqual(n_params(nn.meta.unbox(no_bias.init(KEY, jnp.zeros((1, 1, d))))), d * (8 + 8))
    self.assertLess(n_params(variables), n_params(nn.meta.unbox(
        tl.Dense(d).init(KEY, jnp.zeros((1, d))))) / 3)

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, 'd_out=10 must be a multiple of n_modules=4'):
      tl.MultiplicativeDense(n_modules=4, d_out=10)
    with self.assertRaisesRegex(ValueError, r'output width 6 \(the input width, as d_out is unset\) must be a multiple of n_modules=4'):
      nn.meta.unbox(tl.MultiplicativeDense(n_modules=4).init(KEY, jnp.zeros((1, 6))))
    with self.assertRaisesRegex(ValueError, 'n_modules must be a positive int'):
      tl.MultiplicativeDense(n_modules=0)


def np_causal_conv(x, kernel, bias, n_modules):
  """The definition, with loops: y[t, s, o] over a zero-padded (length, module) grid."""
  b, l, d = x.shape
  k_len, k_mod, m_in, m_out = kernel.shape
  xs = f64(x).reshape(b, l, n_modules, m_in)
  half = (k_mod - 1) // 2
  y = np.zeros((b, l, n_modules, m_out)) + f64(bias)
  for t in range(l):
    for s in range(n_modules):
      for a in range(k_len):
        for c in range(k_mod):
          ti, si = t - (k_len - 1) + a, s - half + c
          if 0 <= ti < l and 0 <= si < n_modules:
            y[:, t, s] += xs[:, ti, si] @ f64(kernel[a, c])
  return y.reshape(b, l, n_modules * m_out)


class ModularCausalConvTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('per_module', 3, 1, None), ('across_modules', 3, 3, None), ('wider_out', 2, 3, 5),
      ('pointwise', 1, 1, None))
  def test_equals_definition_and_predict_equals_full(self, k_len, k_mod, d_module_out):
    n_modules, b, l, d = 4, 2, 7, 12
    x = jax.random.normal(KEY, (b, l, d))
    kw = dict(n_modules=n_modules, length_kernel_size=k_len, module_kernel_size=k_mod,
              d_module_out=d_module_out)
    layer = tl.ModularCausalConv(mode='eval', **kw)
    variables = randomise(nn.meta.unbox(layer.init(KEY, x)))
    p = variables['params']
    self.assertEqual(p['kernel'].shape, (k_len, k_mod, d // n_modules, d_module_out or 3))
    full = layer.apply(variables, x)
    np.testing.assert_allclose(full, np_causal_conv(x, p['kernel'], p['bias'], n_modules),
                               rtol=1e-5, atol=1e-5)

    predict = tl.ModularCausalConv(mode='predict', **kw)
    cache = nn.meta.unbox(predict.init(KEY, x[:, :1])).get('cache', {})
    if k_len > 1:
      self.assertEqual(cache['inputs'].shape, (b, k_len - 1, n_modules, d // n_modules))
      np.testing.assert_array_equal(cache['inputs'], 0.0)
    else:
      self.assertEqual(cache, {})
    step = stepper(predict)
    for t in range(l):
      out, state = step({'params': p, 'cache': cache}, x[:, t:t + 1])
      cache = state.get('cache', {})
      np.testing.assert_allclose(out, full[:, t:t + 1], rtol=1e-5, atol=1e-5)

  def test_predict_prompt_then_tokens(self):
    x = jax.random.normal(KEY, (2, 8, 6))
    make = lambda mode: tl.ModularCausalConv(n_modules=2, length_kernel_size=4, mode=mode)
    variables = randomise(nn.meta.unbox(make('eval').init(KEY, x)))
    full = make('eval').apply(variables, x)
    predict = make('predict')
    cache = predict.init(KEY, x[:, :1])['cache']
    step, pieces = stepper(predict), []
    for start, stop in ((0, 2), (2, 5), (5, 6), (6, 8)):  # a prompt, then shorter and longer steps
      out, state = step({**variables, 'cache': cache}, x[:, start:stop])
      cache = state['cache']
      pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(1, 3)
  def test_causal_and_local(self, k_mod):
    n_modules, k_len, l = 3, 3, 6
    layer = tl.ModularCausalConv(n_modules=n_modules, length_kernel_size=k_len,
                                 module_kernel_size=k_mod, mode='eval')
    x = jax.random.normal(KEY, (1, l, 2 * n_modules))
    variables = randomise(nn.meta.unbox(layer.init(KEY, x)))
    jac = jax.jacobian(lambda x: layer.apply(variables, x))(x)[0, :, :, 0]  # (l, d, l, d)
    jac = np.abs(np.asarray(jac)).reshape(l, n_modules, 2, l, n_modules, 2).sum((2, 5))
    for i in range(l):
      for j in range(l):
        for s in range(n_modules):
          for r in range(n_modules):
            sees = i - k_len < j <= i and abs(s - r) <= (k_mod - 1) // 2
            if sees:
              self.assertGreater(jac[i, s, j, r], 0.0, (i, s, j, r))
            else:
              self.assertEqual(jac[i, s, j, r], 0.0, (i, s, j, r))

  def test_sparse_qkv_stack_predict_equals_eval(self):
    """MultiplicativeDense then the conv, as sparse Q/K/V are made: predict == eval."""
    x = jax.random.normal(KEY, (2, 6, 8))

    def make(mode):
      return cb.Serial(tl.MultiplicativeDense(n_modules=4),
                       tl.ModularCausalConv(n_modules=4, module_kernel_size=3, mode=mode))

    variables = randomise(nn.meta.unbox(make('eval').init(KEY, x)))
    full = make('eval').apply(variables, x)
    predict = make('predict')
    cache = predict.init(KEY, x[:, :1])['cache']
    step = stepper(predict)
    for t in range(6):
      out, state = step({**variables, 'cache': cache}, x[:, t:t + 1])
      cache = state['cache']
      np.testing.assert_allclose(out, full[:, t:t + 1], rtol=1e-5, atol=1e-5)

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, 'module_kernel_size must be odd'):
      tl.ModularCausalConv(n_modules=2, module_kernel_size=2)
    with self.assertRaisesRegex(ValueError, 'ModularCausalConv mode must be one of'):
      tl.ModularCausalConv(n_modules=2, mode='decode')
    with self.assertRaisesRegex(ValueError, 'input width 5 must be a multiple of n_modules=2'):
      nn.meta.unbox(tl.ModularCausalConv(n_modules=2).init(KEY, jnp.zeros((1, 3, 5))))
    with self.assertRaisesRegex(ValueError, r'expects \(b, l, d\) inputs'):
      nn.meta.unbox(tl.ModularCausalConv(n_modules=2).init(KEY, jnp.zeros((3, 4))))


def np_multiplicative(x, p):
  """MultiplicativeDense in float64: (..., d_in) -> (..., S * M)."""
  y = np.einsum('...i,is,im->...sm', f64(x), f64(p['gating']), f64(p['kernel']))
  return y.reshape(x.shape[:-1] + (-1,)) + f64(p['bias'])


def np_causal_attention(q, k, v):
  """Causal softmax attention per head in float64: (b, l, h, w) -> (b, l, h, w_v)."""
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  length = q.shape[1]
  logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', weights, v)


class MultiplicativeConvCausalAttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('dense_output', dict(output_layer='dense')),
      ('multiplicative_output', dict(output_layer='multiplicative', n_modules=2)),
      ('no_output_layer', dict(output_layer='none', length_kernel_size=2)),
      ('other_head_widths', dict(d_qk=6, d_v=3, module_kernel_size=1)))
  def test_equals_float64_reference(self, kw):
    b, l, d, n_heads = 2, 6, 8, 2
    x = jax.random.normal(KEY, (b, l, d))
    layer = tl.MultiplicativeConvCausalAttention(n_heads=n_heads, mode='eval', **kw)
    variables = randomise(nn.meta.unbox(layer.init(KEY, x)))
    p = variables['params']
    n_modules = kw.get('n_modules', n_heads)
    shared = np_multiplicative(x, p['multiplicative'])
    heads = [np_causal_conv(shared, p[name]['kernel'], p[name]['bias'], n_modules)
             .reshape(b, l, n_heads, -1) for name in ('query_conv', 'key_conv', 'value_conv')]
    # Q and K mix neighbouring modules, V does not.
    self.assertEqual(p['query_conv']['kernel'].shape[1], kw.get('module_kernel_size', 3))
    self.assertEqual(p['value_conv']['kernel'].shape[1], 1)
    out = np_causal_attention(*heads).reshape(b, l, -1)
    if kw.get('output_layer', 'dense') == 'dense':
      out = out @ f64(p['output']['kernel']) + f64(p['output']['bias'])
    elif kw['output_layer'] == 'multiplicative':
      out = np_multiplicative(out, p['output'])
    else:
      self.assertNotIn('output', p)
    np.testing.assert_allclose(layer.apply(variables, x), out, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(((1,) * 7,), ((3, 1, 2, 1),))
  def test_predict_steps_equal_eval(self, step_lengths):
    b, l, d = 2, 7, 12
    x = jax.random.normal(KEY, (b, l, d))
    make = lambda mode: tl.MultiplicativeConvCausalAttention(n_heads=3, n_modules=3, max_len=9,
                                                             mode=mode)
    variables = randomise(nn.meta.unbox(make('eval').init(KEY, x)))
    full = make('eval').apply(variables, x)
    predict = make('predict')
    cache = predict.init(KEY, x[:, :1])['cache']
    self.assertEqual(cache['cached_key'].shape, (b, 3, 4, 9))  # (b, h, d_qk, max_len)
    for name in ('query_conv', 'key_conv', 'value_conv'):  # the last 2 inputs, per module
      self.assertEqual(cache[name]['inputs'].shape, (b, 2, 3, 4))
    step, start = stepper(predict), 0
    for length in step_lengths:
      out, state = step({**variables, 'cache': cache}, x[:, start:start + length])
      cache = state['cache']
      np.testing.assert_allclose(out, full[:, start:start + length], rtol=1e-5, atol=1e-5)
      start += length
    self.assertEqual(int(cache['position']), l)

  def test_outputs_ignore_future_tokens(self):
    x = jax.random.normal(KEY, (1, 8, 32))
    layer = tl.MultiplicativeConvCausalAttention(n_heads=4, mode='eval')
    variables = randomise(nn.meta.unbox(layer.init(KEY, x)))
    y = layer.apply(variables, x)
    changed = layer.apply(variables, x.at[:, 5:].set(1.0))
    np.testing.assert_allclose(changed[:, :5], y[:, :5], rtol=1e-6, atol=1e-6)
    self.assertFalse(np.allclose(changed[:, 5:], y[:, 5:]))

  def test_projections_have_few_parameters(self):
    d, n_heads = 256, 4  # M = 64
    x = jax.ShapeDtypeStruct((1, 1, d), jnp.float32)
    count = lambda layer: n_params(jax.eval_shape(layer.init, KEY, x)) - (d * d + d)  # no output
    sparse = count(tl.MultiplicativeConvCausalAttention(n_heads=n_heads, mode='eval'))
    # d (S + M) + d for the multiplicative layer, (3 * 3 + 3 * 3 + 3 * 1) M^2 + 3 M for the convs.
    self.assertEqual(sparse, d * (n_heads + 64) + d + 21 * 64 * 64 + 3 * 64)
    self.assertLess(sparse, 0.6 * count(tl.CausalAttention(n_heads=n_heads, mode='eval')))

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, "output_layer must be one of \\('dense', "):
      tl.MultiplicativeConvCausalAttention(output_layer='sparse')
    with self.assertRaisesRegex(ValueError, 'module_kernel_size must be odd'):
      tl.MultiplicativeConvCausalAttention(module_kernel_size=2)
    with self.assertRaisesRegex(ValueError, 'MultiplicativeConvCausalAttention mode must be'):
      tl.MultiplicativeConvCausalAttention(mode='decode')
    with self.assertRaisesRegex(ValueError, r'input width = 12 must be a multiple of n_modules=5'):
      nn.meta.unbox(
          tl.MultiplicativeConvCausalAttention(n_heads=2, n_modules=5).init(KEY, jnp.zeros((1, 2, 12))))
    with self.assertRaisesRegex(ValueError, r"output_layer='none' needs n_heads \* d_v = 6"):
      nn.meta.unbox(
          tl.MultiplicativeConvCausalAttention(n_heads=2, d_v=3, output_layer='none').init(
          KEY, jnp.zeros((1, 2, 12))))


def packed_documents(lengths=(5, 7, 3), d=8, seed=3):
  """Float documents (l_i, d) of different lengths for the packing contract."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for n in lengths]


class PackedSparseQKVTest(parameterized.TestCase):

  @parameterized.parameters(None, 4)
  def test_packed_equals_unpacked(self, chunk_len):
    # The causal convolution (3 taps) must not read the previous document's last tokens.
    contracts.assert_layer_packed_equals_unpacked(
        lambda **kw: tl.MultiplicativeConvCausalAttention(
            n_heads=2, n_modules=2, length_kernel_size=3, chunk_len=chunk_len, **kw),
        packed_documents(), 16)

  def test_conv_alone(self):
    conv = tl.ModularCausalConv(n_modules=2, length_kernel_size=3, module_kernel_size=1)
    packed = tl.ModularCausalConv(n_modules=2, length_kernel_size=3, module_kernel_size=1,
                                  packed=True)
    docs = packed_documents((4, 2, 6))
    params = conv.init(jax.random.key(0), docs[0][None])['params']
    contracts.assert_packed_equals_unpacked(
        lambda p, x, seg, pos: packed.apply({'params': p}, x, seg),
        lambda p, x: conv.apply({'params': p}, x), params, docs, 14)


if __name__ == '__main__':
  absltest.main()
