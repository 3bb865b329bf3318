"""A ReformerLM on real English text with a 4K SentencePiece vocabulary, documents packed.

The corpus needs no download: `terraflax.data.corpora.python_docs_path()`
writes, on first use, a JSON Lines file of the English reference text that
ships with every Python (the `pydoc_data.topics` documentation topics that
`help()` shows, about 465K characters, plus the standard library's long module
docstrings, about 114K) into ~/.cache/terraflax ($TERRAFLAX_CACHE). The last
5% of its documents (ordered by a hash of their titles) are the eval split.

The tokenizer is a SentencePiece unigram model of 4096 pieces trained on the
training documents on first use and kept in the workdir (WORKDIR/tokenizer.model),
so the workdir decodes and exports text on its own. Documents end with the
end-of-document id and are packed into rows of data.seq_len tokens with
segment_ids/positions (attention does not cross documents).

  python -m terraflax.train --config=configs/text_lm.py --workdir=runs/text_lm
  # Your own corpus and tokenizer:
  python -m terraflax.tokenizer train --input=corpus/ --vocab_size=4096 --kind=spm --out=tok.model
  python -m terraflax.train --config=configs/text_lm.py --workdir=runs/mine \
      --config.data.path='corpus/*.txt' --config.data.format=text --config.data.tokenizer=tok.model
  # The same text byte by byte (bits per byte compare across tokenizers):
  python -m terraflax.train --config=configs/text_lm.py --workdir=runs/text_bytes \
      --config.data.tokenizer=bytes --config.model.vocab_size=256
"""

import ml_collections

from terraflax.data import corpora
from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.model.vocab_size = 4096  # The SentencePiece vocabulary (256 for data.tokenizer=bytes).
  config.model.max_len = 256  # Longest sequence: data.seq_len.
  config.data.name = 'text'  # Real text: tokenized, packed documents (terraflax/data/).
  config.data.path = corpora.python_docs_path()  # Python's own documentation, as JSON Lines.
  config.data.format = 'jsonl'  # One {"title", "text"} object per line.
  config.data.field = 'text'  # The JSON field holding the document.
  config.data.eval_path = ''  # '': the last eval_fraction of the documents.
  config.data.eval_fraction = 0.05  # Of the documents (8 of about 160).
  config.data.tokenizer = 'train'  # SentencePiece trained on first use (or a file, or 'bytes').
  config.data.tokenizer_vocab_size = 4096  # Pieces of the trained tokenizer (pad, eos, unk too).
  config.data.pack = True  # Documents packed with segment_ids/positions.
  config.data.seq_len = 256  # Tokens per row.
  config.data.utf8_errors = 'error'  # Invalid UTF-8 in the corpus is an error naming the file.
  config.data.num_workers = 0  # grain worker processes tokenizing (0: in the trainer's process).
  config.train.steps = 600  # Optimizer updates.
  config.train.log_every = 50  # Steps between logs.
  config.train.eval_every = 100  # Steps between evaluations.
  config.train.eval_batches = -1  # The whole eval split (exact bits per byte).
  config.train.checkpoint_every = 200  # Steps between checkpoints.
  config.train.eval_position_buckets = 4  # eval/loss_by_position/0-63, 64-127, ...
  config.sample.prompt = 'The '  # Text the end-of-training sample continues.
  config.sample.max_new_tokens = 64  # Tokens of that sample (0: none).
  return config
