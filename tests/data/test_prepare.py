"""`prepare`: shards that read back as the documents' tokens, the CLI, and its errors."""

import json
import os
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
from absl.testing import absltest

from terraflax import tokenizer as tokenizer_lib
from terraflax.data import corpus
from terraflax.data.sources import DataError
from terraflax.train import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [f'Document {i}: ' + 'word ' * (i % 7) + 'é' * (i % 3) for i in range(40)]


def text_config(**fields):
  config = dict(name='text', path='', format='auto', field='text', eval_path='',
                eval_fraction=0.1, pack=True, tokenizer='bytes', tokenizer_vocab_size=300,
                utf8_errors='error', num_workers=0, num_threads=1, seq_len=32)
  config.update(fields)
  return ml_collections.ConfigDict(config)


class PrepareTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.jsonl = os.path.join(cls.tmp.name, 'docs.jsonl')
    with open(cls.jsonl, 'w', encoding='utf-8') as f:
      for doc in DOCS:
        f.write(json.dumps({'text': doc}) + '\n')
    cls.prepared = os.path.join(cls.tmp.name, 'prepared')
    cls.cli = subprocess.run(
        [sys.executable, '-m', 'terraflax.data', 'prepare', f'--path={cls.jsonl}',
         f'--out={cls.prepared}', '--n_shards=3'],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT))

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_cli_writes_shards_that_read_back_as_tokens(self):
    self.assertEqual(self.cli.returncode, 0, self.cli.stderr)
    self.assertIn('40/40 documents', self.cli.stdout)  # The progress line.
    meta = json.load(open(os.path.join(self.prepared, corpus.PREPARED_FILE)))
    self.assertLen(meta['shards'], 3)
    self.assertEqual(meta['n_bytes'], sum(len(d.encode()) for d in DOCS))
    prepared = corpus.open_corpus(self.prepared)
    self.assertLen(prepared, 40)
    for i in (0, 13, 39):
      record = prepared[i]
      self.assertEqual(record[0], len(DOCS[i].encode()))
      self.assertEqual(list(record[1:]), list(DOCS[i].encode()))

  def test_training_from_prepared_equals_training_from_text(self):
    from_text = data_lib.make_data(text_config(path=self.jsonl), seed=0)
    from_prepared = data_lib.make_data(text_config(path=self.prepared), seed=0)
    self.assertEqual(len(from_text.eval), len(from_prepared.eval))
    for a, b in zip(from_text.eval, from_prepared.eval):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    ia = from_text.train_iterator(batch_size=2)
    ib = from_prepared.train_iterator(batch_size=2)
    for _ in range(3):
      a, b = next(ia), next(ib)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])

  def test_tokenizer_must_match_the_prepared_one(self):
    spm = os.path.join(self.tmp.name, 'tok.model')
    if not os.path.exists(spm):
      corpus.train_tokenizer(DOCS * 5, vocab_size=30, out=spm)
    with self.assertRaisesRegex(DataError, r"tok\.model' is not the tokenizer .*prepared with"):
      data_lib.make_data(text_config(path=self.prepared, tokenizer=spm), seed=0)
    with self.assertRaisesRegex(DataError, "'train' cannot train on the prepared corpus"):
      data_lib.make_data(text_config(path=self.prepared, tokenizer='train'), seed=0)

  def test_errors(self):
    with self.assertRaisesRegex(DataError, 'already holds a prepared corpus'):
      corpus.prepare(DOCS, tokenizer_lib.load('bytes'), self.prepared)
    result = subprocess.run([sys.executable, '-m', 'terraflax.data', 'prepar', '--path=x',
                             '--out=y'], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    self.assertEqual(result.returncode, 1)
    self.assertIn('expected the command `prepare`', result.stderr)
    self.assertLen(result.stderr.strip().splitlines(), 1)


if __name__ == '__main__':
  absltest.main()
