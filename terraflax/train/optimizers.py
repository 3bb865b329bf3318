"""Learning-rate schedules and optimizers from optax, built from `config.optimizer`.

Schedule: linear warm-up from 0 to `learning_rate` over `warmup_steps`, then
  constant  learning_rate
  rsqrt     learning_rate * sqrt(warmup_steps / step)   (step counted from 1;
            with no warm-up, learning_rate / sqrt(step))
  cosine    cosine decay to `final_lr_fraction * learning_rate` at `train.steps`

Optimizer: adam, adamw (decoupled weight decay), adafactor or sgd (with
momentum), after global-norm gradient clipping when `grad_clip > 0`. Weight
decay skips biases and normalisation scales (`decay_mask`).

Frozen parameters: with `trainable` (a regex searched in each parameter's
path, e.g. 'prefix_' or 'Dense_6'), only matching parameters are updated; the
rest get zero updates from `optax.set_to_zero` (and no optimizer state), so
they stay bit-identical. Clipping, the optimizer and weight decay see only the
trained parameters. This serves prefix tuning, fine-tuning a head on a frozen
body, and any other partial training.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

NO_DECAY_NAMES = ('bias', 'scale')


def make_schedule(optimizer_config, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step (0-based)."""
  o = optimizer_config
  peak, warmup = float(o.learning_rate), int(o.warmup_steps)
  if o.decay == 'constant':
    decay = optax.constant_schedule(peak)
  elif o.decay == 'rsqrt':
    def decay(count):  # `count` counts from the end of warm-up.
      step = jnp.maximum(count + warmup, 1).astype(jnp.float32)
      return peak * jnp.sqrt(max(warmup, 1) / step)
  elif o.decay == 'cosine':
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1),
                                        alpha=float(o.final_lr_fraction))
  else:
    raise ValueError(f"optimizer.decay must be 'constant', 'rsqrt' or 'cosine', got {o.decay!r}.")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """True for the leaves weight decay applies to: not biases, not norm scales."""
  def keep(path, _):
    names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    in_norm = any('Norm' in n for n in names)
    return not in_norm and names[-1] not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(keep, params)


def path_name(path) -> str:
  """'Repeat_3/Serial_0/.../kernel': a parameter's tree path as text."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def trainable_labels(params, pattern: str):
  """'trained' for the leaves whose path matches the regex `pattern` ('' : all), else 'frozen'."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'trained' if regex.search(path_name(path)) else 'frozen', params)


def count_trained(params, pattern: str) -> int:
  """How many scalar parameters `trainable=pattern` trains (all of them for '')."""
  labels = jax.tree_util.tree_leaves(trainable_labels(params, pattern or ''))
  return int(sum(x.size for x, label in zip(jax.tree_util.tree_leaves(params), labels)
                 if label == 'trained'))


def freeze_unmatched(tx: optax.GradientTransformation, pattern: str):
  """`tx` on the parameters matching `pattern`; zero updates (and no state) for the others."""
  if not pattern:
    return tx
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()},
                               lambda params: trainable_labels(params, pattern))


def make_optimizer(optimizer_config, total_steps: int):
  """(optax.GradientTransformation, schedule) for `config.optimizer`."""
  o = optimizer_config
  schedule = make_schedule(o, total_steps)
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
  if o.name == 'adam':
    parts.append(optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps))
  elif o.name == 'adamw':
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=float(o.weight_decay), mask=decay_mask))
  elif o.name == 'adafactor':
    parts.append(optax.adafactor(schedule, weight_decay_rate=float(o.weight_decay) or None,
                                 weight_decay_mask=decay_mask))
  elif o.name == 'sgd':
    if o.weight_decay:
      parts.append(optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=o.momentum or None))
  else:
    raise ValueError(f"optimizer.name must be adam, adamw, adafactor or sgd, got {o.name!r}.")
  return freeze_unmatched(optax.chain(*parts), o.get('trainable', '')), schedule
