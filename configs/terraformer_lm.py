"""A decoder-only Terraformer (sparse feed-forward + sparse QKV) on the byte-level corpus."""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'transformer_lm')
  config.model.name = 'TerraformerLM'  # Decoder-only Terraformer (terraflax.models).
  config.model.d_ff = 1024  # Feed-forward width: SparseFF activates one unit per block.
  config.model.ff_sparsity = 32  # Units per SparseFF block (one of them active).
  config.model.qkv_sparsity = 4  # Modules of the multiplicative sparse QKV layer.
  return config
