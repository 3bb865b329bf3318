"""The Reformer paper's duplication task: sequences `0 w 0 w`, loss on the second copy.

Paper: |w| = 511 (seq_len 1024), symbols 1..127, a 1-layer model with
d_model = d_ff = 256 and 4 heads. Defaults here are laptop-sized (|w| = 127).
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.model.vocab_size = 128  # Symbols 1..127 and the separator 0.
  config.model.d_model = 256  # Paper: 256.
  config.model.d_ff = 256  # Paper: 256.
  config.model.n_layers = 1  # Paper: 1 layer.
  config.model.n_heads = 4  # Paper: 4 heads.
  config.model.n_hashes = 4  # LSH rounds during training.
  config.model.chunk_len = 32  # LSH chunk length.
  config.model.max_len = 256  # At least data.seq_len.
  config.data.name = 'duplication'  # `0 w 0 w`, generated on the fly.
  config.data.path = ''  # Not used: the data is generated.
  config.data.seq_len = 256  # 2 * (|w| + 1): |w| = 127 (paper: 1024, |w| = 511).
  config.data.vocab_size = 128  # Symbols of w are 1..vocab_size-1.
  config.data.eval_examples = 256  # Size of the fixed evaluation set.
  config.train.steps = 5000  # Updates.
  config.train.batch_size = 16  # Global batch.
  config.train.eval_every = 500  # Steps between evaluations.
  config.train.eval_batches = -1  # The whole evaluation set.
  config.optimizer.learning_rate = 1e-3  # Peak learning rate.
  config.optimizer.warmup_steps = 500  # Linear warm-up.
  config.sample.max_new_tokens = 0  # No text sample: the tokens are not bytes.
  return config
