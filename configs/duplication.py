"""The Reformer paper's duplication task: sequences `0 w 0 w`, loss on the second copy.

Paper (Kitaev et al. 2020, Table 2): |w| = 511 (seq_len 1024), symbols 1..127, a
1-layer ReformerLM with d_model = d_ff = 256 and 4 heads, trained with LSH
(1, 2 or 4 hash rounds) or full attention. The defaults here are laptop-sized:
|w| = 127, 1500 steps of 16 sequences (benchmarks/duplication_table.py; about 6
minutes per row on a 2-core CPU).

The fields to vary: |w| is `data.seq_len` = 2 * (|w| + 1) (the model's max_len
follows it), the training length is `train.steps`, the hash rounds
`model.attention.n_hashes`:

  python -m terraflax.train --config=configs/duplication.py --workdir=runs/dup \
      --config.data.seq_len=1024 --config.train.steps=20000 --config.model.attention.n_hashes=2

The paper's "full attention" is full *shared-QK* attention, which is LSH
attention with one bucket and one chunk covering the sequence; train it with
  --config.model.attention.n_hashes=1 --config.model.attention.n_buckets=1 \
      --config.model.attention.chunk_len=256 --config.model.attention.n_chunks_before=0
(chunk_len = seq_len). `model.attention = {'kind': 'full'}` would instead use
separate queries and keys, which cannot be scored with LSH. Score a trained
workdir with other hash rounds, or with full attention, without training:
  ... --config.eval.n_hashes=8      ... --config.eval.attention=full
(see terraflax/train/eval_only.py; results go to WORKDIR/eval_results.jsonl).

LSH buckets follow Trax's rule from the length (2 per chunk).
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.data.name = 'duplication'  # `0 w 0 w`, generated on the fly.
  config.data.path = ''  # Not used: the data is generated.
  config.data.seq_len = 256  # 2 * (|w| + 1): |w| = 127 (paper: 1024, |w| = 511).
  config.data.vocab_size = 128  # Symbols of w are 1..vocab_size-1 (paper: 127 symbols).
  config.data.eval_examples = 256  # Size of the fixed evaluation set.
  config.model.vocab_size = 128  # Symbols 1..127 and the separator 0.
  config.model.d_model = 256  # Paper: 256.
  config.model.d_ff = 256  # Paper: 256.
  config.model.n_layers = 1  # Paper: 1 layer.
  config.model.n_heads = 4  # Paper: 4 heads.
  config.model.attention.kind = 'lsh'  # LSH attention (the paper also trains full attention).
  config.model.attention.n_hashes = 4  # LSH rounds during training (paper: 1, 2 or 4).
  config.model.attention.chunk_len = 16  # LSH chunk length: 16 chunks, 32 buckets at seq_len 256.
  # Learned positions: with axial ones (8 x 8 at |w| = 31, full attention) training stalled
  # at 74% accuracy, the positions of two axial columns never finding their copy.
  config.model.positions = 'learned'  # Not 'axial': see above.
  config.model.dropout = 0.0  # Nothing to regularise: the data is endless.
  # An int placeholder, so that --config.model.attention.n_buckets=1 works (1 bucket and
  # chunk_len=seq_len: full shared-QK attention).
  del config.model.attention['n_buckets']  # An int (8) in the base config.
  config.model.attention.n_buckets = ml_collections.config_dict.placeholder(int)  # None: 2/chunk.
  config.model.attention.n_chunks_before = 1  # Chunks each LSH chunk also attends to (0: full).
  config.model.max_len = config.data.get_ref('seq_len')  # Follows --config.data.seq_len.
  config.train.steps = 1500  # Updates (full, LSH-4, LSH-2 train past 98% by step 500).
  config.train.batch_size = 16  # Global batch.
  config.train.eval_every = 1500  # Steps between evaluations.
  config.train.eval_batches = -1  # The whole evaluation set.
  config.optimizer.learning_rate = 3e-3  # Peak learning rate (cosine decay).
  config.optimizer.warmup_steps = 100  # Linear warm-up.
  config.sample.max_new_tokens = 0  # No text sample: the tokens are not bytes.
  return config
