"""models.common: the deprecated-argument decorator (old configs build the same model)."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl
import terraflax.models as tm
from terraflax.models import attention
from terraflax.models.attention import LSH, Full, Local, SparseQKV
from terraflax.models.common import split_lm_head
from tests import contracts

RNGS = {'params': jax.random.key(0), 'hash': jax.random.key(1), 'sparse': jax.random.key(2),
        'dropout': jax.random.key(3)}
SMALL = dict(vocab_size=11, d_model=8, d_ff=16, n_heads=2, max_len=8, dropout=0.0)

# (factory, old-style kwargs as an old workdir's config.json holds them, the new spelling)
CASES = {
    'reformer_lm': (tm.ReformerLM, dict(
        SMALL, n_layers=4, attention_type=['lsh', 'full', 'local', 'lsh'], n_hashes=2,
        n_buckets=4, chunk_len=4, local_chunk_len=2, pos_type='axial', axial_shape=[2, 4],
        lsh_convention='hf'), dict(
            SMALL, n_layers=4,
            attention=(LSH(n_hashes=2, n_buckets=4, chunk_len=4, convention='hf'),
                       Full(query_chunk_len=4), Local(chunk_len=2),
                       LSH(n_hashes=2, n_buckets=4, chunk_len=4, convention='hf')),
            positions={'kind': 'axial', 'shape': (2, 4)})),
    'reformer_lm_defaults': (tm.ReformerLM, dict(SMALL, n_layers=2, chunk_len=4,
                                                 pos_type='learned'),
                             dict(SMALL, n_layers=2, attention=LSH(chunk_len=4),
                                  positions='learned')),
    'terraformer_lm_lsh': (tm.TerraformerLM, dict(
        SMALL, n_layers=2, ff_sparsity=4, ff_d_lowrank=4, attention_type='lsh',
        attention_options={'n_hashes': 2, 'n_buckets': 2}), dict(
            SMALL, n_layers=2, ff_sparsity=4, ff_d_lowrank=4, d_qk=64, d_v=64,
            attention=LSH(n_hashes=2, n_buckets=2, chunk_len=128))),
    'terraformer_lm_sparse_qkv': (tm.TerraformerLM, dict(
        SMALL, n_layers=2, ff_sparsity=0, attention_options={'n_modules': 2},
        attention_chunk_len=4), dict(SMALL, n_layers=2, ff_sparsity=0,
                                     attention=SparseQKV(n_modules=2, query_chunk_len=4))),
    # attention_dropout sets the dropout of every spec: given, translated or the default.
    'reformer_lm_attention_dropout': (tm.ReformerLM, dict(
        SMALL, n_layers=2, attention_type=['lsh', 'full'], chunk_len=4, n_buckets=2,
        attention_dropout=0.3), dict(
            SMALL, n_layers=2, attention=(LSH(chunk_len=4, n_buckets=2, dropout=0.3),
                                          Full(query_chunk_len=4, dropout=0.3)))),
    'reformer_attention_dropout': (tm.Reformer, dict(
        SMALL, n_layers=1, attention_dropout=0.3, decoder_attention=Local(chunk_len=4)), dict(
            SMALL, n_layers=1, encoder_attention=Full(query_chunk_len=64, dropout=0.3),
            decoder_attention=Local(chunk_len=4, dropout=0.3))),
    'transformer_lm_prefix': (tm.TransformerLM, dict(SMALL, n_layers=2, n_prefix=2,
                                                     attention_chunk_len=4),
                              dict(SMALL, n_layers=2,
                                   attention=Full(query_chunk_len=4, n_prefix=2))),
}


def params_and_logits(model, x, rngs=None):
  inputs = (x, x) if model_is_seq2seq(model) else (x,)
  variables = jax.jit(model.init)(RNGS, *inputs)
  rngs = {'hash': RNGS['hash']} if rngs is None else rngs
  logits = jax.jit(model.apply)(variables, *inputs, rngs=rngs)
  return variables['params'], logits


def assert_same_model(test, model, reference, x, rngs=None):
  """`model` gives `reference`'s parameters (paths, shapes, values) and logits.

  When both trace to the same init and apply programs (jaxpr and constants) with the same
  parameter tree, they compute the same by construction and nothing is compiled; otherwise
  both are run and compared.
  """
  inputs = (x, x) if model_is_seq2seq(model) else (x,)
  rngs = {'hash': RNGS['hash']} if rngs is None else rngs

  def programs(m):
    init = lambda: m.init(RNGS, *inputs)
    variables = jax.eval_shape(init)
    return ([contracts.traced(init),
             contracts.traced(lambda v: m.apply(v, *inputs, rngs=rngs), variables)],
            jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables))

  (got, got_shapes), (want, want_shapes) = programs(model), programs(reference)
  test.assertEqual(got_shapes, want_shapes)  # Same paths, same shapes.
  if contracts.same_traced(got, want):
    return
  got_params, got_logits = params_and_logits(model, x, rngs)
  want_params, want_logits = params_and_logits(reference, x, rngs)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got_params, want_params)
  np.testing.assert_array_equal(np.asarray(got_logits), np.asarray(want_logits))


def model_is_seq2seq(model):
  return model.n_in == 2


class DeprecatedArgumentsTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name,) + case for name, case in CASES.items()])
  def test_old_kwargs_build_the_same_model(self, factory, old, new):
    with self.assertWarns(DeprecationWarning):
      upgraded = factory.upgrade_kwargs(old)  # What the config code does with config.json.
    x = jnp.asarray(np.random.default_rng(0).integers(1, 11, (2, 8)), jnp.int32)
    assert_same_model(self, factory(mode='eval', **upgraded), factory(mode='eval', **new), x)
    # Calling the factory with the old names directly works the same way.
    with self.assertWarns(DeprecationWarning):
      direct = factory(mode='eval', **old)
    assert_same_model(self, direct, factory(mode='eval', **new), x)
    if 'attention_dropout' in old:  # 'train' mode: the same rate where the old one acted.
      train_rngs = {'hash': RNGS['hash'], 'dropout': RNGS['dropout']}
      assert_same_model(self, factory(mode='train', **upgraded), factory(mode='train', **new),
                        x, train_rngs)
      _, new_train = params_and_logits(factory(mode='train', **new), x, train_rngs)
      # Control: without the rate (specs' dropout None, the default 0) the logits differ.
      plain = {k: attention.replace_all(v, dropout=None) if k.endswith('attention') else v
               for k, v in new.items()}
      _, plain_train = params_and_logits(factory(mode='train', **plain), x, train_rngs)
      self.assertGreater(float(jnp.max(jnp.abs(plain_train - new_train))), 1e-3)

  def test_warning_names_the_new_spelling_and_the_signature_is_new(self):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      tm.ReformerLM.upgrade_kwargs({'n_hashes': 2, 'pos_type': 'learned'})
    messages = sorted(str(w.message) for w in caught)
    self.assertLen(messages, 2)  # One per old name.
    self.assertTrue(all(w.category is DeprecationWarning for w in caught))
    self.assertIn('ReformerLM(n_hashes=...) is deprecated', messages[0])
    self.assertIn('attention=LSH(n_hashes=...)', messages[0])
    self.assertIn("positions='axial' | 'sinusoidal' | 'learned'", messages[1])
    for factory in (tm.ReformerLM, tm.Reformer, tm.TerraformerLM, tm.Terraformer,
                    tm.TransformerLM, tm.TransformerEncoder, tm.Transformer, tm.BertMLM, tm.ViT):
      parameters = inspect.signature(factory).parameters
      self.assertNotIn('attention_type', parameters, factory.__name__)
      self.assertNotIn('n_hashes', parameters, factory.__name__)
      self.assertNotIn('attention_chunk_len', parameters, factory.__name__)
    # Attention details live in the spec (attention_dropout is its dropout): keep it small
    # (17 = 16 + `packed`, the input signature of packed rows).
    self.assertLessEqual(len(inspect.signature(tm.ReformerLM).parameters), 17)
    for factory in (tm.ReformerLM, tm.Reformer):
      self.assertNotIn('attention_dropout', inspect.signature(factory).parameters)
    self.assertEqual(tm.ReformerLM.upgrade_kwargs({'d_model': 8}), {'d_model': 8})  # No-op.
    with self.assertWarnsRegex(DeprecationWarning, r"ReformerLM\(attention_dropout=...\) is "
                                                   r"deprecated .* the attention spec's dropout"):
      upgraded = tm.ReformerLM.upgrade_kwargs({'attention_dropout': 0.3})
    self.assertEqual(upgraded, {'attention': attention.to_config(LSH(dropout=0.3))})  # Default.

  def test_unknown_and_conflicting_names_are_errors(self):
    with self.assertRaisesRegex(TypeError, r"ReformerLM got an unexpected keyword argument "
                                           r"'n_hashs' \(did you mean 'n_heads'\?\); valid: vocab_size"):
      tm.ReformerLM.upgrade_kwargs({'n_hashs': 2})
    with self.assertRaisesRegex(TypeError, "'atention' .*did you mean 'attention'"):
      tm.TransformerLM(vocab_size=5, atention=Full())
    with self.assertRaisesRegex(TypeError, 'ReformerLM got attention= and the deprecated '
                                           'n_hashes; pass only attention='), \
        warnings.catch_warnings():
      warnings.simplefilter('ignore', DeprecationWarning)
      tm.ReformerLM.upgrade_kwargs({'attention': LSH(), 'n_hashes': 2})


if __name__ == '__main__':
  absltest.main()


class SplitLmHeadTest(absltest.TestCase):

  def test_body_then_head_is_the_model(self):
    model = tm.ReformerLM(**dict(SMALL, dropout=0.1), n_layers=2,
                          attention=LSH(n_hashes=2, chunk_len=4))
    tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, 11)
    params = jax.jit(model.init)(RNGS, tokens)['params']  # Jitted: op by op is slower.
    body, head = split_lm_head(model)
    self.assertEqual([type(layer).__name__ for layer in head.layers][:2], ['Fn', 'LayerNorm'])
    hidden = jax.jit(lambda p: body.apply({'params': p}, tokens, rngs=RNGS))(params)
    self.assertLen(hidden, 2)  # the two residual streams
    got = jax.jit(lambda p, h: head.apply({'params': p}, *h, rngs=RNGS))(params, hidden)
    want = jax.jit(lambda p: model.apply({'params': p}, tokens, rngs=RNGS))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_no_head_without_a_final_dense(self):
    model = tm.ReformerLM(**SMALL, n_layers=2, attention=LSH(n_hashes=2, chunk_len=4))
    self.assertIsNone(split_lm_head(cb.Serial(*model.layers[:-3])))
    self.assertIsNone(split_lm_head(tl.Dense(3)))
