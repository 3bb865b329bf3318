"""`terraformer_lm` with LSH attention: a TerraformerLM whose layers hash and chunk like Reformer's.

  python -m terraflax.train --config=configs/terraformer_lsh.py --workdir=runs/terraformer_lsh

Trained, its checkpoint can be scored with other LSH settings on the same
parameters (terraflax/train/eval_only.py), e.g. eight hash rounds or full
shared-QK attention:

  python -m terraflax.train --config=configs/terraformer_lsh.py --workdir=runs/terraformer_lsh \
      --config.eval.n_hashes=8
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'terraformer_lm')
  # The attention spec (terraflax.models.attention) as a dict, replacing sparse QKV.
  config.model.attention = ml_collections.ConfigDict()
  config.model.attention.kind = 'lsh'  # LSHSelfAttention: hashed, chunked, shared-QK, causal.
  config.model.attention.n_hashes = 2  # Hash rounds in training (eval.n_hashes rescoring).
  config.model.attention.chunk_len = 64  # Positions per chunk.
  config.model.attention.n_buckets = 8  # Buckets per round: 2 per chunk of data.seq_len 256.
  config.model.attention.n_chunks_before = 1  # Chunks each chunk also attends to.
  return config
