"""Data pipelines: layouts, values against independent references, splits, errors, state."""

import math
import os
import statistics
import tempfile

import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from terraflax.train import data as data_lib
from terraflax.train import listops


def data_config(**fields):
  defaults = dict(path='', glob='*', seq_len=16, eval_fraction=0.05, test_fraction=0.0,
                  vocab_size=0, eval_examples=8, min_len=1, max_len=0, max_depth=10, max_args=10,
                  n_classes=2, num_threads=1, mask_rate=0.15, classes=())
  defaults.update(fields)
  return ml_collections.ConfigDict(defaults)


def evaluate_listops(source: str) -> int:
  """An independent evaluator: a token stack, statistics.median for MED."""
  stack = []
  for token in source.split():
    if token.startswith('['):
      stack.append([token])
    elif token == ']':
      operator, *args = stack.pop()
      value = {'[MAX': max, '[MIN': min, '[SM': lambda a: sum(a) % 10,
               '[MED': lambda a: math.floor(statistics.median(a))}[operator](args)
      if not stack:
        return value
      stack[-1].append(value)
    else:
      stack[-1].append(int(token))
  raise AssertionError(f'unbalanced expression {source!r}')


class DuplicationTest(absltest.TestCase):

  def test_layout_and_weights(self):
    data = data_lib.make_data(data_config(name='duplication', seq_len=12, vocab_size=5), seed=3)
    batch = next(data.train_iterator(batch_size=4))
    tokens, weights = batch['inputs'], batch['weights']
    self.assertEqual(tokens.shape, (4, 12))
    self.assertEqual(tokens.dtype, np.int32)
    np.testing.assert_array_equal(batch['targets'], tokens)
    np.testing.assert_array_equal(tokens[:, 0], 0)
    np.testing.assert_array_equal(tokens[:, 6], 0)
    np.testing.assert_array_equal(tokens[:, 1:6], tokens[:, 7:])  # 0 w 0 w
    self.assertTrue(((tokens[:, 1:6] >= 1) & (tokens[:, 1:6] <= 4)).all())
    expected = np.array([0] * 7 + [1] * 5, np.float32)  # Only the second w is scored.
    np.testing.assert_array_equal(weights, np.tile(expected, (4, 1)))

  def test_odd_length_is_an_error(self):
    with self.assertRaisesRegex(data_lib.DataError, r'config\.data\.seq_len must be even'):
      data_lib.make_data(data_config(name='duplication', seq_len=11, vocab_size=5), seed=0)

  def test_eval_set_differs_from_training_and_is_fixed(self):
    data = data_lib.make_data(data_config(name='duplication', seq_len=8, vocab_size=50), seed=0)
    train = next(data.train_iterator(batch_size=4))['inputs']
    eval_a = next(data.eval_batches(batch_size=4, n_batches=1))['inputs']
    eval_b = next(data.eval_batches(batch_size=4, n_batches=1))['inputs']
    np.testing.assert_array_equal(eval_a, eval_b)
    self.assertFalse(np.array_equal(train, eval_a))


class ReverseTest(absltest.TestCase):

  def test_targets_are_the_reversed_inputs(self):
    data = data_lib.make_data(data_config(name='reverse', seq_len=6, vocab_size=9), seed=0)
    batch = next(data.train_iterator(batch_size=3))
    np.testing.assert_array_equal(batch['targets'], batch['inputs'][:, ::-1])
    self.assertTrue(((batch['inputs'] >= 1) & (batch['inputs'] <= 8)).all())
    np.testing.assert_array_equal(batch['weights'], np.ones((3, 6)))
    self.assertEqual(data.info.task, 'seq2seq')

class ListOpsTest(parameterized.TestCase):

  def test_generated_values_match_an_independent_evaluator(self):
    rng = np.random.default_rng(0)
    operators_seen = set()
    for _ in range(300):
      source, value = listops.generate(rng, min_len=5, max_len=80, max_depth=5, max_args=5)
      self.assertEqual(value, evaluate_listops(source), source)
      self.assertBetween(len(source.split()), 5, 80)
      operators_seen |= {t for t in source.split() if t.startswith('[')}
    self.assertEqual(operators_seen, set(listops.OPERATORS))

  @parameterized.parameters(
      ('[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]', 5),
      ('[SM 9 8 [MAX 0 1 ] ]', 8),
      ('[MED 1 2 3 4 ]', 2),  # Median 2.5, rounded down.
  )
  def test_hand_computed(self, source, value):
    self.assertEqual(evaluate_listops(source), value)

  def test_operators(self):
    self.assertEqual(listops.apply_operator('[MED', [4, 1, 3, 2]), 2)
    self.assertEqual(listops.apply_operator('[MED', [7, 1, 3]), 3)
    self.assertEqual(listops.apply_operator('[SM', [9, 8, 7]), 4)
    self.assertEqual(listops.apply_operator('[MAX', [0, 9, 3]), 9)
    self.assertEqual(listops.apply_operator('[MIN', [5, 2, 8]), 2)

  def test_pipeline_tokens_and_labels(self):
    cfg = data_config(name='listops', seq_len=64, min_len=10, max_len=60, max_depth=4, max_args=4)
    data = data_lib.make_data(cfg, seed=1)
    batch = next(data.train_iterator(batch_size=8))
    self.assertEqual(batch['inputs'].shape, (8, 64))
    self.assertEqual(batch['targets'].shape, (8,))
    np.testing.assert_array_equal(batch['weights'], np.ones(8, np.float32))
    for ids, label in zip(batch['inputs'], batch['targets']):
      source = ' '.join(listops.VOCAB[i] for i in ids if i != listops.PAD_ID)
      self.assertEqual(evaluate_listops(source), label)
    self.assertEqual(data.info.n_classes, 10)

  def test_lra_tsv_round_trip(self):
    rng = np.random.default_rng(1)
    examples = [listops.generate(rng, min_len=5, max_len=30, max_depth=3, max_args=3)
                for _ in range(12)]
    with tempfile.TemporaryDirectory() as d:
      listops.write_tsv(os.path.join(d, 'basic_train.tsv'), examples)
      listops.write_tsv(os.path.join(d, 'basic_val.tsv'), examples[:4])
      self.assertEqual(listops.read_tsv(os.path.join(d, 'basic_train.tsv')), examples)
      data = data_lib.make_data(data_config(name='listops', path=d, seq_len=32, max_len=30), 0)
      first = next(data.eval_batches(batch_size=4, n_batches=1))
      np.testing.assert_array_equal(first['targets'], [v for _, v in examples[:4]])


class BytesTest(absltest.TestCase):

  def test_enwik8_layout_split_sizes(self):
    corpus = np.arange(1000, dtype=np.int64).astype(np.uint8)
    train, evaluation, test = data_lib.split_bytes(corpus, 0.05, 0.05)
    self.assertEqual((train.size, evaluation.size, test.size), (900, 50, 50))
    np.testing.assert_array_equal(np.concatenate([train, evaluation, test]), corpus)
    n = 100_000_000  # enwik8: 90M / 5M / 5M.
    self.assertEqual((int(n * 0.05), n - 2 * int(n * 0.05)), (5_000_000, 90_000_000))

  def test_directory_windows_come_from_the_files(self):
    with tempfile.TemporaryDirectory() as d:
      for name, text in (('b.txt', b'world ' * 50), ('a.txt', b'hello ' * 50), ('c.md', b'x')):
        with open(os.path.join(d, name), 'wb') as f:
          f.write(text)
      corpus = data_lib.read_bytes(d, '*.txt')
      self.assertEqual(corpus.tobytes(), b'hello ' * 50 + b'world ' * 50)  # Sorted, *.md skipped.
      data = data_lib.make_data(data_config(name='bytes', path=d, glob='*.txt', seq_len=16,
                                            eval_fraction=0.1), seed=0)
      batch = next(data.train_iterator(batch_size=4))
      train_bytes = corpus[:corpus.size - int(corpus.size * 0.1)].tobytes()
      for row in batch['inputs']:
        self.assertIn(bytes(row.astype(np.uint8)), train_bytes)
      self.assertTrue(data.info.byte_level)
      self.assertEqual(data.n_eval_batches(4), 0)  # 60 eval bytes: 3 windows, < one batch of 4.
      self.assertEqual(data.n_eval_batches(2), 1)

  def test_missing_and_empty_paths(self):
    with self.assertRaisesRegex(data_lib.DataError, r'config\.data\.path is empty'):
      data_lib.make_data(data_config(name='bytes', path=''), 0)
    with self.assertRaisesRegex(data_lib.DataError,
                                r"config\.data\.path='/no/such/dir' does not exist"):
      data_lib.make_data(data_config(name='bytes', path='/no/such/dir'), 0)
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(data_lib.DataError, r'holds no files matching'):
        data_lib.make_data(data_config(name='bytes', path=d), 0)
      open(os.path.join(d, 'empty.txt'), 'wb').close()
      with self.assertRaisesRegex(data_lib.DataError, r'is empty: no bytes'):
        data_lib.make_data(data_config(name='bytes', path=d), 0)
      with open(os.path.join(d, 'short.txt'), 'wb') as f:
        f.write(b'too short')
      with self.assertRaisesRegex(data_lib.DataError, r'fewer than data\.seq_len=16'):
        data_lib.make_data(data_config(name='bytes', path=d), 0)


class TextClassificationTest(absltest.TestCase):

  def test_tsv_and_folders(self):
    with tempfile.TemporaryDirectory() as d:
      with open(os.path.join(d, 'train.tsv'), 'w') as f:
        f.write('0\tbad movie\n1\tgreat movie\n1\tloved it\n0\tboring\n')
      os.makedirs(os.path.join(d, 'eval', 'neg'))
      os.makedirs(os.path.join(d, 'eval', 'pos'))
      with open(os.path.join(d, 'eval', 'neg', '1.txt'), 'w') as f:
        f.write('awful')
      with open(os.path.join(d, 'eval', 'pos', '1.txt'), 'w') as f:
        f.write('superb film')
      data = data_lib.make_data(data_config(name='text_classification', path=d, seq_len=8), 0)
      batch = next(data.eval_batches(batch_size=2, n_batches=1))
      np.testing.assert_array_equal(batch['targets'], [0, 1])  # neg, pos: sorted class names.
      np.testing.assert_array_equal(batch['inputs'][0], [ord(c) + 1 for c in 'awful'] + [0, 0, 0])
      np.testing.assert_array_equal(batch['inputs'][1], np.frombuffer(b'superb f', np.uint8) + 1)
      train = next(data.train_iterator(batch_size=4))
      self.assertEqual(sorted(train['targets'].tolist()), [0, 0, 1, 1])
      with open(os.path.join(d, 'train.tsv'), 'a') as f:
        f.write('7\tout of range\n')
      with self.assertRaisesRegex(data_lib.DataError, r'labels \[7\] are outside'):
        data_lib.make_data(data_config(name='text_classification', path=d, seq_len=8), 0)

  def test_missing_directory(self):
    with self.assertRaisesRegex(data_lib.DataError, r'config\.data\.path is empty'):
      data_lib.make_data(data_config(name='text_classification'), 0)


class MaskedLMTest(absltest.TestCase):

  def test_masking_statistics_on_a_large_batch(self):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 257, size=(400, 512)).astype(np.int32)
    ids[:, 500:] = 0  # Padding is never selected.
    examples = [data_lib.mlm_mask(row, np.random.default_rng([1, i])) for i, row in enumerate(ids)]
    inputs = np.stack([e['inputs'] for e in examples])
    targets = np.stack([e['targets'] for e in examples])
    selected = np.stack([e['weights'] for e in examples]) > 0
    np.testing.assert_array_equal(targets, ids)
    self.assertFalse(selected[:, 500:].any())
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])  # Only selected change.
    real = ids != 0
    n, k = real.sum(), selected.sum()  # n = 200,000 candidates, k ~ 30,000 selected
    # Binomial bounds at 5 standard deviations.
    self.assertAlmostEqual(k / n, 0.15, delta=5 * math.sqrt(0.15 * 0.85 / n))
    masked = (inputs == data_lib.MASK_ID) & selected
    replaced = (inputs != data_lib.MASK_ID) & (inputs != ids) & selected
    kept = (inputs == ids) & selected
    # A random replacement equals the original byte with probability 1/256.
    for observed, p in ((masked, 0.8), (replaced, 0.1 * 255 / 256), (kept, 0.1 + 0.1 / 256)):
      self.assertAlmostEqual(observed.sum() / k, p, delta=5 * math.sqrt(p * (1 - p) / k))
    random_tokens = inputs[replaced]
    self.assertTrue(((random_tokens >= 1) & (random_tokens <= 256)).all())
    counts = np.bincount(random_tokens, minlength=257)[1:]  # ~12 per byte value
    self.assertGreater((counts > 0).mean(), 0.97)

  def test_pipeline_windows_and_fixed_eval_masks(self):
    with tempfile.TemporaryDirectory() as tmp:
      text = bytes(range(256)) * 8
      with open(os.path.join(tmp, 'a.txt'), 'wb') as f:
        f.write(text)
      data = data_lib.make_data(data_config(name='mlm', path=tmp, seq_len=32,
                                            eval_fraction=0.25), seed=3)
      self.assertEqual((data.info.task, data.info.vocab_size), ('mlm', 258))
      batch = next(data.train_iterator(batch_size=64))
      self.assertEqual(batch['inputs'].shape, (64, 32))
      for row in batch['targets']:  # Windows of consecutive bytes, as ids byte + 1.
        np.testing.assert_array_equal(np.diff(row) % 256, 1)
      self.assertAlmostEqual(batch['weights'].mean(), 0.15, delta=0.05)
      first = list(data.eval_batches(batch_size=4, n_batches=-1))
      again = list(data.eval_batches(batch_size=4, n_batches=-1))
      for a, b in zip(first, again):
        np.testing.assert_array_equal(a['inputs'], b['inputs'])
      np.testing.assert_array_equal(first[0]['targets'][0], np.arange(32) + 1 + 1536 % 256)


class ByteClassificationTest(absltest.TestCase):

  def test_windows_come_from_their_class_folder(self):
    with tempfile.TemporaryDirectory() as tmp:
      for name, byte in (('ayes', b'a'), ('bees', b'b'), ('sees', b'c')):
        os.makedirs(os.path.join(tmp, name))
        with open(os.path.join(tmp, name, 'x.txt'), 'wb') as f:
          f.write(byte * 400)
      data = data_lib.make_data(data_config(name='byte_classification', path=tmp, seq_len=16,
                                            eval_fraction=0.25, eval_examples=6,
                                            classes=['ayes', 'bees', 'sees']), seed=0)
      self.assertEqual((data.info.n_classes, data.info.vocab_size), (3, 257))
      batch = next(data.train_iterator(batch_size=30))
      np.testing.assert_array_equal(batch['inputs'], np.broadcast_to(
          (ord('a') + 1 + batch['targets'])[:, None], (30, 16)))
      self.assertLen(set(batch['targets'].tolist()), 3)
      evaluation = next(data.eval_batches(batch_size=6, n_batches=1))
      np.testing.assert_array_equal(evaluation['targets'], [0, 1, 2, 0, 1, 2])
      with self.assertRaisesRegex(data_lib.DataError, 'data.classes must name >= 2'):
        data_lib.make_data(data_config(name='byte_classification', path=tmp, classes=['ayes']), 0)


class DigitsTest(absltest.TestCase):

  def test_fixed_held_out_split(self):
    data = data_lib.make_data(data_config(name='digits', seq_len=64, eval_examples=360), seed=5)
    other = data_lib.make_data(data_config(name='digits', seq_len=64, eval_examples=360), seed=9)
    self.assertEqual((data.info.n_classes, len(data.eval)), (10, 360))
    pixels, labels = data_lib.load_digits()
    test = np.stack([data.eval[i]['inputs'] for i in range(360)])
    np.testing.assert_array_equal(test, np.stack([other.eval[i]['inputs'] for i in range(360)]))
    train = next(data.train_iterator(batch_size=1437))['inputs']  # One epoch of the rest.
    # Train (one epoch) and test partition the 1797 images.
    self.assertEqual(sorted(r.tobytes() for r in np.concatenate([train, test])),
                     sorted(r.tobytes() for r in pixels))
    self.assertEqual((test.min(), test.max()), (0, 16))
    with self.assertRaisesRegex(data_lib.DataError, 'seq_len must be 64'):
      data_lib.make_data(data_config(name='digits', seq_len=32), seed=0)


class IteratorTest(absltest.TestCase):

  def test_restored_iterator_continues_exactly(self):
    data = data_lib.make_data(data_config(name='duplication', seq_len=8, vocab_size=50), seed=0)
    it = data.train_iterator(batch_size=4)
    for _ in range(3):
      next(it)
    state = it.get_state()
    expected = [next(it)['inputs'] for _ in range(2)]
    fresh = data.train_iterator(batch_size=4)
    fresh.set_state(state)
    for want in expected:
      np.testing.assert_array_equal(next(fresh)['inputs'], want)

  def test_process_shards_make_up_the_global_batch(self):
    data = data_lib.make_data(data_config(name='duplication', seq_len=8, vocab_size=50), seed=0)
    whole = next(data.train_iterator(batch_size=8))['inputs']
    shards = [next(data.train_iterator(batch_size=8, process_index=p, process_count=2))['inputs']
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(shards), whole)  # Row for row.
    evaluation = next(data.eval_batches(batch_size=4, n_batches=1))['inputs']
    halves = [next(data.eval_batches(batch_size=4, n_batches=1, process_index=p,
                                     process_count=2))['inputs'] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), evaluation)


if __name__ == '__main__':
  absltest.main()
