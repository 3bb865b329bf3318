"""MultiplicativeDense and ModularCausalConv against float64 numpy definitions."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl

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
    variables = randomise(layer.init(KEY, x))
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
    variables = layer.init(KEY, jnp.zeros((1, 1, d)))
    self.assertEqual(n_params(variables), d * (n_modules + d // n_modules) + d)
    no_bias = tl.MultiplicativeDense(n_modules=n_modules, use_bias=False)
    self.assertEqual(n_params(no_bias.init(KEY, jnp.zeros((1, 1, d)))), d * (8 + 8))
    self.assertLess(n_params(variables), n_params(tl.Dense(d).init(KEY, jnp.zeros((1, d)))) / 3)

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, 'd_out=10 must be a multiple of n_modules=4'):
      tl.MultiplicativeDense(n_modules=4, d_out=10)
    with self.assertRaisesRegex(ValueError, r'output width 6 \(the input width, as d_out is unset\) must be a multiple of n_modules=4'):
      tl.MultiplicativeDense(n_modules=4).init(KEY, jnp.zeros((1, 6)))
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
    variables = randomise(layer.init(KEY, x))
    p = variables['params']
    self.assertEqual(p['kernel'].shape, (k_len, k_mod, d // n_modules, d_module_out or 3))
    full = layer.apply(variables, x)
    np.testing.assert_allclose(full, np_causal_conv(x, p['kernel'], p['bias'], n_modules),
                               rtol=1e-5, atol=1e-5)

    predict = tl.ModularCausalConv(mode='predict', **kw)
    cache = predict.init(KEY, x[:, :1]).get('cache', {})
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
    variables = randomise(make('eval').init(KEY, x))
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
    variables = randomise(layer.init(KEY, x))
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

    variables = randomise(make('eval').init(KEY, x))
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
      tl.ModularCausalConv(n_modules=2).init(KEY, jnp.zeros((1, 3, 5)))
    with self.assertRaisesRegex(ValueError, r'expects \(b, l, d\) inputs'):
      tl.ModularCausalConv(n_modules=2).init(KEY, jnp.zeros((3, 4)))


if __name__ == '__main__':
  absltest.main()
