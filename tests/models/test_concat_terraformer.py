"""ConcatTerraformer (Trax's ConfigurableTerraformer): one parameter tree, padding-free
concatenation, predict == eval token by token with encoder inputs of different lengths."""

import contextlib
import io
import math
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.decoding as decoding
import terraflax.models as tm
from terraflax.models import spec as spec_lib
from terraflax.models.attention import LSH, Full, SparseQKV
from terraflax.train import checkpoint
from terraflax.train import trainer
from tests.train.tiny_models import tiny_lm_config

KEY = jax.random.key(0)
SIZES = dict(vocab_size=13, d_model=16, d_ff=32, n_encoder_layers=1, n_decoder_layers=2,
             n_heads=2, dropout=0.0, max_len=16, ff_d_lowrank=4)
SPARSE = dict(attention=SparseQKV(n_modules=2), ff_sparsity=4)
RNGS = {'params': KEY, 'sparse': KEY, 'dropout': KEY, 'hash': KEY}


def tokens(shape, seed=0, high=13):
  return jnp.asarray(np.random.default_rng(seed).integers(1, high, size=shape), jnp.int32)


def padded_inputs():
  """(3, 7) inputs with 7, 4 and 1 real tokens (the rest pad 0)."""
  return tokens((3, 7)).at[1, 4:].set(0).at[2, 1:].set(0)


def shapes_of(model, *inputs):
  return jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), nn.meta.unbox(
      jax.eval_shape(model.init, RNGS, *inputs)['params']))


def fake_params(model, *inputs, seed=0, scale=0.5):
  shapes = nn.meta.unbox(jax.eval_shape(model.init, RNGS, *inputs)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), shapes)


def paths(tree):
  return ['/'.join(str(getattr(k, 'key', k)) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(
              tree, is_leaf=lambda x: isinstance(x, tuple))[0]]


class ConcatTerraformerTest(parameterized.TestCase):

  def test_same_parameters_in_every_mode_and_every_one_named(self):
    inputs, targets = padded_inputs(), tokens((3, 5), seed=1)
    kw = dict(SIZES, **SPARSE)
    trees = [shapes_of(tm.ConcatTerraformer(mode=mode, **kw), inputs,
                       targets[:, :1] if mode == 'predict' else targets)
             for mode in ('train', 'eval', 'predict')]
    trees.append(shapes_of(tm.ConcatTerraformer(mode='eval', reversible=False, **kw), inputs,
                           targets))
    for tree in trees[1:]:
      self.assertEqual(tree, trees[0])
    boxed = jax.eval_shape(tm.ConcatTerraformer(mode='eval', **kw).init, RNGS, inputs,
                           targets)['params']
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    self.assertTrue(all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim
                        for x in leaves))
    # Two attention halves per decoder block (n_decoder_attention_layers=2) and the SparseFF.
    names = paths(trees[0])
    self.assertLen({p.split('/ConcatSparseQKVAttention')[0] for p in names
                    if 'ConcatSparseQKVAttention' in p}, 2)
    self.assertTrue(any('SparseFF' in p for p in names))

  def test_embedding_is_shared_when_output_vocab_size_is_none(self):
    inputs, targets = padded_inputs(), tokens((3, 5), seed=1)
    shared = paths(shapes_of(tm.ConcatTerraformer(mode='eval', **SIZES), inputs, targets))
    self.assertLen([p for p in shared if p.endswith('embedding')], 1)
    separate = paths(shapes_of(tm.ConcatTerraformer(mode='eval', **dict(
        SIZES, output_vocab_size=11)), inputs, targets[:, :] % 11))
    self.assertLen([p for p in separate if p.endswith('embedding')], 2)

  @parameterized.named_parameters(
      ('full', dict(attention=Full()), False),
      ('sparse_qkv_sparse_ff_fixed_base', dict(SPARSE, positions='fixed_base'), True))
  def test_predict_steps_equal_eval(self, options, more):
    kw = dict(SIZES, **options)
    inputs, targets = padded_inputs(), tokens((3, 6), seed=1)
    eval_model = tm.ConcatTerraformer(mode='eval', **kw)
    params = fake_params(eval_model, inputs, targets, scale=2.0 if more else 0.5)
    apply = jax.jit(eval_model.apply)
    full = apply({'params': params}, inputs, targets)
    predict = tm.ConcatTerraformer(mode='predict', **kw)
    cache = jax.jit(predict.init)(KEY, inputs, targets[:, :1])['cache']
    step = jax.jit(lambda c, t: predict.apply({'params': params, 'cache': c}, inputs, t,
                                              mutable=['cache']))
    shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    outputs = []
    for t in range(6):
      logits, state = step(cache, shifted[:, t:t + 1])
      cache = state['cache']
      outputs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-5)
    if not more:
      return
    # Greedy decoding through `terraflax.decoding`: the tokens the eval pass ranks first.
    generated = decoding.autoregressive_sample(predict, params, max_new_tokens=6,
                                               temperature=0.0, inputs=inputs)
    self.assertGreater(len(set(np.asarray(generated).ravel().tolist())), 1)  # Not one token.
    teacher = apply({'params': params}, inputs, generated)
    np.testing.assert_array_equal(jnp.argmax(teacher, axis=-1), generated)
    # The concatenation drops each example's padding: row 1 alone, unpadded, gets the logits
    # it gets in the padded batch; and the decoder reads the encoder (row 1 only).
    alone = jax.jit(eval_model.apply)({'params': params}, inputs[1:2, :4], targets[1:2])
    np.testing.assert_allclose(full[1:2], alone, rtol=1e-5, atol=1e-5)
    changed = apply({'params': params}, inputs.at[1, 0].set(inputs[1, 0] % 12 + 1), targets)
    self.assertGreater(float(jnp.abs(changed[1] - full[1]).max()), 1e-3)
    np.testing.assert_allclose(changed[0], full[0], rtol=1e-6, atol=1e-6)

  def test_bad_arguments_are_clear_errors(self):
    with self.assertRaisesRegex(ValueError, r"LSH\(\.\.\.\) does not decode \('predict' mode\)"):
      tm.ConcatTerraformer(mode='predict', attention=LSH(chunk_len=4), **SIZES)
    with self.assertRaisesRegex(ValueError, r"positions must be one of \('sinusoidal', "
                                r"'learned', 'fixed_base'\), got 'axial'"):
      tm.ConcatTerraformer(positions='axial', **SIZES)
    with self.assertRaisesRegex(ValueError, r'encoder_attention must be Full\(\)'):
      tm.ConcatTerraformer(encoder_attention=SparseQKV(), **SIZES)
    with self.assertRaisesRegex(ValueError, r'n_decoder_attention_layers must be a positive int'):
      tm.ConcatTerraformer(n_decoder_attention_layers=0, **SIZES)
    with self.assertRaisesRegex(ValueError, r"fixed_base' needs d_model a multiple of 8"):
      tm.ConcatTerraformer(positions='fixed_base', **dict(SIZES, d_model=12, n_heads=2))

  def test_lsh_decoder_runs_in_eval(self):
    kw = dict(SIZES, attention=LSH(chunk_len=4, n_hashes=1), n_decoder_layers=1)
    inputs, targets = padded_inputs(), tokens((3, 5), seed=1)
    model = tm.ConcatTerraformer(mode='eval', **kw)
    logits = jax.jit(model.apply)({'params': fake_params(model, inputs, targets)}, inputs,
                                  targets, rngs={'hash': KEY})
    self.assertEqual(logits.shape, (3, 5, 13))
    self.assertTrue(bool(jnp.all(jnp.isfinite(logits))))


class ConcatTerraformerTrainingTest(absltest.TestCase):

  def test_converted_workdir_data_name_makes_encoder_decoders_seq2seq(self):
    def task(model_name, data_name):
      config = ml_collections.ConfigDict({'model': dict(SIZES, name=model_name),
                                          'data': {'name': data_name, 'seq_len': 8}})
      if model_name == 'TransformerLM':
        config.model = dict(vocab_size=13, d_model=16, d_ff=32, n_layers=1, n_heads=2,
                            name='TransformerLM')
      return spec_lib.ModelSpec.from_config(config).task

    self.assertEqual(task('ConcatTerraformer', 'tokens'), 'seq2seq')  # not a data set
    self.assertEqual(task('TransformerLM', 'tokens'), 'lm')
    self.assertEqual(task('ConcatTerraformer', 'reverse'), 'seq2seq')
    self.assertEqual(task('ConcatTerraformer', 'bytes'), 'lm')  # a data set's task wins

  def test_config_model_name_trains_on_reverse(self):
    config = tiny_lm_config(**{'train.steps': 2, 'train.log_every': 1, 'train.eval_every': 2,
                               'optimizer.warmup_steps': 1,
                               'train.checkpoint_every': 2})
    config.model = ml_collections.ConfigDict(dict(
        name='ConcatTerraformer', vocab_size=16, d_model=16, d_ff=32, n_encoder_layers=1,
        n_decoder_layers=1, n_heads=2, dropout=0.1, max_len=16, ff_sparsity=4, ff_d_lowrank=4,
        attention={'kind': 'sparse_qkv', 'n_modules': 2}, positions='fixed_base'))
    config.data.name = 'reverse'
    with tempfile.TemporaryDirectory() as workdir:
      with contextlib.redirect_stdout(io.StringIO()):
        last = trainer.train_and_evaluate(config, workdir)
      self.assertTrue(math.isfinite(last['eval/loss']))
      _, params = checkpoint.load_for_inference(workdir)
      self.assertTrue(any('ConcatDecoder' in p for p in paths(params)))


if __name__ == '__main__':
  absltest.main()
