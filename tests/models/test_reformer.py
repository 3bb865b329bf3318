"""Reformer models: reversible == plain, predict == eval, one parameter tree for all modes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.models as tm
from terraflax import decoding
from terraflax.models.attention import LSH, Full
from tests import contracts

KEY = jax.random.key(0)
RNGS = {'dropout': jax.random.key(1), 'hash': jax.random.key(2)}
LSH4, FULL4 = LSH(chunk_len=4), Full(query_chunk_len=4)  # Chunks of 4 (the old chunk_len=4).
LM = dict(vocab_size=11, d_model=8, d_ff=16, n_layers=2, n_heads=2, max_len=8, dropout=0.0,
          attention=LSH4)
SEQ2SEQ = {k: v for k, v in LM.items() if k != 'attention'}
ONE_CHUNK = LSH(n_buckets=1, chunk_len=8, n_chunks_before=0)  # Full shared-QK attention.


def tokens(shape, seed=0, low=1, high=11):
  return jnp.asarray(np.random.default_rng(seed).integers(low, high, size=shape), jnp.int32)


def fake_params(model, *inputs, seed=0):
  """Random parameters of the shapes `model.init` gives, without compiling init."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, {'params': KEY, **RNGS}, *inputs)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5, s.dtype),
                                shapes)


def shapes_of(model, *inputs):
  return jax.tree_util.tree_map(lambda s: (s.shape, s.dtype),
                                nn.meta.unbox(jax.eval_shape(model.init, {'params': KEY, **RNGS},
                                               *inputs)['params']))


def relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def decode_step_by_step(model, params, *inputs):
  """Logits (b, l, v) of feeding the shifted last input one token per call in predict mode."""
  targets = inputs[-1]
  shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]  # predict mode takes the previous token
  cache = jax.jit(model.init)({'params': KEY, **RNGS}, *inputs[:-1], shifted[:, :1])['cache']
  step = jax.jit(lambda c, *x: model.apply({'params': params, 'cache': c}, *x,
                                           mutable=['cache'], rngs=RNGS))
  outputs = []
  for i in range(targets.shape[1]):
    logits, state = step(cache, *inputs[:-1], shifted[:, i:i + 1])
    cache = state['cache']
    outputs.append(logits)
  return jnp.concatenate(outputs, axis=1)


class ReformerLMTest(parameterized.TestCase):

  def test_same_parameters_in_every_mode_and_wiring(self):
    x = tokens((2, 8))
    config = dict(LM, attention=(LSH4, FULL4), n_layers=4)
    trees = [shapes_of(tm.ReformerLM(mode=mode, **config), x[:, :1] if mode == 'predict' else x)
             for mode in ('train', 'eval', 'predict')]
    self.assertEqual(trees[0], trees[1])
    self.assertEqual(trees[0], trees[2])
    self.assertEqual(shapes_of(tm.ReformerLM(mode='train', reversible=False, **config), x),
                     trees[0])
    self.assertEqual(shapes_of(tm.ReformerLM(mode='train', ff_chunk_len=3, **config), x),
                     trees[0])
    # One scanned unit of the pattern (lsh, full), repeated 4 // 2 times.
    blocks = trees[0]['ReversibleSerial_5']
    self.assertEqual(blocks['ReversibleHalfResidual_0']['LSHSelfAttention_1']['qk'][0],
                     (2, 8, 2, 4))
    self.assertEqual(blocks['ReversibleHalfResidual_4']['CausalAttention_1']['query']['kernel'][0],
                     (2, 8, 8))
    # Axial positions default to shape (2, 4) for max_len 8, widths (4, 4); the head sees
    # both streams.
    self.assertEqual(trees[0]['AxialPositionalEncoding_3']['axial_0'][0], (2, 4))
    self.assertEqual(trees[0]['AxialPositionalEncoding_3']['axial_1'][0], (4, 4))
    self.assertEqual(trees[0]['LayerNorm_7']['scale'][0], (16,))
    self.assertEqual(trees[0]['Dense_9']['kernel'][0], (16, 11))
    sinusoidal = shapes_of(tm.ReformerLM(mode='eval', positions='sinusoidal', **config), x)
    self.assertNotIn('AxialPositionalEncoding_3', sinusoidal)
    learned = shapes_of(tm.ReformerLM(mode='eval', positions='learned', **config), x)
    self.assertEqual(learned['PositionalEncoding_3']['pos_embedding'][0], (8, 8))

  def test_reversible_gradients_equal_plain_with_dropout_and_lsh(self):
    config = dict(LM, dropout=0.2,
                  attention=LSH(n_hashes=2, n_buckets=4, chunk_len=4, dropout=0.2))
    x = tokens((2, 8))
    params = fake_params(tm.ReformerLM(mode='train', **config), x)

    def value_and_grad(reversible):
      model = tm.ReformerLM(mode='train', reversible=reversible, **config)

      def loss(params, rngs):
        logits = model.apply({'params': params}, x, rngs=rngs)
        return jnp.mean(jax.nn.log_softmax(logits) * jax.nn.one_hot(x, 11)), logits

      return jax.jit(jax.value_and_grad(loss, has_aux=True))

    reversible = value_and_grad(True)
    (_, logits), grads = reversible(params, RNGS)
    (_, ref_logits), ref_grads = value_and_grad(False)(params, RNGS)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                              jax.tree_util.tree_leaves(ref_grads)):
      self.assertLess(relative_error(g, ref), 1e-4, msg=jax.tree_util.keystr(path))
    self.assertGreater(float(jnp.max(jnp.abs(
        grads['ReversibleSerial_5']['ReversibleHalfResidual_0']['LSHSelfAttention_1']['qk']))),
                       1e-4)
    # The randomness is real: other dropout and hash keys change the logits.
    (_, other), _ = reversible(params, {'dropout': jax.random.key(7),
                                                  'hash': jax.random.key(8)})
    self.assertGreater(float(jnp.max(jnp.abs(other - logits))), 1e-3)

  @parameterized.named_parameters(
      # One bucket and one chunk: LSH attends to every earlier position, like the cache.
      ('lsh_one_bucket_and_full', dict(attention=(ONE_CHUNK, Full(query_chunk_len=8)))),
      ('full_learned_positions', dict(attention=FULL4, positions='learned', n_layers=1)),
  )
  def test_predict_decoding_equals_eval_and_greedy_sampling(self, overrides):
    config = dict(LM, **overrides)
    x = tokens((2, 8))
    eval_model = tm.ReformerLM(mode='eval', **config)
    params = fake_params(eval_model, x)
    evaluate = jax.jit(lambda x: eval_model.apply({'params': params}, x, rngs=RNGS))
    full = evaluate(x)
    predict_model = tm.ReformerLM(mode='predict', **config)
    np.testing.assert_allclose(decode_step_by_step(predict_model, params, x), full,
                               rtol=1e-4, atol=1e-4)
    # Greedy sampling through terraflax.decoding: each token is the eval argmax.
    generated = decoding.autoregressive_sample(predict_model, params, x[:, :3], 5,
                                               temperature=0.0)
    sequence = jnp.concatenate([x[:, :3], generated], axis=1)
    np.testing.assert_array_equal(generated, jnp.argmax(evaluate(sequence)[:, 3:], axis=-1))

  def test_bad_arguments_are_clear_errors(self):
    cases = [
        (dict(mode='test'), 'mode must be one of'),
        (dict(d_model=10, n_heads=3), 'd_model=10 must be divisible by n_heads=3'),
        (dict(attention='sparse'), "unknown attention kind 'sparse' \\(did you mean "
                                   "'sparse_qkv'\\?\\)"),
        (dict(attention={'kind': 'lsh', 'n_hash': 2}),
         "ReformerLM attention: 'n_hash' is not a field .* \\(did you mean 'n_hashes'\\?\\)"),
        (dict(attention=(LSH4, FULL4, FULL4)), 'multiple of 3; got 2'),
        (dict(positions={'kind': 'axial', 'shape': (2, 2)}),
         r'shape=\(2, 2\) covers 4 positions, fewer than max_len=8'),
        (dict(positions={'d_embs': (4, 2)}), r'd_embs=\(4, 2\) must sum to d_model=8'),
        (dict(positions={'d_embs': (8,)}), 'one positive int per axis'),
        (dict(positions='rotary'), 'positions must be one of'),
        (dict(positions={'kind': 'learned', 'shape': (4, 2)}), "apply to kind 'axial' only"),
        (dict(dropout=1.0), r'dropout must be in \[0, 1\)'),
        (dict(attention={'kind': 'lsh', 'n_hashes': 0}), 'n_hashes must be a positive int'),
        (dict(attention=LSH(chunk_len=4, predict_mem_len=4)),
         'predict_mem_len=4 .* chunk_len \\* \\(n_chunks_before'),
        (dict(ff_activation='swish'), 'ff_activation must be one of'),
        (dict(reversible=1), 'reversible must be True or False'),
    ]
    for overrides, message in cases:
      with self.subTest(overrides=overrides), self.assertRaisesRegex(ValueError, message):
        tm.ReformerLM(**{**LM, 'mode': 'train', **overrides})


class ReformerTest(absltest.TestCase):

  def test_predict_decoding_equals_eval(self):
    # Both attention types in the encoder and the decoder; LSH with one bucket and one chunk.
    full = Full(query_chunk_len=8)
    config = dict(SEQ2SEQ, output_vocab_size=7, encoder_attention=(ONE_CHUNK, full),
                  decoder_attention=(full, ONE_CHUNK))
    inputs, targets = tokens((2, 6), seed=1), tokens((2, 8), high=7)
    inputs = inputs.at[1, 4:].set(0)  # Padding in the encoder input.
    eval_model = tm.Reformer(mode='eval', **config)
    params = fake_params(eval_model, inputs, targets)
    self.assertEqual(shapes_of(tm.Reformer(mode='predict', **config), inputs, targets[:, :1]),
                     shapes_of(eval_model, inputs, targets))
    self.assertEqual(shapes_of(tm.Reformer(mode='train', reversible=False, **config), inputs,
                               targets), shapes_of(eval_model, inputs, targets))
    full = jax.jit(eval_model.apply)({'params': params}, inputs, targets, rngs=RNGS)
    self.assertEqual(full.shape, (2, 8, 7))
    predicted = decode_step_by_step(tm.Reformer(mode='predict', **config), params, inputs,
                                    targets)
    np.testing.assert_allclose(predicted, full, rtol=1e-4, atol=1e-4)

  def test_full_attention_encoder_ignores_padding(self):
    config = dict(SEQ2SEQ, output_vocab_size=7, n_layers=1, encoder_attention=FULL4,
                  decoder_attention=FULL4)
    inputs, targets = tokens((1, 5), seed=1), tokens((1, 4), high=7)
    model = tm.Reformer(mode='eval', **config)
    params = fake_params(model, inputs, targets)
    apply = jax.jit(model.apply)
    padded = jnp.pad(inputs, ((0, 0), (0, 3)))
    np.testing.assert_allclose(apply({'params': params}, padded, targets),
                               apply({'params': params}, inputs, targets), rtol=1e-5, atol=1e-5)

  def test_bad_arguments_are_clear_errors(self):
    with self.assertRaisesRegex(ValueError, "Reformer encoder_attention: unknown attention "
                                            "kind 'sparse'"):
      tm.Reformer(**dict(SEQ2SEQ, encoder_attention='sparse'))
    with self.assertRaisesRegex(ValueError, 'n_decoder_layers must be a positive int'):
      tm.Reformer(**dict(SEQ2SEQ, n_decoder_layers=0))


class PackedReformerLMTest(parameterized.TestCase):
  """A reversible ReformerLM on a packed row == each document alone (loss and gradients)."""

  def test_packed_equals_unpacked(self):
    contracts.assert_lm_packed_equals_unpacked(lambda **kw: tm.ReformerLM(
        vocab_size=11, d_model=16, d_ff=16, n_layers=2, n_heads=2, dropout=0.0, max_len=16,
        attention=(LSH(n_hashes=2, n_buckets=2, chunk_len=16, n_chunks_before=0),
                   Full(query_chunk_len=4)), positions='axial', reversible=True, **kw))


class PackedReformerTest(parameterized.TestCase):
  """The encoder-decoder Reformer (reversible) on packed rows == each document pair alone."""

  def test_packed_equals_unpacked(self):
    one_bucket = LSH(n_buckets=1, chunk_len=16, n_chunks_before=0)
    contracts.assert_seq2seq_packed_equals_unpacked(
        lambda packed, mode: tm.Reformer(
            vocab_size=11, d_model=16, d_ff=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16,
            encoder_attention=one_bucket, decoder_attention=Full(query_chunk_len=4),
            positions='sinusoidal', mode=mode, packed=packed),
        16, {'dropout': jax.random.key(3), 'hash': jax.random.key(4)})


if __name__ == '__main__':
  absltest.main()
