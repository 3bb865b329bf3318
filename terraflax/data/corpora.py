"""Natural-language corpora that every Python installation carries: no download needed.

`python_docs_path()` writes (once, atomically) and returns a JSON Lines file of
English reference documentation shipped with the running Python:

  - `pydoc_data.topics.topics`: the text of the Python documentation's
    reference topics that `help('assert')` shows (79 documents, about 465K
    characters on Python 3.11);
  - the module docstrings (longer than 200 characters) of the standard
    library's top-level `*.py` files, read with `ast` without importing them
    (about 80 documents, 114K characters on 3.11).

Each line is `{"title": ..., "text": ...}`; documents are ordered by a hash of
their title, so a split that takes the last documents mixes both kinds. The
file goes to `$TERRAFLAX_CACHE` (default `~/.cache/terraflax`), named by the
Python version.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import tempfile

MIN_DOCSTRING_CHARS = 200


def cache_dir() -> str:
  return os.environ.get('TERRAFLAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                           'terraflax')


def python_docs() -> list[dict[str, str]]:
  """[{'title', 'text'}]: the pydoc topics and long stdlib module docstrings, in a fixed order."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel  # Only when used.
  documents = [{'title': f'topic:{name}', 'text': text}
               for name, text in topics.topics.items() if text.strip()]
  stdlib = os.path.dirname(os.__file__)
  for path in sorted(glob.glob(os.path.join(stdlib, '*.py'))):
    try:
      with open(path, encoding='utf-8') as f:
        docstring = ast.get_docstring(ast.parse(f.read()))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    if docstring and len(docstring) > MIN_DOCSTRING_CHARS:
      name = os.path.splitext(os.path.basename(path))[0]
      documents.append({'title': f'module:{name}', 'text': docstring})
  return sorted(documents, key=lambda d: hashlib.sha1(d['title'].encode('utf-8')).hexdigest())


def python_docs_path(directory: str | None = None) -> str:
  """The JSON Lines file of `python_docs()`, written on first use."""
  directory = directory or cache_dir()
  version = '.'.join(map(str, sys.version_info[:3]))
  path = os.path.join(directory, f'python-docs-{version}.jsonl')
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.python-docs.')
  with os.fdopen(fd, 'w', encoding='utf-8') as f:
    for document in python_docs():
      f.write(json.dumps(document, ensure_ascii=False) + '\n')
  os.replace(tmp, path)  # Atomic: concurrent first uses write the same content.
  return path
