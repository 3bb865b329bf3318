"""Reversible layers: the custom VJP equals plain autodiff, reverse inverts forward."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl

KEY = jax.random.key(0)
D = 4
RNGS = {'dropout': jax.random.key(11), 'hash': jax.random.key(12)}


class HashNoise(cb.Layer):
  """[x] -> [x * (1 + noise)], noise drawn from the `hash` stream (an LSH stand-in)."""

  @nn.compact
  def __call__(self, x):
    return x * (1.0 + 0.5 * jax.random.normal(self.make_rng('hash'), x.shape))


class Gate(cb.Layer):
  """[x, ctx] -> [dense(x) * tanh(ctx)]: a 2 -> 1 layer that reads a context."""

  n_in = 2

  @nn.compact
  def __call__(self, x, ctx):
    return tl.Dense(D)(x) * jnp.tanh(ctx)


class GateKeepingContext(cb.Layer):
  """[x, ctx] -> [dense(x) * tanh(ctx), ctx]: like attention passing its mask on."""

  n_in = 2
  n_out = 2

  @nn.compact
  def __call__(self, x, ctx):
    return tl.Dense(D)(x) * jnp.tanh(ctx), ctx


class MaskedDense(cb.Layer):
  """[x, mask] -> [dense(x) * mask]: mask is int32 (b, l, 1), no gradient."""

  n_in = 2

  @nn.compact
  def __call__(self, x, mask):
    return tl.Dense(D)(x) * mask.astype(x.dtype)


class ReversibleScale(cb.ReversibleLayer):
  """[x] -> [x * exp(s)], s a learned (d,) vector; reverse divides (a generic layer)."""

  @nn.compact
  def _scale(self, d):
    return jnp.exp(self.param('log_scale', nn.initializers.normal(0.5), (d,)))

  def __call__(self, x):
    return x * tl.core.lift_to(self._scale(x.shape[-1]), x)

  def reverse(self, y):
    return y / tl.core.lift_to(self._scale(y.shape[-1]), y)


class CumulativeSum(cb.Layer):
  """[x] -> [cumsum(x) along axis 1]: (b, l, d); predict mode caches the running sum."""

  mode: str = 'train'

  @nn.compact
  def __call__(self, x):
    if self.mode != 'predict':
      return jnp.cumsum(x, axis=1)
    total = self.variable('cache', 'total', lambda: jnp.zeros((x.shape[0], x.shape[2]), x.dtype))
    y = total.value[:, None, :] + jnp.cumsum(x, axis=1)
    if not self.is_initializing():
      total.value = y[:, -1]
    return y


def block(dropout=0.25):
  """One two-stream block: attention-like and feed-forward half residuals."""
  return [
      cb.ReversibleHalfResidual(tl.LayerNorm(), HashNoise(), tl.Dense(D), tl.Dropout(dropout)),
      cb.ReversibleSwap(),
      cb.ReversibleHalfResidual(tl.FeedForward(d_model=D, d_ff=8, dropout=dropout)),
      cb.ReversibleSwap(),
  ]


def lsh_block(dropout=0.25):
  """A Reformer block with real LSH attention (2 rounds, 4 buckets, chunks of 4)."""
  return [
      cb.ReversibleHalfResidual(
          tl.LayerNorm(),
          tl.LSHSelfAttention(n_heads=2, d_qk=2, d_v=2, n_hashes=2, n_buckets=4, chunk_len=4,
                              causal=True, dropout=dropout),
          tl.Dropout(dropout)),
      cb.ReversibleSwap(),
      cb.ReversibleHalfResidual(tl.FeedForward(d_model=D, d_ff=8, dropout=dropout)),
      cb.ReversibleSwap(),
  ]


def context_block(dropout=0.25):
  """A block on [x1, x2, ctx, mask]: every layer reads a context item."""
  return [
      cb.ReversibleHalfResidual(HashNoise(), Gate(), tl.Dropout(dropout)),  # 3 -> 3
      cb.ReversibleSwap(),
      cb.ReversibleHalfResidual(GateKeepingContext(), tl.Dropout(dropout)),  # 3 -> 3
      cb.ReversibleHalfResidual(cb.Select([0, 2], n_in=3), MaskedDense()),  # 4 -> 4
      cb.ReversibleSwap(),
  ]


def unrolled_params(stacked, layers, n_repeats):
  """{name of unrolled layer i: its parameters} from a stacked parameter dict."""
  per_block = len(layers) // n_repeats
  out = {}
  for i, layer in enumerate(layers):
    name_in_block = layers[i % per_block].name
    if name_in_block in stacked:
      out[layer.name] = jax.tree_util.tree_map(lambda p, b=i // per_block: p[b],
                                               stacked[name_in_block])
  return out


class BaseKeys(nn.Module):
  """The keys a root module gets from `make_rng`, as ReversibleSerial draws them."""

  @nn.compact
  def __call__(self):
    return {stream: self.make_rng(stream) for stream in RNGS}


def plain_stack(layers, params, stack):
  """Independent reference: plain autodiff through each layer's own `apply`.

  Layer i draws from `fold_in(base, i)` (the documented derivation), so its
  dropout masks and hash noise are the ones the reversible stack replays.
  """
  base = BaseKeys().apply({}, rngs=RNGS)
  stack = list(stack)
  for i, layer in enumerate(layers):
    rngs = {s: jax.random.fold_in(k, i) for s, k in base.items()}
    variables = {'params': params[layer.name]} if layer.name in params else {}
    out = layer.apply(variables, *stack[:layer.n_in], rngs=rngs)
    stack = list(out if isinstance(out, tuple) else (out,)) + stack[layer.n_in:]
  return stack


def relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def assert_trees_rel_close(test, tree, reference, tol=1e-4):
  chex.assert_trees_all_equal_structs(tree, reference)
  for path, (a, b) in zip(
      jax.tree_util.tree_flatten_with_path(tree)[0],
      zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(reference))):
    test.assertLess(relative_error(a, b), tol, msg=jax.tree_util.keystr(path[0]))


def inputs(n=2):
  keys = jax.random.split(jax.random.key(5), n)
  return [jax.random.normal(k, (2, 5, D)) for k in keys]


def loss_of_stack(stack):
  # A loss that weighs every output differently, so every cotangent matters.
  return sum(jnp.sum(jnp.sin((i + 1.0) * y)) for i, y in enumerate(stack)
             if jnp.issubdtype(y.dtype, jnp.floating))


class GradientTest(absltest.TestCase):

  def test_gradients_equal_plain_autodiff_with_dropout_and_hash(self):
    model = cb.ReversibleSerial(*block(), n_repeats=3)
    x1, x2 = inputs()
    variables = nn.meta.unbox(model.init(KEY, x1, x2))
    unrolled = block() + block() + block()
    cb.Serial(*unrolled)  # Names the layers by position, as an unrolled stack does.

    def loss(params, x1, x2, rngs):
      return loss_of_stack(model.apply({'params': params}, x1, x2, rngs=rngs))

    def ref_loss(params, x1, x2):
      return loss_of_stack(plain_stack(unrolled, params, [x1, x2]))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    value, grads = step(variables['params'], x1, x2, RNGS)
    ref_value, ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(
        unrolled_params(variables['params'], unrolled, 3), x1, x2)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    assert_trees_rel_close(
        self, (unrolled_params(grads[0], unrolled, 3),) + grads[1:], ref_grads)
    # Both streams of randomness are really drawn: other keys change the loss.
    for stream in RNGS:
      other_value, _ = step(variables['params'], x1, x2,
                            dict(RNGS, **{stream: jax.random.key(99)}))
      self.assertGreater(abs(float(value - other_value)), 1e-3)

  def test_gradients_equal_plain_autodiff_with_dropout_and_lsh_attention(self):
    model = cb.ReversibleSerial(*lsh_block(), n_repeats=2)
    # Length 6 is padded to two chunks of 4 inside the LSH layers.
    x1, x2 = (jax.random.normal(k, (2, 6, D)) for k in jax.random.split(jax.random.key(3)))
    variables = nn.meta.unbox(model.init({'params': KEY, **RNGS}, x1, x2))
    unrolled = lsh_block() + lsh_block()
    cb.Serial(*unrolled)  # Names the layers by position, as an unrolled stack does.

    def loss(params, x1, x2, rngs):
      return loss_of_stack(model.apply({'params': params}, x1, x2, rngs=rngs))

    def ref_loss(params, x1, x2):
      return loss_of_stack(plain_stack(unrolled, params, [x1, x2]))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    value, grads = step(variables['params'], x1, x2, RNGS)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2)))(
        unrolled_params(variables['params'], unrolled, 2), x1, x2)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    assert_trees_rel_close(
        self, (unrolled_params(grads[0], unrolled, 2),) + grads[1:], ref_grads)
    # Dropout masks and hash rotations are really drawn: other keys change the loss.
    for stream in RNGS:
      other_value, _ = step(variables['params'], x1, x2,
                            dict(RNGS, **{stream: jax.random.key(99)}))
      self.assertGreater(abs(float(value - other_value)), 1e-4)

  def test_generic_reversible_layer_nested_stack_and_shared_layer(self):
    def model(reversible):
      inner = cb.ReversibleSerial(cb.ReversibleHalfResidual(tl.Dense(D)), cb.ReversibleSwap())
      shared = cb.ReversibleHalfResidual(tl.Dense(D), tl.Tanh())  # used twice, one parameter set
      return cb.ReversibleSerial(ReversibleScale(), shared, inner, shared, ReversibleScale(),
                                 reversible=reversible)

    rev, plain = model(True), model(False)
    self.assertEqual((rev.n_in, rev.n_out), (2, 2))
    x1, x2 = inputs()
    variables = nn.meta.unbox(rev.init(KEY, x1, x2))
    self.assertEqual(sorted(variables['params']), [
        'ReversibleHalfResidual_1', 'ReversibleScale_0', 'ReversibleScale_4',
        'ReversibleSerial_2'])
    grad = lambda m: jax.grad(lambda v, x: loss_of_stack(m.apply(v, x, x2)), argnums=(0, 1))(
        variables, x1)
    assert_trees_rel_close(self, grad(rev), grad(plain))
    ys = rev.apply(variables, x1, x2)
    chex.assert_trees_all_close(rev.apply(variables, *ys, method='reverse'), (x1, x2),
                                atol=1e-5)


class ReverseTest(absltest.TestCase):

  def test_reverse_of_forward_reconstructs_inputs(self):
    model = cb.ReversibleSerial(*block(), *block())
    x1, x2 = inputs()
    variables = nn.meta.unbox(model.init(KEY, x1, x2))
    y1, y2 = model.apply(variables, x1, x2, rngs=RNGS)
    self.assertGreater(float(jnp.max(jnp.abs(y1 - x1))), 0.1)
    r1, r2 = model.apply(variables, y1, y2, rngs=RNGS, method='reverse')
    np.testing.assert_allclose(r1, x1, atol=1e-5)
    np.testing.assert_allclose(r2, x2, atol=1e-5)

  def test_half_residual_and_swap(self):
    x1, x2, ctx = inputs(3)
    layer = cb.ReversibleHalfResidual(Gate())
    self.assertEqual((layer.n_in, layer.n_out), (3, 3))
    variables = nn.meta.unbox(layer.init(KEY, x1, x2, ctx))
    y1, y2, c = layer.apply(variables, x1, x2, ctx)
    kernel = variables['params']['Gate_0']['Dense_0']['kernel']
    bias = variables['params']['Gate_0']['Dense_0']['bias']
    expected = np.asarray(x1, np.float64) + (
        np.asarray(x2, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias)) * np.tanh(
            np.asarray(ctx, np.float64))
    np.testing.assert_allclose(y1, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal((y2, c), (x2, ctx))
    chex.assert_trees_all_close(layer.apply(variables, y1, y2, c, method='reverse'),
                                (x1, x2, ctx), atol=1e-5)
    swap = cb.ReversibleSwap()
    chex.assert_trees_all_equal(swap.apply({}, x1, x2), (x2, x1))
    chex.assert_trees_all_equal(swap.apply({}, x2, x1, method='reverse'), (x1, x2))


class ScanTest(absltest.TestCase):

  def test_scanned_equals_unrolled_and_reverses(self):
    scanned = cb.ReversibleSerial(*block(), n_repeats=3)
    unrolled_layers = block() + block() + block()
    unrolled = cb.ReversibleSerial(*unrolled_layers)
    x1, x2 = inputs()
    variables = nn.meta.unbox(scanned.init(KEY, x1, x2))
    # Parameters read like Serial(*block())'s, with a leading axis of 3.
    plain = nn.meta.unbox(jax.eval_shape(cb.Serial(*block()).init, KEY, x1, x2))
    chex.assert_trees_all_equal_structs(variables, plain)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(plain)):
      self.assertEqual(a.shape, (3,) + b.shape)
    names = [layer.name for layer in scanned.layers]
    self.assertEqual(names, ['ReversibleHalfResidual_0', 'ReversibleSwap_1',
                             'ReversibleHalfResidual_2', 'ReversibleSwap_3'])
    params = unrolled_params(variables['params'], unrolled_layers, 3)
    chex.assert_trees_all_equal_structs(
        {'params': params}, nn.meta.unbox(jax.eval_shape(unrolled.init, KEY, x1, x2)))
    # Same outputs, dropout and hash noise included.
    outputs = scanned.apply(variables, x1, x2, rngs=RNGS)
    chex.assert_trees_all_close(outputs, unrolled.apply({'params': params}, x1, x2, rngs=RNGS),
                                rtol=1e-5, atol=1e-6)
    # reversible=False: the same parameters and function.
    plain_model = cb.ReversibleSerial(*block(), n_repeats=3, reversible=False)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        variables, nn.meta.unbox(jax.eval_shape(plain_model.init, KEY, x1, x2)))
    chex.assert_trees_all_close(outputs, plain_model.apply(variables, x1, x2, rngs=RNGS),
                                rtol=1e-6)
    chex.assert_trees_all_close(scanned.apply(variables, *outputs, rngs=RNGS, method='reverse'),
                                (x1, x2), atol=1e-5)

  def test_init_equals_plain_serial_for_unstacked_layers(self):
    x1, x2 = inputs()
    layers = block()
    model = cb.ReversibleSerial(*layers)
    chex.assert_trees_all_equal(model.init(KEY, x1, x2), cb.Serial(*block()).init(KEY, x1, x2))


class ContextTest(parameterized.TestCase):

  @parameterized.named_parameters(('unrolled', None), ('scanned', 2))
  def test_context_passes_through_and_gets_gradients(self, n_repeats):
    layers = context_block() if n_repeats else context_block() + context_block()
    model = cb.ReversibleSerial(*layers, n_repeats=n_repeats)
    self.assertEqual((model.n_in, model.n_out), (4, 4))
    x1, x2, ctx = inputs(3)
    mask = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 5, 1)), jnp.int32)
    variables = nn.meta.unbox(model.init(KEY, x1, x2, ctx, mask))
    unrolled = context_block() + context_block()
    cb.Serial(*unrolled)
    ref_params = (unrolled_params(variables['params'], unrolled, n_repeats) if n_repeats
                  else variables['params'])
    unrolled = unrolled if n_repeats else layers

    def loss(params, x1, ctx):
      outputs = model.apply({'params': params}, x1, x2, ctx, mask, rngs=RNGS)
      return loss_of_stack(outputs), outputs

    def ref_loss(params, x1, ctx):
      return loss_of_stack(plain_stack(unrolled, params, [x1, x2, ctx, mask]))

    grads, outputs = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
        variables['params'], x1, ctx)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(ref_params, x1, ctx)
    chex.assert_trees_all_equal(outputs[2:], (ctx, mask))
    if not n_repeats:  # ScanTest reverses a scanned stack.
      chex.assert_trees_all_close(model.apply(variables, *outputs, rngs=RNGS, method='reverse'),
                                  (x1, x2, ctx, mask), atol=1e-5)
    if n_repeats:
      grads = (unrolled_params(grads[0], unrolled, n_repeats),) + grads[1:]
    assert_trees_rel_close(self, grads, ref_grads)
    # The context's gradient is more than the identity's 1 from the loss.
    self.assertGreater(relative_error(grads[2], jnp.cos(3.0 * ctx) * 3.0), 1e-2)

  def test_half_residual_keeping_context_drops_the_extra_output(self):
    layer = cb.ReversibleHalfResidual(GateKeepingContext())
    self.assertEqual((layer.n_in, layer.n_out), (3, 3))
    x1, x2, ctx = inputs(3)
    variables = nn.meta.unbox(layer.init(KEY, x1, x2, ctx))
    dense_params = variables['params']['GateKeepingContext_0']['Dense_0']
    dense = tl.Dense(D).apply({'params': dense_params}, x2)
    chex.assert_trees_all_close(layer.apply(variables, x1, x2, ctx),
                                (x1 + dense * jnp.tanh(ctx), x2, ctx), rtol=1e-6)


class ModesTest(absltest.TestCase):

  def test_predict_mode_caches_are_stacked_and_decode_like_eval(self):
    def model(mode):
      return cb.Serial(
          cb.Dup(),
          cb.ReversibleSerial(
              cb.ReversibleHalfResidual(tl.Dense(D), CumulativeSum(mode=mode), tl.Tanh()),
              cb.ReversibleSwap(), n_repeats=3),
          cb.MergeStreams('mean'))

    x = jax.random.normal(KEY, (2, 6, D))
    eval_model, predict_model = model('eval'), model('predict')
    variables = nn.meta.unbox(eval_model.init(KEY, x))
    full = eval_model.apply(variables, x)
    cache = predict_model.init(KEY, x[:, :1])['cache']
    self.assertEqual(
        cache['ReversibleSerial_1']['ReversibleHalfResidual_0']['CumulativeSum_1']['total'].shape,
        (3, 2, D))
    steps = []
    for i in range(x.shape[1]):
      y, mutated = predict_model.apply({'params': variables['params'], 'cache': cache},
                                       x[:, i:i + 1], mutable=['cache'])
      cache = mutated['cache']
      steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-6)


class WiringTest(absltest.TestCase):

  def test_merge_streams(self):
    a, b = inputs()
    np.testing.assert_allclose(cb.MergeStreams('mean').apply({}, a, b), (a + b) / 2)
    self.assertEqual(cb.MergeStreams('concat').apply({}, a, b).shape, (2, 5, 2 * D))
    with self.assertRaisesRegex(ValueError, "how must be 'mean' or 'concat'"):
      cb.MergeStreams('max')

  def test_n_in_n_out(self):
    self.assertEqual((cb.ReversibleSwap().n_in, cb.ReversibleSwap().n_out), (2, 2))
    half = cb.ReversibleHalfResidual(tl.LayerNorm(), tl.Dense(D))
    self.assertEqual((half.n_in, half.n_out), (2, 2))
    self.assertEqual(cb.ReversibleSerial(*block()).n_in, 2)
    self.assertEqual(cb.ReversibleSerial(*context_block(), n_repeats=4).n_out, 4)

  def test_bad_wiring_is_a_clear_error(self):
    with self.assertRaisesRegex(cb.LayerError, r'Dense at position 1.*no reverse'):
      cb.ReversibleSerial(cb.ReversibleSwap(), tl.Dense(D))
    with self.assertRaisesRegex(cb.LayerError, 'n_repeats=None or an int >= 1'):
      cb.ReversibleSerial(cb.ReversibleSwap(), n_repeats=0)
    with self.assertRaisesRegex(cb.LayerError, 'n_out=1 .* got n_in=3, n_out=2'):
      cb.ReversibleHalfResidual(cb.Fn('F', lambda a, b, c: (a, b), n_out=2))
    with self.assertRaisesRegex(cb.LayerError, 'at least x2'):
      cb.ReversibleHalfResidual()
    layer = cb.ReversibleHalfResidual(tl.Dense(D + 1))
    x1, x2 = inputs()
    with self.assertRaisesRegex(cb.LayerError, 'residual f.*shape of x1'):
      nn.meta.unbox(layer.init(KEY, x1, x2))

  def test_half_residual_keeps_the_stream_dtype(self):
    layer = cb.ReversibleHalfResidual(tl.Dense(D))
    x1, x2 = (x.astype(jnp.bfloat16) for x in inputs())
    variables = nn.meta.unbox(layer.init(KEY, x1, x2))
    self.assertEqual(layer.apply(variables, x1, x2)[0].dtype, jnp.bfloat16)


class SegmentIdsTest(absltest.TestCase):
  """Packed rows: segment ids ride through a scanned ReversibleSerial as integer context."""

  def test_segment_ids_pass_through_reverse_and_gradients(self):
    def block():
      return [cb.ReversibleHalfResidual(tl.LayerNorm(), tl.CausalAttention(n_heads=2, packed=True)),
              cb.ReversibleSwap(),
              cb.ReversibleHalfResidual(tl.Dense(D)),
              cb.ReversibleSwap()]

    rng = np.random.default_rng(1)
    x1, x2 = (jnp.asarray(rng.normal(size=(2, 6, D)), jnp.float32) for _ in range(2))
    segments = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]], jnp.int32)
    models = [cb.ReversibleSerial(*block(), n_repeats=2, reversible=r) for r in (True, False)]
    self.assertEqual((models[0].n_in, models[0].n_out), (3, 3))
    variables = models[0].init(KEY, x1, x2, segments)

    def loss(model, params, x1, x2):
      y1, y2, seg = model.apply({'params': params}, x1, x2, segments)
      return jnp.sum(jnp.sin(y1) * y2), seg

    outputs = models[0].apply(variables, x1, x2, segments)
    self.assertIs(outputs[2].dtype, segments.dtype)
    np.testing.assert_array_equal(outputs[2], segments)
    rebuilt = models[0].apply(variables, *outputs, method='reverse')
    chex.assert_trees_all_close(rebuilt[:2], (x1, x2), atol=1e-5)
    np.testing.assert_array_equal(rebuilt[2], segments)
    grads = [jax.grad(lambda p, a, b, m=m: loss(m, p, a, b), argnums=(0, 1, 2), has_aux=True)(
        variables['params'], x1, x2)[0] for m in models]
    # Absolute: the key bias's gradient is zero up to rounding (softmax ignores the shift).
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


if __name__ == '__main__':
  absltest.main()
