"""Losses and metrics, weighted by a mask, as layers and as plain functions.

The functions return (sum, weight) pairs so that metrics over many batches
and devices add up exactly; the layers return the weighted mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from terraflax.combinators.base import Layer
from terraflax.layers.core import first_argmax


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
  correct = (first_argmax(logits) == targets).astype(jnp.float32)
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


def chunked_lm_sums(head, stack, targets, weights=None, *, chunk_len: int,
                    token_losses: bool = False):
  """The sums of `cross_entropy_sum` and `accuracy_sum` of `head(*stack)`, chunk by chunk.

  head: a function from the arrays of `stack` cut to c positions, each
  (b, c, ...), to float logits (b, c, v); it must treat positions
  independently (an LM head: norm, dropout shared along the length, Dense).
  stack: arrays (b, l, ...) (the final hidden states), targets int (b, l),
  weights (b, l) or None. The positions run `chunk_len` at a time in a
  `lax.scan` whose body is rematerialised (`jax.checkpoint`), so neither the
  forward nor the backward pass holds more than one chunk's (b, c, v)
  logits. The chunk is the largest divisor of l that is <= chunk_len;
  lengths without a good divisor (below chunk_len / 4) are zero-padded.

  Returns {'loss_sum', 'correct_sum', 'weight_sum'} float32 scalars, and with
  token_losses=True also 'token_losses' float32 (b, l): -log p(target) per
  position, unweighted (what eval's per-position sums and bits per byte need).
  """
  b, l = targets.shape
  weights = jnp.ones((b, l), jnp.float32) if weights is None else weights.astype(jnp.float32)
  c = l
  if l > chunk_len:
    c = max(n for n in range(1, chunk_len + 1) if l % n == 0)
    if c < chunk_len // 4:
      c = chunk_len
  n_chunks = -(-l // c)
  padded = n_chunks * c

  def to_chunks(x):  # (b, l, ...) -> (n_chunks, b, c, ...); b = 1: a reshape, no copy
    if padded > l:
      x = jnp.pad(x, [(0, 0), (0, padded - l)] + [(0, 0)] * (x.ndim - 2))
    if b == 1:
      return x.reshape((n_chunks, 1, c) + x.shape[2:])
    return jnp.moveaxis(x.reshape((b, n_chunks, c) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_sums(xs, t, w):
    logits = head(*xs)
    _check(logits, t, w)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, t[..., None].astype(jnp.int32), axis=-1)[..., 0]
    correct = (first_argmax(logits) == t).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(correct * w), nll

  def body(carry, chunk):
    xs, t, w = chunk
    loss, correct, nll = chunk_sums(xs, t, w)
    return (carry[0] + loss, carry[1] + correct), (nll if token_losses else None)

  zero = jnp.zeros((), jnp.float32)
  chunks = (tuple(to_chunks(x) for x in stack), to_chunks(targets), to_chunks(weights))
  (loss_sum, correct_sum), nll = jax.lax.scan(body, (zero, zero), chunks)
  sums = {'loss_sum': loss_sum, 'correct_sum': correct_sum, 'weight_sum': jnp.sum(weights)}
  if token_losses:
    nll = nll.reshape(1, padded) if b == 1 else jnp.moveaxis(nll, 0, 1).reshape(b, padded)
    sums['token_losses'] = nll[:, :l]
  return sums
