"""Evaluation: summed cross-entropy, correct predictions and weights over the eval split.

  eval_step(params, batch, index) -> {'loss_sum', 'correct_sum', 'weight_sum'[, 'byte_sum']
                                      [, 'position_loss_sum', 'position_weight_sum']}

Bits per byte compare runs whatever their tokenizer: when a batch carries
'bytes' (the UTF-8 bytes each target stands for, `terraflax.data.packing`),
`eval/bits_per_byte` = summed loss / ln 2 / summed bytes of the scored
targets; a byte-level data set without 'bytes' has one byte per token, so it
is loss / ln 2 (the same figure). With `position_buckets` = n > 0 the loss is
also summed per position (a packed batch's 'positions', the position within
its document; else the index in the row) and reported in n equal buckets over
the row as `eval/loss_by_position/<first>-<last>` (e.g. /0-63): does more
context help?

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
import numpy as np

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


def token_losses(logits, targets) -> jax.Array:
  """Cross-entropy of each target, float32 (targets' shape)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def text_sums(logits, batch, *, by_position: bool) -> dict[str, jax.Array]:
  """'byte_sum' (batches with 'bytes') and per-position loss/weight sums (float32 (l,))."""
  sums = {}
  weights = batch['weights'].astype(jnp.float32)
  if 'bytes' in batch:
    sums['byte_sum'] = jnp.sum(jnp.where(weights > 0, batch['bytes'], 0.0))
  if by_position and batch['targets'].ndim == 2:
    b, l = batch['targets'].shape
    positions = batch.get('positions')
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[None, :], (b, l))
    losses = token_losses(logits, batch['targets']) * weights
    flat = positions.reshape(-1)
    sums['position_loss_sum'] = jnp.zeros((l,), jnp.float32).at[flat].add(losses.reshape(-1))
    sums['position_weight_sum'] = jnp.zeros((l,), jnp.float32).at[flat].add(weights.reshape(-1))
  return sums


def loss_by_position(loss_sums, weight_sums, n_buckets: int,
                     prefix: str = 'eval') -> dict[str, float]:
  """{prefix/loss_by_position/<first>-<last>: mean loss} over `n_buckets` equal position ranges.

  Buckets without a scored token are left out.
  """
  loss_sums, weight_sums = np.asarray(loss_sums), np.asarray(weight_sums)
  edges = np.linspace(0, loss_sums.size, n_buckets + 1).round().astype(int)
  out = {}
  for first, stop in zip(edges[:-1], edges[1:]):
    weight = float(weight_sums[first:stop].sum())
    if stop > first and weight > 0:
      out[f'{prefix}/loss_by_position/{first}-{stop - 1}'] = (
          float(loss_sums[first:stop].sum()) / weight)
  return out


def normalise(sums: dict[str, Any], prefix: str) -> dict[str, float]:
  """{prefix/loss, prefix/accuracy}: the sums divided by the total weight."""
  weight = max(float(sums['weight_sum']), 1e-9)
  return {f'{prefix}/loss': float(sums['loss_sum']) / weight,
          f'{prefix}/accuracy': float(sums['correct_sum']) / weight}


def make_eval_step(model, task: str = 'lm', *, by_position: bool = False):
  """`eval_step(params, batch, index) -> sums` for `model` in 'eval' mode.

  `by_position`: also the per-position sums of `text_sums` (LM targets only).
  """

  def eval_step(params, batch, index):
    key = jax.random.fold_in(jax.random.key(0), index)
    logits = model.apply({'params': params}, *spec_lib.model_inputs(batch, task),
                         rngs=rng_lib.noise_keys(key))
    return dict(batch_sums(logits, batch), **text_sums(logits, batch, by_position=by_position))

  return eval_step


def jit_eval_step(model, task: str, out_sharding, *, by_position: bool = False):
  """`make_eval_step` jitted as the trainer and eval-only scoring run it."""
  return jax.jit(make_eval_step(model, task, by_position=by_position),
                 out_shardings=out_sharding, compiler_options=compiler.options())


def evaluate_params(eval_step, data, params, *, batch_size: int, n_batches: int,
                    mesh, position_buckets: int = 0) -> dict[str, float]:
  """{'eval/loss', 'eval/accuracy'[, 'eval/bits_per_byte', 'eval/loss_by_position/...']} of
  `params` on the eval split (`position_buckets`: buckets of loss_by_position, 0: none)."""
  sums = None
  for index, batch in enumerate(data.eval_batches(
      batch_size=batch_size, n_batches=n_batches, process_index=jax.process_index(),
      process_count=jax.process_count())):
    batch_sums_ = eval_step(params, sharding_lib.put_batch(batch, mesh), index)
    sums = batch_sums_ if sums is None else jax.tree_util.tree_map(jnp.add, sums, batch_sums_)
  if sums is None:
    sums = {name: jnp.zeros((), jnp.float32) for name in SUM_KEYS}
  sums = jax.device_get(sums)
  result = normalise(sums, 'eval')
  if 'byte_sum' in sums:
    result['eval/bits_per_byte'] = (float(sums['loss_sum']) / math.log(2)
                                    / max(float(sums['byte_sum']), 1e-9))
  elif data.info.byte_level:
    result['eval/bits_per_byte'] = result['eval/loss'] / math.log(2)
  if data.info.chance:
    result['eval/chance'] = data.info.chance  # The accuracy of guessing, beside eval/accuracy.
  if position_buckets and 'position_loss_sum' in sums:
    result.update(loss_by_position(sums['position_loss_sum'], sums['position_weight_sum'],
                                   position_buckets))
  return result
