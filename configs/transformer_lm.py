"""A decoder-only Transformer on the same byte-level corpus as configs/default.py."""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.model = ml_collections.ConfigDict()
  config.model.name = 'TransformerLM'  # Full causal dot-product attention.
  config.model.vocab_size = 256  # Byte-level: one token per byte.
  config.model.d_model = 128  # Width of the residual stream.
  config.model.d_ff = 512  # Hidden width of each feed-forward block.
  config.model.n_layers = 2  # Attention + feed-forward blocks.
  config.model.n_heads = 4  # Attention heads; d_model must be divisible by n_heads.
  config.model.dropout = 0.0  # Dropout rate in train mode.
  config.model.max_len = 256  # Longest sequence the positional encoding supports.
  config.model.dtype = 'float32'  # Compute dtype ('bfloat16' for mixed precision).
  return config
