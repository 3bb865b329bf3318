"""Losses and metrics, weighted by a mask, as layers and as plain functions.

The functions return (sum, weight) pairs so that metrics over many batches
and devices add up exactly; the layers return the weighted mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from terraflax.combinators.base import Layer


def _check(logits, targets, weights):
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
        f'logits {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, '
        f'got {tuple(targets.shape)}.')
  if weights is not None and weights.shape != targets.shape:
    raise ValueError(f'weights {tuple(weights.shape)} must match targets {tuple(targets.shape)}.')


def cross_entropy_sum(logits, targets, weights=None):
  """(sum of weighted -log p(target), sum of weights); logits (..., v), targets (...)."""
  _check(logits, targets, weights)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def accuracy_sum(logits, targets, weights=None):
  """(sum of weighted [argmax == target], sum of weights)."""
  _check(logits, targets, weights)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  weights = jnp.ones_like(correct) if weights is None else weights.astype(jnp.float32)
  return jnp.sum(correct * weights), jnp.sum(weights)


class CrossEntropyLoss(Layer):
  """[logits, targets, weights] -> [weighted mean cross-entropy]: (b, l, v), (b, l), (b, l) -> ()."""

  n_in = 3

  def __call__(self, logits, targets, weights):
    total, weight = cross_entropy_sum(logits, targets, weights)
    return total / jnp.maximum(weight, 1e-9)


class Accuracy(Layer):
  """[logits, targets, weights] -> [weighted mean accuracy]: (b, l, v), (b, l), (b, l) -> ()."""

  n_in = 3

  def __call__(self, logits, targets, weights):
    correct, weight = accuracy_sum(logits, targets, weights)
    return correct / jnp.maximum(weight, 1e-9)
