"""Hugging Face Reformer checkpoints -> ReformerLM: parity with HF's logits, CLI, errors.

The fixtures in tests/fixtures/hf_reformer_{local,lsh,spm}/ were made by
tests/fixtures/make_hf_reformer_fixture.py with torch + transformers 5.23
(not needed here): tiny random `ReformerModelWithLMHead`s, their input ids,
HF's logits and, for the LSH layers, the rotations HF drew; hf_reformer_spm
also has a SentencePiece `spiece.model`, a text prompt and HF's greedy
continuation of it.
"""

import json
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from safetensors.numpy import load_file, save_file

from terraflax import export
from terraflax import tokenizer as tokenizer_lib
from terraflax.models import attention, convert
from terraflax.models.reformer import ReformerLM
from tests.contracts import relative_error, run_module

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / 'tests' / 'fixtures'


def fixture(name):
  path = str(FIXTURES / f'hf_reformer_{name}')
  with np.load(os.path.join(path, 'parity.npz')) as data:
    arrays = {k: data[k] for k in data.files}
  return path, arrays


def hf_reference(path, arrays):
  """HF's logits; with lm_head.bias added where this transformers version left it out."""
  want = arrays['logits'].astype(np.float64)
  if not bool(arrays['head_adds_bias']):  # transformers 5.x drops lm_head.bias (4.x added it).
    want = want + load_file(os.path.join(path, 'model.safetensors'))['lm_head.bias']
  return want


def shifted_inputs(ids):
  """ReformerLM inputs whose right shift (pad 0 first) is HF's ids, which start with 0."""
  assert (ids[:, 0] == 0).all()
  return np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)


def converted_logits(name, *, rotations=True, lsh_changes=None):
  path, arrays = fixture(name)
  kwargs, params = convert.from_hf_reformer(path)
  if lsh_changes:
    kwargs['attention'] = attention.replace_lsh(kwargs['attention'], **lsh_changes)
  variables = {'params': params}
  given = {int(k.split('_')[1]): v for k, v in arrays.items() if k.startswith('rotations_')}
  if rotations and given:
    variables['lsh_rotations'] = convert.lsh_rotations(kwargs, given)
  model = ReformerLM(**kwargs, mode='eval')
  logits = jax.jit(model.apply)(variables, jnp.asarray(shifted_inputs(arrays['input_ids'])),
                                rngs={'hash': jax.random.key(0)})
  return np.asarray(logits, np.float64), hf_reference(path, arrays)



class ParityTest(absltest.TestCase):

  def test_local_model_reproduces_hf_logits(self):
    got, want = converted_logits('local')
    self.assertLess(relative_error(got, want), 1e-4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  def test_lsh_model_with_hf_rotations_reproduces_hf_logits(self):
    got, want = converted_logits('lsh')
    self.assertLess(relative_error(got, want), 1e-4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  def test_lsh_parity_needs_the_rotations_and_the_hf_convention(self):
    # Controls: the fixture is sensitive to both, so the parity above is not luck.
    got, want = converted_logits('lsh', rotations=False)
    self.assertGreater(relative_error(got, want), 1e-3)
    got, want = converted_logits('lsh', lsh_changes={'convention': 'terraflax'})
    self.assertGreater(relative_error(got, want), 1e-3)

  def test_converted_kwargs(self):
    kwargs, _ = convert.from_hf_reformer(fixture('lsh')[0])
    local, lsh = attention.specs_from(kwargs['attention'])
    self.assertEqual((local.kind, lsh.kind), ('local', 'lsh'))
    self.assertEqual((lsh.chunk_len, local.chunk_len), (4, 8))
    self.assertEqual((lsh.n_hashes, lsh.n_buckets), (2, (2, 4)))
    self.assertEqual(kwargs['positions']['shape'], [4, 8])
    self.assertEqual(lsh.convention, 'hf')
    self.assertEqual((local.dropout, lsh.dropout), (0.0, 0.0))
    self.assertNotIn('attention_dropout', kwargs)
    json.dumps(kwargs)  # Plain JSON: it goes into a workdir's config.json.
    # Each kind's attention_probs_dropout_prob becomes the dropout of that kind's spec.
    config = dict(convert.read_hf_config(fixture('lsh')[0]),
                  local_attention_probs_dropout_prob=0.05, lsh_attention_probs_dropout_prob=0.1)
    local, lsh = attention.specs_from(convert.model_kwargs_from_hf(config)['attention'])
    self.assertEqual((local.dropout, lsh.dropout), (0.05, 0.1))


class ByteLMTest(absltest.TestCase):

  def test_byte_lm_is_the_reformer_on_offset_ids(self):
    kwargs = dict(vocab_size=260, d_model=8, d_ff=8, n_layers=1, n_heads=1, max_len=16,
                  attention={'kind': 'local', 'chunk_len': 4}, dropout=0.0, reversible=False)
    inner = ReformerLM(**kwargs, mode='eval')
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)), jnp.int32)
    params = jax.jit(inner.init)({'params': jax.random.key(0)}, ids)['params']
    wrapped = convert.ByteLM(byte_offset=2, **kwargs, mode='eval')
    got = jax.jit(wrapped.apply)({'params': convert.byte_lm_params(kwargs, params, 2)}, ids)
    want = jax.jit(inner.apply)({'params': params}, ids + 2)[..., 2:258]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with self.assertRaisesRegex(ValueError, 'byte_offset'):
      convert.ByteLM(byte_offset=8, **kwargs)



class CommandLineTest(absltest.TestCase):

  def test_converted_model_decodes_through_the_cli(self):
    path, arrays = fixture('local')
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'wd')
      result = run_module('terraflax.models.convert', f'--from_hf={path}', f'--to={workdir}')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      self.assertIn('Converted', result.stdout)
      prompt = [int(t) for t in arrays['input_ids'][0, 1:6]]
      result = run_module('terraflax.decoding', f'--workdir={workdir}',
                   f'--prompt={" ".join(map(str, prompt))}', '--max_new_tokens=6',
                   '--temperature=0')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      tokens = [int(t) for t in result.stdout.strip().splitlines()[-1].split()]
    self.assertEqual(tokens[:len(prompt)], prompt)
    generated = tokens[len(prompt):]
    self.assertLen(generated, 6)
    # Greedy decoding by the CLI (predict mode, one token at a time) equals
    # greedy decoding by full forward passes of HF's function (eval mode).
    kwargs, params = convert.from_hf_reformer(path)
    forward = jax.jit(ReformerLM(**kwargs, mode='eval').apply)
    sequence = list(prompt)
    for _ in range(6):  # One length (padded at the end: causal), so one compilation.
      padded = sequence + [0] * (12 - len(sequence))
      logits = forward({'params': params}, jnp.asarray([padded], jnp.int32))
      sequence.append(int(jnp.argmax(logits[0, len(sequence)])))
    self.assertEqual(generated, sequence[len(prompt):])


class SentencePieceFixtureTest(absltest.TestCase):
  """hf_reformer_spm: a Reformer over a SentencePiece vocabulary, text in and text out."""

  def test_prompt_encodes_to_the_fixture_ids_and_logits_match_hf(self):
    path, arrays = fixture('spm')
    tok = convert.hf_tokenizer(path, vocab_size=96)
    self.assertEqual((tok.kind, tok.vocab_size, tok.pad_id, tok.eos_id), ('spm', 96, 0, 1))
    self.assertEqual([0] + tok.encode(str(arrays['prompt'])), arrays['input_ids'][0].tolist())
    got, want = converted_logits('spm')
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  def test_converted_workdir_decodes_text_like_hf(self):
    path, arrays = fixture('spm')
    prompt, greedy = str(arrays['prompt']), arrays['greedy_ids'].tolist()
    with tempfile.TemporaryDirectory() as tmp:
      workdir, artifact = os.path.join(tmp, 'wd'), os.path.join(tmp, 'artifact')
      result = run_module('terraflax.models.convert', f'--from_hf={path}', f'--to={workdir}')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      self.assertIn('spiece.model, 96 ids', result.stdout)
      with open(os.path.join(workdir, 'tokenizer.model'), 'rb') as f, open(
          os.path.join(path, 'spiece.model'), 'rb') as g:
        self.assertEqual(f.read(), g.read())
      result = run_module('terraflax.decoding', f'--workdir={workdir}', f'--prompt={prompt}',
                   f'--max_new_tokens={len(greedy)}', '--temperature=0')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      # The reference: HF's greedy ids (full forward passes in torch) decoded by the
      # fixture's own spiece.model after the prompt's ids.
      tok = tokenizer_lib.load(os.path.join(path, 'spiece.model'))
      want = tok.decode(tok.encode(prompt) + greedy)
      self.assertTrue(want.startswith(prompt))
      self.assertEqual(result.stdout.rstrip('\n'), want)
      # The exported decode step carries the tokenizer: same text, jax + sentencepiece only.
      result = run_module('terraflax.export', f'--workdir={workdir}', f'--out={artifact}')
      self.assertEqual(result.returncode, 0, result.stderr[-2000:])
      served = export.Exported(artifact)
      self.assertEqual(served.tokenizer, 'spm')
      self.assertEqual(served.encode(prompt), tok.encode(prompt))
      self.assertEqual(served.greedy_text(prompt, len(greedy)), want)

  def test_directory_without_a_tokenizer_and_bad_tokenizers(self):
    path, _ = fixture('spm')
    self.assertIsNone(convert.hf_tokenizer(str(FIXTURES / 'hf_reformer_local')))
    with self.assertRaisesRegex(convert.ConversionError, r'vocab_size=20 is smaller .*\(96 ids\)'):
      convert.hf_tokenizer(path, vocab_size=20)
    with tempfile.TemporaryDirectory() as tmp:
      shutil.copytree(path, os.path.join(tmp, 'hf'))
      with open(os.path.join(tmp, 'hf', 'spiece.model'), 'wb') as f:
        f.write(b'not a sentencepiece model')
      with self.assertRaisesRegex(convert.ConversionError, 'spiece.model is neither'):
        convert.hf_tokenizer(os.path.join(tmp, 'hf'))


class ErrorTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp)
    self.path = os.path.join(self.tmp, 'model')
    shutil.copytree(fixture('lsh')[0], self.path)

  def edit_config(self, **changes):
    with open(os.path.join(self.path, 'config.json')) as f:
      config = json.load(f)
    config.update(changes)
    with open(os.path.join(self.path, 'config.json'), 'w') as f:
      json.dump(config, f)

  def assert_error(self, pattern):
    with self.assertRaisesRegex(convert.ConversionError, pattern):
      convert.from_hf_reformer(self.path)

  def test_missing_files(self):
    os.remove(os.path.join(self.path, 'model.safetensors'))
    self.assert_error(r'model\.safetensors is missing')
    os.remove(os.path.join(self.path, 'config.json'))
    self.assert_error(r'config\.json is missing')
    self.assert_error(f'{self.path}/config.json')
    with self.assertRaisesRegex(convert.ConversionError, 'not a directory'):
      convert.from_hf_reformer(os.path.join(self.tmp, 'nowhere'))

  def test_truncated_safetensors(self):
    file = os.path.join(self.path, 'model.safetensors')
    with open(file, 'rb') as f:
      data = f.read()
    with open(file, 'wb') as f:
      f.write(data[:len(data) // 2])
    self.assert_error(r'model\.safetensors cannot be read')

  def test_corrupt_config(self):
    with open(os.path.join(self.path, 'config.json'), 'w') as f:
      f.write('{"attn_layers": [')
    self.assert_error(r'config\.json is not valid JSON')

  def test_wrong_tensor_shape_and_missing_tensor(self):
    file = os.path.join(self.path, 'model.safetensors')
    tensors = load_file(file)
    name = 'reformer.encoder.layers.1.attention.self_attention.query_key.weight'
    tensors[name] = tensors[name][:8]
    save_file(tensors, file)
    self.assert_error(r"tensor 'reformer\.encoder\.layers\.1\.attention\.self_attention\."
                      r"query_key\.weight' has shape \(8, 16\).*\(16, 16\)")
    del tensors[name]
    save_file(tensors, file)
    self.assert_error(r"has no tensor 'reformer\.encoder\.layers\.1\.attention")

  def test_config_that_does_not_match_the_weights(self):
    self.edit_config(feed_forward_size=64)
    self.assert_error(r"feed_forward\.dense\.dense\.weight' has shape \(32, 16\)")
    self.edit_config(feed_forward_size=32, attn_layers=['lsh', 'lsh', 'local', 'lsh'])
    self.assert_error(r"has no tensor 'reformer\.encoder\.layers\.0\.attention\.self_attention"
                      r"\.query_key\.weight'")

  def test_unsupported_config_values(self):
    for changes, pattern in [
        (dict(hidden_act='silu'), "hidden_act='silu' is not supported"),
        (dict(is_decoder=False), 'is_decoder=False is not supported'),
        (dict(num_buckets=None), 'num_buckets=None is not supported'),
        (dict(num_buckets=[2, 4, 8]), r'num_buckets=\[2, 4, 8\] is not supported'),
        (dict(num_buckets=3), 'num_buckets=3 is not supported'),
        (dict(attn_layers=['local', 'full', 'local', 'lsh']), 'attn_layers=.* not supported'),
        (dict(num_hidden_layers=6), 'num_hidden_layers=6 disagrees'),
        (dict(model_type='bert'), "model_type='bert' is not supported"),
        (dict(axial_pos_embds_dim=[8, 4]), r'must sum to hidden_size=16'),
    ]:
      shutil.copy(FIXTURES / 'hf_reformer_lsh' / 'config.json', self.path)
      self.edit_config(**changes)
      with self.subTest(changes=changes):
        self.assert_error(pattern)

  def test_num_buckets_override(self):
    self.edit_config(num_buckets=None)
    kwargs, _ = convert.from_hf_reformer(self.path, num_buckets=[2, 4])
    self.assertEqual(attention.specs_from(kwargs['attention'])[-1].n_buckets, (2, 4))
    shutil.copy(FIXTURES / 'hf_reformer_lsh' / 'config.json', self.path)
    with self.assertRaisesRegex(convert.ConversionError, 'only applies when it is null'):
      convert.from_hf_reformer(self.path, num_buckets=8)

  def test_cli_reports_errors_cleanly(self):
    os.remove(os.path.join(self.path, 'model.safetensors'))
    result = run_module('terraflax.models.convert', f'--from_hf={self.path}',
                 f'--to={os.path.join(self.tmp, "wd")}')
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('model.safetensors is missing', result.stderr)
    self.assertNotIn('Traceback', result.stderr)


if __name__ == '__main__':
  absltest.main()
