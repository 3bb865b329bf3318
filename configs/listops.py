"""ListOps (Long Range Arena): classify the value 0-9 of a nested MAX/MIN/MED/SM expression.

Generated locally in the LRA format; set data.path to a directory with LRA's
basic_train.tsv / basic_val.tsv to read those files instead. LRA uses lengths
500-2000 (seq_len 2000); these defaults are laptop-sized.
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.model = ml_collections.ConfigDict()
  config.model.name = 'TransformerEncoder'  # Bidirectional encoder with a classification head.
  config.model.vocab_size = 16  # Pad, digits 0-9, [MAX [MIN [MED [SM and ].
  config.model.n_classes = 10  # The value of the expression.
  config.model.d_model = 128  # Width of the residual stream.
  config.model.d_ff = 256  # Feed-forward width.
  config.model.n_layers = 2  # Encoder blocks.
  config.model.n_heads = 4  # Attention heads.
  config.model.dropout = 0.1  # Dropout rate in train mode.
  config.model.max_len = 512  # At least data.seq_len.
  config.data.name = 'listops'  # Generated on the fly (or LRA's tsv files in data.path).
  config.data.path = ''  # '' : generate; else a directory with basic_train.tsv, basic_val.tsv.
  config.data.seq_len = 512  # Tokens per example (padded); LRA: 2000.
  config.data.min_len = 32  # Shortest expression in tokens; LRA: 500.
  config.data.max_len = 512  # Longest expression in tokens; LRA: 2000.
  config.data.max_depth = 10  # Deepest nesting; LRA: 10.
  config.data.max_args = 10  # Most arguments per operator; LRA: 10.
  config.data.eval_examples = 512  # Size of the fixed evaluation set.
  config.train.steps = 5000  # Updates.
  config.train.batch_size = 32  # Global batch.
  config.train.eval_every = 500  # Steps between evaluations.
  config.train.eval_batches = -1  # The whole evaluation set.
  config.optimizer.name = 'adamw'  # Adam with decoupled weight decay.
  config.optimizer.learning_rate = 5e-4  # Peak learning rate.
  config.optimizer.weight_decay = 0.01  # Skips biases and norm scales.
  config.sample.max_new_tokens = 0  # Classification: no sample.
  return config
