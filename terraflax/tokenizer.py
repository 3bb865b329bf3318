"""Tokenizers: text <-> token ids behind one small interface, and training them.

  tok = tokenizer.load('bytes')               # or a SentencePiece model / HF tokenizer.json
  ids = tok.encode('Grüße, world')            # list[int], every id < tok.vocab_size
  rows = tok.encode_batch(docs)               # [encode(d) for d in docs], faster
  text = tok.decode(ids)                      # == 'Grüße, world'
  tok.save_to(workdir)                        # WORKDIR/tokenizer.model | tokenizer.json
  tok = tokenizer.from_workdir(workdir)       # what decoding and export use

  python -m terraflax.tokenizer train --input=corpus/ --input='more/*.txt' \\
      --vocab_size=4000 --kind=spm --out=/tmp/tok.model

Kinds (`Tokenizer.kind`):
  'bytes': today's behaviour. vocab_size 256, a token is one byte of the text's
      UTF-8 encoding. pad_id 0 (the NUL byte), eos_id 255 (0xFF never occurs in
      UTF-8, so the end-of-document id cannot collide with text).
  'spm':  a SentencePiece model file (`sentencepiece`).
  'hf':   a Hugging Face `tokenizer.json` (`tokenizers`).
A file is recognised by its content, not its name: a JSON object with a
'model' field is a tokenizer.json; anything else must load as a SentencePiece
ModelProto, or it is a `TokenizerError` naming the file.

Special ids: `pad_id` is always 0 (the id the decoder feeds first and the
packer pads with; its loss weight is 0 whatever piece the file has there).
`eos_id` is the end-of-document id packing appends: the SentencePiece model's
eos piece, or in a tokenizer.json the first of '</s>', '<|endoftext|>',
'<eos>', '<|end_of_text|>', '[SEP]' it has. The tokenizers `train` makes
reserve pad = 0 ('<pad>') and eos = 1 ('</s>').

Decoding: `decode` drops the special ids (pad and eos for 'bytes'; the
control/special pieces of a file tokenizer) and ids outside the vocabulary
(a model's vocab_size may exceed its tokenizer's), and REPLACES invalid UTF-8
(a model may emit a byte sequence that is not text) with U+FFFD: decoding
model output never raises. Encoding a str that is not valid Unicode (a lone
surrogate) is a `TokenizerError`.

sentencepiece and tokenizers are optional (`pip install terraflax[text]`);
they are imported only when a file tokenizer is loaded or trained.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Sequence

from terraflax import errors

BYTES = 'bytes'
BYTES_VOCAB_SIZE = 256
BYTES_EOS_ID = 255
PAD_ID = 0
# The pieces `train` reserves: id 0 pad, id 1 end of document (spm also needs an unk, id 2).
PAD_PIECE, EOS_PIECE, UNK_PIECE = '<pad>', '</s>', '<unk>'
_HF_EOS_PIECES = ('</s>', '<|endoftext|>', '<eos>', '<|end_of_text|>', '[SEP]')
KINDS = ('spm', 'bpe')  # what `train` makes
SPM_MODEL_TYPES = ('unigram', 'bpe')
# spm byte fallback (every text round-trips) costs 256 pieces: on by default from this size.
SPM_BYTE_FALLBACK_MIN_VOCAB = 512
WORKDIR_FILES = {'spm': 'tokenizer.model', 'hf': 'tokenizer.json'}
_INSTALL = 'pip install terraflax[text]'


class TokenizerError(errors.UserError, ValueError):
  """A tokenizer file, spec, training input or vocabulary size the user must fix."""


def _import_sentencepiece():
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TokenizerError(f'SentencePiece tokenizers need the sentencepiece package: {_INSTALL}'
                         ) from e
  return sentencepiece


def _import_tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TokenizerError(f'tokenizer.json files need the tokenizers package: {_INSTALL}') from e
  return tokenizers


# ----------------------------------------------------------------------------
# The interface.

@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """Text <-> ids. Build with `load(spec)` / `from_workdir(workdir)`, not directly.

  Fields: kind ('bytes' | 'spm' | 'hf'), path (the file; None for bytes),
  vocab_size, eos_id (end of document), pad_id (0), special_ids (the ids
  decode drops: pad and eos, and a file's control/special pieces).
  """
  kind: str
  path: str | None
  vocab_size: int
  eos_id: int
  pad_id: int
  special_ids: frozenset = dataclasses.field(repr=False)  # dropped by decode (pad, eos, ...)
  _impl: Any = dataclasses.field(repr=False)

  def encode(self, text: str) -> list[int]:
    """str -> list of ids, each in [0, vocab_size). No eos is appended."""
    self._check_text(text)
    if self.kind == BYTES:
      return list(text.encode('utf-8'))
    if self.kind == 'spm':
      return list(self._impl.encode(text, out_type=int))
    return list(self._impl.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """[encode(t) for t in texts], in one call into the tokenizer library (faster)."""
    texts = list(texts)
    for text in texts:
      self._check_text(text)
    if self.kind == BYTES:
      return [list(text.encode('utf-8')) for text in texts]
    if self.kind == 'spm':
      return [list(ids) for ids in self._impl.encode(texts, out_type=int)]
    return [list(e.ids) for e in self._impl.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """ids (any int iterable, e.g. a 1-D array) -> str.

    Special ids and ids outside [0, vocab_size) are dropped; invalid UTF-8 is
    replaced by U+FFFD (never raises).
    """
    kept = [int(i) for i in ids]
    kept = [i for i in kept if 0 <= i < self.vocab_size and i not in self.special_ids]
    if self.kind == BYTES:
      return bytes(kept).decode('utf-8', errors='replace')
    if self.kind == 'spm':
      return self._impl.decode(kept)
    return self._impl.decode(kept, skip_special_tokens=True)

  @staticmethod
  def _check_text(text) -> None:
    if not isinstance(text, str):
      raise TokenizerError(f'encode takes a str, got {type(text).__name__}.')
    try:
      text.encode('utf-8')
    except UnicodeEncodeError as e:
      raise TokenizerError(f'encode: the text is not valid Unicode ({e.reason} at character '
                           f'{e.start}: {text[e.start:e.end]!r}).') from None

  def save_to(self, workdir: str) -> str:
    """Copies the file into `workdir` as tokenizer.model (spm) / tokenizer.json (hf).

    Returns the stored path ('' for 'bytes', which stores nothing). A workdir
    keeps one tokenizer: a different one already there is a TokenizerError
    (a resumed run cannot change its vocabulary); the same file is a no-op.
    """
    existing = _workdir_files(workdir)
    if self.kind == BYTES:
      if existing:
        raise TokenizerError(f'{existing[0]} is already this workdir\'s tokenizer; the run asks '
                             f"for 'bytes'. A workdir keeps one tokenizer: use a new workdir.")
      return ''
    target = os.path.join(workdir, WORKDIR_FILES[self.kind])
    with open(self.path, 'rb') as f:
      content = f.read()
    for path in existing:
      with open(path, 'rb') as f:
        if path == target and f.read() == content:
          return target
      raise TokenizerError(f'{path} is already this workdir\'s tokenizer and differs from '
                           f'{self.path}. A workdir keeps one tokenizer: use a new workdir.')
    os.makedirs(workdir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix='.tokenizer.')
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(content)
      os.replace(tmp, target)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    return target


def _bytes() -> Tokenizer:
  return Tokenizer(kind=BYTES, path=None, vocab_size=BYTES_VOCAB_SIZE, eos_id=BYTES_EOS_ID,
                   pad_id=PAD_ID, _impl=None, special_ids=frozenset({PAD_ID, BYTES_EOS_ID}))


def _detect(path: str) -> str:
  """'hf' | 'spm' from the file's content, or a TokenizerError naming the file."""
  if not os.path.exists(path):
    raise TokenizerError(f"tokenizer file {path} does not exist (give 'bytes', a SentencePiece "
                         'model file or an HF tokenizer.json).')
  if os.path.isdir(path):
    raise TokenizerError(f'tokenizer {path} is a directory; give the SentencePiece model file or '
                         'the tokenizer.json inside it.')
  with open(path, 'rb') as f:
    head = f.read(64)
  if not head:
    raise TokenizerError(f'tokenizer file {path} is empty.')
  if head.lstrip()[:1] == b'{':
    return 'hf'
  return 'spm'


def _load_spm(path: str) -> Tokenizer:
  spm = _import_sentencepiece()
  processor = spm.SentencePieceProcessor()
  try:
    processor.Load(path)
  except (RuntimeError, OSError) as e:
    raise TokenizerError(f'{path} is neither a SentencePiece model nor an HF tokenizer.json '
                         f'(sentencepiece: {str(e).strip()}); give one of those or \'bytes\'.'
                         ) from None
  n = processor.GetPieceSize()
  if n < 2:
    raise TokenizerError(f'{path}: a SentencePiece model with {n} pieces is not usable.')
  eos = processor.eos_id()
  if eos < 0:
    eos = processor.PieceToId(EOS_PIECE)
    if processor.IdToPiece(eos) != EOS_PIECE:
      raise TokenizerError(f'{path}: the SentencePiece model has no end-of-document piece (eos_id '
                           f'or {EOS_PIECE!r}); train it with an eos piece '
                           '(python -m terraflax.tokenizer train reserves id 1).')
  special = {i for i in range(n) if processor.IsControl(i)} | {eos}
  return Tokenizer(kind='spm', path=path, vocab_size=n, eos_id=eos, pad_id=PAD_ID,
                   _impl=processor, special_ids=frozenset(special))


def _load_hf(path: str) -> Tokenizer:
  try:
    with open(path, encoding='utf-8') as f:
      content = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenizerError(f'{path} starts like JSON but does not parse ({e}); an HF tokenizer.json '
                         'or a SentencePiece model is expected.') from None
  if not isinstance(content, dict) or 'model' not in content:
    raise TokenizerError(f"{path} is JSON but not an HF tokenizer.json (it has no 'model' field); "
                         "give a tokenizer.json, a SentencePiece model or 'bytes'.")
  tokenizers = _import_tokenizers()
  try:
    impl = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except  (tokenizers raises plain Exception)
    raise TokenizerError(f'{path} is not a valid HF tokenizer.json (tokenizers: {e}).') from None
  vocab = impl.get_vocab(with_added_tokens=True)
  eos = next((vocab[p] for p in _HF_EOS_PIECES if p in vocab), None)
  if eos is None:
    raise TokenizerError(f'{path}: the tokenizer has no end-of-document token (one of '
                         f'{", ".join(_HF_EOS_PIECES)}).')
  special = {i for i, t in impl.get_added_tokens_decoder().items() if t.special} | {eos}
  return Tokenizer(kind='hf', path=path, vocab_size=impl.get_vocab_size(with_added_tokens=True),
                   eos_id=eos, pad_id=PAD_ID, _impl=impl, special_ids=frozenset(special))


def load(spec: str) -> Tokenizer:
  """'bytes' or the path of a SentencePiece model / HF tokenizer.json -> Tokenizer."""
  if not isinstance(spec, str) or not spec:
    raise TokenizerError(f"tokenizer must be 'bytes' or a tokenizer file path, got {spec!r}.")
  if spec == BYTES:
    return _bytes()
  path = os.path.abspath(os.path.expanduser(spec))
  return _load_hf(path) if _detect(path) == 'hf' else _load_spm(path)


def _workdir_files(workdir: str) -> list[str]:
  paths = [os.path.join(workdir, name) for name in WORKDIR_FILES.values()]
  return [p for p in paths if os.path.exists(p)]


def from_workdir(workdir: str) -> Tokenizer:
  """The tokenizer stored in `workdir` (tokenizer.model / tokenizer.json), else 'bytes'."""
  found = _workdir_files(workdir)
  if len(found) > 1:
    raise TokenizerError(f'{workdir} holds both {" and ".join(found)}; a workdir keeps one '
                         'tokenizer: remove the one the run did not use.')
  return load(found[0]) if found else _bytes()


def check_vocab(tokenizer: Tokenizer, vocab_size: int, field: str = 'model.vocab_size') -> None:
  """A TokenizerError when the tokenizer's ids do not all fit the model's `vocab_size`."""
  if tokenizer.vocab_size > vocab_size:
    source = 'bytes' if tokenizer.path is None else tokenizer.path
    raise TokenizerError(f'{field}={vocab_size} is smaller than the vocabulary of tokenizer '
                         f'{source} ({tokenizer.vocab_size} ids); set {field} >= '
                         f'{tokenizer.vocab_size}.')


# ----------------------------------------------------------------------------
# Training.

def expand_inputs(paths: str | Sequence[str]) -> list[str]:
  """Files named by paths, globs and directories (recursively, sorted; hidden files skipped).

  A path or glob matching nothing, or inputs holding no text at all, is a TokenizerError.
  """
  if isinstance(paths, str):
    paths = [paths]
  if not paths:
    raise TokenizerError('--input: no training text given (paths, globs or directories).')
  files = []
  for spec in paths:
    spec = os.path.expanduser(spec)
    matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
    if not matches or not all(os.path.exists(m) for m in matches):
      raise TokenizerError(f'--input {spec}: no such file, directory or glob match.')
    for match in matches:
      if os.path.isdir(match):
        for root, dirs, names in os.walk(match):
          dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
          files += [os.path.join(root, n) for n in sorted(names) if not n.startswith('.')]
      else:
        files.append(match)
  files = list(dict.fromkeys(files))
  if not any(os.path.getsize(f) for f in files) or not any(_has_text(f) for f in files):
    raise TokenizerError(f'--input {", ".join(paths)}: the input holds no text '
                         f'({len(files)} file(s), all empty).')
  return files


def _has_text(path: str) -> bool:
  with open(path, 'rb') as f:
    return bool(f.read(1 << 16).strip())


def _check_utf8(files: list[str]) -> None:
  for path in files:
    with open(path, 'rb') as f:
      for number, line in enumerate(f, 1):
        try:
          line.decode('utf-8')
        except UnicodeDecodeError as e:
          raise TokenizerError(f'{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start} '
                               'of the line); tokenizers train on UTF-8 text files.') from None


def train(paths: str | Sequence[str], *, vocab_size: int, kind: str, out: str,
          spm_model_type: str = 'unigram', byte_fallback: bool | None = None) -> Tokenizer:
  """Trains a tokenizer on text files and writes it to `out`; returns it loaded.

  Args:
    paths: files, globs and directories of UTF-8 text (SentencePiece reads a
      sentence per line).
    vocab_size: the number of ids, specials included.
    kind: 'spm' (a SentencePiece model file) or 'bpe' (an HF byte-level BPE
      tokenizer.json).
    out: the file to write (its directory is created).
    spm_model_type: 'unigram' or 'bpe' (kind='spm' only).
    byte_fallback: spm only: unknown characters become UTF-8 byte pieces so
      every text round-trips (costs 256 pieces; the rarest 0.05% of characters
      are left to bytes too); default on when vocab_size >= 512. Without it
      every character of the training text is a piece and characters absent
      from it decode as ' ⁇ '.
      (kind='bpe' is byte-level: always lossless.)

  Both kinds reserve id 0 = '<pad>' and id 1 = '</s>' (end of document); spm
  also id 2 = '<unk>'.
  """
  if kind not in KINDS:
    raise TokenizerError(f'--kind={kind!r}: must be one of {", ".join(KINDS)}.')
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
    raise TokenizerError(f'--vocab_size={vocab_size!r}: must be a positive int.')
  if spm_model_type not in SPM_MODEL_TYPES:
    raise TokenizerError(f'--spm_model_type={spm_model_type!r}: must be one of '
                         f'{", ".join(SPM_MODEL_TYPES)}.')
  if not out:
    raise TokenizerError('--out: give the tokenizer file to write.')
  files = expand_inputs(paths)
  _check_utf8(files)
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out):
    raise TokenizerError(f'--out={out} is a directory; give a file path.')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  if kind == 'spm':
    _train_spm(files, vocab_size, out, spm_model_type,
               vocab_size >= SPM_BYTE_FALLBACK_MIN_VOCAB if byte_fallback is None
               else byte_fallback)
  else:
    _train_bpe(files, vocab_size, out)
  return load(out)


def _train_spm(files, vocab_size, out, model_type, byte_fallback):
  spm = _import_sentencepiece()
  minimum = 3 + (256 if byte_fallback else 0) + 1
  if vocab_size < minimum:
    raise TokenizerError(f'--vocab_size={vocab_size} is too small: a SentencePiece model needs '
                         f'at least {minimum} ids (pad, eos, unk'
                         f'{", 256 byte pieces" if byte_fallback else ""} and one piece).')
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, 'spm')
    log = os.path.join(tmp, 'log')
    try:
      with open(log, 'w') as logstream:
        spm.SentencePieceTrainer.Train(
            input=files, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD_ID, eos_id=1, unk_id=2, bos_id=-1, pad_piece=PAD_PIECE,
            eos_piece=EOS_PIECE, unk_piece=UNK_PIECE, byte_fallback=byte_fallback,
            character_coverage=0.9995 if byte_fallback else 1.0,
            normalization_rule_name='identity',
            remove_extra_whitespaces=False, split_digits=False,
            user_defined_symbols=['\n'], max_sentence_length=1 << 16,
            input_sentence_size=2_000_000, shuffle_input_sentence=True,
            train_extremely_large_corpus=False, logstream=logstream)
    except RuntimeError as e:
      raise _spm_error(str(e), vocab_size, files) from None
    shutil.move(prefix + '.model', out)


def _spm_error(message: str, vocab_size: int, files: list[str]) -> TokenizerError:
  """sentencepiece's training errors in the flags' words."""
  where = f'the input ({len(files)} file(s): {files[0]}{", ..." if len(files) > 1 else ""})'
  high = re.search(r'Vocabulary size (?:is )?too high \((\d+)\).*?<= (\d+)', message)
  if high:
    return TokenizerError(f'--vocab_size={vocab_size} is too large for {where}: it supports at '
                          f'most {high.group(2)} pieces; use a smaller --vocab_size or more text.')
  small = re.search(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)', message)
  if small:
    return TokenizerError(f'--vocab_size={vocab_size} is too small for {where}: its '
                          f'{small.group(2)} distinct characters and the special pieces need '
                          f'more ids; use --vocab_size >= {int(small.group(2)) + 4}.')
  return TokenizerError(f'training a SentencePiece model on {where} failed: '
                        f'{message.strip().splitlines()[-1]}')


def _train_bpe(files, vocab_size, out):
  tokenizers = _import_tokenizers()
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  minimum = 2 + len(alphabet)
  if vocab_size < minimum:
    raise TokenizerError(f'--vocab_size={vocab_size} is too small: a byte-level BPE tokenizer '
                         f'needs at least {minimum} ids (pad, eos and the 256 bytes).')
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[PAD_PIECE, EOS_PIECE], initial_alphabet=alphabet,
      show_progress=False)
  tok.train(files, trainer)
  got = tok.get_vocab_size(with_added_tokens=True)
  if got < vocab_size:
    raise TokenizerError(f'--vocab_size={vocab_size} is too large for the input ({len(files)} '
                         f'file(s): {files[0]}{", ..." if len(files) > 1 else ""}): BPE found '
                         f'only {got} ids; use --vocab_size <= {got} or more text.')
  tmp = out + '.tmp'
  tok.save(tmp)
  os.replace(tmp, out)


# ----------------------------------------------------------------------------
# The command line.

def _parse_command(argv: list[str]) -> list[str]:
  """Parses the flags; the one positional argument must be the command `train`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  rest = flags.FLAGS(argv)
  if rest[1:] != ['train']:
    raise TokenizerError(f'expected the command `train`, got {" ".join(rest[1:]) or "none"} '
                         '(python -m terraflax.tokenizer train --input=PATH --vocab_size=N '
                         '--kind=spm|bpe --out=FILE).')
  return rest[:1]


def main(argv):
  """`python -m terraflax.tokenizer train --input=... --vocab_size=N --kind=spm|bpe --out=F`."""
  del argv  # The command `train` was checked by _parse_command.
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  tok = train(f.input, vocab_size=f.vocab_size, kind=f.kind, out=f.out,
              spm_model_type=f.spm_model_type, byte_fallback=f.byte_fallback)
  print(f'Wrote {tok.path}: {tok.kind} tokenizer, {tok.vocab_size} ids (pad {tok.pad_id}, '
        f'end of document {tok.eos_id}); use it with --config.data.tokenizer={tok.path}',
        flush=True)


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_multi_string('input', None, 'Training text: files, directories (read '
                            'recursively) or globs; repeat the flag for more.')
  flags.DEFINE_integer('vocab_size', None, 'Number of ids, the reserved pad/eos(/unk) included.',
                       lower_bound=1)
  flags.DEFINE_enum('kind', 'spm', list(KINDS), 'spm: a SentencePiece model file; bpe: an HF '
                    'byte-level BPE tokenizer.json.')
  flags.DEFINE_string('out', None, 'The tokenizer file to write.')
  flags.DEFINE_enum('spm_model_type', 'unigram', list(SPM_MODEL_TYPES),
                    'SentencePiece algorithm (--kind=spm).')
  flags.DEFINE_bool('byte_fallback', None, 'SentencePiece byte fallback (every text round-trips; '
                    f'256 pieces); default on when --vocab_size >= {SPM_BYTE_FALLBACK_MIN_VOCAB}.')
  flags.mark_flags_as_required(['input', 'vocab_size', 'out'])


if __name__ == '__main__':
  from terraflax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, name='terraflax.tokenizer', flags_parser=_parse_command)
