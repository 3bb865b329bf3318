"""Input pipelines on grain: deterministic, shardable, with checkpointable iterators.

Every data set is a pair of grain `MapDataset`s of single examples: an
infinite training stream (example `i` is a pure function of the seed and `i`)
and a finite evaluation set. An example is a dict of numpy arrays, batched
into the dicts of CONTRIBUTING.md:

  inputs   int32 (b, l)       token ids (an LM's input is also its target)
  targets  int32 (b, l) | (b,) next-token ids, or class ids
  weights  float32, targets' shape; 0 marks padding or unscored positions

Built in (`config.data.name`):
  bytes                byte-level LM text from a file or a directory of files;
                       the concatenated bytes split into train/eval/test by
                       fractions (enwik8: 0.05/0.05 of 100M bytes gives the
                       standard 90M/5M/5M layout)
  duplication          the Reformer copy task `0 w 0 w`, symbols 1..V-1, only
                       the second copy of w scored
  listops              ListOps in the LRA format, generated on the fly (or read
                       from LRA's tsv files when `data.path` is set); 10 classes
  text_classification  byte-level classification from `train.tsv`/`eval.tsv`
                       (`label<TAB>text` lines) or `train/<class>/*` folders
  reverse              seq2seq sanity task: inputs w, targets w reversed,
                       symbols 1..V-1 (an encoder-decoder reads inputs and
                       predicts targets)
  mlm                  BERT masked-LM pre-training on the bytes of a file or
                       directory (ids byte + 1, 0 padding, 257 [MASK]): each
                       position is selected with probability data.mask_rate
                       (0.15); a selected one becomes [MASK] (80%), a random
                       byte (10%) or stays (10%); only selected ones are scored
  byte_classification  which of data.classes (sub-directories of data.path)
                       a random window of seq_len bytes comes from (ids
                       byte + 1, as text_classification and mlm); eval windows
                       come from the last eval_fraction of each class's bytes
  text                 real text for LMs (`text_data`, terraflax/data/): plain text,
                       JSON Lines, Parquet, ArrayRecord or a prepared directory;
                       tokenized by data.tokenizer ('bytes', a tokenizer file, or
                       'train': a SentencePiece model trained on first use and
                       kept in the workdir); documents + end-of-document id
                       packed into rows with segment_ids/positions (data.pack)
                       or cut into plain windows of the token stream; every
                       example also carries 'bytes' (UTF-8 bytes per target)
                       for eval/bits_per_byte
  retrieval            long-document key-value retrieval (`retrieval_example`):
                       a directory of n_pairs keys filed under n_values
                       value headers opens the sequence, filler follows,
                       and the last 2 * n_queries positions ask "key value"
                       for distinct filed keys, only the values scored;
                       chance is 1 / n_values
  digits               scikit-learn's 8x8 handwritten digits (1797 images,
                       shipped with the package): inputs are the 64 pixel
                       intensities 0..16, targets the digit; a fixed
                       permutation holds out data.eval_examples test images

The training iterator's position is its whole state (`get_state()` is the
grain iterator's JSON state), so a restored iterator continues exactly.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import os
import tempfile
from typing import Any, Callable, Iterator

from absl import flags
import grain
import numpy as np

from terraflax import tokenizer as tokenizer_lib
from terraflax.data import corpus as corpus_lib
from terraflax.data import packing
from terraflax.data import sources
from terraflax.models import spec as spec_lib
from terraflax.train import listops

DATASETS = ('bytes', 'duplication', 'listops', 'text_classification', 'reverse', 'mlm',
            'byte_classification', 'digits', 'text', 'retrieval')
TASKS = spec_lib.TASKS  # How the model is called, by data set name (models/spec.py).
MASK_ID = 257  # [MASK] in the mlm data set; bytes are 1..256 and 0 is padding.
MLM_VOCAB_SIZE = 258
BYTE_LEVEL = spec_lib.BYTE_LEVEL  # Data sets whose tokens are raw bytes (text in, text out).
EVAL_SEED_SALT = 0x2545F491  # Makes evaluation examples a different stream.


DataError = sources.DataError  # A data set could not be built; the message names the field.


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the trainer and the model need to know about a data set."""

  task: str  # TASKS[config.data.name]: 'lm', 'mlm', 'classification' or 'seq2seq'.
  vocab_size: int  # Token ids are in [0, vocab_size).
  n_classes: int = 0  # Classification only.
  byte_level: bool = False  # One token per byte: eval reports bits per byte.
  chance: float = 0.0  # Accuracy of guessing (retrieval: 1 / n_values); 0: not reported.


@dataclasses.dataclass(frozen=True)
class Data:
  """A data set: its info and its two example streams (grain MapDatasets)."""

  info: DataInfo
  # Infinite; example i depends only on (seed, i). Or an IterDataset of examples (packed
  # text), whose iterator state is the whole position in the stream.
  train: grain.MapDataset | grain.IterDataset
  eval: grain.MapDataset  # Finite, in a fixed order.
  tokenizer: tokenizer_lib.Tokenizer | None = None  # 'text' only: ids <-> text.

  def train_iterator(self, *, batch_size: int, process_index: int = 0,
                     process_count: int = 1, num_threads: int = 1):
    """A checkpointable iterator over this process's share of the global batches.

    Global batch `s` holds examples `[s * batch_size, (s + 1) * batch_size)` in
    order; process `p` of `P` reads the p-th contiguous slice of each.
    """
    if isinstance(self.train, grain.IterDataset):
      return iter(_local_rows(self.train.batch(batch_size, drop_remainder=True), batch_size,
                              process_index, process_count))
    ds = _local(self.train, batch_size, process_index, process_count, 'train.batch_size')
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return iter(ds.to_iter_dataset(options))

  def eval_batches(self, *, batch_size: int, n_batches: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The first `n_batches` full evaluation batches (all of them for -1)."""
    ds = _local(self.eval, batch_size, process_index, process_count, 'train.batch_size')
    n = len(ds) if n_batches < 0 else min(n_batches, len(ds))
    for i in range(n):
      yield ds[i]

  def n_eval_batches(self, batch_size: int) -> int:
    return len(self.eval) // batch_size


def _local(ds, batch_size, process_index, process_count, field):
  """Batches of this process's rows: process p of P holds rows [p * b/P, (p + 1) * b/P).

  The global batch is then the same, row for row, for any number of processes.
  """
  if batch_size % process_count:
    raise DataError(f'config.{field}={batch_size} must be divisible by the {process_count} '
                    'processes.')
  local = batch_size // process_count
  if process_count > 1:
    source = ds

    def global_example(j):
      batch, row = divmod(j, local)
      return source[batch * batch_size + process_index * local + row]

    ds = grain.MapDataset.range(len(source) // batch_size * local).map(global_example)
  return ds.batch(local, drop_remainder=True)


def _local_rows(batches, batch_size, process_index, process_count):
  """This process's rows [p * b/P, (p + 1) * b/P) of each global batch of an IterDataset."""
  if batch_size % process_count:
    raise DataError(f'config.train.batch_size={batch_size} must be divisible by the '
                    f'{process_count} processes.')
  if process_count == 1:
    return batches
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  return batches.map(lambda batch: {k: v[rows] for k, v in batch.items()})


def lm_example(tokens: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """An LM example: the model shifts right itself, so inputs and targets coincide."""
  tokens = np.asarray(tokens, np.int32)
  if weights is None:
    weights = np.ones(tokens.shape, np.float32)
  return {'inputs': tokens, 'targets': tokens.copy(), 'weights': np.asarray(weights, np.float32)}


# ----------------------------------------------------------------------------- bytes


def list_files(path: str, pattern: str, field: str = 'data.path') -> list[str]:
  """The files `path` names: itself, or its files matching `pattern`, sorted."""
  if not path:
    raise DataError(f'config.{field} is empty; set it to a file or a directory of text files.')
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DataError(f'config.{field}={path!r} does not exist.')
  files = sorted(f for f in globlib.glob(os.path.join(path, pattern), recursive=True)
                 if os.path.isfile(f))
  if not files:
    raise DataError(f'config.{field}={path!r} holds no files matching data.glob={pattern!r}.')
  return files


def read_bytes(path: str, pattern: str = '*') -> np.ndarray:
  """The bytes of a file, or of a directory's matching files concatenated, as uint8."""
  files = list_files(path, pattern)
  parts = [np.fromfile(f, dtype=np.uint8) for f in files]
  corpus = np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
  if corpus.size == 0:
    raise DataError(f'config.data.path={path!r} is empty: no bytes in {len(files)} file(s).')
  return corpus


def split_bytes(corpus: np.ndarray, eval_fraction: float,
                test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train, eval, test): consecutive slices; eval and test take their fractions at the end."""
  n = corpus.size
  n_eval, n_test = int(n * eval_fraction), int(n * test_fraction)
  n_train = n - n_eval - n_test
  return corpus[:n_train], corpus[n_train:n_train + n_eval], corpus[n_train + n_eval:]


def byte_data(cfg, seed: int) -> Data:
  seq_len = cfg.seq_len
  train, evaluation, _ = split_bytes(read_bytes(cfg.path, cfg.glob), cfg.eval_fraction,
                                     cfg.test_fraction)
  for name, part, field in (('training', train, 'data.eval_fraction/data.test_fraction'),
                            ('evaluation', evaluation, 'data.eval_fraction')):
    if part.size < seq_len:
      raise DataError(
          f'The {name} split of config.data.path={cfg.path!r} has {part.size} bytes, fewer than '
          f'data.seq_len={seq_len}; use a larger corpus or change config.{field}.')
  n_windows = max(1, train.size // seq_len)  # A nominal epoch: re-seeded on each repeat.

  def random_window(_, rng):
    start = int(rng.integers(0, train.size - seq_len + 1))
    return lm_example(train[start:start + seq_len])

  def eval_window(i):
    return lm_example(evaluation[i * seq_len:(i + 1) * seq_len])

  return Data(
      info=DataInfo(task=TASKS[cfg.name], vocab_size=256, byte_level=True),
      train=grain.MapDataset.range(n_windows).repeat().random_map(random_window, seed=seed),
      eval=grain.MapDataset.range(evaluation.size // seq_len).map(eval_window))


# ----------------------------------------------------------------------------- duplication


def duplication_example(rng: np.random.Generator, seq_len: int, vocab_size: int):
  """`0 w 0 w` of length seq_len (even), w uniform in 1..vocab_size-1; the second w scored."""
  half = seq_len // 2
  w = rng.integers(1, vocab_size, size=half - 1)
  tokens = np.concatenate([[0], w, [0], w])
  weights = np.zeros((seq_len,), np.float32)
  weights[half + 1:] = 1.0
  return lm_example(tokens, weights)


def duplication_data(cfg, seed: int) -> Data:
  if cfg.seq_len % 2 or cfg.seq_len < 4:
    raise DataError('config.data.seq_len must be even and >= 4 for duplication, got '
                    f'{cfg.seq_len}.')
  if cfg.vocab_size < 2:
    raise DataError(f'config.data.vocab_size must be >= 2 for duplication, got {cfg.vocab_size}.')

  def make(_, rng):
    return duplication_example(rng, cfg.seq_len, cfg.vocab_size)

  return Data(
      info=DataInfo(task=TASKS[cfg.name], vocab_size=cfg.vocab_size),
      train=grain.MapDataset.range(1).repeat().random_map(make, seed=seed),
      eval=grain.MapDataset.range(cfg.eval_examples).random_map(make, seed=seed ^ EVAL_SEED_SALT))


# ----------------------------------------------------------------------------- retrieval


@dataclasses.dataclass(frozen=True)
class RetrievalVocab:
  """Token ids of the retrieval task: 0, filler, keys, values (in that order).

  0 is the pad id the LM shifts in; filler ids are 1..n_filler, keys the next
  n_keys ids, values the last n_values.
  """

  n_filler: int
  n_keys: int
  n_values: int

  @property
  def first_key(self) -> int:
    return 1 + self.n_filler

  @property
  def first_value(self) -> int:
    return self.first_key + self.n_keys

  @property
  def size(self) -> int:
    return self.first_value + self.n_values


def retrieval_example(rng: np.random.Generator, seq_len: int, *, n_pairs: int, n_queries: int,
                      vocab: RetrievalVocab) -> dict[str, np.ndarray]:
  """One key-value retrieval sequence (seq_len,); weights 1 on the queried values only.

    [V1 k k .. k  V2 k k .. k ... | filler ... | q1 u1 q2 u2 ... qQ uQ]

  A directory of n_pairs distinct keys (drawn from the vocab's keys, in
  random order) filed under the n_values value headers in turn (value j
  heads the j-th of n_values equal sections), filler tokens uniform in
  1..n_filler, then the last 2 * n_queries positions ask distinct filed keys
  "key value" (random order): the value is the header the key was filed
  under, the scored target. Every answer is at least
  seq_len - (n_pairs + n_values) - 2 * n_queries + 1 positions after its key.

  A shared-QK LSH layer hashes a query key with its earlier occurrence (the
  same token) and reads where that was: the section gives the value.
  """
  keys = vocab.first_key + rng.choice(vocab.n_keys, size=n_pairs, replace=False)
  per_section = n_pairs // vocab.n_values
  directory = np.concatenate([
      np.concatenate([[vocab.first_value + j], keys[j * per_section:(j + 1) * per_section]])
      for j in range(vocab.n_values)])
  values = vocab.first_value + np.arange(n_pairs) // per_section
  asked = rng.choice(n_pairs, size=n_queries, replace=False)
  tokens = rng.integers(1, vocab.n_filler + 1, size=seq_len)
  tokens[:directory.size] = directory
  start = seq_len - 2 * n_queries
  tokens[start::2], tokens[start + 1::2] = keys[asked], values[asked]
  weights = np.zeros((seq_len,), np.float32)
  weights[start + 1::2] = 1.0
  return lm_example(tokens, weights)


def retrieval_data(cfg, seed: int) -> Data:
  n_pairs = cfg.n_pairs
  n_queries = cfg.n_queries or n_pairs
  if cfg.n_keys < n_pairs:
    raise DataError(f'config.data.n_keys={cfg.n_keys} must be >= data.n_pairs={n_pairs} for '
                    'retrieval (the keys of one sequence are distinct).')
  if n_queries > n_pairs:
    raise DataError(f'config.data.n_queries={n_queries} must be <= data.n_pairs={n_pairs} for '
                    'retrieval (each defined key is asked at most once).')
  if n_pairs % cfg.n_values:
    raise DataError(f'config.data.n_pairs={n_pairs} must be a multiple of data.n_values='
                    f'{cfg.n_values} for retrieval (equal sections, one per value).')
  used = n_pairs + cfg.n_values + 2 * n_queries
  if used >= cfg.seq_len:
    raise DataError(f'config.data.seq_len={cfg.seq_len} must exceed data.n_pairs + '
                    f'data.n_values + 2 * data.n_queries = {used} for retrieval (the directory, '
                    'filler, then the queries).')
  vocab = RetrievalVocab(n_filler=cfg.n_filler, n_keys=cfg.n_keys, n_values=cfg.n_values)

  def make(_, rng):
    return retrieval_example(rng, cfg.seq_len, n_pairs=n_pairs, n_queries=n_queries,
                             vocab=vocab)

  return Data(
      info=DataInfo(task=TASKS[cfg.name], vocab_size=vocab.size, chance=1.0 / cfg.n_values),
      train=grain.MapDataset.range(1).repeat().random_map(make, seed=seed),
      eval=grain.MapDataset.range(cfg.eval_examples).random_map(make, seed=seed ^ EVAL_SEED_SALT))


# ----------------------------------------------------------------------------- listops


def classification_example(ids: np.ndarray, label: int) -> dict[str, np.ndarray]:
  return {'inputs': np.asarray(ids, np.int32), 'targets': np.asarray(label, np.int32),
          'weights': np.asarray(1.0, np.float32)}


def listops_data(cfg, seed: int) -> Data:
  if cfg.max_len > cfg.seq_len:
    raise DataError(f'config.data.max_len={cfg.max_len} must be <= data.seq_len={cfg.seq_len} '
                    'for listops (the longest expression must fit).')
  if not 1 <= cfg.min_len <= cfg.max_len:
    raise DataError(f'config.data.min_len={cfg.min_len} must be in '
                    f'[1, data.max_len={cfg.max_len}].')
  info = DataInfo(task=TASKS[cfg.name], vocab_size=listops.VOCAB_SIZE, n_classes=listops.N_CLASSES)
  if cfg.path:
    train = _listops_file(cfg, 'basic_train.tsv')
    evaluation = _listops_file(cfg, 'basic_val.tsv')
    train_ds = grain.MapDataset.source(train).shuffle(seed=seed).repeat()
    return Data(info, train_ds, grain.MapDataset.source(evaluation))
  kwargs = dict(min_len=cfg.min_len, max_len=cfg.max_len, max_depth=cfg.max_depth,
                max_args=cfg.max_args)

  def make(_, rng):
    source, value = listops.generate(rng, **kwargs)
    return classification_example(listops.tokenize(source, cfg.seq_len), value)

  return Data(
      info=info,
      train=grain.MapDataset.range(1).repeat().random_map(make, seed=seed),
      eval=grain.MapDataset.range(cfg.eval_examples).random_map(make, seed=seed ^ EVAL_SEED_SALT))


def _listops_file(cfg, name):
  path = os.path.join(cfg.path, name)
  if not os.path.isfile(path):
    raise DataError(f'config.data.path={cfg.path!r} has no {name} (LRA ListOps layout).')
  return [classification_example(listops.tokenize(source, cfg.seq_len), value)
          for source, value in listops.read_tsv(path)]


# ----------------------------------------------------------------------------- text classification


def byte_ids(text: bytes, seq_len: int) -> np.ndarray:
  """int32 (seq_len,): byte + 1 (0 is padding), truncated or zero-padded."""
  ids = np.frombuffer(text[:seq_len], np.uint8).astype(np.int32) + 1
  return np.pad(ids, (0, seq_len - ids.size))


def read_labelled(path: str, split: str, n_classes: int) -> list[tuple[bytes, int]]:
  """(text, label) pairs from `path/split.tsv` or `path/split/<class>/*` folders."""
  tsv, folder = os.path.join(path, f'{split}.tsv'), os.path.join(path, split)
  examples = []
  if os.path.isfile(tsv):
    with open(tsv, 'rb') as f:
      for line_number, line in enumerate(f, 1):
        label, tab, text = line.rstrip(b'\r\n').partition(b'\t')
        if not tab or not label.strip().isdigit():
          raise DataError(f'{tsv}:{line_number}: expected "label<TAB>text", got {line[:60]!r}.')
        examples.append((text, int(label)))
  elif os.path.isdir(folder):
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    for label, name in enumerate(classes):
      for file in sorted(globlib.glob(os.path.join(folder, name, '*'))):
        with open(file, 'rb') as f:
          examples.append((f.read(), label))
  else:
    raise DataError(f'config.data.path={path!r} has neither {split}.tsv nor a {split}/ folder '
                    'of class folders.')
  if not examples:
    raise DataError(f'config.data.path={path!r}: the {split} split is empty.')
  bad = sorted({label for _, label in examples if not 0 <= label < n_classes})
  if bad:
    raise DataError(f'config.data.path={path!r}: {split} labels {bad[:5]} are outside '
                    f'[0, data.n_classes={n_classes}).')
  return examples


def text_classification_data(cfg, seed: int) -> Data:
  if not cfg.path:
    raise DataError('config.data.path is empty; text_classification needs a directory with '
                    'train.tsv and eval.tsv (or train/ and eval/ class folders).')
  if not os.path.isdir(cfg.path):
    raise DataError(f'config.data.path={cfg.path!r} does not exist or is not a directory.')
  split = {}
  for name in ('train', 'eval'):
    split[name] = [classification_example(byte_ids(text, cfg.seq_len), label)
                   for text, label in read_labelled(cfg.path, name, cfg.n_classes)]
  return Data(
      info=DataInfo(task=TASKS[cfg.name], vocab_size=257, n_classes=cfg.n_classes),
      train=grain.MapDataset.source(split['train']).shuffle(seed=seed).repeat(),
      eval=grain.MapDataset.source(split['eval']))


# ----------------------------------------------------------------------------- reverse


def reverse_example(rng: np.random.Generator, seq_len: int, vocab_size: int):
  """inputs w, targets w[::-1]: (seq_len,) ids in 1..vocab_size-1, every target scored."""
  w = rng.integers(1, vocab_size, size=seq_len).astype(np.int32)
  return {'inputs': w, 'targets': w[::-1].copy(), 'weights': np.ones((seq_len,), np.float32)}


def reverse_data(cfg, seed: int) -> Data:
  if cfg.vocab_size < 2:
    raise DataError(f'config.data.vocab_size must be >= 2 for reverse, got {cfg.vocab_size}.')

  def make(_, rng):
    return reverse_example(rng, cfg.seq_len, cfg.vocab_size)

  return Data(
      info=DataInfo(task=TASKS[cfg.name], vocab_size=cfg.vocab_size),
      train=grain.MapDataset.range(1).repeat().random_map(make, seed=seed),
      eval=grain.MapDataset.range(cfg.eval_examples).random_map(make, seed=seed ^ EVAL_SEED_SALT))


# ----------------------------------------------------------------------------- mlm


def mlm_mask(ids: np.ndarray, rng: np.random.Generator, *, mask_rate: float = 0.15,
             mask_id: int = MASK_ID, n_real: int = 256) -> dict[str, np.ndarray]:
  """BERT's masking of token ids (l,): an example scored only at the selected positions.

  Each non-padding position (id != 0) is selected with probability
  `mask_rate`; a selected position's input becomes `mask_id` with probability
  0.8, a uniformly random real token (1..n_real) with 0.1, and stays with 0.1.
  Targets are the original ids; weights are 1 at selected positions, else 0.
  """
  ids = np.asarray(ids, np.int32)
  selected = (rng.random(ids.shape) < mask_rate) & (ids != 0)
  action = rng.random(ids.shape)
  inputs = ids.copy()
  inputs[selected & (action < 0.8)] = mask_id
  randomised = selected & (action >= 0.8) & (action < 0.9)
  inputs[randomised] = rng.integers(1, n_real + 1, size=int(randomised.sum()))
  return {'inputs': inputs, 'targets': ids.copy(), 'weights': selected.astype(np.float32)}


def mlm_data(cfg, seed: int) -> Data:
  seq_len = cfg.seq_len
  train, evaluation, _ = split_bytes(read_bytes(cfg.path, cfg.glob), cfg.eval_fraction,
                                     cfg.test_fraction)
  for name, part in (('training', train), ('evaluation', evaluation)):
    if part.size < seq_len:
      raise DataError(f'The {name} split of config.data.path={cfg.path!r} has {part.size} bytes, '
                      f'fewer than data.seq_len={seq_len}.')
  ids = lambda window: window.astype(np.int32) + 1

  def random_window(_, rng):
    start = int(rng.integers(0, train.size - seq_len + 1))
    return mlm_mask(ids(train[start:start + seq_len]), rng, mask_rate=cfg.mask_rate)

  def eval_window(i):
    rng = np.random.default_rng([seed ^ EVAL_SEED_SALT, i])  # The same masks every evaluation.
    return mlm_mask(ids(evaluation[i * seq_len:(i + 1) * seq_len]), rng, mask_rate=cfg.mask_rate)

  return Data(
      info=DataInfo(task=TASKS[cfg.name], vocab_size=MLM_VOCAB_SIZE),
      train=grain.MapDataset.range(max(1, train.size // seq_len)).repeat().random_map(
          random_window, seed=seed),
      eval=grain.MapDataset.range(evaluation.size // seq_len).map(eval_window))


# ----------------------------------------------------------------------------- byte classification


def byte_classification_data(cfg, seed: int) -> Data:
  classes = tuple(cfg.classes)
  if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
    raise DataError('config.data.classes must name >= 2 sub-directories of data.path (one per '
                    f'class) for byte_classification, got {classes!r}.')
  seq_len, splits = cfg.seq_len, []
  for name in classes:
    folder = os.path.join(os.path.expanduser(cfg.path), name)
    train, evaluation, _ = split_bytes(read_bytes(folder, cfg.glob), cfg.eval_fraction, 0.0)
    if min(train.size, evaluation.size) < seq_len:
      raise DataError(f'config.data.classes: class {name!r} ({folder}) has too few bytes for '
                      f'windows of data.seq_len={seq_len} in both splits.')
    splits.append((train, evaluation))

  def window(part, label, rng):
    start = int(rng.integers(0, part.size - seq_len + 1))
    return classification_example(part[start:start + seq_len].astype(np.int32) + 1, label)

  def train_example(_, rng):
    label = int(rng.integers(0, len(classes)))  # Balanced classes.
    return window(splits[label][0], label, rng)

  def eval_example(i):
    label = i % len(classes)
    return window(splits[label][1], label, np.random.default_rng([seed ^ EVAL_SEED_SALT, i]))

  return Data(
      info=DataInfo(task=TASKS[cfg.name], vocab_size=257, n_classes=len(classes)),
      train=grain.MapDataset.range(1).repeat().random_map(train_example, seed=seed),
      eval=grain.MapDataset.range(cfg.eval_examples).map(eval_example))


# ----------------------------------------------------------------------------- digits


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """(pixels int32 (1797, 64) in 0..16, labels int32 (1797,)) from scikit-learn."""
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError("data.name='digits' needs scikit-learn, which ships the 8x8 digits: "
                    "pip install 'terraflax[vision]' (or scikit-learn).") from None
  pixels, labels = datasets.load_digits(return_X_y=True)
  return pixels.astype(np.int32), labels.astype(np.int32)


def digits_data(cfg, seed: int) -> Data:
  if cfg.seq_len != 64:
    raise DataError(f'config.data.seq_len must be 64 (8x8 pixels) for digits, got {cfg.seq_len}.')
  pixels, labels = load_digits()
  order = np.random.default_rng(0).permutation(len(labels))  # A fixed split, whatever the seed.
  n_test = cfg.eval_examples
  if not 0 < n_test < len(labels):
    raise DataError(f'config.data.eval_examples={n_test} (held-out test images) must be in '
                    f'[1, {len(labels) - 1}] for digits.')
  examples = lambda rows: [classification_example(pixels[i], labels[i]) for i in rows]
  return Data(
      info=DataInfo(task=TASKS[cfg.name], vocab_size=17, n_classes=10),
      train=grain.MapDataset.source(examples(order[n_test:])).shuffle(seed=seed).repeat(),
      eval=grain.MapDataset.source(examples(order[:n_test])))


# ----------------------------------------------------------------------------- text


def text_data(cfg, seed: int, workdir: str | None = None) -> Data:
  """LM rows of real text (module docstring, `text`); the tokenizer resolved as `text_tokenizer`."""
  documents = corpus_lib.open_corpus(cfg.path, format=cfg.format, field=cfg.field,
                                     utf8_errors=cfg.utf8_errors)
  source = grain.MapDataset.source(documents)
  if cfg.eval_path:
    eval_docs = corpus_lib.open_corpus(cfg.eval_path, format=cfg.format, field=cfg.field,
                                       utf8_errors=cfg.utf8_errors,
                                       config_field='config.data.eval_path')
    train_docs = source
  else:
    if cfg.eval_fraction <= 0:
      raise DataError('config.data.eval_fraction=0 leaves no evaluation documents; set it > 0 '
                      'or give evaluation files in config.data.eval_path.')
    train_range, eval_range = corpus_lib.split(len(documents), cfg.eval_fraction)
    train_docs = source[:train_range.stop]
    eval_docs = source[eval_range.start:]
  tokenizer = text_tokenizer(cfg, [documents, eval_docs], train_docs, workdir)
  tokenize = corpus_lib.Tokenize(tokenizer)
  options = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=64)
  train = train_docs.shuffle(seed=seed).repeat().map(tokenize).to_iter_dataset(options)
  if cfg.num_workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (a library caller's).
      flags.FLAGS.mark_as_parsed()
    train = train.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  rows = packing.pack_documents([tokenize(d) for d in eval_docs], cfg.seq_len, packed=cfg.pack)
  return Data(
      info=DataInfo(task=spec_lib.task_of(cfg.name), vocab_size=tokenizer.vocab_size,
                    byte_level=tokenizer.kind == tokenizer_lib.BYTES),
      train=packing.pack(train, cfg.seq_len, packed=cfg.pack),
      eval=grain.MapDataset.source(rows), tokenizer=tokenizer)


def text_tokenizer(cfg, corpora, train_docs, workdir: str | None) -> tokenizer_lib.Tokenizer:
  """The tokenizer `config.data.tokenizer` names.

  'bytes' or a file: that one. 'train': the workdir's stored tokenizer when it
  has one (a resumed run), else a SentencePiece model of
  data.tokenizer_vocab_size ids trained on the training documents into a
  temporary file (the trainer then copies it into the workdir). A prepared
  corpus carries its tokenizer: data.tokenizer must be the same one.
  """
  spec = cfg.tokenizer
  prepared = [c for c in corpora if isinstance(c, corpus_lib.PreparedCorpus)]
  if spec == 'train':
    if prepared:
      raise DataError(f"config.data.tokenizer='train' cannot train on the prepared corpus "
                      f'{prepared[0].directory}; set config.data.tokenizer to its tokenizer '
                      f'({prepared[0].tokenizer.path or "bytes"}).')
    stored = tokenizer_lib.from_workdir(workdir) if workdir and os.path.isdir(workdir) else None
    if stored is not None and stored.kind != tokenizer_lib.BYTES:
      return stored
    out = os.path.join(tempfile.mkdtemp(prefix='terraflax_tokenizer_'), 'tokenizer.model')
    try:
      return corpus_lib.train_tokenizer(train_docs, vocab_size=cfg.tokenizer_vocab_size, out=out)
    except tokenizer_lib.TokenizerError as e:  # Its flags' words -> the config's.
      raise DataError(f"config.data.tokenizer='train': " + str(e).replace(
          '--vocab_size', 'config.data.tokenizer_vocab_size')) from None
  tokenizer = tokenizer_lib.load(spec)
  for corpus in prepared:
    if not _same_tokenizer(tokenizer, corpus.tokenizer):
      raise DataError(f'config.data.tokenizer={spec!r} is not the tokenizer {corpus.directory} '
                      f'was prepared with; set it to {corpus.tokenizer.path or "bytes"!r}.')
  return tokenizer


def _same_tokenizer(a: tokenizer_lib.Tokenizer, b: tokenizer_lib.Tokenizer) -> bool:
  if a.kind != b.kind or a.vocab_size != b.vocab_size:
    return False
  if a.path is None or b.path is None:
    return a.path == b.path
  with open(a.path, 'rb') as fa, open(b.path, 'rb') as fb:
    return fa.read() == fb.read()


BUILDERS: dict[str, Callable[[Any, int], Data]] = {
    'bytes': byte_data,
    'duplication': duplication_data,
    'listops': listops_data,
    'text_classification': text_classification_data,
    'reverse': reverse_data,
    'mlm': mlm_data,
    'byte_classification': byte_classification_data,
    'digits': digits_data,
    'retrieval': retrieval_data,
}


def make_data(data_config, seed: int, workdir: str | None = None) -> Data:
  """The `Data` that `config.data` describes; `DataError` naming the field if it cannot.

  `workdir` (the run's, if known) holds the tokenizer of data.tokenizer='train'.
  """
  if data_config.name == 'text':
    try:
      return text_data(data_config, seed % 2**32, workdir)
    except tokenizer_lib.TokenizerError as e:
      raise DataError(f'config.data.tokenizer={data_config.tokenizer!r}: {e}') from None
  if data_config.name not in BUILDERS:
    raise DataError(f'config.data.name must be one of {DATASETS}, got {data_config.name!r}.')
  return BUILDERS[data_config.name](data_config, seed % 2**32)

