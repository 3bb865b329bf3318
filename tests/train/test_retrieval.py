"""The long-document retrieval task: its examples, its chance level, its config, and that it learns."""

import contextlib
import io
import json
import os
import pathlib
import tempfile

import ml_collections
import numpy as np
from absl.testing import absltest

from terraflax.train import config as config_lib
from terraflax.train import data as data_lib
from terraflax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def retrieval_config(**fields):
  defaults = dict(name='retrieval', path='', seq_len=64, eval_examples=4, n_pairs=8,
                  n_queries=0, n_keys=12, n_values=5, n_filler=3)
  defaults.update(fields)
  return ml_collections.ConfigDict(defaults)


def brute_force_answers(tokens, vocab):
  """{position t: expected value} for every later occurrence of a key at t - 1.

  A key's first occurrence is its definition, the token just before it its
  value; a later occurrence asks for it.
  """
  is_key = lambda token: vocab.first_key <= token < vocab.first_value
  first = {}
  for i, token in enumerate(tokens.tolist()):
    if is_key(token) and token not in first:
      first[token] = i
  return {t: int(tokens[first[int(tokens[t - 1])] - 1]) for t in range(1, len(tokens))
          if is_key(int(tokens[t - 1])) and first[int(tokens[t - 1])] != t - 1}


class RetrievalDataTest(absltest.TestCase):

  def test_answers_are_the_values_defined_far_earlier(self):
    cfg = retrieval_config()
    data = data_lib.make_data(cfg, seed=1)
    vocab = data_lib.RetrievalVocab(n_filler=3, n_keys=12, n_values=5)
    self.assertEqual(data.info.vocab_size, vocab.size)
    batch = next(data.train_iterator(batch_size=6))
    np.testing.assert_array_equal(batch['targets'], batch['inputs'])
    for tokens, weights in zip(batch['inputs'], batch['weights']):
      answers = brute_force_answers(tokens, vocab)
      self.assertLen(answers, 8)  # Every defined key is asked once.
      scored = np.flatnonzero(weights)
      self.assertEqual(sorted(answers), scored.tolist())  # Weights only on the answers.
      np.testing.assert_array_equal(weights[scored], 1.0)
      for t, value in answers.items():
        self.assertEqual(tokens[t], value)
        self.assertTrue(vocab.first_value <= value < vocab.size)
        definition = int(np.flatnonzero(tokens == tokens[t - 1])[0])
        self.assertGreaterEqual(t - definition, 64 - 2 * (8 + 8) + 1)
      middle = tokens[16:32]  # Between definitions and queries: filler only.
      self.assertTrue(((middle >= 1) & (middle <= 3)).all())
    self.assertGreater(len(np.unique(batch['inputs'][:, :16])), 10)  # Random, not fixed.

  def test_chance_is_one_over_the_values_and_no_constant_beats_it(self):
    data = data_lib.make_data(retrieval_config(n_values=4, eval_examples=400), seed=0)
    self.assertAlmostEqual(data.info.chance, 0.25)
    answers = np.concatenate([b['targets'][b['weights'] > 0] for b in data.eval_batches(
        batch_size=100, n_batches=-1)])
    best_constant = np.bincount(answers).max() / answers.size
    self.assertLess(best_constant, 0.25 + 0.03)  # 3200 answers: ~4 standard errors.
    self.assertGreater(best_constant, 0.25 - 0.03)

  def test_fewer_queries_and_a_fixed_eval_set(self):
    data = data_lib.make_data(retrieval_config(n_queries=3), seed=0)
    batch = next(data.eval_batches(batch_size=4, n_batches=1))
    np.testing.assert_array_equal(batch['weights'].sum(axis=1), 3.0)
    again = next(data.eval_batches(batch_size=4, n_batches=1))
    np.testing.assert_array_equal(batch['inputs'], again['inputs'])

  def test_bad_fields_are_named(self):
    cases = [(dict(n_keys=4), r'data\.n_keys=4 must be >= data\.n_pairs=8'),
             (dict(n_queries=9), r'data\.n_queries=9 must be <= data\.n_pairs=8'),
             (dict(seq_len=32), r'data\.seq_len=32 must exceed 2 \* \(data\.n_pairs')]
    for fields, message in cases:
      with self.subTest(**fields), self.assertRaisesRegex(data_lib.DataError, message):
        data_lib.make_data(retrieval_config(**fields), seed=0)


def short_config(**overrides):
  """configs/long_retrieval.py at 256 tokens: 16 pairs, queried after 190+ filler positions."""
  config = config_lib.load_sibling(str(ROOT / 'configs' / 'x.py'), 'long_retrieval')
  config.data.seq_len = 256
  config.data.n_pairs = 16
  config.data.n_keys = 16
  config.data.eval_examples = 8
  config.model.vocab_size = 1 + 1 + 16 + 16
  config.model.d_model = 32
  config.model.d_ff = 64
  config.model.attention[1]['chunk_len'] = 16
  config.train.steps = 60
  config.train.batch_size = 8
  config.train.log_every = 20
  config.train.eval_every = 60
  config.train.checkpoint_every = 60
  config.train.async_checkpoints = False
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 5
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


class RetrievalConfigTest(absltest.TestCase):

  def test_the_64k_config_validates(self):
    config = config_lib.load_sibling(str(ROOT / 'configs' / 'x.py'), 'long_retrieval')
    experiment = config_lib.validate_config(config, n_devices=1, n_processes=1)
    self.assertEqual(experiment.config.data.seq_len, 65536)
    self.assertEqual(experiment.data.info.chance, 1 / 16)

  def test_a_short_run_learns_well_above_chance(self):
    with tempfile.TemporaryDirectory() as workdir:
      with contextlib.redirect_stdout(io.StringIO()):
        last = trainer.train_and_evaluate(short_config(), workdir)
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        logged = [json.loads(line) for line in f]
    self.assertEqual(last['eval/chance'], 1 / 16)
    self.assertGreater(last['eval/accuracy'], 1 / 16 + 0.3)
    self.assertTrue(any('eval/chance' in r for r in logged))


if __name__ == '__main__':
  absltest.main()
