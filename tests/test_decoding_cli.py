"""`python -m terraflax.decoding` samples from a trained workdir's latest checkpoint."""

import os
import pathlib
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from terraflax import decoding
from terraflax import quantization
from terraflax.train import checkpoint
from terraflax.train.trainer import train_and_evaluate
from tests.contracts import run_module

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_transformer_config(workdir_data: str):
  sys.path.insert(0, str(REPO / 'configs'))
  try:
    import transformer_lm  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = transformer_lm.get_config()
  config.model.d_model, config.model.d_ff, config.model.n_heads = 16, 32, 2
  config.model.max_len = 64
  config.data.path, config.data.seq_len, config.data.eval_fraction = workdir_data, 32, 0.2
  config.train.steps, config.train.batch_size = 3, 2
  config.train.log_every = config.train.eval_every = config.train.checkpoint_every = 3
  config.train.eval_batches = 1
  config.optimizer.warmup_steps = 1
  config.sample.max_new_tokens = 0
  return config



class DecodingCliTest(absltest.TestCase):

  def test_samples_from_latest_checkpoint_and_matches_in_process_greedy(self):
    workdir = tempfile.mkdtemp()
    corpus = pathlib.Path(workdir, 'corpus.txt')
    corpus.write_bytes(pathlib.Path(__file__).read_bytes() * 3)
    train_and_evaluate(tiny_transformer_config(str(corpus)), os.path.join(workdir, 'run'))

    result = run_module('terraflax.decoding', f'--workdir={workdir}/run', '--prompt=def ', '--max_new_tokens=6',
                     '--temperature=0')
    self.assertEqual(result.returncode, 0, result.stderr)
    printed = result.stdout.rstrip('\n')

    config, params = checkpoint.load_for_inference(os.path.join(workdir, 'run'))
    model = checkpoint.model_from_config(config, 'predict')
    prompt = jnp.asarray([[ord(c) for c in 'def ']], jnp.int32)
    tokens = np.asarray(decoding.autoregressive_sample(
        model, params, prompt, 6, temperature=0.0, rng=jax.random.key(0))).reshape(-1)
    self.assertLen(tokens, 6)
    expected = (b'def ' + bytes(int(t) for t in tokens)).decode('utf-8', errors='replace')
    self.assertEqual(printed, expected)
    self.assertTrue(printed.startswith('def '))

    # --weights=int8 decodes what the same int8 weights decode in process.
    result = run_module('terraflax.decoding', f'--workdir={workdir}/run', '--prompt=def ', '--max_new_tokens=6',
                     '--temperature=0', '--weights=int8')
    self.assertEqual(result.returncode, 0, result.stderr)
    context, qparams = quantization.prepare_for_decoding(model, params, weights='int8')
    with context:
      tokens = np.asarray(decoding.autoregressive_sample(
          model, qparams, prompt, 6, temperature=0.0)).reshape(-1)
    expected = (b'def ' + bytes(int(t) for t in tokens)).decode('utf-8', errors='replace')
    self.assertEqual(result.stdout.rstrip('\n'), expected)

  def test_workdir_without_checkpoint_is_a_clear_error(self):
    result = run_module('terraflax.decoding', f'--workdir={tempfile.mkdtemp()}', '--prompt=x')
    self.assertNotEqual(result.returncode, 0)
    self.assertIn('terraflax.decoding:', result.stderr)
    self.assertNotIn('Traceback', result.stderr)


class CheckLengthTest(absltest.TestCase):

  def test_fits(self):
    decoding.check_length(60, 4, 64)  # Exactly the model's positions.
    decoding.check_length(10**6, 10**6, None)  # No max_len: not checked.

  def test_too_long_names_both_numbers(self):
    with self.assertRaisesRegex(decoding.DecodingError,
                                r'prompt \(100 tokens\) plus --max_new_tokens=5 needs 105 '
                                r'positions.*config.model.max_len=64'):
      decoding.check_length(100, 5, 64)


class Seq2SeqInputsTest(absltest.TestCase):
  """--inputs: a seq2seq model's encoder text, required for it and refused for an LM."""

  def test_inputs_only_for_seq2seq_models(self):
    decoding.check_inputs('seq2seq', 'ConcatTerraformer', '3 4')
    decoding.check_inputs('lm', 'TransformerLM', None)
    with self.assertRaisesRegex(decoding.DecodingError,
                                r'seq2seq model \(Terraformer\): pass .* --inputs=TEXT'):
      decoding.check_inputs('seq2seq', 'Terraformer', None)
    with self.assertRaisesRegex(decoding.DecodingError,
                                r'--inputs is for seq2seq models .* language model '
                                r'\(TransformerLM\)'):
      decoding.check_inputs('lm', 'TransformerLM', 'x')

  def test_concat_terraformer_workdir_decodes_its_inputs_greedily(self):
    from terraflax.models import convert  # pylint: disable=import-outside-toplevel
    import terraflax.models as tm  # pylint: disable=import-outside-toplevel
    kwargs = dict(vocab_size=13, d_model=16, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                  n_heads=2, dropout=0.0, max_len=16, n_decoder_attention_layers=1)
    inputs, targets = jnp.asarray([[3, 4, 5, 6]]), jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(tm.ConcatTerraformer(mode='eval', **kwargs).init,
                            jax.random.key(0), inputs, targets)['params']
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                    nn.meta.unbox(shapes))
    workdir = convert.write_workdir(tempfile.mkdtemp(), kwargs, params, seq_len=8,
                                    name='ConcatTerraformer', source='a test')
    result = run_module('terraflax.decoding', f'--workdir={workdir}', '--inputs=3 4 5 6',
                        '--max_new_tokens=5', '--temperature=0')
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    want = decoding.autoregressive_sample(tm.ConcatTerraformer(mode='predict', **kwargs),
                                          params, max_new_tokens=5, temperature=0.0,
                                          inputs=inputs)
    self.assertEqual(result.stdout.split(), [str(int(t)) for t in np.asarray(want)[0]])
    missing = run_module('terraflax.decoding', f'--workdir={workdir}', '--prompt=3')
    self.assertNotEqual(missing.returncode, 0)
    self.assertIn('seq2seq model (ConcatTerraformer): pass the text its encoder reads with '
                  '--inputs=TEXT', missing.stderr)


class PromptIdsTest(absltest.TestCase):

  def test_text_prompt_for_an_id_model_is_a_clear_error(self):
    # Raised while reading the prompt, before the model is called (the model is never used).
    with self.assertRaisesRegex(decoding.DecodingError, r"'def x'.*token ids separated by"):
      decoding.generate_text(None, {}, 'def x', max_new_tokens=1, byte_level=False)


if __name__ == '__main__':
  absltest.main()
