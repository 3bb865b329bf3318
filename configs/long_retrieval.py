"""Long-document key-value retrieval: the answers are tens of thousands of tokens back.

Each sequence opens with a directory: `data.n_pairs` distinct keys filed
under `data.n_values` value headers (equal sections), then filler, then
`data.n_queries` queries "key value" for distinct filed keys; only the
queried values are scored (terraflax/train/data.py, `retrieval_example`).
`eval/accuracy` is the answer accuracy; `eval/chance` = 1 / data.n_values is
what guessing gets. At seq_len 65536 every answer is more than 60K positions
after its key, so local attention alone is at chance; full attention cannot
run there on this machine (README, "Long documents").

The model is a 1-layer ReformerLM with LSH attention (shared-QK: a query key
hashes with its earlier occurrence, the same token, and reads that
position). Learned positions: small at init (axial ones start ten times the
token embeddings, and hashing would see positions rather than tokens), and
they learn where each section lies. n_buckets is fixed (not Trax's rule from
the length) so that equal tokens collide as often at 64K as at 2K.

  python -m terraflax.train --config=configs/long_retrieval.py --workdir=runs/retrieval64k

A short version that learns in a few minutes:
  python -m terraflax.train --config=configs/long_retrieval.py --workdir=runs/retrieval2k \\
      --config.data.seq_len=2048 --config.data.n_pairs=256 --config.data.eval_examples=4 \\
      --config.train.batch_size=4
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.data.name = 'retrieval'  # Key-value retrieval, generated on the fly.
  config.data.path = ''  # Not used: the data is generated.
  config.data.seq_len = 65536  # Tokens per sequence.
  config.data.n_pairs = 1024  # Keys filed in the directory (n_values sections of 64).
  config.data.n_queries = 0  # Keys asked at the end (0: all n_pairs of them).
  config.data.n_keys = 1024  # Key alphabet (>= n_pairs).
  config.data.n_values = 16  # Value alphabet (sections): chance is 1/16.
  config.data.n_filler = 1  # Filler alphabet.
  config.data.eval_examples = 2  # Fixed evaluation sequences (2048 answers).
  config.model.vocab_size = 1 + 1 + 1024 + 16  # 0, filler, keys, values (>= the data's).
  config.model.d_model = 64  # Width of each residual stream.
  config.model.d_ff = 128  # Feed-forward hidden width.
  config.model.n_layers = 1  # One LSH layer.
  config.model.n_heads = 2  # Attention heads.
  config.model.positions = 'learned'  # See above.
  config.model.attention.kind = 'lsh'  # Shared-QK LSH attention.
  config.model.attention.n_hashes = 2  # Hash rounds.
  config.model.attention.chunk_len = 64  # Positions per chunk.
  config.model.attention.n_buckets = 64  # Fixed: equal tokens collide as often at any length.
  config.model.max_len = config.data.get_ref('seq_len')  # Follows --config.data.seq_len.
  config.train.steps = 150  # Updates (about 30 minutes on 2 busy CPU cores).
  config.train.batch_size = 1  # One 64K sequence per step.
  config.train.log_every = 10  # Steps between metrics lines.
  config.train.eval_every = 15  # Steps between evaluations (the curve's points).
  config.train.eval_batches = -1  # The whole evaluation set.
  config.train.checkpoint_every = 50  # Steps between checkpoints.
  config.optimizer.learning_rate = 2e-3  # Peak learning rate (cosine decay).
  config.optimizer.warmup_steps = 20  # Linear warm-up.
  config.sample.max_new_tokens = 0  # No text sample: the tokens are not bytes.
  return config
