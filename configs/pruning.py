"""Gradual magnitude pruning while fine-tuning a trained configs/transformer_lm.py model.

  python -m terraflax.train --config=configs/transformer_lm.py --workdir=runs/transformer_lm
  python -m terraflax.train --config=configs/pruning.py --workdir=runs/pruned_50 \
      --config.init_from=runs/transformer_lm [--config.pruning.sparsity=0.75]

The sparsity follows Zhu & Gupta's cubic schedule from start_step to end_step
(masks in the optimizer state; pruned weights are exactly 0 from then on), and
the rest of the run fine-tunes the surviving weights. Structured pruning (a
genuinely smaller model) is `python -m terraflax.prune`; benchmarks/pruning.py
compares both.
"""

import ml_collections

from terraflax.train import pruning
from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'transformer_lm')
  config.init_from = ''  # The trained dense workdir to prune (set on the command line).
  config.train.steps = 500  # Fine-tuning updates in total.
  config.optimizer.learning_rate = 1e-3  # Lower than from scratch: the weights are trained.
  config.optimizer.warmup_steps = 20  # Short warm-up.
  config.pruning = ml_collections.ConfigDict()
  config.pruning.method = 'magnitude'  # 'none' or 'magnitude' (smallest |w| pruned).
  config.pruning.scope = 'global'  # 'global' (one threshold) or 'per_layer'.
  config.pruning.sparsity = 0.5  # Final fraction of the pruned parameters set to 0.
  config.pruning.start_step = 1  # First step of the schedule (equal to end_step: one-shot).
  config.pruning.end_step = 400  # Target sparsity from here on; the rest fine-tunes.
  config.pruning.frequency = 25  # Steps between mask updates on the way.
  config.pruning.power = 3  # The schedule's exponent (3: cubic).
  config.pruning.params = pruning.DEFAULT_PARAMS  # Attention and feed-forward dense kernels.
  return config
