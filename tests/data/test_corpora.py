"""The corpus every Python carries: its documents, and the JSON Lines file written once."""

import json
import os
import tempfile

from absl.testing import absltest
from pydoc_data import topics

from terraflax.data import corpora


class CorporaTest(absltest.TestCase):

  def test_python_docs_written_once_in_a_fixed_order(self):
    docs = corpora.python_docs()
    titles = [d['title'] for d in docs]
    self.assertLen(set(titles), len(docs))
    self.assertEqual(sum(t.startswith('topic:') for t in titles),
                     sum(1 for text in topics.topics.values() if text.strip()))
    self.assertTrue(any(t.startswith('module:') for t in titles))
    self.assertEqual(dict((d['title'], d['text']) for d in docs)['topic:assert'],
                     topics.topics['assert'])
    with tempfile.TemporaryDirectory() as tmp:
      path = corpora.python_docs_path(tmp)
      with open(path, encoding='utf-8') as f:
        written = [json.loads(line) for line in f]
      self.assertEqual(written, docs)
      mtime = os.path.getmtime(path)
      self.assertEqual(corpora.python_docs_path(tmp), path)  # Reused, not rewritten.
      self.assertEqual(os.path.getmtime(path), mtime)


if __name__ == '__main__':
  absltest.main()
