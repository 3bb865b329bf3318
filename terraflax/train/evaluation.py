"""Evaluation: summed cross-entropy, correct predictions and weights over the eval split.

  eval_step(params, batch, index) -> {'loss_sum', 'correct_sum', 'weight_sum'}

Batch `index` draws its noise (LSH hashing is random in 'eval' mode too) from
`noise_keys(fold_in(key(0), index))`, so every evaluation of the same
parameters, in the trainer or an eval-only run, gives the same numbers. Sums
stay on the device and are normalised on the host (`normalise`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from terraflax import compiler
from terraflax import rng as rng_lib
from terraflax.layers.metrics import accuracy_sum, cross_entropy_sum
from terraflax.models import spec as spec_lib
from terraflax.train import sharding as sharding_lib

SUM_KEYS = ('loss_sum', 'correct_sum', 'weight_sum')


def batch_sums(logits, batch) -> dict[str, jax.Array]:
  """Summed cross-entropy, correct predictions and weights of one batch."""
  loss_sum, weight_sum = cross_entropy_sum(logits, batch['targets'], batch['weights'])
  correct_sum, _ = accuracy_sum(logits, batch['targets'], batch['weights'])
  return {'loss_sum': loss_sum, 'correct_sum': correct_sum, 'weight_sum': weight_sum}


def normalise(sums: dict[str, Any], prefix: str) -> dict[str, float]:
  """{prefix/loss, prefix/accuracy}: the sums divided by the total weight."""
  weight = max(float(sums['weight_sum']), 1e-9)
  return {f'{prefix}/loss': float(sums['loss_sum']) / weight,
          f'{prefix}/accuracy': float(sums['correct_sum']) / weight}


def make_eval_step(model, task: str = 'lm'):
  """`eval_step(params, batch, index) -> sums` for `model` in 'eval' mode."""

  def eval_step(params, batch, index):
    key = jax.random.fold_in(jax.random.key(0), index)
    logits = model.apply({'params': params}, *spec_lib.model_inputs(batch, task),
                         rngs=rng_lib.noise_keys(key))
    return batch_sums(logits, batch)

  return eval_step


def jit_eval_step(model, task: str, out_sharding):
  """`make_eval_step` jitted as the trainer and eval-only scoring run it."""
  return jax.jit(make_eval_step(model, task), out_shardings=out_sharding,
                 compiler_options=compiler.options())


def evaluate_params(eval_step, data, params, *, batch_size: int, n_batches: int,
                    mesh) -> dict[str, float]:
  """{'eval/loss', 'eval/accuracy'[, 'eval/bits_per_byte']} of `params` on the eval split."""
  sums = {name: jnp.zeros((), jnp.float32) for name in SUM_KEYS}
  for index, batch in enumerate(data.eval_batches(
      batch_size=batch_size, n_batches=n_batches, process_index=jax.process_index(),
      process_count=jax.process_count())):
    batch_sums_ = eval_step(params, sharding_lib.put_batch(batch, mesh), index)
    sums = jax.tree_util.tree_map(jnp.add, sums, batch_sums_)
  result = normalise(jax.device_get(sums), 'eval')
  if data.info.byte_level:
    result['eval/bits_per_byte'] = result['eval/loss'] / math.log(2)
  return result
