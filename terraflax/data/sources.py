"""Documents on disk: plain text, JSON Lines, Parquet and ArrayRecord, as random-access sources.

  paths = expand_paths('corpus/*.jsonl,extra/', field='data.path')
  docs = open_documents(paths, format='auto', field='text')   # len(docs), docs[i] -> str | bytes

Formats (`config.data.format`; 'auto' picks one per file from its name):
  text         one document per file (*.txt, *.md, *.rst, *.html and anything else)
  lines        one document per non-empty line
  jsonl        JSON Lines (*.jsonl, *.json): one object per line, the document in its
               `field` ('text' by default); blank lines are skipped
  parquet      Parquet files (*.parquet, pyarrow): the document in column `field`
  arrayrecord  grain's ArrayRecord files (*.array_record, *.arrayrecord): one
               UTF-8 document per record, read lazily (nothing held in memory)

`path` is one or more comma-separated entries, each a file, a directory (its
files, recursively, sorted; hidden files skipped) or a glob. Text is UTF-8:
invalid bytes are an error naming the file (and line) unless
`utf8_errors='replace'`, which substitutes U+FFFD. Every problem is a
`DataError` naming the file, line or field.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from typing import Sequence

import grain

from terraflax import errors

FORMATS = ('auto', 'text', 'lines', 'jsonl', 'parquet', 'arrayrecord')
UTF8_ERRORS = ('error', 'replace')
_BY_EXTENSION = {'.jsonl': 'jsonl', '.json': 'jsonl', '.parquet': 'parquet',
                 '.array_record': 'arrayrecord', '.arrayrecord': 'arrayrecord'}


class DataError(errors.UserError, ValueError):
  """A data set could not be built from its config or files; the message names the field/file."""


def expand_paths(spec: str, *, field: str = 'config.data.path') -> list[str]:
  """The files `spec` names: comma-separated files, directories (recursive) and globs, in order."""
  if not spec or not spec.strip():
    raise DataError(f'{field} is empty; set it to a file, a directory or a glob '
                    '(several: comma-separated).')
  files = []
  for entry in (e.strip() for e in spec.split(',')):
    if not entry:
      continue
    path = os.path.expanduser(entry)
    if os.path.isfile(path):
      found = [path]
    elif os.path.isdir(path):
      found = sorted(p for p in globlib.glob(os.path.join(path, '**', '*'), recursive=True)
                     if os.path.isfile(p) and not _hidden(os.path.relpath(p, path)))
      if not found:
        raise DataError(f'{field}: the directory {entry!r} holds no files.')
    elif globlib.has_magic(path):
      found = sorted(p for p in globlib.glob(path, recursive=True) if os.path.isfile(p))
      if not found:
        raise DataError(f'{field}: the glob {entry!r} matches no files.')
    else:
      raise DataError(f'{field}: {entry!r} does not exist (a file, a directory or a '
                      'glob).')
    files.extend(found)
  return files


def _hidden(relative: str) -> bool:
  return any(part.startswith('.') for part in relative.split(os.sep))


def format_of(path: str, format: str) -> str:  # pylint: disable=redefined-builtin
  """The format of file `path`: `format` itself unless it is 'auto' (then by extension)."""
  if format != 'auto':
    return format
  return _BY_EXTENSION.get(os.path.splitext(path)[1].lower(), 'text')


def decode_utf8(raw: bytes, where: str, utf8_errors: str = 'error') -> str:
  """`raw` as text; invalid UTF-8 is a `DataError` naming `where` and the byte offset."""
  try:
    return raw.decode('utf-8', errors='strict' if utf8_errors == 'error' else 'replace')
  except UnicodeDecodeError as e:
    raise DataError(f'{where}: invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r}); '
                    "fix the file or set config.data.utf8_errors='replace'.") from None


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file.')
  if os.path.getsize(path) == 0:
    raise DataError(f'{path}: the file is empty.')


def read_text_file(path: str, format: str, *, field: str = 'text',  # pylint: disable=redefined-builtin
                   utf8_errors: str = 'error') -> list[str]:
  """The documents of one 'text', 'lines', 'jsonl' or 'parquet' file."""
  _check_file(path)
  if format == 'parquet':
    return _read_parquet(path, field)
  with open(path, 'rb') as f:
    raw = f.read()
  if format == 'text':
    return [decode_utf8(raw, path, utf8_errors)]
  docs = []
  for number, line in enumerate(raw.split(b'\n'), 1):
    line = line.rstrip(b'\r')
    if not line.strip():
      continue
    text = decode_utf8(line, f'{path}:{number}', utf8_errors)
    if format == 'lines':
      docs.append(text)
      continue
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{number}: not a JSON object ({e.msg}); JSON Lines holds one '
                      'object per line.') from None
    if not isinstance(record, dict) or field not in record:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise DataError(f'{path}:{number}: no {field!r} field (config.data.field) in this line; '
                      f'it has {keys}.')
    if not isinstance(record[field], str):
      raise DataError(f'{path}:{number}: the {field!r} field (config.data.field) must be a '
                      f'string, got {type(record[field]).__name__}.')
    docs.append(record[field])
  if not docs:
    raise DataError(f'{path}: no documents (only blank lines).')
  return docs


def _read_parquet(path: str, column: str) -> list[str]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel  # Optional extra.
  except ImportError:
    raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'terraflax[text]'."
                    ) from None
  try:
    table = pq.read_table(path)
  except Exception as e:  # pylint: disable=broad-except  # pyarrow's errors are many types.
    raise DataError(f'{path}: not a readable Parquet file ({e}).') from None
  if column not in table.column_names:
    raise DataError(f'{path}: no column {column!r} (config.data.field); columns: '
                    f'{table.column_names}.')
  values = table.column(column).to_pylist()
  for row, value in enumerate(values):
    if not isinstance(value, str):
      raise DataError(f'{path}: row {row} of column {column!r} is {type(value).__name__}, '
                      'not a string.')
  if not values:
    raise DataError(f'{path}: no rows.')
  return values


class ArrayRecordDocuments(Sequence):
  """The records of ArrayRecord files as a lazy random-access sequence of bytes."""

  def __init__(self, paths: Sequence[str]):
    for path in paths:
      _check_file(path)
    try:
      self._source = grain.sources.ArrayRecordDataSource(list(paths))
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{", ".join(paths)}: not readable as ArrayRecord ({e}).') from None
    self.paths = tuple(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    return self._source[index]

  def __getstate__(self):
    return {'paths': self.paths}

  def __setstate__(self, state):
    self.__init__(state['paths'])


class TextDocuments(Sequence):
  """Documents of ArrayRecord files decoded as UTF-8 on access (`DataError` on bad bytes)."""

  def __init__(self, records: ArrayRecordDocuments, utf8_errors: str = 'error'):
    self.records, self.utf8_errors = records, utf8_errors

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index):
    return decode_utf8(self.records[index], f'{",".join(self.records.paths)} record {index}',
                       self.utf8_errors)


def open_documents(paths: Sequence[str], *, format: str = 'auto',  # pylint: disable=redefined-builtin
                   field: str = 'text', utf8_errors: str = 'error') -> Sequence[str]:
  """All documents of `paths` in order: a list, or a lazy sequence when all are ArrayRecord."""
  if format not in FORMATS:
    raise DataError(f'config.data.format must be one of {FORMATS}, got {format!r}.')
  if utf8_errors not in UTF8_ERRORS:
    raise DataError(f'config.data.utf8_errors must be one of {UTF8_ERRORS}, got '
                    f'{utf8_errors!r}.')
  kinds = [format_of(p, format) for p in paths]
  if kinds and all(k == 'arrayrecord' for k in kinds):
    return TextDocuments(ArrayRecordDocuments(paths), utf8_errors)
  if 'arrayrecord' in kinds:
    mixed = [p for p, k in zip(paths, kinds) if k == 'arrayrecord'][0]
    raise DataError(f'{mixed}: ArrayRecord files cannot be mixed with other formats in one '
                    'config.data.path; convert them all (python -m terraflax.data prepare).')
  docs = []
  for path, kind in zip(paths, kinds):
    docs.extend(read_text_file(path, kind, field=field, utf8_errors=utf8_errors))
  return docs
