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
import jax.numpy as jnp

from terraflax.train import checkpoint as ckpt
from terraflax.train import config as config_lib
from terraflax.train import data as data_lib


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
  config = experiment.config
  workdir = config.distill.teacher_workdir
  teacher_config, params = ckpt.load_for_inference(workdir)
  model = ckpt.model_from_config(teacher_config, 'eval')
  task = experiment.data.info.task
  teacher_task = data_lib.TASKS.get(teacher_config.data.name, 'lm')
  if teacher_task != task:
    raise config_lib.ConfigError(
        f'config.distill.teacher_workdir={workdir!r} holds a {teacher_task} model '
        f'(data.name={teacher_config.data.name!r}); the student is trained for {task}.')
  shape = (config.train.batch_size // config.train.grad_accum_steps, config.data.seq_len)
  batch = {'inputs': jax.ShapeDtypeStruct(shape, jnp.int32),
           'targets': jax.ShapeDtypeStruct(shape, jnp.int32)}
  inputs = config_lib.model_inputs(batch, task)
  key = jax.eval_shape(jax.random.key, 0)  # Abstract: nothing is computed.

  def logits_shape(m, p):
    return jax.eval_shape(
        lambda p, x, k: m.apply({'params': p}, *x,
                                rngs={s: k for s in config_lib.RNG_STREAMS if s != 'params'}),
        p, inputs, key).shape

  want = logits_shape(experiment.model('eval'),
                      nn.meta.unbox(experiment.abstract_variables['params']))
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
                    alpha=float(config.distill.alpha), workdir=workdir,
                    name=teacher_config.model.get('name', '?'))
  return teacher, params
