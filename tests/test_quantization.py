"""Int8 and bfloat16 weights: the rounding bound, a quantized Dense within its documented
tolerance of the float one, a whole LM (eval and predict) on int8 weights, and decoding on
int8/bf16 weights equal to the eval forward pass on the same weights, token by token."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import traverse_util

import terraflax.layers as tl
import terraflax.models as tm
from terraflax import decoding
from terraflax import kernels
from terraflax import quantization as qz
from terraflax.kernels import lowp_cpu
from tests import contracts

KEY = jax.random.key(0)
LM = dict(vocab_size=13, d_model=16, d_ff=24, n_layers=2, n_heads=2, dropout=0.0, max_len=16)


class QuantizeTest(parameterized.TestCase):

  @parameterized.parameters(-1, -2, 0)
  def test_rounding_bound_and_range(self, axis):
    w = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    w[1, :, 2] = 0.0  # An all-zero column: scale 1, q 0.
    q, scale = qz.quantize(w, axis)
    self.assertEqual((q.dtype, scale.dtype), (jnp.int8, jnp.float32))
    self.assertEqual(scale.shape[axis], 1)
    q, scale = np.asarray(q, np.int32), np.asarray(scale, np.float64)
    self.assertLessEqual(np.abs(q).max(), 127)
    np.testing.assert_array_equal(np.abs(q).max(axis=axis), np.where(
        np.abs(w).max(axis=axis) > 0, 127, 0))  # Each slice's peak maps to +-127.
    error = np.abs(w - q * scale)
    self.assertTrue(np.all(error <= scale / 2 + 1e-7))

  def test_quantized_dense_within_documented_tolerance(self):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 6, 32)), jnp.float32)
    dense = tl.Dense(24)
    params = nn.meta.unbox(dense.init(KEY, x)['params'])
    params = dict(params, bias=jnp.asarray(rng.normal(size=(24,)), jnp.float32))
    qparams = qz.quantize_model_params(dense, params, x)
    self.assertEqual(qparams['kernel'].dtype, jnp.int8)
    self.assertEqual(qparams['kernel_scale'].shape, (1, 24))
    with qz.int8_inference():
      y_q = np.asarray(dense.apply({'params': qparams}, x), np.float64)
    x64 = np.asarray(x, np.float64)
    y = x64 @ np.asarray(params['kernel'], np.float64) + np.asarray(params['bias'], np.float64)
    # Documented bound: sum_i |x_i| * scale_j / 2 per output channel j (+ float32 rounding).
    bound = np.abs(x64).sum(-1, keepdims=True) * np.asarray(qparams['kernel_scale'])[0] / 2
    self.assertTrue(np.all(np.abs(y_q - y) <= bound + 1e-4))
    self.assertLess(np.abs(y_q - y).max() / np.abs(y).max(), 0.02)
    # The same computation through the dequantize-on-load path.
    y_deq = dense.apply({'params': qz.dequantize_params(qparams)}, x)
    np.testing.assert_allclose(y_deq, y_q, rtol=1e-5, atol=1e-5)

  def test_embedding_rows_and_errors(self):
    ids = jnp.asarray([[0, 3, 4]])
    embed = tl.Embedding(5, 8)
    params = nn.meta.unbox(embed.init(KEY, ids)['params'])
    qparams = qz.quantize_model_params(embed, params, ids)
    self.assertEqual(qparams['embedding_scale'].shape, (5, 1))
    with qz.int8_inference():
      rows = embed.apply({'params': qparams}, ids)
    table = np.asarray(params['embedding'])
    np.testing.assert_allclose(rows, table[np.asarray(ids)],
                               atol=float(np.abs(table).max() / 254 + 1e-7))
    dense = tl.Dense(3)
    bare = {'kernel': jnp.ones((4, 3), jnp.int8), 'bias': jnp.zeros((3,))}
    with self.assertRaisesRegex(ValueError, 'kernel is int8 but there is no kernel_scale'):
      with qz.int8_inference():
        dense.apply({'params': bare}, jnp.ones((1, 4)))


class QuantizedLMTest(absltest.TestCase):

  def test_lm_on_int8_weights_in_eval_and_predict(self):
    x = jnp.asarray(np.random.default_rng(0).integers(1, 13, (2, 7)), jnp.int32)
    model = tm.TransformerLM(mode='eval', **LM)
    params = model.init(KEY, x)['params']
    qparams = qz.quantize_model_params(model, params, x)
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(qparams)
               if path[-1].key in ('kernel', 'embedding')]
    self.assertLen(kernels, 8)  # Embedding, q/k/v/output, two feed-forward Dense, output Dense.
    self.assertTrue(all(k.dtype == jnp.int8 for k in kernels))
    self.assertLess(qz.nbytes(qparams), 0.45 * qz.nbytes(params))
    apply = jax.jit(model.apply)
    full = apply({'params': params}, x)
    with qz.int8_inference():
      quantized = jax.jit(model.apply)({'params': qparams}, x)
      predict = tm.TransformerLM(mode='predict', **LM)
      cache = predict.init(KEY, x[:, :1])['cache']
      shifted = jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]
      stepped, _ = jax.jit(lambda c, t: predict.apply({'params': qparams, 'cache': c}, t,
                                                      mutable=['cache']))(cache, shifted)
    self.assertLess(float(jnp.abs(quantized - full).max()), 0.05 * float(jnp.abs(full).max()))
    np.testing.assert_allclose(stepped, quantized, rtol=1e-5, atol=1e-5)
    reference = apply({'params': qz.dequantize_params(qparams)}, x)
    np.testing.assert_allclose(quantized, reference, rtol=1e-5, atol=1e-5)


# Widths with whole 32-column blocks of the native kernel and a tail (vocab 40, d_ff 72).
LM_WIDE = dict(vocab_size=40, d_model=32, d_ff=72, n_layers=2, n_heads=2, dropout=0.0,
               max_len=16)


class LowPrecisionDecodingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x = jnp.asarray(np.random.default_rng(2).integers(1, 40, (2, 9)), jnp.int32)
    cls.params = tm.TransformerLM(mode='eval', **LM_WIDE).init(KEY, cls.x)['params']

  @parameterized.parameters('int8', 'bf16')
  def test_decoding_equals_eval_on_the_same_weights(self, weights):
    eval_model = tm.TransformerLM(mode='eval', **LM_WIDE)
    predict = tm.TransformerLM(mode='predict', **LM_WIDE)
    context, params = qz.prepare_for_decoding(predict, self.params, weights=weights)
    shifted = jnp.pad(self.x, ((0, 0), (1, 0)))[:, :-1]
    with context:
      full = jax.jit(eval_model.apply)({'params': params}, self.x)  # shifts right itself
      stepped = contracts.predict_one_at_a_time(predict, params, shifted)
      text = jax.jit(eval_model.apply).lower({'params': params}, self.x).as_text()
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
    if lowp_cpu.available() and kernels.native_allowed():  # The weights were read as stored.
      target = lowp_cpu.INT8 if weights == 'int8' else lowp_cpu.BF16
      # Six Dense layers in the scanned block (q, k, v, output, two feed-forward) + the head.
      self.assertEqual(text.count(target), 7)
    # Against the float32 model: the low-precision one is close, not equal.
    reference = eval_model.apply({'params': self.params}, self.x)
    self.assertLess(float(jnp.abs(full - reference).max()), 0.05 * float(jnp.abs(reference).max()))
    self.assertGreater(float(jnp.abs(full - reference).max()), 0.0)

  def test_bf16_casts_only_the_weights_read_as_stored(self):
    size = dict(LM_WIDE, max_len=128, d_ff=64)
    predict = tm.TerraformerLM(mode='predict', **size)
    params = tm.TerraformerLM(mode='eval', **size).init(KEY, self.x[:1])['params']
    layers = qz.find_quantizable(predict, jnp.zeros((1, 1), jnp.int32))
    for embeddings in (True, False):
      _, cast = qz.prepare_for_decoding(predict, params, weights='bf16', embeddings=embeddings)
      flat = {'/'.join(k): v.dtype for k, v in traverse_util.flatten_dict(cast).items()}
      low = {name for name, dtype in flat.items() if dtype == jnp.bfloat16}
      want = {'/'.join(path) + ('/kernel' if kind == qz.DENSE else '/embedding')
              for path, kind in layers.items() if embeddings or kind == qz.DENSE}
      self.assertEqual(low, want)
      self.assertTrue(any(name.endswith('/kernel') for name in low))
      # SparseFF's units, sparse QKV's convolutions and stacked norm scales stay float32.
      for name in ('kernel_in', 'kernel_out', 'query_conv/kernel', 'LayerNorm_0/scale'):
        matching = [n for n in flat if n.endswith(name)]
        self.assertNotEqual(matching, [], name)
        self.assertTrue(all(flat[n] == jnp.float32 for n in matching), name)

  @parameterized.parameters((tm.ReformerLM, 'bf16'), (tm.TerraformerLM, 'int8'),
                            (tm.TerraformerLM, 'bf16'))
  def test_other_lms_decode_as_they_evaluate(self, make, weights):
    # LSH's predict memory holds its chunk neighbourhood; SparseFF blocks of 32 units.
    size = dict(LM_WIDE, max_len=128, d_ff=64)
    x = self.x[:1]
    eval_model, predict = make(mode='eval', **size), make(mode='predict', **size)
    params = eval_model.init(KEY, x)['params']
    context, params = qz.prepare_for_decoding(predict, params, weights=weights)
    with context:
      full = eval_model.apply({'params': params}, x,
                              rngs={'hash': jax.random.key(1), 'sparse': jax.random.key(2)})
      shifted = jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]
      stepped = contracts.predict_one_at_a_time(predict, params, shifted)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)

  def test_greedy_sampling_follows_the_eval_argmax(self):
    predict = tm.TransformerLM(mode='predict', **LM_WIDE)
    eval_model = tm.TransformerLM(mode='eval', **LM_WIDE)
    context, params = qz.prepare_for_decoding(predict, self.params, weights='int8')
    prompt = self.x[:, :3]
    with context:
      tokens = decoding.autoregressive_sample(predict, params, prompt, 5, temperature=0.0)
      # Eval shifts right itself: its logits at position t follow tokens < t.
      logits = eval_model.apply({'params': params}, jnp.concatenate([prompt, tokens], axis=1))
    # Each generated token is the eval pass's argmax after the tokens before it.
    np.testing.assert_array_equal(tokens, jnp.argmax(logits[:, 3:], -1))

  def test_slots_vmapped_over_one_int8_step_read_the_weights_once(self):
    # The server's shape: one decode step vmapped over slots, each slot its own (1, 1) token
    # and cache; the weights are shared, so each product takes every slot's row at once.
    predict = tm.TransformerLM(mode='predict', **LM_WIDE)
    context, params = qz.prepare_for_decoding(predict, self.params, weights='int8')
    tokens = self.x[:, :1].reshape(2, 1, 1)  # (slots, b=1, 1)
    caches = jax.vmap(lambda t: predict.init(KEY, t)['cache'])(tokens)

    def step(cache, token):
      return predict.apply({'params': params, 'cache': cache}, token, mutable=['cache'])[0]

    with context:
      slots = jax.jit(jax.vmap(step))
      together = slots(caches, tokens)
      alone = [jax.jit(step)(jax.tree_util.tree_map(lambda c: c[i], caches), tokens[i])
               for i in range(2)]
      text = slots.lower(caches, tokens).as_text()
    np.testing.assert_allclose(together, np.stack(alone), rtol=1e-6, atol=1e-6)
    if lowp_cpu.available() and kernels.native_allowed():
      calls = [line for line in text.splitlines() if lowp_cpu.INT8 in line]
      # One product per Dense whose x holds both slots' rows, not one call per slot.
      self.assertLen(calls, 7)
      self.assertTrue(all(': (tensor<2x' in line for line in calls), calls[0])

  def test_cast_weights_and_prepare_errors(self):
    cast = qz.cast_weights(self.params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(cast):
      self.assertEqual(leaf.dtype, jnp.bfloat16 if leaf.ndim >= 2 else jnp.float32, path)
    self.assertLess(qz.nbytes(cast), 0.55 * qz.nbytes(nn.meta.unbox(self.params)))
    context, same = qz.prepare_for_decoding(None, self.params, weights='f32')
    with context:
      pass
    self.assertEqual(qz.nbytes(same), qz.nbytes(nn.meta.unbox(self.params)))
    with self.assertRaisesRegex(ValueError, r"weights must be one of \('f32', 'bf16', 'int8'\)"):
      qz.prepare_for_decoding(None, self.params, weights='int4')


if __name__ == '__main__':
  absltest.main()
