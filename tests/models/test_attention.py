"""Attention specs: construction checks, dict round trip, cycling, one builder per kind."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl.testing import absltest, parameterized

import terraflax.layers as tl
import terraflax.models as tm
from terraflax.models import attention as attn
from terraflax.models.attention import LSH, Full, Local, SparseQKV

KEY = jax.random.key(0)
SIZES = dict(n_heads=2, d_qk=4, d_v=4, mode='eval', dtype=None, dropout=0.0, max_len=16)


class SpecTest(parameterized.TestCase):

  @parameterized.parameters(
      (Full, dict(query_chunk_len=0), 'Full attention query_chunk_len must be a positive int'),
      (Full, dict(n_prefix=-1), 'n_prefix must be an int >= 0'),
      (Local, dict(chunk_len=0), 'Local attention chunk_len must be a positive int'),
      (Local, dict(n_chunks_after=-1), 'n_chunks_after must be an int >= 0'),
      (LSH, dict(n_hashes=0), 'LSH attention n_hashes must be a positive int'),
      (LSH, dict(n_buckets=3), 'LSH attention n_buckets must be .* got 3'),
      (LSH, dict(n_buckets=(2, 4, 8)), r'n_buckets must be .* got \(2, 4, 8\)'),
      (LSH, dict(convention='trax'), r"convention must be one of \('terraflax', 'hf'\)"),
      (LSH, dict(predict_mem_len=0), 'predict_mem_len must be a positive int or None'),
      (SparseQKV, dict(module_kernel_size=2), 'module_kernel_size must be odd'),
      (SparseQKV, dict(output_layer='conv'), 'output_layer must be one of'),
      (Full, dict(dropout=1.0), r'Full attention dropout must be None .* in \[0, 1\), got 1.0'),
      (LSH, dict(dropout=-0.1), 'LSH attention dropout must be None'),
      (Local, dict(dropout=True), 'Local attention dropout must be None'),
      (SparseQKV, dict(dropout='0.1'), 'SparseQKV attention dropout must be None'),
  )
  def test_construction_errors_name_the_field(self, cls, fields, message):
    with self.assertRaisesRegex(ValueError, message):
      cls(**fields)

  def test_specs_are_frozen_and_hashable(self):
    spec = LSH(n_buckets=[2, 4])  # A list (as JSON holds it) becomes a tuple.
    self.assertEqual(spec.n_buckets, (2, 4))
    self.assertEqual(hash(spec), hash(LSH(n_buckets=(2, 4))))
    with self.assertRaises(AttributeError):
      spec.n_hashes = 2  # pytype: disable=not-writable

  def test_dict_round_trip(self):
    specs = (Full(query_chunk_len=8, n_prefix=2), Local(chunk_len=4),
             LSH(n_hashes=4, n_buckets=(2, 4), predict_mem_len=32, convention='hf'),
             SparseQKV(n_modules=2, output_layer='none'))
    written = attn.to_config(specs)
    self.assertEqual(json.loads(json.dumps(written)), written)  # Plain JSON.
    self.assertEqual(written[2], {'kind': 'lsh', 'n_hashes': 4, 'chunk_len': 64,
                                  'n_buckets': [2, 4], 'n_chunks_before': 1,
                                  'n_chunks_after': 0, 'predict_mem_len': 32,
                                  'convention': 'hf'})
    self.assertEqual(attn.specs_from(written), specs)
    self.assertEqual(attn.to_config(specs[2]), written[2])  # One spec: one dict.
    self.assertEqual(attn.specs_from(specs[1]), (specs[1],))
    # A ConfigDict (as configs hold it) and a kind name with defaults read too.
    config = ml_collections.ConfigDict({'kind': 'lsh', 'n_hashes': 4})
    self.assertEqual(attn.specs_from(config), (LSH(n_hashes=4),))
    self.assertEqual(attn.specs_from('local'), (Local(),))
    # dropout: written when set, left out when None (the model's default).
    rated = (Local(chunk_len=4, dropout=0.1), Full(dropout=0.0))
    self.assertEqual(attn.to_config(rated)[0]['dropout'], 0.1)
    self.assertNotIn('dropout', written[0])
    self.assertEqual(attn.specs_from(attn.to_config(rated)), rated)
    self.assertEqual(attn.replace_all([LSH(), {'kind': 'full'}], dropout=0.2),
                     attn.to_config([LSH(dropout=0.2), Full(dropout=0.2)]))

  def test_unknown_kinds_and_fields_suggest_a_close_match(self):
    with self.assertRaisesRegex(ValueError, r"ReformerLM attention\[1\]: 'n_hash' is not a field "
                                            r"of 'lsh' attention \(LSH\) \(did you mean "
                                            r"'n_hashes'\?\); valid: kind, n_hashes"):
      attn.specs_from([Full(), {'kind': 'lsh', 'n_hash': 2}], where='ReformerLM attention')
    with self.assertRaisesRegex(ValueError, r"x: unknown attention kind 'lhs' \(did you mean "
                                            r"'lsh'\?\); valid kinds: full, local, lsh"):
      attn.specs_from({'kind': 'lhs'}, where='x')
    with self.assertRaisesRegex(ValueError, "x needs a 'kind'"):
      attn.specs_from({'n_hashes': 2}, where='x')
    with self.assertRaisesRegex(ValueError, 'x must not be an empty sequence'):
      attn.specs_from([], where='x')
    with self.assertRaisesRegex(ValueError, r'x\[0\]: LSH attention n_hashes must be a positive'):
      attn.specs_from([{'kind': 'lsh', 'n_hashes': 0}], where='x')

  def test_pattern_cycles_over_layers(self):
    lsh, full = LSH(), Full()
    self.assertEqual(attn.pattern([lsh, full], 4, where='m'), (lsh, full))
    self.assertEqual(attn.pattern([lsh, lsh], 4, where='m'), (lsh,))  # One repeated spec.
    with self.assertRaisesRegex(ValueError, 'm has 3 specs, .* multiple of 3; got 4'):
      attn.pattern([lsh, full, full], 4, where='m')
    # A model: layer i has spec i % 2; one scanned unit holds one layer of each.
    model = tm.TransformerLM(vocab_size=7, d_model=8, d_ff=8, n_layers=4, n_heads=2,
                             max_len=8, attention=[LSH(chunk_len=4), Full()], mode='eval')
    params = nn.meta.unbox(jax.eval_shape(model.init, {'params': KEY, 'hash': KEY},
                            jnp.zeros((1, 8), jnp.int32))['params'])
    unit = params['Repeat_3']['Serial_0']
    # 4 // 2 repeats; per-head width d_model // n_heads.
    self.assertEqual(unit['Residual_0']['LSHSelfAttention_1']['qk'].shape, (2, 8, 2, 4))
    self.assertIn('CausalAttention_1', unit['Residual_2'])

  def test_replace_lsh_changes_only_lsh_specs(self):
    value = [{'kind': 'lsh', 'n_hashes': 2}, {'kind': 'full'}]
    self.assertEqual(attn.replace_lsh(value, n_hashes=8),
                     [attn.to_config(LSH(n_hashes=8)), attn.to_config(Full())])
    self.assertEqual(attn.replace_lsh(LSH(), **attn.full_as_lsh(32)),
                     attn.to_config(LSH(n_buckets=1, chunk_len=32, n_chunks_before=0)))
    self.assertTrue(attn.has_lsh(value))
    self.assertFalse(attn.has_lsh(Full()))


class BuilderTest(parameterized.TestCase):

  @parameterized.parameters(
      (Full(), True, tl.CausalAttention),
      (Full(), False, tl.Attention),
      (Full(n_prefix=2), True, tl.PrefixCausalAttention),
      (Full(n_prefix=2), False, tl.PrefixAttention),
      (Local(), True, tl.LocalSelfAttention),
      (LSH(), True, tl.LSHSelfAttention),
      (LSH(), False, tl.LSHSelfAttention),
      (SparseQKV(), True, tl.MultiplicativeConvCausalAttention),
  )
  def test_layer_class_per_kind(self, spec, causal, layer_class):
    layer = attn.SelfAttention(spec, causal=causal, **SIZES)
    self.assertIs(type(layer), layer_class)
    self.assertEqual(layer.n_in, 2 if (isinstance(spec, Full) and not causal) else 1)

  def test_builder_passes_the_knobs(self):
    layer = attn.SelfAttention({'kind': 'lsh', 'n_hashes': 3, 'chunk_len': 8}, causal=True,
                               **SIZES)
    self.assertEqual((layer.n_hashes, layer.chunk_len, layer.predict_mem_len, layer.causal),
                     (3, 8, 16, True))  # predict_mem_len defaults to max_len.
    full = attn.SelfAttention(Full(query_chunk_len=4), causal=True, use_bias=False, **SIZES)
    self.assertEqual((full.chunk_len, full.use_bias, full.max_len), (4, False, 16))
    with self.assertRaisesRegex(ValueError, 'causal only'):
      attn.SelfAttention(SparseQKV(), causal=False, **SIZES)

  @parameterized.parameters(Full(), Local(), LSH(), SparseQKV())
  def test_spec_dropout_overrides_the_models_default(self, spec):
    sizes = dict(SIZES, dropout=0.3)
    self.assertEqual(attn.SelfAttention(spec, causal=True, **sizes).dropout, 0.3)
    rated = dataclasses.replace(spec, dropout=0.1)
    self.assertEqual(attn.SelfAttention(rated, causal=True, **sizes).dropout, 0.1)
    zero = dataclasses.replace(spec, dropout=0.0)  # 0 is a rate, not "the default".
    self.assertEqual(attn.SelfAttention(zero, causal=True, **sizes).dropout, 0.0)


if __name__ == '__main__':
  absltest.main()
