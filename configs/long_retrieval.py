"""Long-document key-value retrieval: the answers are tens of thousands of tokens back.

Each sequence opens with `data.n_pairs` definitions "key value" (distinct
keys, uniform random values), continues with filler, and ends with
`data.n_queries` queries "key value" for distinct defined keys; only the
queried values are scored (terraflax/train/data.py, `retrieval_example`).
`eval/accuracy` is the answer accuracy; `eval/chance` = 1 / data.n_values is
what guessing gets. At seq_len 65536 every answer is more than 64K positions
after its definition, so local attention alone is at chance; full attention
cannot run there on this machine (README, "Long documents").

The model is a 2-layer ReformerLM: a causal local attention layer (windows of
4-8 positions: it gives each value its key) then an LSH layer (shared-QK: a
query key hashes with the definition that carries the same key and reads its
value).

  python -m terraflax.train --config=configs/long_retrieval.py --workdir=runs/retrieval64k

A short version that learns in a few minutes:
  python -m terraflax.train --config=configs/long_retrieval.py --workdir=runs/retrieval2k \\
      --config.data.seq_len=2048 --config.train.batch_size=4
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.data.name = 'retrieval'  # Key-value retrieval, generated on the fly.
  config.data.path = ''  # Not used: the data is generated.
  config.data.seq_len = 65536  # Tokens per sequence.
  config.data.n_pairs = 64  # Keys defined at the start of each sequence.
  config.data.n_queries = 0  # Keys asked at the end (0: all n_pairs of them).
  config.data.n_keys = 64  # Key alphabet (>= n_pairs).
  config.data.n_values = 16  # Value alphabet: chance is 1/16.
  config.data.n_filler = 1  # Filler alphabet.
  config.data.eval_examples = 4  # Fixed evaluation sequences.
  config.model.vocab_size = 1 + 1 + 64 + 16  # 0, filler, keys, values (>= the data's).
  config.model.d_model = 128  # Width of each residual stream.
  config.model.d_ff = 256  # Feed-forward hidden width.
  config.model.n_layers = 2  # One local layer, one LSH layer.
  config.model.n_heads = 2  # Attention heads.
  config.model.positions = 'learned'  # Small at init (axial ones start 10x the tokens: hashing
  # would see positions, not tokens).
  del config.model.attention  # A dict in the base config; here a list of two specs.
  config.model.attention = (
      {'kind': 'local', 'chunk_len': 1, 'n_chunks_before': 1},  # Each token and its predecessor.
      {'kind': 'lsh', 'n_hashes': 2, 'chunk_len': 64, 'n_buckets': None},  # Buckets: 2/chunk.
  )
  config.model.max_len = config.data.get_ref('seq_len')  # Follows --config.data.seq_len.
  config.train.steps = 300  # Updates.
  config.train.batch_size = 1  # One 64K sequence per step.
  config.train.log_every = 10  # Steps between metrics lines.
  config.train.eval_every = 25  # Steps between evaluations (the curve's points).
  config.train.eval_batches = -1  # The whole evaluation set.
  config.train.checkpoint_every = 50  # Steps between checkpoints.
  config.optimizer.learning_rate = 2e-3  # Peak learning rate (cosine decay).
  config.optimizer.warmup_steps = 20  # Linear warm-up.
  config.sample.max_new_tokens = 0  # No text sample: the tokens are not bytes.
  return config
