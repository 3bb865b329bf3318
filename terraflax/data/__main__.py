"""`python -m terraflax.data prepare --path=CORPUS --tokenizer=FILE|bytes --out=DIR`.

Tokenizes the documents of `--path` (files, directories, globs; formats as
`config.data.format`) once into ArrayRecord shards in `--out`, with a progress
line every few seconds; train from them with `--config.data.path=DIR`.
"""

from absl import flags

from terraflax import cli
from terraflax import tokenizer as tokenizer_lib
from terraflax.data import corpus
from terraflax.data import sources

_PATH = flags.DEFINE_string('path', None, 'The corpus: files, directories or globs, '
                            'comma-separated.')
_FORMAT = flags.DEFINE_enum('format', 'auto', list(sources.FORMATS),
                            'File format (auto: by extension; see terraflax/data/sources.py).')
_FIELD = flags.DEFINE_string('field', 'text', 'The JSON Lines field / Parquet column holding '
                             'the text.')
_TOKENIZER = flags.DEFINE_string('tokenizer', 'bytes', "'bytes' or a SentencePiece model / HF "
                                 'tokenizer.json file.')
_OUT = flags.DEFINE_string('out', None, 'The directory to write (must not hold a prepared '
                           'corpus).')
_N_SHARDS = flags.DEFINE_integer('n_shards', 1, 'ArrayRecord shards to write.', lower_bound=1)
_UTF8_ERRORS = flags.DEFINE_enum('utf8_errors', 'error', list(sources.UTF8_ERRORS),
                                 "Invalid UTF-8: 'error' names the file, 'replace' uses U+FFFD.")
flags.mark_flags_as_required(['path', 'out'])


def parse(argv):
  if len(argv) < 2 or argv[1] != 'prepare':
    raise sources.DataError(f'expected the command `prepare`, got {" ".join(argv[1:2]) or "none"}'
                            ' (python -m terraflax.data prepare --path=CORPUS --tokenizer=FILE '
                            '--out=DIR).')
  return flags.FLAGS([argv[0]] + argv[2:])


def main(argv):
  del argv
  documents = corpus.open_corpus(_PATH.value, format=_FORMAT.value, field=_FIELD.value,
                                 utf8_errors=_UTF8_ERRORS.value, config_field='--path')
  tokenizer = tokenizer_lib.load(_TOKENIZER.value)
  meta = corpus.prepare(documents, tokenizer, _OUT.value, n_shards=_N_SHARDS.value,
                        progress=lambda line: print(line, flush=True))
  print(f'Wrote {meta["n_documents"]:,} documents ({meta["n_tokens"]:,} {tokenizer.kind} tokens, '
        f'{meta["n_bytes"]:,} bytes) to {_OUT.value}; train on it with '
        f'--config.data.path={_OUT.value}', flush=True)


if __name__ == '__main__':
  cli.run(main, name='terraflax.data', user_errors=(sources.DataError,), flags_parser=parse)
