"""FNet (Fourier mixing instead of attention) on ListOps; compare with configs/listops.py.

  python -m terraflax.train --config=configs/fnet_listops.py --workdir=runs/fnet_listops

To mix kinds per layer, use model.name = 'TransformerEncoder' with e.g.
model.mixing = ('fourier', 'attention').
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'listops')
  del config.model['n_heads']  # FNet has no attention heads.
  config.model.name = 'FNet'  # Re(FFT2) token mixing: no attention parameters, O(l log l).
  return config
