"""ListOps (Nangia & Bowman 2018) in the Long Range Arena format, generated locally.

An example is a nested expression over the digits 0-9 and four operators,
written as whitespace-separated tokens, and its value (one of 10 classes):

  [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

MAX and MIN are the largest and smallest argument, MED the median (rounded
down for an even count), SM the sum modulo 10. Expressions are drawn from a
`numpy.random.Generator`, so example `i` of a seeded stream is always the same.
LRA's own files (tab-separated `Source`/`Target` columns with a header) are
written by `write_tsv` and read by `read_tsv`.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

OPERATORS = ('[MAX', '[MIN', '[MED', '[SM')
END = ']'
DIGITS = tuple(str(d) for d in range(10))
PAD_ID = 0
# Token ids: 0 pad, digits 1..10, operators 11..14, END 15. LRA's tokenizer
# also keeps parentheses, which this generator never writes.
VOCAB = ('<pad>',) + DIGITS + OPERATORS + (END,)
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)
N_CLASSES = 10


def apply_operator(operator: str, args: Sequence[int]) -> int:
  """The value of `operator` on integer arguments."""
  if operator == '[MAX':
    return max(args)
  if operator == '[MIN':
    return min(args)
  if operator == '[MED':
    return int(np.floor(np.median(np.asarray(args, np.float64))))
  if operator == '[SM':
    return sum(args) % 10
  raise ValueError(f'Unknown ListOps operator {operator!r}; expected one of {OPERATORS}.')


def _tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int):
  """A random expression tree: an int leaf or (operator, [children])."""
  if depth >= max_depth or (depth > 1 and rng.random() < 0.25):
    return int(rng.integers(0, 10))
  operator = OPERATORS[int(rng.integers(0, len(OPERATORS)))]
  n_args = int(rng.integers(2, max_args + 1))
  return operator, [_tree(rng, depth + 1, max_depth, max_args) for _ in range(n_args)]


def _tokens(tree) -> list[str]:
  if isinstance(tree, int):
    return [str(tree)]
  operator, children = tree
  out = [operator]
  for child in children:
    out.extend(_tokens(child))
  out.append(END)
  return out


def _value(tree) -> int:
  if isinstance(tree, int):
    return tree
  operator, children = tree
  return apply_operator(operator, [_value(child) for child in children])


def generate(rng: np.random.Generator, *, min_len: int, max_len: int, max_depth: int = 10,
             max_args: int = 10, max_tries: int = 1000) -> tuple[str, int]:
  """One (source, value) pair whose token count is in [min_len, max_len].

  Draws trees until one fits; raises if `max_tries` draws all miss (the range
  is then too narrow for `max_depth`/`max_args`).
  """
  for _ in range(max_tries):
    tree = _tree(rng, 1, max_depth, max_args)
    tokens = _tokens(tree)
    if min_len <= len(tokens) <= max_len:
      return ' '.join(tokens), _value(tree)
  raise ValueError(
      f'No ListOps expression with {min_len} to {max_len} tokens in {max_tries} draws '
      f'(max_depth={max_depth}, max_args={max_args}); widen the length range.')


def tokenize(source: str, seq_len: int) -> np.ndarray:
  """int32 (seq_len,) ids of a source string, padded with 0; parentheses dropped."""
  tokens = [t for t in source.replace('(', ' ').replace(')', ' ').split()]
  if len(tokens) > seq_len:
    raise ValueError(f'ListOps example has {len(tokens)} tokens, more than data.seq_len={seq_len}.')
  try:
    ids = [TOKEN_IDS[t] for t in tokens]
  except KeyError as e:
    raise ValueError(
        f'Unknown ListOps token {e.args[0]!r}; the vocabulary is {VOCAB[1:]}.') from None
  out = np.full((seq_len,), PAD_ID, np.int32)
  out[:len(ids)] = ids
  return out


def write_tsv(path: str, examples: Sequence[tuple[str, int]]) -> None:
  """Writes (source, value) pairs as an LRA ListOps file (`Source\\tTarget` header)."""
  with open(path, 'w', encoding='utf-8') as f:
    f.write('Source\tTarget\n')
    for source, value in examples:
      f.write(f'{source}\t{value}\n')


def read_tsv(path: str) -> list[tuple[str, int]]:
  """Reads an LRA ListOps file into (source, value) pairs."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'ListOps file {path!r} does not exist.')
  examples = []
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line or (line_number == 1 and line.startswith('Source')):
        continue
      source, _, target = line.rpartition('\t')
      try:
        examples.append((source, int(target)))
      except ValueError:
        raise ValueError(f'{path}:{line_number}: expected "source<TAB>value", '
                         f'got {line[:80]!r}.') from None
  if not examples:
    raise ValueError(f'ListOps file {path!r} holds no examples.')
  return examples
