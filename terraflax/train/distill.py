"""Knowledge distillation in the trainer: `config.distill.teacher_workdir`.

The teacher is the latest checkpoint of another training workdir, rebuilt
from its `config.json` in 'eval' mode; it may be any model whose logits have
the student's shape (a bigger Transformer, a Reformer, ...). Each train step
runs it on the batch and the student minimises
`terraflax.layers.distillation.distillation_sum` (labels and the teacher's
softened logits, `distill.temperature` and `distill.alpha`). Reported
`train/loss` and every `eval/*` metric stay the student's cross-entropy on
the labels, so runs with and without a teacher compare directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from terraflax import rng as rng_lib
from terraflax.models import spec as spec_lib
from terraflax.train import config as config_lib


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A teacher model (eval mode) and how its logits enter the loss."""

  model: Any
  temperature: float
  alpha: float
  workdir: str
  name: str


def load_teacher(experiment: config_lib.Experiment):
  """(Teacher, teacher params on the default device) for `config.distill`.

  Raises `ConfigError` naming `distill.teacher_workdir` when the teacher's
  logits do not have the student's shape.
  """
  config, spec = experiment.config, experiment.spec
  workdir = config.distill.teacher_workdir
  with config_lib.model_errors():
    teacher_config, teacher_spec, params = spec_lib.load_workdir(workdir)
  if teacher_spec.task != spec.task:
    raise config_lib.ConfigError(
        f'config.distill.teacher_workdir={workdir!r} holds a {teacher_spec.task} model '
        f'(data.name={teacher_config.data.name!r}); the student is trained for {spec.task}.')
  shape = (config.train.batch_size // config.train.grad_accum_steps, config.data.seq_len)
  inputs = spec.abstract_inputs(*shape)
  model = teacher_spec.build('eval')

  def logits_shape(m, p):  # Abstract: nothing is computed.
    return jax.eval_shape(lambda p, x, k: m.apply({'params': p}, *x, rngs=k), p, inputs,
                          rng_lib.abstract_keys(rng_lib.NOISE_STREAMS)).shape

  want = logits_shape(spec.build('eval'), nn.meta.unbox(experiment.abstract_variables['params']))
  try:
    got = logits_shape(model, params)
  except Exception as e:  # pylint: disable=broad-except
    raise config_lib.ConfigError(
        f'config.distill.teacher_workdir={workdir!r}: the teacher cannot take this config\'s '
        f'inputs {shape}: {type(e).__name__}: {e}') from e
  if got != want:
    raise config_lib.ConfigError(
        f'config.distill.teacher_workdir={workdir!r}: the teacher gives logits of shape {got}, '
        f'the student {want}; they must agree (same vocabulary or classes).')
  teacher = Teacher(model=model, temperature=float(config.distill.temperature),
                    alpha=float(config.distill.alpha), workdir=workdir, name=teacher_spec.name)
  return teacher, params
