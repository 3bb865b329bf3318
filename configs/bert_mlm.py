"""BERT-style masked-LM pre-training (`BertMLM`) on the standard library's source, byte by byte.

15% of positions are selected (80% -> [MASK], 10% -> a random byte, 10% kept)
and only they are scored. The pre-trained body then initialises a classifier:

  python -m terraflax.train --config=configs/bert_mlm.py --workdir=runs/bert_mlm
  python -m terraflax.train --config=configs/bert_classify.py --workdir=runs/bert_classify \
      --config.init_from=runs/bert_mlm
"""

import ml_collections
from ml_collections import config_dict

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.model = ml_collections.ConfigDict()
  config.model.name = 'BertMLM'  # Bidirectional encoder with a per-token masked-LM head.
  config.model.vocab_size = 258  # Pad 0, bytes 1..256, [MASK] 257.
  config.model.d_model = 128  # Width of the residual stream.
  config.model.d_ff = 512  # Feed-forward width.
  config.model.n_layers = 2  # Encoder blocks.
  config.model.n_heads = 4  # Attention heads.
  config.model.dropout = 0.1  # Dropout rate in train mode.
  config.model.max_len = 128  # At least data.seq_len.
  config.model.share_layers = False  # ALBERT cross-layer sharing (see configs/albert_mlm.py).
  config.model.d_embedding = config_dict.placeholder(int)  # ALBERT factorised embedding width (None: d_model).
  config.data.name = 'mlm'  # Masked windows of the corpus's bytes.
  config.data.seq_len = 128  # Bytes per example.
  config.data.mask_rate = 0.15  # Fraction of positions selected for prediction.
  config.train.steps = 1000  # Updates.
  config.train.batch_size = 16  # Global batch.
  config.train.eval_every = 500  # Steps between evaluations.
  config.train.checkpoint_every = 500  # Steps between checkpoints.
  config.optimizer.name = 'adamw'  # Adam with decoupled weight decay.
  config.optimizer.learning_rate = 1e-3  # Peak learning rate.
  config.optimizer.weight_decay = 0.01  # Skips biases and norm scales.
  config.sample.max_new_tokens = 0  # Not a left-to-right LM: no sample.
  return config
