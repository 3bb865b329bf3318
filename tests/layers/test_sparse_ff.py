"""SparseFF against a float64 numpy masked dense feed-forward and a hand-derived estimator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl

KEY = jax.random.key(0)
D_MODEL, D_FF, N_EL, D_LOWRANK = 8, 24, 4, 3
N_BLOCKS = D_FF // N_EL


def f64(x):
  return np.asarray(x, np.float64)


def make(mode, **kw):
  kw = {'d_ff': D_FF, 'n_elements_in_block': N_EL, 'd_lowrank': D_LOWRANK,
        'sow_choices': True, **kw}
  return tl.SparseFF(mode=mode, **kw)


def init_params(seed=0, **kw):
  """Parameters with non-zero biases, so every term of the reference matters."""
  x = jnp.zeros((1, 1, D_MODEL))
  params = nn.meta.unbox(make('eval', **kw).init(jax.random.key(seed), x)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + 0.3 * rng.standard_normal(p.shape), jnp.float32),
      params)


def np_logits(params, x):
  """Controller logits (..., k, e) in float64."""
  c = params['controller_logits']
  z = f64(x) @ f64(params['controller_lowrank']['kernel'])
  logits = z @ f64(c['kernel']) + f64(c['bias'])
  return logits.reshape(x.shape[:-1] + (N_BLOCKS, N_EL))


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_masked_ff(params, x, mask, activation=lambda h: np.maximum(h, 0)):
  """The dense feed-forward with its (..., k, e) hidden units multiplied by `mask`."""
  h = f64(x) @ f64(params['kernel_in']).T + f64(params['bias_in'])
  a = activation(h) * mask.reshape(h.shape)
  return a @ f64(params['kernel_out']) + f64(params['bias_out'])


def one_hot(choices):
  return np.eye(N_EL)[np.asarray(choices)]


def run(layer, params, x, rngs=None):
  y, state = layer.apply({'params': params}, x, rngs=rngs, mutable=['intermediates'])
  return y, state['intermediates']['choices'][0]


class SparseFFForwardTest(parameterized.TestCase):

  @parameterized.product(multiply=(False, True), length=(1, 5))
  def test_predict_gather_equals_numpy_masked_dense(self, multiply, length):
    params = init_params(multiply_by_controller_output=multiply)
    x = jax.random.normal(KEY, (3, length, D_MODEL))
    layer = make('predict', multiply_by_controller_output=multiply)
    variables = nn.meta.unbox(layer.init(KEY, x[:, :1]))
    self.assertEqual(set(variables), {'params'})  # no cache needed
    y, choices = run(layer, params, x)
    logits = np_logits(params, x)
    np.testing.assert_array_equal(choices, logits.argmax(-1))
    mask = one_hot(choices) * (np_softmax(logits) if multiply else 1.0)
    np.testing.assert_allclose(y, np_masked_ff(params, x, mask), rtol=1e-5, atol=1e-5)
    y_eval, choices_eval = run(make('eval', multiply_by_controller_output=multiply), params, x)
    np.testing.assert_array_equal(choices_eval, choices)
    np.testing.assert_allclose(y, y_eval, rtol=1e-5, atol=1e-5)

  def test_predict_with_other_activation_and_no_bias(self):
    gelu = lambda h: jax.nn.gelu(h, approximate=False)
    params = init_params(use_bias=False)
    self.assertNotIn('bias_in', params)
    x = jax.random.normal(KEY, (2, 3, D_MODEL))
    y, choices = run(make('predict', activation=gelu, use_bias=False), params, x)
    erf = np.vectorize(__import__('math').erf)
    h = f64(x) @ f64(params['kernel_in']).T
    a = 0.5 * h * (1 + erf(h / np.sqrt(2))) * one_hot(choices).reshape(h.shape)
    np.testing.assert_allclose(y, a @ f64(params['kernel_out']), rtol=1e-5, atol=1e-5)

  def test_eval_uses_exactly_one_unit_per_block(self):
    params = init_params()
    x = jax.random.normal(KEY, (1, 1, D_MODEL))
    y, choices = run(make('eval'), params, x)
    self.assertEqual(choices.shape, (1, 1, N_BLOCKS))
    self.assertTrue(np.all((choices >= 0) & (choices < N_EL)))
    np.testing.assert_allclose(y, np_masked_ff(params, x, one_hot(choices)), rtol=1e-5, atol=1e-5)
    chosen = np.asarray(choices[0, 0]) + N_EL * np.arange(N_BLOCKS)
    unchosen = np.setdiff1d(np.arange(D_FF), chosen)
    self.assertLen(unchosen, D_FF - N_BLOCKS)

    def perturb(units):
      p = dict(params)
      for name in ('kernel_in', 'kernel_out', 'bias_in'):
        p[name] = params[name].at[units].add(5.0)
      return run(make('eval'), p, x)[0]

    np.testing.assert_array_equal(perturb(unchosen), y)  # the other units are never used
    for unit in chosen:
      self.assertGreater(float(jnp.abs(perturb(np.array([unit])) - y).max()), 1e-3)

  def test_soft_mask_when_quant_prob_zero(self):
    params = init_params()
    x = jax.random.normal(KEY, (2, 3, D_MODEL))
    layer = make('train', quant_prob=0.0)
    y, _ = run(layer, params, x, rngs={'sparse': KEY})
    mask = np_softmax(np_logits(params, x))
    np.testing.assert_allclose(y, np_masked_ff(params, x, mask), rtol=1e-5, atol=1e-5)

  def test_chunked_equals_whole(self):
    params = init_params()
    x = jax.random.normal(KEY, (2, 7, D_MODEL))
    whole = make('eval', sow_choices=False).apply({'params': params}, x)
    chunked = cb.Chunk(make('eval', sow_choices=False), chunk_len=3)
    np.testing.assert_allclose(chunked.apply({'params': {'SparseFF_0': params}}, x), whole,
                               rtol=1e-6, atol=1e-6)

  def test_bfloat16_compute_float32_params(self):
    x = jnp.ones((1, 2, D_MODEL))
    layer = make('predict', dtype=jnp.bfloat16, sow_choices=False)
    variables = nn.meta.unbox(layer.init(KEY, x))
    self.assertEqual(variables['params']['kernel_in'].dtype, jnp.float32)
    self.assertEqual(layer.apply(variables, x).dtype, jnp.bfloat16)

  def test_same_parameters_in_every_mode(self):
    x = jnp.ones((1, 1, D_MODEL))
    shapes = [jax.tree_util.tree_map(jnp.shape, jax.eval_shape(
        make(mode).init, {'params': KEY, 'sparse': KEY}, x)) for mode in ('train', 'eval', 'predict')]
    self.assertEqual(shapes[0], shapes[1])
    self.assertEqual(shapes[0], shapes[2])

  @parameterized.parameters('eval', 'predict')
  def test_replay_uses_the_recorded_choices(self, mode):
    params = init_params()
    x = jax.random.normal(KEY, (2, 3, D_MODEL))
    recorded = np.random.default_rng(0).integers(-1, N_EL, (2, 3, N_BLOCKS)).astype(np.int8)
    layer = make(mode, replay=True, sow_choices=False)
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    y, choices = layer.apply({'params': params}, x, jnp.asarray(recorded))
    expected = np.where(recorded >= 0, recorded, np_logits(params, x).argmax(-1))
    self.assertEqual(choices.dtype, jnp.int8)
    np.testing.assert_array_equal(choices, expected)
    np.testing.assert_allclose(y, np_masked_ff(params, x, one_hot(expected)), rtol=1e-5,
                               atol=1e-5)

  def test_replay_with_nothing_recorded_is_the_plain_layer(self):
    """Same noise, same outputs and same gradients in train mode."""
    params = init_params()
    x = jax.random.normal(KEY, (2, 5, D_MODEL))
    nothing = jnp.full((2, 5, N_BLOCKS), -1, jnp.int32)
    rngs = {'sparse': jax.random.key(4)}
    plain = make('train', temperature=1.0, quant_prob=1.0, sow_choices=False)
    replay = make('train', temperature=1.0, quant_prob=1.0, sow_choices=False, replay=True)
    loss_plain = lambda p: jnp.sum(jnp.sin(plain.apply({'params': p}, x, rngs=rngs)))
    loss_replay = lambda p: jnp.sum(jnp.sin(replay.apply({'params': p}, x, nothing,
                                                         rngs=rngs)[0]))
    np.testing.assert_allclose(loss_replay(params), loss_plain(params), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(jax.grad(loss_replay)(params)),
                    jax.tree_util.tree_leaves(jax.grad(loss_plain)(params))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with self.assertRaisesRegex(ValueError, r'SparseFF takes \[x, recorded\] with replay=True'):
      replay.apply({'params': params}, x, rngs=rngs)
    with self.assertRaisesRegex(ValueError, 'recorded choices must be int'):
      replay.apply({'params': params}, x, nothing[:, :, :2], rngs=rngs)


class SparseFFTrainTest(parameterized.TestCase):

  def test_gumbel_noise_comes_from_the_sparse_stream(self):
    params = init_params()
    x = jax.random.normal(KEY, (4, 6, D_MODEL))
    layer = make('train', temperature=1.0, quant_prob=1.0)
    y1, c1 = run(layer, params, x, rngs={'sparse': jax.random.key(1)})
    y2, c2 = run(layer, params, x, rngs={'sparse': jax.random.key(1), 'dropout': KEY})
    y3, c3 = run(layer, params, x, rngs={'sparse': jax.random.key(2)})
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(y1, y2)
    self.assertGreater(int((c1 != c3).sum()), 0)
    # Whatever the sample, the forward pass is the masked dense FF of the choices.
    for y, c in ((y1, c1), (y3, c3)):
      np.testing.assert_allclose(y, np_masked_ff(params, x, one_hot(c)), rtol=1e-5, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "'sparse' rng stream"):
      layer.apply({'params': params}, x)

  def test_zero_temperature_is_eval_argmax(self):
    params = init_params()
    x = jax.random.normal(KEY, (2, 3, D_MODEL))
    y_train, c_train = run(make('train', temperature=0.0, quant_prob=1.0), params, x)
    y_eval, c_eval = run(make('eval'), params, x)
    np.testing.assert_array_equal(c_train, c_eval)
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-6, atol=1e-6)

  def test_samples_follow_the_tempered_softmax(self):
    params = init_params()
    temperature = 0.7
    x = jnp.broadcast_to(jax.random.normal(KEY, (1, 1, D_MODEL)), (1, 4000, D_MODEL))
    _, choices = run(make('train', temperature=temperature, quant_prob=1.0), params, x,
                     rngs={'sparse': jax.random.key(3)})
    frequencies = one_hot(choices[0]).mean(0)  # (k, e)
    expected = np_softmax(np_logits(params, x[:, :1])[0, 0] / temperature)
    np.testing.assert_allclose(frequencies, expected, atol=0.04)

  @parameterized.parameters(False, True)
  def test_straight_through_gradient_matches_hand_derived(self, multiply):
    params = init_params(multiply_by_controller_output=multiply)
    x = jax.random.normal(KEY, (2, 3, D_MODEL))
    c = np.asarray(jax.random.normal(jax.random.key(7), (2, 3, D_MODEL)))
    layer = make('train', temperature=0.5, quant_prob=1.0, multiply_by_controller_output=multiply)
    rngs = {'sparse': jax.random.key(5)}

    def loss(p):
      y, choices = run(layer, p, x, rngs)
      return jnp.sum(y * c), choices

    grads, choices = jax.grad(loss, has_aux=True)(params)
    choices = np.asarray(choices)

    # Forward: hard one-hot (times the probability with `multiply`). Backward:
    # d loss / d mask_u = a_u * (W_out[u] . c), pushed through the block softmax.
    logits = np_logits(params, x)
    probs = np_softmax(logits)
    h = f64(x) @ f64(params['kernel_in']).T + f64(params['bias_in'])
    a = np.maximum(h, 0).reshape(probs.shape)
    g_mask = a * (c @ f64(params['kernel_out']).T).reshape(probs.shape)
    if multiply:
      g_mask = g_mask * probs
    g_logits = probs * (g_mask - (probs * g_mask).sum(-1, keepdims=True))
    g_logits = g_logits.reshape(-1, D_FF)
    z = (f64(x) @ f64(params['controller_lowrank']['kernel'])).reshape(-1, D_LOWRANK)
    ctrl = grads['controller_logits']
    np.testing.assert_allclose(ctrl['bias'], g_logits.sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ctrl['kernel'], z.T @ g_logits, rtol=1e-4, atol=1e-6)
    self.assertGreater(float(jnp.abs(ctrl['bias']).max()), 1e-3)
    self.assertGreater(float(jnp.abs(grads['controller_lowrank']['kernel']).max()), 1e-3)

    # The forward mask is hard: units no token chose get no gradient in W_in.
    used = np.zeros(D_FF, bool)
    used[(choices + N_EL * np.arange(N_BLOCKS)).reshape(-1)] = True
    np.testing.assert_array_equal(np.asarray(grads['kernel_in'])[~used], 0.0)
    self.assertGreater(float(jnp.abs(grads['kernel_in'][used]).max()), 1e-4)

  def test_dropout_on_output_in_train_only(self):
    params = init_params()
    x = jax.random.normal(KEY, (2, 50, D_MODEL))
    layer = make('train', temperature=0.0, quant_prob=1.0, dropout=0.5)
    y, _ = run(layer, params, x, rngs={'dropout': KEY})
    y_eval, _ = run(make('eval', dropout=0.5), params, x)
    dropped = np.asarray(y) == 0
    self.assertBetween(float(dropped.mean()), 0.4, 0.6)
    np.testing.assert_allclose(np.asarray(y)[~dropped], 2 * np.asarray(y_eval)[~dropped],
                               rtol=1e-5, atol=1e-6)


class SparseFFErrorTest(absltest.TestCase):

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, 'd_ff=30 must be a multiple of n_elements_in_block=4'):
      tl.SparseFF(d_ff=30, n_elements_in_block=4)
    with self.assertRaisesRegex(ValueError, 'SparseFF mode must be one of'):
      tl.SparseFF(d_ff=8, mode='decode')
    with self.assertRaisesRegex(ValueError, r'quant_prob must be in \[0, 1\]'):
      tl.SparseFF(d_ff=8, n_elements_in_block=4, quant_prob=1.5)
    with self.assertRaisesRegex(ValueError, 'd_lowrank must be a positive int'):
      tl.SparseFF(d_ff=8, n_elements_in_block=4, d_lowrank=0)
    with self.assertRaises(TypeError):  # hyperparameters are keyword-only
      tl.SparseFF(8)  # pylint: disable=too-many-function-args


if __name__ == '__main__':
  absltest.main()
