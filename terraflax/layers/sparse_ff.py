"""Terraformer's sparse feed-forward block (`SparseFF`).

Jaszczur et al., "Sparse is Enough in Scaling Transformers" (2021): the d_ff
hidden units of a feed-forward block are split into blocks of
`n_elements_in_block`, and a cheap low-rank controller picks one active unit
per block for each token. Decoding then only touches the chosen units' rows
of the two weight matrices, so its cost scales with d_ff / n_elements_in_block.

Axis letters (beyond the package's): f feed-forward units (d_ff), k blocks
(d_ff / n_elements_in_block), e elements of a block, t tokens (b * l).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from terraflax.combinators.base import Layer, check_mode
from terraflax.layers.core import (Dense, constrain, dropout, first_argmax, lift_to,
                                   param_with_axes)

Initializer = Callable[..., jax.Array]


def block_choices(logits: jax.Array, temperature: float = 0.0,
                  rng: jax.Array | None = None) -> jax.Array:
  """The active element of each block: int32 (..., k) from logits (..., k, e).

  With `temperature` 0 (or no `rng`), the argmax. Otherwise a sample from
  softmax(logits / temperature) drawn with the Gumbel-max trick,
  argmax(logits + temperature * g) with g ~ Gumbel(0, 1), so lower
  temperatures explore less and temperature -> 0 recovers the argmax.
  """
  if temperature > 0.0 and rng is not None:
    logits = logits + temperature * jax.random.gumbel(rng, logits.shape, logits.dtype)
  return first_argmax(logits)


def straight_through(choices: jax.Array, probs: jax.Array) -> jax.Array:
  """One-hot of `choices` in the forward pass, the gradient of `probs` backward.

  (..., k) int, (..., k, e) -> (..., k, e): one_hot + probs - stop_gradient(probs).
  """
  hard = jax.nn.one_hot(choices, probs.shape[-1], dtype=probs.dtype)
  return hard + probs - jax.lax.stop_gradient(probs)


class SparseFF(Layer):
  """[x] -> [y]: (b, l, d) -> (b, l, d); n_in = n_out = 1 (2 -> 2 with `replay`).

  A feed-forward block y = (act(x W_in + b_in) * mask) W_out + b_out whose
  `d_ff` hidden units are grouped into k = d_ff / n_elements_in_block blocks
  with exactly one active unit per block. The choice is made per token by a
  low-rank controller: logits = Dense(d_ff)(Dense(d_lowrank, no bias)(x)),
  reshaped to (..., k, n_elements_in_block).

  - `'train'`: the chosen unit of each block is sampled with the Gumbel-max
    trick at `temperature` (noise from the `sparse` rng stream; 0 gives the
    argmax), and the mask is straight-through: one-hot forward, gradient of
    the block softmax backward, so the controller learns. With probability
    `1 - quant_prob` per call (drawn from `sparse` too) the soft mask
    (the block softmax itself) is used instead, as in Trax's `SparseFF` and
    Kaiser & Bengio (2018), which stabilises training. The whole d_ff is
    computed densely, then masked.
  - `'eval'`: the argmax; the same dense computation with a one-hot mask.
  - `'predict'`: the argmax, and only the chosen units' rows of `kernel_in`
    and `kernel_out` (and entries of `bias_in`) are gathered and multiplied:
    per-token cost ~ d_model * (d_lowrank + k) + d_lowrank * d_ff instead of
    d_model * d_ff. Same outputs as `'eval'`, no cache.

  `multiply_by_controller_output=True` multiplies each chosen unit's
  activation by its softmax probability (a quant-style mask, Trax's option of
  the same name); in training with the soft mask that product is already
  there. The probability factor carries no gradient of its own: the
  controller learns through the straight-through estimator.

  Parameters (the same in every mode): `controller_lowrank/kernel` (d,
  d_lowrank), `controller_logits/{kernel, bias}` (d_lowrank, d_ff), (d_ff,);
  `kernel_in` (d_ff, d) (stored unit-major, so the rows that decoding gathers
  are contiguous), `bias_in` (d_ff,), `kernel_out` (d_ff, d), `bias_out` (d,).
  Logical axes: d_ff 'mlp', d 'embed', d_lowrank 'controller'.
  Unit u is element u % n_elements_in_block of block u // n_elements_in_block.

  With `sow_choices`, the chosen elements, int32 (b, l, k), are sown to
  `intermediates` as `choices`. `dropout` applies to the output in `'train'`.

  `replay=True` makes the layer [x, recorded] -> [y, choices]: (b, l, d),
  int (b, l, k) -> (b, l, d), (b, l, k) (n_in = n_out = 2). Where `recorded`
  is >= 0 that element is used instead of the controller's choice (the
  controller still runs and draws its noise, so randomness and the
  straight-through gradient are unchanged); -1 means "choose". `choices`
  (in `recorded`'s dtype) are the elements used. A reversible stack uses it
  to replay, in its backward pass, exactly the choices of the forward pass
  (see `terraflax.layers.sparse_reversible`).
  """

  _: dataclasses.KW_ONLY
  d_ff: int
  n_elements_in_block: int = 32
  d_lowrank: int = 64
  temperature: float = 0.1
  quant_prob: float = 0.3
  multiply_by_controller_output: bool = False
  activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
  dropout: float = 0.0
  mode: str = 'train'
  sow_choices: bool = False
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32
  replay: bool = False

  def __post_init__(self):
    check_mode(self.mode, 'SparseFF mode')
    for name in ('d_ff', 'n_elements_in_block', 'd_lowrank'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'SparseFF {name} must be a positive int, got {value!r}.')
    if self.d_ff % self.n_elements_in_block:
      raise ValueError(
          f'SparseFF d_ff={self.d_ff} must be a multiple of '
          f'n_elements_in_block={self.n_elements_in_block}.')
    if self.temperature < 0:
      raise ValueError(f'SparseFF temperature must be >= 0, got {self.temperature}.')
    if not 0.0 <= self.quant_prob <= 1.0:
      raise ValueError(f'SparseFF quant_prob must be in [0, 1], got {self.quant_prob}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'SparseFF dropout must be in [0, 1), got {self.dropout}.')
    super().__post_init__()

  @property
  def n_in(self) -> int:
    return 2 if self.replay else 1

  @property
  def n_out(self) -> int:
    return self.n_in

  @property
  def n_blocks(self) -> int:
    return self.d_ff // self.n_elements_in_block

  def _rng(self, purpose: str) -> jax.Array:
    if not self.has_rng('sparse'):
      raise ValueError(
          f"SparseFF in 'train' mode draws its {purpose} from the 'sparse' rng stream; "
          "pass rngs={'sparse': key, ...} to apply (or init), or use mode='eval'.")
    return self.make_rng('sparse')

  @nn.compact
  def __call__(self, x, recorded=None):
    if self.replay != (recorded is not None):
      raise ValueError(
          'SparseFF takes [x, recorded] with replay=True and [x] otherwise; got replay='
          f'{self.replay} and {"no " if recorded is None else ""}recorded choices.')
    d_model = x.shape[-1]
    k, e = self.n_blocks, self.n_elements_in_block
    def param(name, axes, init, shape):
      return param_with_axes(self, name, axes, init, shape, self.param_dtype)

    kernel_in = param('kernel_in', ('mlp', 'embed'), self.kernel_init, (self.d_ff, d_model))
    bias_in = param('bias_in', ('mlp',), self.bias_init, (self.d_ff,)) if self.use_bias else None
    kernel_out = param('kernel_out', ('mlp', 'embed'), self.kernel_init, (self.d_ff, d_model))
    bias_out = param('bias_out', ('embed',), self.bias_init, (d_model,)) if self.use_bias else None
    dtype = self.dtype or jnp.result_type(x, kernel_in)
    x = x.astype(dtype)

    # The controller: logits (..., k, e) in float32, so choices are stable.
    lowrank = Dense(self.d_lowrank, use_bias=False, kernel_init=self.kernel_init,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    axes=('embed', 'controller'), name='controller_lowrank')
    to_logits = Dense(self.d_ff, kernel_init=self.kernel_init, bias_init=self.bias_init,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      axes=('controller', 'mlp'), name='controller_logits')
    logits = to_logits(lowrank(x)).astype(jnp.float32)
    logits = logits.reshape(x.shape[:-1] + (k, e))
    probs = jax.nn.softmax(logits, axis=-1)
    if self.mode == 'train' and self.temperature > 0:
      choices = block_choices(logits, self.temperature, self._rng('Gumbel noise'))
    else:
      choices = block_choices(logits)
    if recorded is not None:
      if recorded.shape != choices.shape or not jnp.issubdtype(recorded.dtype, jnp.integer):
        raise ValueError(f'SparseFF recorded choices must be int {choices.shape} (-1: choose), '
                         f'got {recorded.dtype}{tuple(recorded.shape)}.')
      choices = jnp.where(recorded >= 0, recorded.astype(jnp.int32), choices)
    if self.sow_choices:
      self.sow('intermediates', 'choices', choices)

    if self.mode == 'predict':
      y = self._gathered(x, choices, probs, kernel_in, bias_in, kernel_out)
    else:
      if self.mode == 'train':
        mask = straight_through(choices, probs)
        if self.multiply_by_controller_output:
          mask = mask * jax.lax.stop_gradient(probs)
        if self.quant_prob < 1.0:
          use_hard = jax.random.uniform(self._rng('hard/soft mask draw'), ()) < self.quant_prob
          mask = jnp.where(use_hard, mask, probs)
      else:
        mask = jax.nn.one_hot(choices, e, dtype=probs.dtype)
        if self.multiply_by_controller_output:
          mask = mask * probs
      y = self._masked_dense(x, mask, kernel_in, bias_in, kernel_out)
    if bias_out is not None:
      y = y + lift_to(bias_out.astype(dtype), y)
    if self.mode == 'train' and self.dropout > 0:
      y = dropout(y, self.dropout, self.make_rng('dropout'))
    if recorded is not None:
      return y, choices.astype(recorded.dtype)
    return y

  def _masked_dense(self, x, mask, kernel_in, bias_in, kernel_out):
    """All d_ff units, then the (..., k, e) mask: train and eval."""
    h = constrain(jnp.einsum('...d,fd->...f', x, kernel_in.astype(x.dtype)),
                  ('batch', 'length', 'mlp'))
    if bias_in is not None:
      h = h + lift_to(bias_in.astype(x.dtype), h)
    a = self.activation(h).reshape(mask.shape) * mask.astype(x.dtype)
    return jnp.einsum('...f,fd->...d', a.reshape(h.shape), kernel_out.astype(x.dtype))

  def _gathered(self, x, choices, probs, kernel_in, bias_in, kernel_out):
    """Only the chosen unit of each block: gathers (t, k, d) rows; predict."""
    lead, d_model = x.shape[:-1], x.shape[-1]
    k, e = self.n_blocks, self.n_elements_in_block
    units = choices.reshape(-1, k) + (jnp.arange(k, dtype=jnp.int32) * e)[None, :]  # (t, k)
    xt = x.reshape(-1, d_model)
    w_in = kernel_in.at[units].get(mode='promise_in_bounds').astype(x.dtype)  # (t, k, d)
    h = jnp.einsum('td,tkd->tk', xt, w_in)
    if bias_in is not None:
      h = h + bias_in.at[units].get(mode='promise_in_bounds').astype(x.dtype)
    a = self.activation(h)
    if self.multiply_by_controller_output:
      chosen = jnp.take_along_axis(probs, choices[..., None], axis=-1)[..., 0]
      a = a * chosen.reshape(-1, k).astype(x.dtype)
    w_out = kernel_out.at[units].get(mode='promise_in_bounds').astype(x.dtype)  # (t, k, d)
    return jnp.einsum('tk,tkd->td', a, w_out).reshape(lead + (d_model,))
