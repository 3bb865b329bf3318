"""`python -m terraflax.decoding` samples from a trained workdir's latest checkpoint."""

import os
import pathlib
import sys
import tempfile

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


class PromptIdsTest(absltest.TestCase):

  def test_text_prompt_for_an_id_model_is_a_clear_error(self):
    # Raised while reading the prompt, before the model is called (the model is never used).
    with self.assertRaisesRegex(decoding.DecodingError, r"'def x'.*token ids separated by"):
      decoding.generate_text(None, {}, 'def x', max_new_tokens=1, byte_level=False)


if __name__ == '__main__':
  absltest.main()
