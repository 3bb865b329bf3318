"""Trax's ConfigurableTerraformer checkpoints -> ConcatTerraformer: logits, greedy targets, CLI.

The fixtures tests/fixtures/trax_terraformer_encdec{,_sparse}/ were made by
tests/fixtures/make_trax_fixtures.py with trax 1.4.1 (not needed here): tiny
encoder-decoders trained two steps by `training.Loop`, their config.gin,
inputs whose real (non-pad) lengths differ per example, targets, Trax's
eval-mode logits and Trax's greedy targets (one eval forward pass per token).
  trax_terraformer_encdec: full SelfAttention, dense ReLU feed-forward, one
    shared embedding, learned positions (pos_type None), 2 + 2 layers.
  trax_terraformer_encdec_sparse: decoder layers of MultiplicativeConvCausalAttention
    (sparse QKV) and CausalAttention (Dense with biases) in turn, SparseFF
    everywhere, output_vocab_size 40 (its own embedding), Trax's default
    fixed-base positions, 1 + 2 layers.
"""

import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from terraflax import decoding
from terraflax.models import attention, convert, convert_trax
from terraflax.models.concat_terraformer import ConcatTerraformer
from tests.contracts import relative_error, run_module

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / 'tests' / 'fixtures'
RNGS = {'hash': jax.random.key(0), 'sparse': jax.random.key(0)}


def fixture(name):
  path = str(FIXTURES / f'trax_{name}')
  with np.load(os.path.join(path, 'parity.npz')) as data:
    arrays = {k: data[k] for k in data.files}
  return path, arrays


def converted(name, mode='eval'):
  """(model config, the ConcatTerraformer in `mode`, params, the fixture's arrays)."""
  path, arrays = fixture(name)
  model_config, params = convert.from_trax(path)
  kwargs = dict(model_config)
  assert kwargs.pop('name') == 'ConcatTerraformer', model_config
  return model_config, ConcatTerraformer(**kwargs, mode=mode), params, arrays


def logits_of(model, params, inputs, targets):
  return np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray(inputs),
                                         jnp.asarray(targets), rngs=RNGS), np.float64)


class ParityTest(absltest.TestCase):

  def test_dense_encoder_decoder_reproduces_trax_logits(self):
    model_config, model, params, arrays = converted('terraformer_encdec')
    (spec,) = attention.specs_from(model_config['attention'])
    self.assertEqual((spec.kind, model_config['positions'], model_config['n_encoder_layers'],
                      model_config['n_decoder_attention_layers'],
                      'output_vocab_size' in model_config, 'ff_sparsity' in model_config),
                     ('full', 'learned', 2, 2, False, False))
    self.assertEqual(sorted(set((arrays['input_ids'] != 0).sum(1))), [2, 5, 8])
    got = logits_of(model, params, arrays['input_ids'], arrays['target_ids'])
    self.assertLess(relative_error(got, arrays['logits']), 1e-4)

  def test_sparse_encoder_decoder_reproduces_trax_logits(self):
    model_config, model, params, arrays = converted('terraformer_encdec_sparse')
    sparse_qkv, full = attention.specs_from(model_config['attention'])
    self.assertEqual((sparse_qkv.kind, sparse_qkv.output_layer, full.kind,
                      model_config['ff_sparsity'], model_config['ff_d_lowrank'],
                      model_config['positions'], model_config['output_vocab_size']),
                     ('sparse_qkv', 'none', 'full', 4, 8, 'fixed_base', 40))
    got = logits_of(model, params, arrays['input_ids'], arrays['target_ids'])
    self.assertLess(relative_error(got, arrays['logits']), 1e-4)

  def test_the_encoder_lengths_matter(self):
    # Control: with every example's inputs cut to 2 real tokens the logits move away from
    # Trax's, so the parity above depends on placing each example's encoder length right.
    _, model, params, arrays = converted('terraformer_encdec')
    inputs = arrays['input_ids'].copy()
    inputs[:, 2:] = 0
    got = logits_of(model, params, inputs, arrays['target_ids'])
    self.assertGreater(relative_error(got[:2], arrays['logits'][:2]), 1e-2)
    self.assertLess(relative_error(got[2:], arrays['logits'][2:]), 1e-4)  # Its length is 2.


class DecodingTest(absltest.TestCase):

  def test_greedy_decoding_equals_trax_greedy_targets(self):
    # Trax's reference: one full eval-mode forward pass per new token, for three inputs of
    # real lengths 8, 5 and 2 in one batch; here the predict-mode model and its cache.
    for name in ('terraformer_encdec', 'terraformer_encdec_sparse'):
      with self.subTest(name):
        _, model, params, arrays = converted(name, mode='predict')
        want = arrays['greedy_ids']
        got = decoding.autoregressive_sample(model, params, None, want.shape[1],
                                             temperature=0.0,
                                             inputs=jnp.asarray(arrays['input_ids']))
        np.testing.assert_array_equal(np.asarray(got), want)


class CommandLineTest(absltest.TestCase):

  def test_converts_with_one_command_and_decodes_trax_greedy_targets(self):
    # The sparse fixture's row 2 (2 real input tokens); the dense fixture decodes in
    # DecodingTest (two subprocesses per fixture are what make this test slow).
    path, arrays = fixture('terraformer_encdec_sparse')
    inputs = [int(t) for t in arrays['input_ids'][2] if t]
    greedy = arrays['greedy_ids'][2].tolist()
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'wd')
      result = run_module('terraflax.models.convert', f'--from_trax={path}', f'--to={workdir}')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      self.assertIn('terraflax ConcatTerraformer', result.stdout)
      self.assertIn('--inputs=', result.stdout)
      result = run_module('terraflax.decoding', f'--workdir={workdir}',
                          f'--inputs={" ".join(map(str, inputs))}',
                          f'--max_new_tokens={len(greedy)}', '--temperature=0')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    tokens = [int(t) for t in result.stdout.strip().splitlines()[-1].split()]
    self.assertEqual(tokens, greedy)


class ErrorTest(absltest.TestCase):

  def config(self, **changes):
    base = dict(input_vocab_size=48, d_model=16, d_ff=32, n_encoder_layers=2,
                n_decoder_layers=2, n_heads=2, max_len=32, pos_type=None)
    return dict(base, **changes)

  def convert(self, **changes):
    path, _ = fixture('terraformer_encdec')
    return convert.from_trax(path, model='ConfigurableTerraformer', config=self.config(**changes))

  def test_the_keyword_config_equals_the_gin_file(self):
    path, _ = fixture('terraformer_encdec')
    self.assertEqual(convert.from_trax(path)[0], self.convert()[0])

  def test_kinds_the_converter_does_not_take(self):
    for changes, message in [
        (dict(encoder_attention_type='LSHSelfAttention'),
         r"encoder_attention_type must be one full SelfAttention \(chunk_len None\), got "
         r"\['LSHSelfAttention'\]"),
        (dict(encoder_decoder_attention_type='LSHSelfAttention'),
         r"encoder_decoder_attention_type\[0\]='LSHSelfAttention' is not supported; expected "
         'CausalAttention, SelfAttention'),
        (dict(encoder_decoder_attention_type='CausalAttention', d_attention_key=4),
         r'=CausalAttention with d_attention_key=4 / d_attention_value=8 is not supported'),
        (dict(pos_type='sin-cos'),
         r"ConfigurableTerraformer.pos_type='sin-cos' is not supported; expected 'fixed-base'"),
        (dict(reversible_encoder=True),
         r'ConfigurableTerraformer.reversible_encoder=True is not supported \(only False'),
        (dict(n_layers_forget=1),
         r'ConfigurableTerraformer.n_layers_forget=1 is not supported \(only 0 converts\)'),
        (dict(d_ff_typo=3), 'argument.*d_ff_typo are not read by the converter'),
    ]:
      with self.subTest(message):
        with self.assertRaisesRegex(convert_trax.TraxConversionError, message):
          self.convert(**changes)
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                'has no ConfigurableTerraformer.input_vocab_size'):
      path, _ = fixture('terraformer_encdec')
      convert.from_trax(path, model='ConfigurableTerraformer', config={'d_model': 16})

  def test_a_structure_mismatch_names_the_weight(self):
    # One attention layer per decoder block: decoder block 0's feed-forward norm would be
    # its second attention's norm, then its first Dense kernel is that attention's w_q.
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r'weight #39 has shape \(2, 16, 8\), but the '
                                r'ConfigurableTerraformer configuration puts decoder block 0 '
                                r'feed-forward first Dense kernel \(16, 32\) there'):
      self.convert(n_decoder_attention_layers=1)
    # Three decoder blocks: the final norm is read as block 2's first norm, then the output
    # kernel is not its attention's w_q.
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r'weight #69 has shape \(16, 48\), but the ConfigurableTerraformer '
                                r'configuration puts decoder block 2 attention 0 SelfAttention w_q '
                                r'\(2, 16, 8\) there'):
      self.convert(n_decoder_layers=3)
    # The sparse checkpoint read as shared-embedding: its output embedding is not the
    # decoder's first fixed-base digit vector.
    path, _ = fixture('terraformer_encdec_sparse')
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r'weight #34 has shape \(40, 16\), but the ConfigurableTerraformer '
                                r'configuration puts decoder FixedBasePositionalEncoding base 11 '
                                r'digit 0 \(1, 2\) there'):
      convert.from_trax(path, model='ConfigurableTerraformer', config=dict(
          input_vocab_size=48, d_model=16, d_ff=32, n_encoder_layers=1, n_decoder_layers=2,
          n_heads=2, max_len=32, ff_sparsity=4,
          encoder_decoder_attention_type=['MultiplicativeConvCausalAttention',
                                          'CausalAttention']))


if __name__ == '__main__':
  absltest.main()
