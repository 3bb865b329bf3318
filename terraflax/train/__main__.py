"""`python -m terraflax.train --config=configs/NAME.py --workdir=DIR [--config.a.b=value ...]`.

Trains (`trainer.train_and_evaluate`), or, when any `config.eval.*` field is
set, scores a checkpoint of DIR without training (`eval_only.evaluate_checkpoint`).
Errors end in one line through `terraflax.cli.run`.
"""

from absl import flags

from terraflax import cli
from terraflax.train import config as config_lib
from terraflax.train import eval_only
from terraflax.train.config import ConfigError
from terraflax.train.trainer import TrainingDivergedError, train_and_evaluate

# Every schema field with a default (the required ones hold a sentinel object, not a value) is
# overridable on every config, e.g. --config.init_from=DIR on a config that does not declare it.
_DEFAULTS = {path: field.default for path, field in config_lib.SCHEMA.items()
             if isinstance(field.default, (bool, int, float, str, tuple, list))}
_CONFIG = cli.define_config_file('config', defaults=_DEFAULTS)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # cli.run refuses extra arguments.
  if eval_only.requested(_CONFIG.value):
    eval_only.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  else:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main, name='terraflax.train', user_errors=(ConfigError, TrainingDivergedError))
