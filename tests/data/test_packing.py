"""Packing against a brute-force reference (concatenate, cut, number), and resumable iteration."""

import grain
import numpy as np
from absl.testing import absltest, parameterized

from terraflax.data import packing

EOS = 99


def reference_rows(docs, n_bytes, seq_len):
  """Brute force: the stream of (token, doc, bytes) cut into rows; segments numbered per row."""
  stream = []
  for d, (doc, size) in enumerate(zip(docs, n_bytes)):
    for token in list(doc) + [EOS]:
      stream.append((token, d, (size + 1) / (len(doc) + 1)))
  rows = []
  for start in range(0, len(stream), seq_len):
    part = stream[start:start + seq_len]
    tokens = np.zeros(seq_len, np.int32)
    segments = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    byte_counts = np.zeros(seq_len, np.float32)
    segment, previous, position = 0, None, 0
    for i, (token, d, b) in enumerate(part):
      if d != previous:
        segment, previous, position = segment + 1, d, 0
      tokens[i], segments[i], positions[i], byte_counts[i] = token, segment, position, b
      position += 1
    rows.append((tokens, segments, positions, byte_counts))
  return rows


class PackingTest(parameterized.TestCase):

  @parameterized.parameters(4, 7, 16)
  def test_rows_equal_brute_force(self, seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(1, 50, size=n) for n in (3, 9, 1, 5, 12, 2)]
    n_bytes = [len(d) + int(rng.integers(0, 5)) for d in docs]  # Several bytes per token.
    rows = packing.pack_documents(
        [packing.document_tokens(d, b, EOS) for d, b in zip(docs, n_bytes)], seq_len)
    want = reference_rows(docs, n_bytes, seq_len)
    self.assertLen(rows, len(want))
    for row, (tokens, segments, positions, byte_counts) in zip(rows, want):
      np.testing.assert_array_equal(row['inputs'], tokens)
      np.testing.assert_array_equal(row['targets'], tokens)
      np.testing.assert_array_equal(row['segment_ids'], segments)
      np.testing.assert_array_equal(row['positions'], positions)
      np.testing.assert_array_equal(row['weights'], (segments > 0).astype(np.float32))
      np.testing.assert_allclose(row['bytes'], byte_counts, rtol=1e-6)
      self.assertEqual(row['inputs'].dtype, np.int32)
      self.assertEqual(row['segment_ids'].dtype, np.int32)
    # Whole documents: the bytes add up to the text's bytes plus one per end of document.
    total = sum(float(r['bytes'].sum()) for r in rows)
    self.assertAlmostEqual(total, sum(n_bytes) + len(docs), places=3)

  def test_unpacked_rows_are_windows_of_the_stream(self):
    docs = [np.arange(1, 6), np.arange(10, 13)]
    rows = packing.pack_documents([packing.document_tokens(d, len(d), EOS) for d in docs], 4,
                                  packed=False)
    self.assertEqual(sorted(rows[0]), ['bytes', 'inputs', 'targets', 'weights'])
    stream = [1, 2, 3, 4, 5, EOS, 10, 11, 12, EOS]
    np.testing.assert_array_equal(np.concatenate([r['inputs'] for r in rows]),
                                  stream + [0, 0])
    np.testing.assert_array_equal(rows[-1]['weights'], [1, 1, 0, 0])
    np.testing.assert_array_equal(rows[-1]['bytes'], [1, 1, 0, 0])

  def test_document_tokens(self):
    example = packing.document_tokens([5, 6], n_bytes=8, eos_id=1)
    np.testing.assert_array_equal(example['tokens'], [5, 6, 1])
    np.testing.assert_allclose(example['bytes'], [3, 3, 3])  # (8 + 1) / 3.

  def test_restored_iterator_continues_identically(self):
    rng = np.random.default_rng(0)
    docs = [packing.document_tokens(rng.integers(1, 50, size=int(n)), int(n), EOS)
            for n in rng.integers(1, 20, size=30)]
    ds = packing.pack(grain.MapDataset.source(docs).shuffle(seed=3).repeat().to_iter_dataset(),
                      8).batch(2)
    iterator = iter(ds)
    for _ in range(5):
      next(iterator)
    state = iterator.get_state()
    want = [next(iterator) for _ in range(6)]
    restored = iter(ds)
    restored.set_state(state)
    for a, b in zip(want, [next(restored) for _ in range(6)]):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


if __name__ == '__main__':
  absltest.main()
