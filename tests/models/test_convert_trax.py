"""Trax checkpoints -> terraflax: parity with Trax's logits and greedy decoding, CLI, errors.

The fixtures in tests/fixtures/trax_*/ were made by
tests/fixtures/make_trax_fixtures.py with trax 1.4.1 (not needed here): tiny
random models trained two steps by `training.Loop` (its checkpoint files), a
config.gin describing each, input ids, Trax's eval-mode logits, the LSH
rotations Trax drew, and Trax's greedy continuations of a prompt.
"""

import gzip
import os
import pathlib
import pickle
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from terraflax import decoding
from terraflax import quantization
from terraflax import tokenizer as tokenizer_lib
from terraflax.models import attention, convert, convert_trax
from terraflax.models import spec as spec_lib
from terraflax.models.reformer import ReformerLM
from terraflax.models.terraformer import TerraformerLM
from terraflax.models.transformer import TransformerLM
from tests.contracts import relative_error, run_module

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / 'tests' / 'fixtures'
FACTORIES = {'TransformerLM': TransformerLM, 'ReformerLM': ReformerLM,
             'TerraformerLM': TerraformerLM}
SPM = FIXTURES / 'hf_reformer_spm' / 'spiece.model'  # TransformerLM's fixture vocabulary.


def fixture(name):
  path = str(FIXTURES / f'trax_{name}')
  with np.load(os.path.join(path, 'parity.npz')) as data:
    arrays = {k: data[k] for k in data.files}
  return path, arrays


def converted_logits(name, *, rotations=True, lsh_changes=None):
  """(terraflax logits, Trax's) of a fixture, float64."""
  path, arrays = fixture(name)
  model_config, params = convert.from_trax(path)
  kwargs = dict(model_config)
  factory = FACTORIES[kwargs.pop('name')]
  if lsh_changes:
    kwargs['attention'] = attention.replace_lsh(kwargs['attention'], **lsh_changes)
  variables = {'params': params}
  given = {int(k.split('_')[1]): v for k, v in arrays.items() if k.startswith('rotations_')}
  if rotations and given:
    variables['lsh_rotations'] = convert.lsh_rotations(kwargs, given)
  model = factory(**kwargs, mode='eval')
  logits = jax.jit(model.apply)(variables, jnp.asarray(arrays['input_ids']),
                                rngs={'hash': jax.random.key(0), 'sparse': jax.random.key(0)})
  return np.asarray(logits, np.float64), arrays['logits'].astype(np.float64)



class ParityTest(absltest.TestCase):

  def test_transformer_lm_reproduces_trax_logits(self):
    got, want = converted_logits('transformer_lm')
    self.assertLess(relative_error(got, want), 1e-4)

  def test_reformer_lm_local_and_full_reproduces_trax_logits(self):
    got, want = converted_logits('reformer_lm')
    self.assertLess(relative_error(got, want), 1e-4)

  def test_reformer_lm_lsh_with_trax_rotations_reproduces_trax_logits(self):
    got, want = converted_logits('reformer_lsh')
    self.assertLess(relative_error(got, want), 1e-4)
    # Control: other rotations give other logits, so the parity above is not luck.
    got, want = converted_logits('reformer_lsh', rotations=False)
    self.assertGreater(relative_error(got, want), 1e-3)

  def test_sparse_ff_reformer_lm_becomes_a_terraformer_lm_with_trax_logits(self):
    model_config, _ = convert.from_trax(fixture('terraformer_lm')[0])
    self.assertEqual((model_config['name'], model_config['ff_sparsity'],
                      model_config['ff_d_lowrank']), ('TerraformerLM', 4, 8))
    got, want = converted_logits('terraformer_lm')
    self.assertLess(relative_error(got, want), 1e-4)

  def test_sparse_qkv_terraformer_reproduces_trax_logits(self):
    model_config, _ = convert.from_trax(fixture('terraformer_qkv')[0])
    (spec,) = attention.specs_from(model_config['attention'])
    self.assertEqual((model_config['name'], spec.kind, spec.output_layer),
                     ('TerraformerLM', 'sparse_qkv', 'none'))
    got, want = converted_logits('terraformer_qkv')
    self.assertLess(relative_error(got, want), 1e-4)

  def test_configurable_transformer_lm_sparse_reproduces_trax_logits(self):
    # One pre-norm stream with sparse QKV and SparseFF: a TransformerLM (not the two-stream
    # TerraformerLM) with SparseQKV attention and ff_sparsity.
    model_config, _ = convert.from_trax(fixture('configurable_lm')[0])
    (spec,) = attention.specs_from(model_config['attention'])
    self.assertEqual((model_config['name'], spec.kind, spec.output_layer,
                      model_config['ff_sparsity'], model_config['ff_d_lowrank']),
                     ('TransformerLM', 'sparse_qkv', 'none', 4, 8))
    got, want = converted_logits('configurable_lm')
    self.assertLess(relative_error(got, want), 1e-4)

  def test_configurable_transformer_lm_dense_reproduces_trax_logits(self):
    model_config, _ = convert.from_trax(fixture('configurable_dense')[0])
    (spec,) = attention.specs_from(model_config['attention'])
    self.assertEqual((model_config['name'], spec.kind, 'ff_sparsity' in model_config),
                     ('TransformerLM', 'full', False))
    got, want = converted_logits('configurable_dense')
    self.assertLess(relative_error(got, want), 1e-4)

  def test_save_to_file_converts_like_the_loop_checkpoint(self):
    path, _ = fixture('transformer_lm')
    config = os.path.join(path, 'config.gin')
    loop_config, loop_params = convert.from_trax(path)
    file_config, file_params = convert.from_trax(os.path.join(path, 'layer.pkl.gz'),
                                                 config=config)
    self.assertEqual(loop_config, file_config)
    for a, b in zip(jax.tree_util.tree_leaves(loop_params), jax.tree_util.tree_leaves(file_params)):
      np.testing.assert_array_equal(a, b)

  def test_keyword_config_equals_the_gin_file(self):
    path, _ = fixture('reformer_lsh')
    gin_config, _ = convert.from_trax(path)
    kwargs = dict(vocab_size=48, d_model=16, d_ff=32, d_attention_key=8, d_attention_value=8,
                  n_layers=2, n_heads=2, max_len=16, dropout=0.1, ff_activation='Relu',
                  pos_type='axial', pos_axial_shape=[4, 4], pos_d_axial_embs=[8, 8],
                  attention_type=[
                      {'type': 'SelfAttention', 'chunk_len': 8, 'n_chunks_before': 1},
                      {'type': 'LSHSelfAttention', 'chunk_len': 4, 'n_hashes': 2,
                       'n_buckets': [2, 4]}])
    json_config, _ = convert.from_trax(path, model='ReformerLM', config=kwargs)
    self.assertEqual(gin_config, json_config)
    local, lsh = attention.specs_from(json_config['attention'])
    self.assertEqual((local.kind, local.chunk_len, local.n_chunks_before), ('local', 8, 1))
    self.assertEqual((lsh.kind, lsh.n_hashes, lsh.n_buckets, lsh.chunk_len),
                     ('lsh', 2, (2, 4), 4))


class GinTest(absltest.TestCase):

  def test_reads_an_operative_config(self):
    text = """\
import trax.layers
# Macros:
# ==============================================================================
n_layers = 4

# Parameters for ReformerLM:
ReformerLM.attention_type = [
    @trax.layers.SelfAttention,  # local
    @hashed/trax.layers.LSHSelfAttention,
]
ReformerLM.n_layers = %n_layers
ReformerLM.pos_axial_shape = (8, 8)
hashed/LSHSelfAttention.n_buckets = [2, 4]
"""
    with tempfile.TemporaryDirectory() as tmp:
      gin = os.path.join(tmp, 'config.gin')
      with open(gin, 'w') as f:
        f.write(text)
      bindings = convert_trax.read_gin(gin)
      self.assertEqual(bindings[('', 'ReformerLM')], {
          'attention_type': ['@trax.layers.SelfAttention',
                             '@hashed/trax.layers.LSHSelfAttention'],
          'n_layers': 4, 'pos_axial_shape': (8, 8)})
      self.assertEqual(bindings[('hashed', 'LSHSelfAttention')], {'n_buckets': [2, 4]})
      with open(gin, 'a') as f:
        f.write('ReformerLM.d_model = %d_model\n')
      with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                  r'config.gin:14: %d_model is not a macro'):
        convert_trax.read_gin(gin)



class CommandLineTest(absltest.TestCase):

  def test_transformer_lm_converts_and_decodes_text_like_trax(self):
    path, arrays = fixture('transformer_lm')
    prompt, greedy = arrays['prompt'].tolist(), arrays['greedy_ids'].tolist()
    tok = tokenizer_lib.load(str(SPM))
    text = tok.decode(prompt)
    self.assertEqual(tok.encode(text), prompt)  # The fixture's prompt is text's ids.
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'wd')
      result = run_module('terraflax.models.convert', f'--from_trax={path}', f'--to={workdir}',
                   f'--tokenizer={SPM}')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      self.assertIn('terraflax TransformerLM', result.stdout)
      self.assertIn('optimizer slots dropped', result.stdout)
      result = run_module('terraflax.decoding', f'--workdir={workdir}', f'--prompt={text}',
                   f'--max_new_tokens={len(greedy)}', '--temperature=0')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    # Reference: Trax's greedy ids (full eval-mode forward passes in Trax) as text.
    self.assertEqual(result.stdout.rstrip('\n'), tok.decode(prompt + greedy))

  def test_reformer_lm_converts_and_decodes_like_trax(self):
    path, arrays = fixture('reformer_lm')
    prompt, greedy = arrays['prompt'].tolist(), arrays['greedy_ids'].tolist()
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'wd')
      result = run_module('terraflax.models.convert', f'--from_trax={path}', f'--to={workdir}')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      result = run_module('terraflax.decoding', f'--workdir={workdir}',
                   f'--prompt={" ".join(map(str, prompt))}', f'--max_new_tokens={len(greedy)}',
                   '--temperature=0')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    tokens = [int(t) for t in result.stdout.strip().splitlines()[-1].split()]
    self.assertEqual(tokens, prompt + greedy)

  def test_terraformer_lm_converts_and_decodes_like_trax(self):
    for name in ('terraformer_lm', 'terraformer_qkv'):
      with self.subTest(name):
        self.check_greedy_ids(name)

  def test_configurable_transformer_lm_converts_and_decodes_like_trax(self):
    for name in ('configurable_lm', 'configurable_dense'):
      with self.subTest(name):
        self.check_greedy_ids(name, 'TransformerLM')

  def check_greedy_ids(self, name, terraflax_model='TerraformerLM'):
    """The conversion and decoding the two commands run (convert.main's from_trax +
    write_workdir, decoding.main's load_workdir + generate_text), in this process: the other
    tests here run the commands themselves, and two subprocesses per fixture only added their
    start-up."""
    path, arrays = fixture(name)
    prompt, greedy = arrays['prompt'].tolist(), arrays['greedy_ids'].tolist()
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'wd')
      model_config, params = convert.from_trax(path)
      model_name = model_config.pop('name')
      self.assertEqual(model_name, terraflax_model)
      convert.write_workdir(workdir, model_config, params, name=model_name, source='Trax')
      config, spec, params = spec_lib.load_workdir(workdir)
      model = spec.build('predict')
      context, params = quantization.prepare_for_decoding(model, params, weights='f32')
      with context:
        text = decoding.generate_text(
            model, params, ' '.join(map(str, prompt)), max_new_tokens=len(greedy),
            tokenizer=decoding.workdir_tokenizer(workdir, config), temperature=0.0)
    tokens = [int(t) for t in text.split()]
    self.assertEqual(tokens, prompt + greedy)

  def test_lsh_reformer_converts_with_one_command(self):
    path, _ = fixture('reformer_lsh')
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'wd')
      result = run_module('terraflax.models.convert', f'--from_trax={path}', f'--to={workdir}')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      result = run_module('terraflax.decoding', f'--workdir={workdir}', '--prompt=3 4 5',
                   '--max_new_tokens=4', '--temperature=0')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    tokens = [int(t) for t in result.stdout.strip().splitlines()[-1].split()]
    self.assertEqual(tokens[:3], [3, 4, 5])
    self.assertLen(tokens, 7)

  def test_bad_input_is_one_line(self):
    with tempfile.TemporaryDirectory() as tmp:
      junk = os.path.join(tmp, 'model.pkl.gz')
      with open(junk, 'wb') as f:
        f.write(b'not a checkpoint')
      result = run_module('terraflax.models.convert', f'--from_trax={junk}', f'--to={tmp}/wd',
                   '--trax_model=TransformerLM', '--trax_config={"vocab_size": 8}')
    self.assertEqual(result.returncode, 1)
    self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
    self.assertIn('is not a Trax checkpoint', result.stderr)


class ErrorTest(absltest.TestCase):

  def copy(self, name, tmp):
    target = os.path.join(tmp, name)
    shutil.copytree(fixture(name)[0], target)
    return target

  def test_a_file_that_is_not_a_trax_checkpoint(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = self.copy('transformer_lm', tmp)
      with gzip.open(os.path.join(path, 'model.pkl.gz'), 'wb') as f:
        pickle.dump({'weights': [1, 2]}, f)  # A gzipped pickle, but not Trax's dict.
      with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                  "not a Trax checkpoint: expected a dict with 'flat_weights'"):
        convert.from_trax(path)
      with self.assertRaisesRegex(convert_trax.TraxConversionError, 'holds no model.pkl.gz'):
        convert.from_trax(tmp)

  def test_an_unknown_model_kind(self):
    path, _ = fixture('transformer_lm')
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                "unknown Trax model 'BERT'.*ReformerLM, TransformerLM"):
      convert.from_trax(path, model='BERT')
    with tempfile.TemporaryDirectory() as tmp:
      gin = os.path.join(tmp, 'other.gin')
      with open(gin, 'w') as f:
        f.write('Transformer.d_model = 16\nTransformer.input_vocab_size = 8\n')
      with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                  'binds none of the Trax models the converter knows'):
        convert.from_trax(path, config=gin)

  def test_configurable_models_the_converter_does_not_take(self):
    path, _ = fixture('configurable_lm')
    base = dict(vocab_size=48, d_model=16, d_ff=32, n_layers=2, n_heads=2, max_len=32,
                ff_sparsity=4, attention_type='MultiplicativeConvCausalAttention')
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r"ConfigurableTransformerLM.attention_type='LSHSelfAttention' "
                                'is not supported; expected CausalAttention or '
                                'MultiplicativeConvCausalAttention'):
      convert.from_trax(path, model='ConfigurableTransformerLM',
                        config=dict(base, attention_type='LSHSelfAttention'))
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r"ConfigurableTransformerLM.ff_sparsity_type='Block' is not "
                                r"supported \(only '1inN' converts\)"):
      convert.from_trax(path, model='ConfigurableTransformerLM',
                        config=dict(base, ff_sparsity_type='Block'))
    # Without ff_sparsity the checkpoint's SparseFF weights are not a dense feed-forward.
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r'weight #15 has shape \(16, 8\), but the '
                                r'ConfigurableTransformerLM configuration puts block 0 '
                                r'feed-forward first Dense kernel \(16, 32\)'):
      convert.from_trax(path, model='ConfigurableTransformerLM', config=dict(base, ff_sparsity=0))
    with tempfile.TemporaryDirectory() as tmp:
      gin = os.path.join(tmp, 'terraformer.gin')
      with open(gin, 'w') as f:
        f.write('ConfigurableTerraformer.input_vocab_size = 8\n')
      # ConfigurableTerraformer converts (tests/models/test_convert_trax_terraformer.py), but
      # not from this LM's checkpoint.
      with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                  r'weight #0 has shape \(48, 16\), but the '
                                  'ConfigurableTerraformer configuration puts input Embedding '
                                  r'\(8, 512\) there'):
        convert.from_trax(path, config=gin)

  def test_a_structure_mismatch_names_the_weight(self):
    path, _ = fixture('transformer_lm')
    kwargs = dict(vocab_size=96, d_model=16, d_ff=32, n_heads=2, max_len=64)
    # Three blocks: the final norm is read as block 2's first norm, then the head's kernel
    # is not block 2's query kernel.
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r'weight #36 has shape \(16, 96\), but the TransformerLM '
                                r'configuration puts block 2 attention query Dense kernel'):
      convert.from_trax(path, model='TransformerLM', config=dict(kwargs, n_layers=3))
    with tempfile.TemporaryDirectory() as tmp:  # A checkpoint cut short: 20 weights.
      short = os.path.join(tmp, 'short.pkl.gz')
      with gzip.open(short, 'wb') as f:
        pickle.dump({'flat_weights': convert_trax.read_weights(path)[:20]}, f)
      with self.assertRaisesRegex(
          convert_trax.TraxConversionError,
          'has 20 weights, but the TransformerLM configuration needs more: '
          r'block 1 attention query Dense kernel \(16, 16\) would be #20'):
        convert.from_trax(short, model='TransformerLM', config=dict(kwargs, n_layers=2))
    # One block: the second block's weights are not the final norm and head.
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r'weight #20 has shape \(16, 16\), but the TransformerLM '
                                r'configuration puts output Dense kernel \(16, 96\) there'):
      convert.from_trax(path, model='TransformerLM', config=dict(kwargs, n_layers=1))
    with self.assertRaisesRegex(convert_trax.TraxConversionError,
                                r'weight #0 has shape \(96, 16\), but the TransformerLM '
                                r'configuration puts Embedding \(96, 32\) there'):
      convert.from_trax(path, model='TransformerLM', config=dict(kwargs, n_layers=2, d_model=32,
                                                                 max_len=64))


if __name__ == '__main__':
  absltest.main()
