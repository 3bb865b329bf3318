"""Real text on disk for language models: sources, packing, prepared ArrayRecord shards.

  sources.py   documents of plain text / JSON Lines / Parquet / ArrayRecord files
  packing.py   documents (+ end-of-document id) into seq_len rows, with segment ids
  corpus.py    split, tokenization, tokenizer training, `prepare` (ArrayRecord shards)

`python -m terraflax.data prepare --path=... --tokenizer=... --out=DIR`
tokenizes a corpus once; `config.data.path=DIR` then trains from it. The
training pipeline (`config.data.name='text'`) is `terraflax.train.data`'s.
"""

from terraflax.data.corpus import open_corpus as open_corpus
from terraflax.data.corpus import prepare as prepare
from terraflax.data.packing import pack as pack
from terraflax.data.sources import DataError as DataError
