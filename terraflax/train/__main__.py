"""`python -m terraflax.train --config=configs/NAME.py --workdir=DIR [--config.a.b=value ...]`.

Trains (`trainer.train_and_evaluate`), or, when any `config.eval.*` field is
set, scores a checkpoint of DIR without training (`eval_only.evaluate_checkpoint`).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from terraflax.train import eval_only
from terraflax.train.config import ConfigError
from terraflax.train.trainer import TrainingDivergedError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    # The trainer prints its own progress lines; orbax's and jax's INFO logs are opt-in
    # (--verbosity=0).
    logging.set_verbosity(logging.WARNING)
  try:
    if eval_only.requested(_CONFIG.value):
      eval_only.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
    else:
      train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, TrainingDivergedError) as e:
    sys.exit(f'terraflax.train: {e}')


if __name__ == '__main__':
  app.run(main)
