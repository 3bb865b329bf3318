"""Terraformer models: predict == eval token by token, reversible == plain, one parameter tree."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.decoding as decoding
import terraflax.models as tm
from terraflax.models.attention import LSH, Full, SparseQKV
from terraflax.train import config as config_lib
from tests import contracts

KEY = jax.random.key(0)
LM = dict(vocab_size=13, d_model=16, d_ff=32, n_layers=2, n_heads=2, dropout=0.0, max_len=16,
          ff_d_lowrank=4)
SEQ2SEQ = dict(LM, output_vocab_size=11)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tokens(shape, seed=0, high=13):
  return jnp.asarray(np.random.default_rng(seed).integers(1, high, size=shape), jnp.int32)


def fake_params(model, *inputs, seed=0):
  """Random parameters of the shapes `model.init` gives, without compiling init."""
  shapes = jax.eval_shape(model.init, {'params': KEY, 'sparse': KEY, 'dropout': KEY},
                          *inputs)['params']
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                                shapes)


def shapes_of(model, *inputs):
  return jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), jax.eval_shape(
      model.init, {'params': KEY, 'sparse': KEY, 'dropout': KEY, 'hash': KEY}, *inputs)['params'])


def leaves_with(tree, name):
  """{path: leaf} of the leaves whose path contains `name`."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {jax.tree_util.keystr(p): v for p, v in flat if name in jax.tree_util.keystr(p)}


def step_through(model, params, cache, pieces, *inputs):
  """Runs predict-mode steps on `pieces` (b, length_i) in order; returns the logits."""
  step = jax.jit(lambda c, *x: model.apply({'params': params, 'cache': c}, *x, mutable=['cache']))
  outputs = []
  for piece in pieces:
    logits, state = step(cache, *inputs, piece)
    cache = state['cache']
    outputs.append(logits)
  return jnp.concatenate(outputs, axis=1)


class TerraformerLMTest(parameterized.TestCase):

  @parameterized.parameters((SparseQKV(), 4), (Full(), None))
  def test_same_parameters_in_every_mode(self, attention, ff_sparsity):
    x = tokens((2, 6))
    kw = dict(LM, attention=attention, ff_sparsity=ff_sparsity)
    chunked = dict(kw, attention=dataclasses.replace(attention, query_chunk_len=2))
    trees = [shapes_of(tm.TerraformerLM(mode=mode, **kw), x[:, :1] if mode == 'predict' else x)
             for mode in ('train', 'eval', 'predict')]
    trees.append(shapes_of(tm.TerraformerLM(mode='train', reversible=False, **kw), x))
    trees.append(shapes_of(tm.TerraformerLM(mode='eval', ff_chunk_len=4, **chunked), x))
    for tree in trees[1:]:
      self.assertEqual(tree, trees[0])
    # The blocks are scanned: n_layers on a leading axis.
    name = 'SparseFF' if ff_sparsity else 'FeedForward'
    kernels = leaves_with(trees[0], name)
    self.assertNotEmpty(kernels)
    self.assertTrue(all(shape[0] == 2 for shape, _ in kernels.values()))
    if ff_sparsity:
      self.assertEqual(leaves_with(trees[0], 'kernel_in').popitem()[1][0], (2, 32, 16))
      self.assertLen(leaves_with(trees[0], 'controller'), 3)
    if attention.kind == 'sparse_qkv':
      self.assertLen(leaves_with(trees[0], 'query_conv'), 2)

  def test_lsh_attention_is_one_more_kind_with_the_same_parameters_in_every_mode(self):
    x = tokens((2, 8))
    kw = dict(LM, attention={'kind': 'lsh', 'n_hashes': 2, 'chunk_len': 4}, ff_sparsity=4,
              d_qk=8, d_v=8)
    trees = [shapes_of(tm.TerraformerLM(mode=mode, **kw), x[:, :1] if mode == 'predict' else x)
             for mode in ('train', 'eval', 'predict')]
    self.assertEqual(trees[0], trees[1])
    self.assertEqual(trees[0], trees[2])
    self.assertEqual(leaves_with(trees[0], 'LSHSelfAttention').popitem()[1][0][0], 2)

  @parameterized.named_parameters(
      ('full_dense_ff', 'full', None, (1,) * 9),
      ('full_sparse_ff', 'full', 4, (1,) * 9),
      ('sparse_qkv_sparse_ff_prefill', 'sparse_qkv', 4, (4,) + (1,) * 5))
  def test_predict_steps_equal_eval_logits(self, attention, ff_sparsity, step_lengths):
    x = tokens((2, 9))
    kw = dict(LM, attention=attention, ff_sparsity=ff_sparsity)
    params = fake_params(tm.TerraformerLM(mode='eval', **kw), x)
    full = jax.jit(tm.TerraformerLM(mode='eval', **kw).apply)({'params': params}, x)
    self.assertEqual((full.shape, full.dtype), ((2, 9, 13), jnp.float32))
    predict = tm.TerraformerLM(mode='predict', **kw)
    cache = jax.jit(predict.init)(KEY, x[:, :1])['cache']
    shifted = jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]  # predict mode takes the previous token
    bounds = np.cumsum((0,) + step_lengths)
    pieces = [shifted[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_allclose(step_through(predict, params, cache, pieces), full, rtol=1e-5,
                               atol=1e-5)

  def test_greedy_decoding_equals_eval_argmax(self):
    kw = dict(LM, attention=SparseQKV(), ff_sparsity=4)
    prompt = tokens((2, 3), seed=1)
    params = fake_params(tm.TerraformerLM(mode='eval', **kw), prompt, seed=1)
    generated = decoding.autoregressive_sample(tm.TerraformerLM(mode='predict', **kw), params,
                                               prompt, max_new_tokens=8, temperature=0.0)
    sequence = jnp.concatenate([prompt, generated], axis=1)  # (2, 11)
    logits = jax.jit(tm.TerraformerLM(mode='eval', **kw).apply)({'params': params}, sequence)
    # logits[:, p] predict token p from the tokens before it: greedy picks their argmax.
    np.testing.assert_array_equal(jnp.argmax(logits[:, 3:], axis=-1), generated)
    self.assertGreater(len(np.unique(np.asarray(generated))), 1)

  def test_reversible_equals_plain_and_controllers_learn(self):
    x = tokens((2, 8))
    kw = dict(LM, attention=SparseQKV(), ff_sparsity=4, ff_quant_prob=0.5,
              ff_temperature=0.5)
    params = fake_params(tm.TerraformerLM(**kw), x)
    rngs = {'sparse': jax.random.key(1), 'dropout': jax.random.key(2)}

    def loss(params, reversible):
      logits = tm.TerraformerLM(mode='train', reversible=reversible, **kw).apply(
          {'params': params}, x, rngs=rngs)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[..., None], -1)), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l_rev, logits_rev), g_rev = grad(params, True)
    (l_plain, logits_plain), g_plain = grad(params, False)
    np.testing.assert_allclose(logits_rev, logits_plain, rtol=1e-5, atol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g_plain))
    for a, b in zip(jax.tree_util.tree_leaves(g_rev), jax.tree_util.tree_leaves(g_plain)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    # The straight-through estimator reaches every layer's controller.
    controllers = leaves_with(g_rev, 'controller')
    self.assertLen(controllers, 3)
    for path, g in controllers.items():
      per_layer = jnp.sqrt(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1))
      self.assertTrue(np.all(np.asarray(per_layer) > 1e-6), path)

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, r"TerraformerLM mode must be one of \('train', "):
      tm.TerraformerLM(mode='decode', **LM)
    with self.assertRaisesRegex(ValueError, r"TerraformerLM attention: unknown attention kind "
                                            r"'linear'; valid kinds: full, local, lsh"):
      tm.TerraformerLM(attention='linear', **LM)
    with self.assertRaisesRegex(ValueError, "'n_hashes' is not a field of 'sparse_qkv' "
                                            "attention.*valid: .*length_kernel_size"):
      tm.TerraformerLM(attention={'kind': 'sparse_qkv', 'n_hashes': 2}, **LM)
    with self.assertRaisesRegex(ValueError, 'd_ff=32 must be a multiple of ff_sparsity=5'):
      tm.TerraformerLM(**dict(LM, ff_sparsity=5))
    with self.assertRaisesRegex(ValueError, 'ff_sparsity must be 0/None'):
      tm.TerraformerLM(**dict(LM, ff_sparsity=-1))
    with self.assertRaisesRegex(ValueError, r"merge_streams must be one of \('concat', 'mean'\)"):
      tm.TerraformerLM(merge_streams='sum', **LM)
    with self.assertRaisesRegex(ValueError, 'd_model=16 must be divisible by n_heads=3'):
      tm.Terraformer(**dict(SEQ2SEQ, n_heads=3))

  def test_config_file_builds_the_model(self):
    config = config_lib.load_sibling(os.path.join(ROOT, 'configs', 'x.py'), 'terraformer_lm')
    config = config_lib.check_fields(config)
    spec = config_lib.model_spec(config)  # Resolves and checks the factory's arguments.
    factory, kwargs = spec.factory, dict(spec.kwargs)
    x = jax.ShapeDtypeStruct((2, config.data.seq_len), jnp.int32)
    logits = jax.eval_shape(lambda x: factory(mode='eval', **kwargs).init_with_output(KEY, x)[0],
                            x)
    self.assertEqual(logits.shape, (2, config.data.seq_len, 256))


class TerraformerTest(absltest.TestCase):

  def test_same_parameters_in_every_mode(self):
    inputs, targets = tokens((2, 7)), tokens((2, 5), high=11)
    kw = dict(SEQ2SEQ, ff_sparsity=4)
    trees = [shapes_of(tm.Terraformer(mode=mode, **kw), inputs,
                       targets[:, :1] if mode == 'predict' else targets)
             for mode in ('train', 'eval', 'predict')]
    trees.append(shapes_of(tm.Terraformer(mode='eval', reversible=False, **kw), inputs, targets))
    for tree in trees[1:]:
      self.assertEqual(tree, trees[0])

  def test_decoder_predict_steps_equal_eval_logits(self):
    inputs = tokens((2, 7)).at[1, 5:].set(0)  # Row 1's input is padded.
    targets = tokens((2, 6), high=11)
    kw = dict(SEQ2SEQ, ff_sparsity=4, attention=SparseQKV(), merge_streams='mean')
    eval_model = tm.Terraformer(mode='eval', **kw)
    params = fake_params(eval_model, inputs, targets)
    full = jax.jit(eval_model.apply)({'params': params}, inputs, targets)
    self.assertEqual(full.shape, (2, 6, 11))
    predict = tm.Terraformer(mode='predict', **kw)
    cache = jax.jit(predict.init)(KEY, inputs, targets[:, :1])['cache']
    shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    pieces = [shifted[:, i:i + 1] for i in range(6)]
    np.testing.assert_allclose(step_through(predict, params, cache, pieces, inputs), full,
                               rtol=1e-5, atol=1e-5)
    # Greedy decoding through `terraflax.decoding` agrees with the eval logits.
    generated = decoding.autoregressive_sample(predict, params, max_new_tokens=6,
                                               temperature=0.0, inputs=inputs)
    teacher = jax.jit(eval_model.apply)({'params': params}, inputs, generated)
    np.testing.assert_array_equal(jnp.argmax(teacher, axis=-1), generated)

  def test_reversible_gradients_equal_plain_and_reach_the_encoder(self):
    inputs, targets = tokens((2, 5)).at[0, 3:].set(0), tokens((2, 4), high=11)
    kw = dict(SEQ2SEQ, n_layers=1, ff_sparsity=4, attention=Full())
    params = fake_params(tm.Terraformer(**kw), inputs, targets)

    def loss(params, reversible):  # eval mode: no randomness to compile, same custom VJP.
      logits = tm.Terraformer(mode='eval', reversible=reversible, **kw).apply(
          {'params': params}, inputs, targets)
      return jnp.sum(jnp.sin(logits))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_rev, g_plain = grad(params, True), grad(params, False)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g_plain))
    for a, b in zip(jax.tree_util.tree_leaves(g_rev), jax.tree_util.tree_leaves(g_plain)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    encoder = leaves_with(g_rev, 'CacheOutputs')
    self.assertNotEmpty(encoder)
    self.assertGreater(max(float(jnp.abs(g).max()) for g in encoder.values()), 1e-4)


class PackedTerraformerLMTest(parameterized.TestCase):
  """A TerraformerLM (sparse QKV, reversible) on a packed row == each document alone."""

  def test_packed_equals_unpacked_dense_ff(self):
    contracts.assert_lm_packed_equals_unpacked(lambda **kw: tm.TerraformerLM(
        vocab_size=11, d_model=16, d_ff=16, n_layers=2, n_heads=2, dropout=0.0, max_len=16,
        attention=SparseQKV(n_modules=2), ff_sparsity=None, **kw))

  def test_packed_equals_unpacked_sparse_ff_eval(self):
    # In training, SparseFF's Gumbel noise is drawn per position of the call: a packed row
    # draws other noise than its documents alone, so only 'eval' can match.
    contracts.assert_lm_packed_equals_unpacked(lambda **kw: tm.TerraformerLM(
        vocab_size=11, d_model=16, d_ff=16, n_layers=2, n_heads=2, dropout=0.0, max_len=16,
        attention=SparseQKV(n_modules=2), ff_sparsity=4, ff_d_lowrank=4, **kw),
        modes=('eval',))


if __name__ == '__main__':
  absltest.main()
