"""ALBERT: `configs/bert_mlm.py` with one shared encoder block and factorised embeddings.

The block's parameters exist once however deep the model is (the printed
parameter count shows it), and tokens embed to d_embedding = 32 before a
projection to d_model.

  python -m terraflax.train --config=configs/albert_mlm.py --workdir=runs/albert_mlm
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'bert_mlm')
  config.model.n_layers = 4  # Four applications of the one shared block.
  config.model.share_layers = True  # Cross-layer parameter sharing.
  config.model.d_embedding = 32  # Factorised embedding: 258 x 32 plus a 32 x 128 projection.
  return config
