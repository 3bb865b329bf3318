"""SparseFF in a reversible stack, with its choices replayed in the backward pass.

The reversible backward pass rebuilds each block's inputs from its outputs,
x1 = (x1 + f(x2)) - f(x2), which is exact in real arithmetic but not in
float32: the rebuilt inputs differ from the forward pass's by rounding. A
SparseFF controller's argmax (or Gumbel-max) over nearly tied logits can
then pick a different unit when the block is recomputed, and that token's
rebuilt activations become wrong by O(1), not O(rounding), and the error
spreads through attention to earlier blocks. `benchmarks/sparse_reversible.py`
(6 blocks, d_model 64, d_ff 2048, 32 units per block, 8 x 1024 tokens, 8
initialisations, eval argmax) found it in 1 of 8 initialisations: 16 tokens
rebuilt with errors up to 0.04 and parameter gradients 1.4e-4 off plain
autodiff (global norm), against 2e-6 and 7e-8 otherwise. That is one event
in 2.5e7 controller choices; a model making 5e7 choices per step (6 layers,
512 blocks, 16K tokens) would expect about two per step. With replay:
rounding only.

So the stack records the choices and the backward pass replays them. Two
extra items travel below the two residual streams:

  slot    int32 ()                    the index of the next record
  record  int8 (n_records, b, l, k)   choices (element of each block) per
                                      token, -1 where none is recorded yet

  StartRecord(n_records, n_blocks, n_elements_in_block)
                             [x] -> [x, slot, record]           1 -> 3
  ReplayedHalfResidual(F)    [x1, x2, slot, record]
                             -> [x1 + F(x2, record[slot])[0], x2, slot, record']   4 -> 4
  AdvanceSlot()              [x1, x2, slot] -> [x1, x2, slot + 1]                 3 -> 3

F is [x, recorded] -> [y, choices], e.g. `Chunk(LayerNorm(), SparseFF(replay=True))`:
it uses the recorded element wherever one is recorded and the controller's
choice elsewhere, and returns the elements used; `ReplayedHalfResidual`
writes them to `record[slot]`. In the forward pass every entry is -1, so the
controller chooses; in the backward pass the block sees the record of the
stack's outputs, where its entry holds the forward pass's choices, so its
recomputation (and `reverse`) use exactly those. A block is then
[ReversibleHalfResidual(attention), ReversibleSwap(), ReplayedHalfResidual(F),
ReversibleSwap(), AdvanceSlot()], scanned over n_records blocks.

Cost: the record is kept with the stack's outputs for the backward pass,
n_records * b * l * (d_ff / n_elements_in_block) bytes (int8): 1/8 of one
float32 residual stream per layer at d_ff = 16 d_model with 32-unit blocks,
against the several d_ff-wide activations per layer plain autodiff stores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from terraflax.combinators.base import (
    Layer, LayerError, check_inputs)
from terraflax.combinators.core import run_serial, serial_n_in_n_out
from terraflax.combinators.reversible import (
    ReversibleHalfResidual, ReversibleLayer, _check_same_shape)

NOT_RECORDED = -1


def record_dtype(n_elements_in_block: int):
  """The narrowest signed int that holds 0 .. n_elements_in_block - 1 and -1."""
  return jnp.int8 if n_elements_in_block <= 128 else jnp.int32


class StartRecord(Layer):
  """[x] -> [x, slot, record]: (b, l, d) -> (b, l, d), int32 (), int (n_records, b, l, k).

  n_in = 1, n_out = 3. slot = 0 and an empty record (all -1) of
  `n_records` entries of `n_blocks` choices per token (int8 unless
  `n_elements_in_block` > 128).
  """

  _: dataclasses.KW_ONLY
  n_records: int
  n_blocks: int
  n_elements_in_block: int = 32
  n_out = 3

  def __post_init__(self):
    for name in ('n_records', 'n_blocks', 'n_elements_in_block'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'StartRecord {name} must be a positive int, got {value!r}.')
    super().__post_init__()

  def __call__(self, x):
    if x.ndim < 2:
      raise ValueError(f'StartRecord needs x of shape (b, l, ...), got {tuple(x.shape)}.')
    record = jnp.full((self.n_records,) + x.shape[:2] + (self.n_blocks,), NOT_RECORDED,
                      record_dtype(self.n_elements_in_block))
    return x, jnp.zeros((), jnp.int32), record


class ReplayedHalfResidual(ReversibleHalfResidual):
  """[x1, x2, slot, record] -> [x1 + y, x2, slot, record']; n_in = n_out = 4.

  Shapes: (b, l, d), (b, l, d), int32 (), int (n, b, l, k). The layers F (in
  serial) map [x2, record[slot]] -> [y, choices] (2 -> 2); record' is the
  record with `choices` written at `slot`. `reverse` and the reversible
  backward pass (which sees record') recompute F with the recorded choices,
  so they rebuild x1 with exactly the choices of the forward pass. The
  slot is advanced by a later `AdvanceSlot`.
  """

  def __init__(self, *layers, **kwargs):
    super().__init__(*layers, **kwargs)
    if serial_n_in_n_out(self.layers) != (2, 2):
      raise LayerError(
          'ReplayedHalfResidual needs layers [x, recorded] -> [y, choices] (n_in = n_out = 2), '
          f'got n_in, n_out = {serial_n_in_n_out(self.layers)}.')

  @property
  def n_in(self):
    return 4

  @property
  def n_out(self):
    return 4

  def _residual_and_choices(self, x2, slot, record):
    recorded = jax.lax.dynamic_index_in_dim(record, slot, axis=0, keepdims=False)
    y, choices = run_serial(self.layers, [x2, recorded])
    return y, choices

  def residual(self, x2, slot, record):
    """[x2, slot, record] -> F(x2, record[slot])'s y: the branch added to x1."""
    return self._residual_and_choices(x2, slot, record)[0]

  def __call__(self, *inputs):
    x1, x2, slot, record = check_inputs(self, inputs)
    fx, choices = self._residual_and_choices(x2, slot, record)
    _check_same_shape(self, x1, fx, 'ReplayedHalfResidual')
    record = jax.lax.dynamic_update_index_in_dim(record, choices.astype(record.dtype), slot,
                                                 axis=0)
    return (x1 + fx).astype(x1.dtype), x2, slot, record


class AdvanceSlot(ReversibleLayer):
  """[x1, x2, slot] -> [x1, x2, slot + 1]: (b, l, d), (b, l, d), int32 (); 3 -> 3.

  Its reverse steps the slot back, so each `ReplayedHalfResidual` of a
  scanned stack reads and writes its own record entry.
  """

  n_in = 3
  n_out = 3

  def __call__(self, x1, x2, slot):
    return x1, x2, slot + 1

  def reverse(self, x1, x2, slot):
    return x1, x2, slot - 1
