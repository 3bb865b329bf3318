"""Transformer models: predict == eval token by token, one parameter tree for all modes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.models as tm
from terraflax.models.attention import Full
from tests import contracts

KEY = jax.random.key(0)
LM = dict(vocab_size=13, d_model=16, d_ff=24, n_layers=2, n_heads=2, dropout=0.0, max_len=16)
SEQ2SEQ = dict(LM, output_vocab_size=11)
ENCODER = dict(LM, n_classes=3)
CHUNKED = Full(query_chunk_len=4)  # Query-chunked full attention.


def tokens(shape, seed=0, low=1, high=13):
  return jnp.asarray(np.random.default_rng(seed).integers(low, high, size=shape), jnp.int32)


def fake_params(model, *inputs, seed=0):
  """Random parameters of the shapes `model.init` gives, without compiling init."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, KEY, *inputs)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                                shapes)


def shapes_of(model, *inputs):
  return jax.tree_util.tree_map(lambda s: (s.shape, s.dtype),
                                nn.meta.unbox(jax.eval_shape(model.init, KEY, *inputs)['params']))


class TransformerLMTest(parameterized.TestCase):

  def test_same_parameters_in_every_mode(self):
    x = tokens((2, 6))
    trees = [shapes_of(tm.TransformerLM(mode=mode, attention=CHUNKED, ff_chunk_len=2, **LM),
                       x[:, :1] if mode == 'predict' else x)
             for mode in ('train', 'eval', 'predict')]
    self.assertEqual(trees[0], trees[1])
    self.assertEqual(trees[0], trees[2])
    # Attention chunking does not change the parameters (feed-forward chunking adds a level).
    self.assertEqual(shapes_of(tm.TransformerLM(mode='eval', attention=CHUNKED, **LM), x),
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
    chunked = jax.jit(tm.TransformerLM(mode='eval', attention=Full(query_chunk_len=3), ff_chunk_len=4,
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


class SparseFeedForwardLMTest(absltest.TestCase):
  """TransformerLM(ff_sparsity=N): Residual(LayerNorm, SparseFF) in every block."""

  def test_one_unit_per_block_equals_the_dense_feed_forward(self):
    # Reference: with ff_sparsity=1 every unit is active, so SparseFF is the dense ReLU
    # feed-forward with the same weights (SparseFF's kernel_in is (d_ff, d_model)).
    x = tokens((2, 7))
    dense = tm.TransformerLM(mode='eval', **LM)
    params = fake_params(dense, x)
    sparse = tm.TransformerLM(mode='eval', ff_sparsity=1, **LM)
    shapes = nn.meta.unbox(jax.eval_shape(sparse.init, KEY, x)['params'])
    blocks = dict(params['Repeat_3']['Serial_0'])
    ff = blocks.pop('Residual_1')['FeedForward_0']
    sparse_ff = jax.tree_util.tree_map(
        lambda s: jnp.asarray(np.random.default_rng(1).normal(size=s.shape), s.dtype),
        shapes['Repeat_3']['Serial_0']['Residual_1']['SparseFF_1'])
    sparse_ff.update(kernel_in=jnp.swapaxes(ff['Dense_1']['kernel'], 1, 2),
                     bias_in=ff['Dense_1']['bias'], kernel_out=ff['Dense_4']['kernel'],
                     bias_out=ff['Dense_4']['bias'])
    blocks['Residual_1'] = {'LayerNorm_0': ff['LayerNorm_0'], 'SparseFF_1': sparse_ff}
    sparse_params = dict(params, Repeat_3={'Serial_0': blocks})
    self.assertEqual(jax.tree_util.tree_structure(sparse_params),
                     jax.tree_util.tree_structure(shapes))
    np.testing.assert_allclose(sparse.apply({'params': sparse_params}, x),
                               dense.apply({'params': params}, x), rtol=1e-5, atol=1e-5)

  def test_predict_steps_equal_eval_logits(self):
    config = dict(LM, ff_sparsity=4, ff_d_lowrank=3)
    x = tokens((2, 6))
    params = fake_params(tm.TransformerLM(mode='eval', **config), x)
    full = tm.TransformerLM(mode='eval', **config).apply({'params': params}, x)
    shifted = jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]  # predict mode takes the previous token
    steps = contracts.predict_one_at_a_time(tm.TransformerLM(mode='predict', **config), params,
                                            shifted)
    np.testing.assert_allclose(steps, full, rtol=1e-5, atol=1e-5)
    lowrank = params['Repeat_3']['Serial_0']['Residual_1']['SparseFF_1']['controller_lowrank']
    self.assertEqual(lowrank['kernel'].shape, (2, 16, 3))

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, 'd_ff=24 must be a multiple of ff_sparsity=5'):
      tm.TransformerLM(ff_sparsity=5, **LM)
    with self.assertRaisesRegex(ValueError, 'ff_sparsity must be 0/None .* got -2'):
      tm.TransformerLM(ff_sparsity=-2, **LM)
    with self.assertRaisesRegex(ValueError, 'ff_d_lowrank must be a positive int or None'):
      tm.TransformerLM(ff_sparsity=4, ff_d_lowrank=0, **LM)


class TransformerEncoderTest(absltest.TestCase):

  def test_classifier_ignores_padding(self):
    x = tokens((2, 6)).at[0, 4:].set(0)  # Row 0 has 4 real tokens.
    model = tm.TransformerEncoder(mode='eval', attention=CHUNKED, **ENCODER)
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


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def lm_count(*, vocab_size, d_model, d_ff, n_layers, d_embedding=None, **_):
  """Hand count of a TransformerLM's parameters: embeddings, blocks, final norm, output."""
  v, d, f = vocab_size, d_model, d_ff
  block = 2 * d + 4 * (d * d + d) + 2 * d + (d * f + f + f * d + d)
  if d_embedding is None:
    return v * d + n_layers * block + 2 * d + (d * v + v)
  e = d_embedding
  return v * e + (e * d + d) + n_layers * block + 2 * d + (d * e + e) + (e * v + v)


class AlbertOptionsTest(parameterized.TestCase):
  """Cross-layer sharing and factorised embeddings (ALBERT) on the LM and the encoder."""

  @parameterized.parameters(None, 8)
  def test_counts_match_a_hand_count(self, d_embedding):
    x = tokens((2, 6))
    config = dict(LM, n_layers=3, d_embedding=d_embedding)
    plain = shapes_of(tm.TransformerLM(**config), x)
    shared = shapes_of(tm.TransformerLM(share_layers=True, **config), x)
    self.assertEqual(count(fake_params(tm.TransformerLM(**config), x)), lm_count(**config))
    self.assertEqual(count(fake_params(tm.TransformerLM(share_layers=True, **config), x)),
                     lm_count(**dict(config, n_layers=1)))
    # Exactly one set of block parameters: the stacked tree without its layer axis.
    unstack = lambda leaf: (leaf[0][1:], leaf[1])
    is_leaf = lambda leaf: isinstance(leaf, tuple) and len(leaf) == 2 and isinstance(leaf[0], tuple)
    self.assertEqual(shared['Repeat_4' if d_embedding else 'Repeat_3'],
                     jax.tree_util.tree_map(unstack, plain['Repeat_4' if d_embedding else
                                                           'Repeat_3'], is_leaf=is_leaf))

  def test_shared_lm_equals_plain_lm_with_copied_blocks_in_every_mode(self):
    x = tokens((2, 7))
    config = dict(LM, n_layers=3)
    shared = tm.TransformerLM(mode='eval', share_layers=True, **config)
    params = fake_params(shared, x)
    copies = dict(params, Repeat_3=jax.tree_util.tree_map(
        lambda p: jnp.stack([p] * 3), params['Repeat_3']))
    full = shared.apply({'params': params}, x)
    np.testing.assert_allclose(tm.TransformerLM(mode='eval', **config).apply({'params': copies}, x),
                               full, rtol=1e-5, atol=1e-5)
    predict = tm.TransformerLM(mode='predict', share_layers=True, **config)
    cache = predict.init(KEY, x[:, :1])['cache']  # One cache per depth.
    self.assertEqual(cache['Repeat_3']['Serial_0']['Residual_0']['CausalAttention_1']
                     ['cached_key'].shape[0], 3)
    logits, _ = predict.apply({'params': params, 'cache': cache},
                              jnp.pad(x, ((0, 0), (1, 0)))[:, :-1], mutable=['cache'])
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)

  def test_encoder_sharing_and_factorised_embedding(self):
    x = tokens((2, 6))
    config = dict(ENCODER, n_layers=4, d_embedding=8)
    shared = fake_params(tm.TransformerEncoder(share_layers=True, **config), x)
    one = fake_params(tm.TransformerEncoder(**dict(config, n_layers=1)), x)
    self.assertEqual(count(shared), count(one))
    self.assertEqual(shared['Embedding_1']['embedding'].shape, (13, 8))
    self.assertEqual(shared['Dense_2']['kernel'].shape, (8, 16))  # The projection.
    with self.assertRaisesRegex(ValueError, 'd_embedding=32 must be <= d_model=16'):
      tm.TransformerLM(**dict(LM, d_embedding=32))
    with self.assertRaisesRegex(ValueError, 'share_layers needs the same kind of layer everywhere'):
      tm.TransformerEncoder(share_layers=True, mixing=('fourier', 'attention'), **ENCODER)


class MixingTest(absltest.TestCase):
  """Attention or Fourier mixing per encoder layer."""

  def test_per_layer_kinds(self):
    x = tokens((2, 6))
    mixed = fake_params(tm.TransformerEncoder(mixing=('fourier', 'attention', 'attention'),
                                              **dict(ENCODER, n_layers=3)), x)
    runs = mixed['Encoder_3']
    self.assertNotIn('Attention_1', runs['Repeat_0']['Serial_0']['Residual_0'])
    self.assertEqual(runs['Repeat_1']['Serial_0']['Residual_0']['Attention_1']['query']['kernel']
                     .shape, (2, 16, 16))
    self.assertEqual(runs['Repeat_0']['Serial_0']['Residual_1']['FeedForward_0']['Dense_1']
                     ['kernel'].shape, (1, 16, 24))
    all_fourier = fake_params(tm.TransformerEncoder(mixing='fourier', **ENCODER), x)
    self.assertEqual(count(all_fourier), count(fake_params(tm.TransformerEncoder(**ENCODER), x))
                     - 2 * 4 * (16 * 16 + 16))  # No attention projections in either layer.
    with self.assertRaisesRegex(ValueError, r"mixing must be one of \('attention', 'fourier'\)"):
      tm.TransformerEncoder(mixing=('fourier',), **ENCODER)  # n_layers=2 needs two kinds.


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


class PackedTransformerLMTest(parameterized.TestCase):

  @parameterized.parameters(dict(attention=Full()), dict(attention=Full(query_chunk_len=4)),
                            dict(attention=Full(n_prefix=2)))
  def test_packed_equals_unpacked(self, attention):
    contracts.assert_lm_packed_equals_unpacked(lambda **kw: tm.TransformerLM(
        vocab_size=11, d_model=16, d_ff=16, n_layers=2, n_heads=2, dropout=0.0, max_len=16,
        attention=attention, **kw))


class PackedTransformerTest(parameterized.TestCase):
  """Encoder-decoder on packed rows: target document s reads input document s, as if alone."""

  def test_packed_equals_unpacked(self):
    contracts.assert_seq2seq_packed_equals_unpacked(
        lambda packed, mode: tm.Transformer(
            vocab_size=11, d_model=16, d_ff=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16,
            attention=Full(query_chunk_len=4), mode=mode, packed=packed),
        12, {'dropout': jax.random.key(3)})


if __name__ == '__main__':
  absltest.main()
