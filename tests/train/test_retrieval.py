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
from terraflax.train import evaluation
from terraflax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def retrieval_config(**fields):
  defaults = dict(name='retrieval', path='', seq_len=64, eval_examples=4, n_pairs=8,
                  n_queries=0, n_keys=12, n_values=4, n_filler=3)
  defaults.update(fields)
  return ml_collections.ConfigDict(defaults)


class RetrievalDataTest(absltest.TestCase):

  def test_answers_are_the_values_filed_far_earlier(self):
    cfg = retrieval_config()
    data = data_lib.make_data(cfg, seed=1)
    vocab = data_lib.RetrievalVocab(n_filler=3, n_keys=12, n_values=4)
    self.assertEqual(data.info.vocab_size, vocab.size)
    batch = next(data.train_iterator(batch_size=6))
    np.testing.assert_array_equal(batch['targets'], batch['inputs'])
    for tokens, weights in zip(batch['inputs'], batch['weights']):
      # The directory: 4 headers (values in order), 2 distinct keys under each.
      np.testing.assert_array_equal(tokens[0:12:3], vocab.first_value + np.arange(4))
      keys = np.delete(tokens[:12], np.arange(0, 12, 3))
      self.assertLen(set(keys.tolist()), 8)
      self.assertTrue(((keys >= vocab.first_key) & (keys < vocab.first_value)).all())
      answers = {}
      for t in range(1, 64):  # Brute force: a later occurrence of a key asks its header.
        key = int(tokens[t - 1])
        first = int(np.flatnonzero(tokens == key)[0])
        if key in keys and first != t - 1:
          answers[t] = tokens[first - first % 3]  # The header of its section of three.
          self.assertGreaterEqual(t - first, 64 - 12 - 16 + 1)
      self.assertLen(answers, 8)  # Every filed key is asked once.
      scored = np.flatnonzero(weights)
      self.assertEqual(sorted(answers), scored.tolist())  # Weights only on the answers.
      np.testing.assert_array_equal(weights[scored], 1.0)
      for t, value in answers.items():
        self.assertEqual(tokens[t], value)
      middle = tokens[12:48]  # Between the directory and the queries: filler only.
      self.assertTrue(((middle >= 1) & (middle <= 3)).all())
    self.assertGreater(len(np.unique(np.delete(batch['inputs'][:, :12], np.arange(0, 12, 3),
                                               axis=1))), 10)  # Random keys, not fixed.

  def test_chance_is_one_over_the_values_and_no_constant_beats_it(self):
    data = data_lib.make_data(retrieval_config(eval_examples=400), seed=0)
    self.assertAlmostEqual(data.info.chance, 0.25)
    answers = np.concatenate([b['targets'][b['weights'] > 0] for b in data.eval_batches(
        batch_size=100, n_batches=-1)])
    self.assertEqual(answers.size, 3200)
    np.testing.assert_array_equal(np.bincount(answers)[answers.min():], 800)  # Uniform.

  def test_fewer_queries_and_a_fixed_eval_set(self):
    data = data_lib.make_data(retrieval_config(n_queries=3), seed=0)
    batch = next(data.eval_batches(batch_size=4, n_batches=1))
    np.testing.assert_array_equal(batch['weights'].sum(axis=1), 3.0)
    again = next(data.eval_batches(batch_size=4, n_batches=1))
    np.testing.assert_array_equal(batch['inputs'], again['inputs'])

  def test_bad_fields_are_named(self):
    cases = [(dict(n_keys=4), r'data\.n_keys=4 must be >= data\.n_pairs=8'),
             (dict(n_queries=9), r'data\.n_queries=9 must be <= data\.n_pairs=8'),
             (dict(n_values=3), r'data\.n_pairs=8 must be a multiple of data\.n_values=3'),
             (dict(seq_len=28), r'data\.seq_len=28 must exceed data\.n_pairs \+ '
                                r'data\.n_values \+ 2 \* data\.n_queries = 28')]
    for fields, message in cases:
      with self.subTest(**fields), self.assertRaisesRegex(data_lib.DataError, message):
        data_lib.make_data(retrieval_config(**fields), seed=0)


def short_config(**overrides):
  """configs/long_retrieval.py at 256 tokens: 16 keys in 4 sections, asked 200+ positions later."""
  config = config_lib.load_sibling(str(ROOT / 'configs' / 'x.py'), 'long_retrieval')
  config.data.seq_len = 256
  config.data.n_pairs = 16
  config.data.n_keys = 16
  config.data.n_values = 4
  config.data.eval_examples = 8
  config.model.vocab_size = 1 + 1 + 16 + 4
  config.model.d_model = 32
  config.model.d_ff = 32
  config.model.attention.chunk_len = 16
  config.model.attention.n_buckets = 16
  config.train.steps = 30  # 98% eval accuracy at seed 0 (chance 25%).
  config.train.batch_size = 8
  config.train.log_every = 10
  config.train.eval_every = 30
  config.train.checkpoint_every = 30
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
    self.assertEqual(last['eval/chance'], 0.25)
    self.assertGreater(last['eval/accuracy'], 0.25 + 0.4)  # 128 answers: chance + 8 sigma.
    self.assertTrue(any('eval/chance' in r for r in logged))


class LongLossByPositionTest(absltest.TestCase):

  def test_buckets_tile_long_rows_exactly(self):
    rng = np.random.default_rng(0)
    for length, n_buckets in ((65536, 16), (1 << 20, 10), (65536 * 3, 7)):
      losses = rng.random(length).astype(np.float32)
      weights = (rng.random(length) < 0.5).astype(np.float32)
      out = evaluation.loss_by_position(losses * weights, weights, n_buckets)
      self.assertLen(out, n_buckets)
      covered = []
      for name, value in out.items():
        first, last = (int(x) for x in name.rsplit('/', 1)[1].split('-'))
        covered.extend(range(first, last + 1))
        part = slice(first, last + 1)
        expected = float((losses[part] * weights[part]).astype(np.float64).sum()
                         / weights[part].sum())
        self.assertAlmostEqual(value, expected, delta=1e-3 * expected)
      self.assertEqual(covered, list(range(length)))  # No gap, no overlap, in order.
    self.assertIn('eval/loss_by_position/61440-65535',
                  evaluation.loss_by_position(np.ones(65536), np.ones(65536), 16))


if __name__ == '__main__':
  absltest.main()
