"""A text corpus as token examples: documents, their split, tokenization and prepared shards.

  corpus = open_corpus('corpus/*.jsonl', format='auto', field='text')
  train_ids, eval_ids = split(len(corpus), eval_fraction=0.05)    # ranges of documents
  tokenize = Tokenize(tokenizer)            # document -> document_tokens dict (packing.py)

A prepared corpus (`prepare`, `python -m terraflax.data prepare`) is a
directory holding `prepared.json`, the tokenizer file (tokenizer.model /
tokenizer.json; none for 'bytes') and ArrayRecord shards
`documents-NNNNN-of-NNNNN.array_record`, one record per document: int32
little-endian [UTF-8 byte count, token ids...] (no end-of-document id; it is
appended when packing). Training reads the shards directly, lazily, without
re-tokenizing; `config.data.path` is then the directory.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, Sequence

from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter  # grain's format.
import numpy as np

from terraflax import tokenizer as tokenizer_lib
from terraflax.data import packing
from terraflax.data import sources
from terraflax.data.sources import DataError

PREPARED_FILE = 'prepared.json'
PREPARED_VERSION = 1
SHARD_PATTERN = 'documents-{:05d}-of-{:05d}.array_record'
ENCODE_BATCH = 256  # Documents per call into the tokenizer library.


def is_prepared(spec: str) -> bool:
  """Whether `spec` is one directory made by `prepare`."""
  return bool(spec) and os.path.isfile(os.path.join(os.path.expanduser(spec.strip()),
                                                    PREPARED_FILE))


class PreparedCorpus(Sequence):
  """A prepared directory's documents as int32 arrays [n_bytes, ids...], read lazily."""

  def __init__(self, directory: str, field: str = 'config.data.path'):
    self.directory = os.path.expanduser(directory.strip())
    with open(os.path.join(self.directory, PREPARED_FILE), encoding='utf-8') as f:
      try:
        self.meta = json.load(f)
      except json.JSONDecodeError as e:
        raise DataError(f'{field}: {self.directory}/{PREPARED_FILE} is not JSON '
                        f'({e.msg}); prepare the corpus again.') from None
    if self.meta.get('version') != PREPARED_VERSION:
      raise DataError(f'{field}: {self.directory} was prepared by format version '
                      f'{self.meta.get("version")!r}, this terraflax reads {PREPARED_VERSION}; '
                      'prepare the corpus again.')
    paths = [os.path.join(self.directory, name) for name in self.meta['shards']]
    self._records = sources.ArrayRecordDocuments(paths)
    self.tokenizer = tokenizer_lib.from_workdir(self.directory)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):
    return np.frombuffer(self._records[index], np.dtype('<i4'))

  def __getstate__(self):
    return {'directory': self.directory}

  def __setstate__(self, state):
    self.__init__(state['directory'])


def open_corpus(spec: str, *, format: str = 'auto', field: str = 'text',  # pylint: disable=redefined-builtin
                utf8_errors: str = 'error', config_field: str = 'config.data.path') -> Sequence:
  """The documents `spec` names: a `PreparedCorpus`, or the text documents of its files."""
  if is_prepared(spec):
    return PreparedCorpus(spec, config_field)
  documents = sources.open_documents(sources.expand_paths(spec, field=config_field),
                                     format=format, field=field, utf8_errors=utf8_errors)
  if not len(documents):  # pylint: disable=g-explicit-length-test  # A lazy sequence.
    raise DataError(f'{config_field}={spec!r} holds no documents.')
  return documents


def split(n_documents: int, eval_fraction: float) -> tuple[range, range]:
  """(train, eval) document ranges: eval is the last round(n * eval_fraction) (at least 1)."""
  n_eval = max(1, int(round(n_documents * eval_fraction)))
  if n_eval >= n_documents:
    raise DataError(f'config.data.eval_fraction={eval_fraction} of {n_documents} document(s) '
                    'leaves none for training; add documents, lower data.eval_fraction or give '
                    'separate evaluation files in data.eval_path.')
  return range(n_documents - n_eval), range(n_documents - n_eval, n_documents)


class Tokenize:
  """document (str, or a prepared int32 record) -> `packing.document_tokens` dict.

  Picklable for grain worker processes: it carries the tokenizer's spec (its
  file, or 'bytes') and loads it again in the worker.
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, document) -> dict[str, np.ndarray]:
    if isinstance(document, np.ndarray):  # Prepared: [n_bytes, ids...].
      return packing.document_tokens(document[1:], int(document[0]), self.tokenizer.eos_id)
    ids = self.tokenizer.encode(document)
    return packing.document_tokens(ids, len(document.encode('utf-8')), self.tokenizer.eos_id)

  def __getstate__(self):
    return {'spec': self.tokenizer.path or tokenizer_lib.BYTES}

  def __setstate__(self, state):
    self.tokenizer = tokenizer_lib.load(state['spec'])


def train_tokenizer(documents: Sequence[str], *, vocab_size: int, out: str,
                    kind: str = 'spm') -> tokenizer_lib.Tokenizer:
  """A tokenizer trained on `documents` (written to a temporary text file), saved at `out`."""
  with tempfile.TemporaryDirectory() as tmp:
    text = os.path.join(tmp, 'documents.txt')
    with open(text, 'w', encoding='utf-8') as f:
      for document in documents:
        if isinstance(document, np.ndarray):
          raise DataError('config.data.tokenizer=\'train\' cannot train on a prepared corpus '
                          '(its documents are token ids); it carries its own tokenizer.')
        f.write(document.rstrip('\n') + '\n')
    return tokenizer_lib.train([text], vocab_size=vocab_size, kind=kind, out=out)


def prepare(documents: Sequence[str], tokenizer: tokenizer_lib.Tokenizer, out: str, *,
            n_shards: int = 1, log_every: float = 5.0,
            progress: Callable[[str], None] | None = None) -> dict:
  """Tokenizes `documents` once into ArrayRecord shards in directory `out`; returns the metadata.

  Shard k holds a contiguous range of documents, so reading the shards in order
  gives the documents in order. A progress line (`progress`, absl logging by
  default) every `log_every` seconds and at the end.
  """
  if n_shards < 1:
    raise DataError(f'--n_shards={n_shards} must be a positive int.')
  if os.path.exists(os.path.join(out, PREPARED_FILE)):
    raise DataError(f'--out={out} already holds a prepared corpus; choose another directory or '
                    'remove it.')
  os.makedirs(out, exist_ok=True)
  tokenizer.save_to(out)
  progress = progress or logging.info
  n = len(documents)
  bounds = np.linspace(0, n, n_shards + 1).astype(int)
  names, n_tokens, n_bytes = [], 0, 0
  began = last = time.time()
  done = 0
  for shard in range(n_shards):
    name = SHARD_PATTERN.format(shard, n_shards)
    names.append(name)
    writer = ArrayRecordWriter(os.path.join(out, name), 'group_size:1')
    for start in range(bounds[shard], bounds[shard + 1], ENCODE_BATCH):
      texts = [documents[i] for i in range(start, min(start + ENCODE_BATCH, bounds[shard + 1]))]
      for document, ids in zip(texts, tokenizer.encode_batch(texts)):
        size = len(document.encode('utf-8'))
        writer.write(np.asarray([size] + ids, '<i4').tobytes())
        n_tokens, n_bytes, done = n_tokens + len(ids), n_bytes + size, done + 1
      if time.time() - last >= log_every:
        last = time.time()
        progress(_progress_line(done, n, n_tokens, last - began))
    writer.close()
  progress(_progress_line(done, n, n_tokens, time.time() - began))
  meta = {'version': PREPARED_VERSION, 'shards': names, 'n_documents': n, 'n_tokens': n_tokens,
          'n_bytes': n_bytes, 'tokenizer': tokenizer.kind, 'vocab_size': tokenizer.vocab_size,
          'eos_id': tokenizer.eos_id}
  tmp = os.path.join(out, PREPARED_FILE + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(out, PREPARED_FILE))  # Last: a half-written corpus has none.
  return meta


def _progress_line(done: int, total: int, n_tokens: int, seconds: float) -> str:
  bar = '#' * int(30 * done / max(total, 1))
  return (f'[{bar:<30}] {done:,}/{total:,} documents, {n_tokens:,} tokens, '
          f'{n_tokens / max(seconds, 1e-9):,.0f} tokens/s')
