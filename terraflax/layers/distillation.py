"""Knowledge distillation (Hinton et al. 2015): learn from a teacher's softened predictions.

For student logits s, teacher logits t, label y, temperature T and weight a,
the loss at one scored position is

  (1 - a) * CE(softmax(s), y)  +  a * T^2 * KL(softmax(t / T) || softmax(s / T))

The T^2 keeps the soft term's gradients on the scale of the hard term's as T
grows. `distillation_sum` returns (sum of weighted losses, sum of weights),
like the other metrics, so that batches and devices add up exactly; the
teacher's logits get no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from terraflax.combinators.base import Layer
from terraflax.layers.metrics import cross_entropy_sum


def soft_kl(student_logits, teacher_logits, temperature: float):
  """KL(softmax(t / T) || softmax(s / T)) per position: (..., v), (..., v) -> (...) float32."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f'Distillation needs student and teacher logits of one shape, got '
                     f'{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}.')
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p_teacher = jax.nn.log_softmax(t, axis=-1)
  log_p_student = jax.nn.log_softmax(s, axis=-1)
  return jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)


def distillation_sum(student_logits, teacher_logits, targets, weights=None, *,
                     temperature: float = 2.0, alpha: float = 0.5):
  """(sum of weighted distillation losses, sum of weights); see the module docstring.

  Shapes: logits (..., v), targets and weights (...). `alpha` weighs the
  teacher's term (1: teacher only, 0: labels only).
  """
  if temperature <= 0 or not 0.0 <= alpha <= 1.0:
    raise ValueError(f'distillation needs temperature > 0 and alpha in [0, 1], got '
                     f'temperature={temperature}, alpha={alpha}.')
  hard, weight = cross_entropy_sum(student_logits, targets, weights)
  kl = soft_kl(student_logits, teacher_logits, temperature)
  w = jnp.ones_like(kl) if weights is None else weights.astype(jnp.float32)
  soft = jnp.sum(kl * w) * (temperature ** 2)
  return (1.0 - alpha) * hard + alpha * soft, weight


class DistillationLoss(Layer):
  """[student, teacher, targets, weights] -> [weighted mean loss]; n_in = 4, n_out = 1.

  Shapes (b, l, v), (b, l, v), (b, l), (b, l) -> (); `distillation_sum`
  divided by the total weight.
  """

  temperature: float = 2.0
  alpha: float = 0.5
  n_in = 4

  def __call__(self, student, teacher, targets, weights):
    total, weight = distillation_sum(student, teacher, targets, weights,
                                     temperature=self.temperature, alpha=self.alpha)
    return total / jnp.maximum(weight, 1e-9)
