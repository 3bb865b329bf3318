"""The Reformer paper's duplication task: sequences `0 w 0 w`, loss on the second copy.

Paper (Kitaev et al. 2020, Table 2): |w| = 511 (seq_len 1024), symbols 1..127, a
1-layer ReformerLM with d_model = d_ff = 256 and 4 heads, trained with LSH
(1, 2 or 4 hash rounds) or full attention. The defaults here are laptop-sized.

The fields to vary: |w| is `data.seq_len` = 2 * (|w| + 1) (the model's max_len
follows it), the training length is `train.steps`, the attention is
`model.attention_type` ('lsh' or 'full') with `model.n_hashes` rounds:

  python -m terraflax.train --config=configs/duplication.py --workdir=runs/dup \
      --config.data.seq_len=1024 --config.train.steps=20000 --config.model.n_hashes=2

LSH buckets follow Trax's rule from the length (2 per chunk); in 'predict'
mode from max_len, which equals seq_len here.
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
  config.model.attention_type = 'lsh'  # 'lsh' or 'full' (the paper trains both).
  config.model.n_hashes = 4  # LSH rounds during training (paper: 1, 2 or 4).
  config.model.chunk_len = 32  # LSH chunk length.
  del config.model['n_buckets']  # None: Trax's rule, 2 * length // chunk_len buckets.
  config.model.max_len = config.data.get_ref('seq_len')  # Follows --config.data.seq_len.
  config.train.steps = 5000  # Updates.
  config.train.batch_size = 16  # Global batch.
  config.train.eval_every = 500  # Steps between evaluations.
  config.train.eval_batches = -1  # The whole evaluation set.
  config.optimizer.learning_rate = 1e-3  # Peak learning rate.
  config.optimizer.warmup_steps = 500  # Linear warm-up.
  config.sample.max_new_tokens = 0  # No text sample: the tokens are not bytes.
  return config
