"""A decoder-only Terraformer (sparse feed-forward + sparse QKV, reversible) on the byte corpus.

  python -m terraflax.train --config=configs/terraformer_lm.py --workdir=runs/terraformer_lm
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'transformer_lm')
  config.model.name = 'TerraformerLM'  # Decoder-only Terraformer (terraflax.models).
  config.model.d_ff = 1024  # Feed-forward width: SparseFF activates one unit per block.
  config.model.ff_sparsity = 32  # Units per SparseFF block (one active); 0: dense feed-forward.
  config.model.ff_d_lowrank = 32  # Width of the SparseFF controller's low-rank bottleneck.
  config.model.ff_temperature = 0.1  # Gumbel-softmax temperature of the controller in training.
  config.model.ff_quant_prob = 0.3  # Probability of the hard (one-hot) mask per training call.
  # The attention spec (terraflax.models.attention) as a dict; configs/terraformer_lsh.py: LSH.
  config.model.attention = ml_collections.ConfigDict()
  config.model.attention.kind = 'sparse_qkv'  # 'full', 'sparse_qkv' (multiplicative + conv), 'lsh'.
  config.model.attention.n_modules = 4  # Sparse QKV modules (S); defaults to n_heads.
  config.model.attention.length_kernel_size = 3  # Causal conv width along the length.
  config.model.reversible = True  # Reversible backward pass: memory flat in n_layers.
  config.model.merge_streams = 'concat'  # How the two residual streams end: 'concat' or 'mean'.
  return config
