"""Documents on disk: every format read back against the text written, and each bad input."""

import json
import os
import tempfile

from absl.testing import absltest

from terraflax.data import sources
from terraflax.data.sources import DataError

DOCS = ['First document.\nIt has two lines.', 'Grüße, 世界 — non-ASCII', 'third']


class SourcesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def write(self, name, content, mode='w'):
    path = os.path.join(self.dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
      f.write(content)
    return path

  def read(self, spec, **kw):
    return list(sources.open_documents(sources.expand_paths(spec), **kw))

  def test_text_one_document_per_file_directory_sorted_recursive(self):
    for i, doc in enumerate(DOCS):
      self.write(f'corpus/{"sub/" if i == 2 else ""}{i}.txt', doc)
    self.write('corpus/.hidden.txt', 'not read')
    self.assertEqual(self.read(os.path.join(self.dir, 'corpus')), DOCS)

  def test_lines_skip_blank_lines(self):
    path = self.write('a.txt', 'one\n\n  \ntwo\r\nthree')
    self.assertEqual(self.read(path, format='lines'), ['one', 'two', 'three'])

  def test_jsonl_field_and_glob_and_comma_list(self):
    a = self.write('a.jsonl', '\n'.join(json.dumps({'body': d, 'id': i})
                                        for i, d in enumerate(DOCS[:2])) + '\n\n')
    self.write('b.jsonl', json.dumps({'body': DOCS[2]}))
    self.assertEqual(self.read(os.path.join(self.dir, '*.jsonl'), field='body'), DOCS)
    self.assertEqual(self.read(f'{a}, {a}', field='body'), DOCS[:2] * 2)

  def test_parquet_column(self):
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    path = os.path.join(self.dir, 'd.parquet')
    pq.write_table(pa.table({'content': DOCS, 'n': [1, 2, 3]}), path)
    self.assertEqual(self.read(path, field='content'), DOCS)
    with self.assertRaisesRegex(DataError, r"d\.parquet: no column 'text'.*'content'"):
      self.read(path)

  def test_arrayrecord_records_are_lazy_documents(self):
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    path = os.path.join(self.dir, 'd.array_record')
    writer = ArrayRecordWriter(path, 'group_size:1')
    for doc in DOCS:
      writer.write(doc.encode('utf-8'))
    writer.close()
    docs = sources.open_documents([path])
    self.assertIsInstance(docs, sources.TextDocuments)
    self.assertLen(docs, 3)
    self.assertEqual(docs[1], DOCS[1])

  def test_missing_paths(self):
    with self.assertRaisesRegex(DataError, r"config\.data\.path: '/nonexistent/x' does not exist"):
      sources.expand_paths('/nonexistent/x')
    with self.assertRaisesRegex(DataError, 'matches no files'):
      sources.expand_paths(os.path.join(self.dir, '*.none'))
    with self.assertRaisesRegex(DataError, r'config\.data\.path is empty'):
      sources.expand_paths('')

  def test_empty_file(self):
    path = self.write('empty.txt', '')
    with self.assertRaisesRegex(DataError, r'empty\.txt: the file is empty'):
      self.read(path)

  def test_jsonl_line_without_field_names_file_and_line(self):
    path = self.write('a.jsonl', json.dumps({'text': 'ok'}) + '\n' + json.dumps({'txt': 'x'}))
    with self.assertRaisesRegex(DataError, r"a\.jsonl:2: no 'text' field .*\['txt'\]"):
      self.read(path)
    bad = self.write('b.jsonl', '{"text": "ok"}\n{not json\n')
    with self.assertRaisesRegex(DataError, r'b\.jsonl:2: not a JSON object'):
      self.read(bad)
    wrong = self.write('c.jsonl', '{"text": 3}\n')
    with self.assertRaisesRegex(DataError, r"c\.jsonl:1: the 'text' field .* must be a string"):
      self.read(wrong)

  def test_invalid_utf8_is_an_error_or_replaced(self):
    path = self.write('bad.txt', b'ok\nfine \xff\xfe here\n', mode='wb')
    with self.assertRaisesRegex(DataError, r'bad\.txt: invalid UTF-8 at byte 8 .*utf8_errors'):
      self.read(path)
    with self.assertRaisesRegex(DataError, r'bad\.txt:2: invalid UTF-8 at byte 5'):
      self.read(path, format='lines')
    self.assertEqual(self.read(path, format='lines', utf8_errors='replace'),
                     ['ok', 'fine \ufffd\ufffd here'])

  def test_bad_format_and_mixing_arrayrecord(self):
    path = self.write('a.txt', 'x')
    with self.assertRaisesRegex(DataError, r"config\.data\.format must be one of .*'csv'"):
      self.read(path, format='csv')
    other = self.write('b.array_record', 'x')
    with self.assertRaisesRegex(DataError, 'cannot be mixed'):
      self.read(f'{path},{other}')


if __name__ == '__main__':
  absltest.main()
