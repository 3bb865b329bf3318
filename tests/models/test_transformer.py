"""Transformer models: predict == eval token by token, one parameter tree for all modes."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.models as tm

KEY = jax.random.key(0)
LM = dict(vocab_size=13, d_model=16, d_ff=24, n_layers=2, n_heads=2, dropout=0.0, max_len=16)
SEQ2SEQ = dict(LM, output_vocab_size=11)
ENCODER = dict(LM, n_classes=3)


def tokens(shape, seed=0, low=1, high=13):
  return jnp.asarray(np.random.default_rng(seed).integers(low, high, size=shape), jnp.int32)


def fake_params(model, *inputs, seed=0):
  """Random parameters of the shapes `model.init` gives, without compiling init."""
  shapes = jax.eval_shape(model.init, KEY, *inputs)['params']
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                                shapes)


def shapes_of(model, *inputs):
  return jax.tree_util.tree_map(lambda s: (s.shape, s.dtype),
                                jax.eval_shape(model.init, KEY, *inputs)['params'])


class TransformerLMTest(parameterized.TestCase):

  def test_same_parameters_in_every_mode(self):
    x = tokens((2, 6))
    trees = [shapes_of(tm.TransformerLM(mode=mode, attention_chunk_len=4, ff_chunk_len=2, **LM),
                       x[:, :1] if mode == 'predict' else x)
             for mode in ('train', 'eval', 'predict')]
    self.assertEqual(trees[0], trees[1])
    self.assertEqual(trees[0], trees[2])
    # Attention chunking does not change the parameters (feed-forward chunking adds a level).
    self.assertEqual(shapes_of(tm.TransformerLM(mode='eval', attention_chunk_len=4, **LM), x),
                     shapes_of(tm.TransformerLM(mode='eval', **LM), x))
    # Blocks are scanned: their parameters carry a leading n_layers axis.
    kernel = trees[0]['Repeat_3']['Serial_0']['Residual_0']['CausalAttention_1']['query']['kernel']
    self.assertEqual(kernel[0], (2, 16, 16))

  @parameterized.parameters(((1,) * 9,), ((4, 1, 3, 1),))
  def test_predict_steps_equal_eval_logits(self, step_lengths):
    x = tokens((2, 9))
    params = fake_params(tm.TransformerLM(mode='eval', **LM), x)
    full = jax.jit(tm.TransformerLM(mode='eval', **LM).apply)({'params': params}, x)
    self.assertEqual((full.shape, full.dtype), ((2, 9, 13), jnp.float32))
    predict = tm.TransformerLM(mode='predict', **LM)
    cache = jax.jit(predict.init)(KEY, x[:, :1])['cache']
    step = jax.jit(lambda c, t: predict.apply({'params': params, 'cache': c}, t,
                                              mutable=['cache']))
    shifted = jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]  # predict mode takes the previous token
    start = 0
    for length in step_lengths:
      logits, state = step(cache, shifted[:, start:start + length])
      cache = state['cache']
      np.testing.assert_allclose(logits, full[:, start:start + length], rtol=1e-5, atol=1e-5)
      start += length

  def test_causal_and_chunked_equal_plain(self):
    x = tokens((2, 10))
    params = fake_params(tm.TransformerLM(mode='eval', **LM), x)
    plain = jax.jit(tm.TransformerLM(mode='eval', **LM).apply)
    chunked = jax.jit(tm.TransformerLM(mode='eval', attention_chunk_len=3, ff_chunk_len=4,
                                       **LM).apply)
    full = plain({'params': params}, x)
    # Chunking renames no parameter: the same params load into both.
    np.testing.assert_allclose(chunked({'params': params}, x), full, rtol=1e-5, atol=1e-5)
    changed = x.at[:, 6:].set(tokens((2, 4), seed=1))
    np.testing.assert_allclose(plain({'params': params}, changed)[:, :6], full[:, :6],
                               rtol=1e-6, atol=1e-6)

  def test_bfloat16_compute_float32_params_and_logits(self):
    x = tokens((2, 6))
    model = tm.TransformerLM(mode='eval', dtype='bfloat16', **LM)
    shapes = shapes_of(model, x)
    self.assertTrue(all(dtype == jnp.float32 for _, dtype in jax.tree_util.tree_leaves(
        shapes, is_leaf=lambda leaf: isinstance(leaf, tuple))))
    params = fake_params(model, x)
    logits = jax.jit(model.apply)({'params': params}, x)
    self.assertEqual(logits.dtype, jnp.float32)
    reference = jax.jit(tm.TransformerLM(mode='eval', **LM).apply)({'params': params}, x)
    np.testing.assert_allclose(logits, reference, atol=0.15 * float(jnp.abs(reference).max()))

  def test_dropout_only_in_train(self):
    x = tokens((2, 6))
    config = dict(LM, dropout=0.3)
    params = fake_params(tm.TransformerLM(**config), x)
    evaluated = tm.TransformerLM(mode='eval', **config).apply({'params': params}, x)
    train = tm.TransformerLM(mode='train', **config)
    a = train.apply({'params': params}, x, rngs={'dropout': KEY})
    b = train.apply({'params': params}, x, rngs={'dropout': jax.random.key(1)})
    self.assertFalse(np.allclose(a, evaluated))
    self.assertFalse(np.allclose(a, b))

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, r"TransformerLM mode must be one of \('train', "
                                            r"'eval', 'predict'\), got 'decode'"):
      tm.TransformerLM(mode='decode', **LM)
    with self.assertRaisesRegex(ValueError, 'd_model=16 must be divisible by n_heads=3'):
      tm.TransformerLM(**dict(LM, n_heads=3))
    with self.assertRaisesRegex(ValueError, 'n_layers must be a positive int, got 0'):
      tm.TransformerLM(**dict(LM, n_layers=0))
    with self.assertRaisesRegex(ValueError, r'Transformer mode must be one of'):
      tm.Transformer(mode='serve', **SEQ2SEQ)
    with self.assertRaisesRegex(ValueError, r'TransformerEncoder dropout must be in \[0, 1\)'):
      tm.TransformerEncoder(**dict(ENCODER, dropout=1.5))


class TransformerEncoderTest(absltest.TestCase):

  def test_classifier_ignores_padding(self):
    x = tokens((2, 6)).at[0, 4:].set(0)  # Row 0 has 4 real tokens.
    model = tm.TransformerEncoder(mode='eval', attention_chunk_len=4, **ENCODER)
    params = fake_params(model, x)
    apply = jax.jit(model.apply)
    logits = apply({'params': params}, x)
    self.assertEqual((logits.shape, logits.dtype), ((2, 3), jnp.float32))
    longer = jnp.pad(x, ((0, 0), (0, 5)))  # More right-padding changes nothing.
    np.testing.assert_allclose(apply({'params': params}, longer), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply({'params': params}, x[:1, :4]), logits[:1],
                               rtol=1e-5, atol=1e-5)
    self.assertFalse(np.allclose(apply({'params': params}, x.at[0, 1].set(5)), logits))

  def test_same_parameters_in_every_mode(self):
    x = tokens((2, 6))
    trees = [shapes_of(tm.TransformerEncoder(mode=mode, **ENCODER), x)
             for mode in ('train', 'eval', 'predict')]
    self.assertEqual(trees[0], trees[1])
    self.assertEqual(trees[0], trees[2])


class TransformerTest(absltest.TestCase):

  def test_same_parameters_in_every_mode(self):
    inputs, targets = tokens((2, 7)), tokens((2, 5), high=11)
    trees = [shapes_of(tm.Transformer(mode=mode, **SEQ2SEQ), inputs,
                       targets[:, :1] if mode == 'predict' else targets)
             for mode in ('train', 'eval', 'predict')]
    self.assertEqual(trees[0], trees[1])
    self.assertEqual(trees[0], trees[2])

  def test_decoder_predict_steps_equal_eval_logits(self):
    inputs = tokens((2, 7)).at[1, 5:].set(0)  # Row 1's input is padded.
    targets = tokens((2, 6), high=11)
    eval_model = tm.Transformer(mode='eval', **SEQ2SEQ)
    params = fake_params(eval_model, inputs, targets)
    full = jax.jit(eval_model.apply)({'params': params}, inputs, targets)
    self.assertEqual(full.shape, (2, 6, 11))
    # Right-padding the inputs further changes nothing.
    np.testing.assert_allclose(
        jax.jit(eval_model.apply)({'params': params}, jnp.pad(inputs, ((0, 0), (0, 3))), targets),
        full, rtol=1e-5, atol=1e-5)
    predict = tm.Transformer(mode='predict', **SEQ2SEQ)
    cache = jax.jit(predict.init)(KEY, inputs, targets[:, :1])['cache']
    step = jax.jit(lambda c, i, t: predict.apply({'params': params, 'cache': c}, i, t,
                                                 mutable=['cache']))
    shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    for i in range(6):
      # The encoder runs on the first step only: later steps may pass anything of its shape.
      feed = inputs if i == 0 else jnp.zeros_like(inputs)
      logits, state = step(cache, feed, shifted[:, i:i + 1])
      cache = state['cache']
      np.testing.assert_allclose(logits, full[:, i:i + 1], rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
