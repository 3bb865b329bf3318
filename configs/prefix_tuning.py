"""Prefix tuning: adapt a trained `configs/transformer_lm.py` model to a new corpus.

The base LM (trained on the standard library's top-level modules) is loaded
with --config.init_from and frozen; only 16 key/value prefix vectors per
attention layer are trained, on the `email` package's source, which the base
model never saw. The trainer prints and writes (WORKDIR/parameters.json) how
many parameters were trained: 2 layers x 16 positions x (key + value) x 128 =
8,192 of the model's parameters. `terraflax.layers.prefix.split_prefix` takes
the learned prefix out of the checkpoint; one base model serves many of them.

  python -m terraflax.train --config=configs/transformer_lm.py --workdir=runs/transformer_lm
  python -m terraflax.train --config=configs/prefix_tuning.py --workdir=runs/prefix_tuning \
      --config.init_from=runs/transformer_lm
"""

import os

import ml_collections

from terraflax.layers.prefix import PREFIX_PATTERN
from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'transformer_lm')  # The base model's architecture.
  config.init_from = ''  # The base LM's workdir (set with --config.init_from=DIR).
  config.model.attention = ml_collections.ConfigDict()  # Full attention with prefix tuning:
  config.model.attention.kind = 'full'  # The base model's attention,
  config.model.attention.n_prefix = 16  # plus trainable key/value positions at every layer.
  config.optimizer.trainable = PREFIX_PATTERN  # Train prefix_key/prefix_value only.
  config.optimizer.learning_rate = 1e-2  # Prefixes take a larger learning rate.
  config.optimizer.warmup_steps = 50  # Linear warm-up from 0.
  config.data.path = os.path.join(os.path.dirname(os.__file__), 'email')  # The new domain.
  config.data.eval_fraction = 0.1  # Bytes of the email package held out for evaluation.
  config.train.steps = 500  # Updates.
  config.train.eval_every = 250  # Steps between evaluations.
  config.train.checkpoint_every = 250  # Steps between checkpoints.
  config.sample.prompt = 'def '  # Text the final sample continues.
  return config
