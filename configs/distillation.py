"""Knowledge distillation: a small student LM learns from a trained `configs/transformer_lm.py`.

The student (d_model 64, one layer) minimises (1 - alpha) * cross-entropy
on the bytes + alpha * T^2 * KL(teacher || student) at temperature T. Reported
losses are the student's cross-entropy; compare with the same config trained
without a teacher (--config.distill.teacher_workdir='').

  python -m terraflax.train --config=configs/transformer_lm.py --workdir=runs/transformer_lm
  python -m terraflax.train --config=configs/distillation.py --workdir=runs/distillation \
      --config.distill.teacher_workdir=runs/transformer_lm
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'transformer_lm')  # Same data as the teacher's.
  config.model.d_model = 64  # The student: half the teacher's width,
  config.model.d_ff = 256  # a quarter of its feed-forward width,
  config.model.n_layers = 1  # and half its depth.
  config.distill = ml_collections.ConfigDict()
  config.distill.teacher_workdir = ''  # A trained LM's workdir ('' : no teacher).
  config.distill.temperature = 2.0  # Softens both distributions.
  config.distill.alpha = 0.5  # Weight of the teacher's term (0: labels only).
  return config
