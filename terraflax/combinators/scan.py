"""Scanned combinators: `Repeat` (a stack of identical layers) and `Chunk`.

Both run their layer inside `nn.scan`, so the traced program holds the layer
once: compile time does not grow with the number of repeats or chunks. The
rng streams they split are those of `terraflax.rng.STREAMS`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from terraflax.rng import STREAMS

from terraflax.combinators.base import (
    Layer, LayerError, apply_layer, as_return, check_inputs, flatten_layers,
    label_of, n_in_of, n_out_of, name_children)
from terraflax.combinators.core import (
    Serial, _layers_init, _LayersFields, run_serial, serial_n_in_n_out)


def stacked_axes(module: nn.Module, broadcast: tuple[str, ...] = ()) -> dict[str, int]:
  """`nn.scan`'s variable_axes for a stack of copies: axis 0 for every collection.

  Parameters, predict-mode caches and sown values always; also any other
  collection the caller passes in, so that each copy reads its own slice.
  `broadcast` names collections shared by every copy instead.
  """
  names = {'params', 'cache', 'intermediates'} | set(module.variables)
  return {name: 0 for name in sorted(names - set(broadcast))}


def predict_unroll(module: nn.Module, n: int) -> int:
  """`nn.scan`'s unroll for a stack of n copies: n (no loop) when decoding, else 1.

  In predict mode (the `cache` collection mutable, not initialising) the
  stack runs once per token inside the decoding loop. Scanned, every token
  would dynamic-slice (copy) each block's stacked weights; fully unrolled,
  the blocks index their weights at static offsets. XLA:CPU still copied
  such slices of loop-carried arrays every token, so `terraflax.decoding`
  carries each block's slice as its own buffer (`split_layers`) and the
  static slices fold away. Training and init stay scanned (flat compile
  time).
  """
  if module.is_initializing() or not module.is_mutable_collection('cache'):
    return 1
  return n


def stacked_copies(module: nn.Module) -> tuple[int, bool] | None:
  """(n, params stacked) when `module` holds n stacked copies' variables, else None.

  A `Repeat` (or a `ReversibleSerial` with `n_repeats`) keeps every variable
  of its copies under its own path with a leading axis of size n (parameters
  too, unless shared). The decoding loop reads this to hold each copy's
  slice as its own buffer (`terraflax.decoding.stacked_depths`).
  """
  stacked = getattr(module, 'stacked_copies', None)
  return stacked() if callable(stacked) else None


def _one_layer(layer: Any) -> Any:
  """A layer, or a `Serial` of a list of them."""
  if isinstance(layer, (list, tuple)):
    flat = flatten_layers(layer)
    return flat[0] if len(flat) == 1 else Serial(*flat)
  return layer


class _RepeatFields(Layer):
  layer: Any = None
  n: int = 1
  remat: bool = False
  share_params: bool = False
  preserve_adopted_names = True


class Repeat(_RepeatFields):
  """`n` copies of `layer` in serial, with parameters stacked on a leading axis.

  [x_1..x_k] -> [x_1..x_k] after n applications; `layer` must be k -> k. The
  copies are scanned (`nn.scan`), so compile time does not grow with `n`.
  Parameters, caches and sown intermediates get a leading axis of size `n`;
  each copy draws its own randomness. `remat=True` recomputes each copy's
  activations in the backward pass instead of storing them.

  `share_params=True` (ALBERT's cross-layer sharing) applies the one `layer`
  instance `n` times with a single set of parameters (no leading axis; their
  gradient sums over the applications). Caches and intermediates are still
  per application, so a shared causal-attention block keeps one key/value
  cache per depth in predict mode.
  """

  def __init__(self, layer=None, n=1, *, remat=False, share_params=False, **kwargs):
    layer = _one_layer(layer)
    if layer is None:
      raise LayerError('Repeat needs a layer.')
    if not isinstance(n, int) or n < 1:
      raise LayerError(f'Repeat needs n >= 1 copies, got n={n!r}.')
    if n_in_of(layer) != n_out_of(layer):
      raise LayerError(
          f'Repeat needs a layer with n_in == n_out, got {label_of(layer)} with '
          f'n_in={n_in_of(layer)}, n_out={n_out_of(layer)}.')
    name_children([layer], 'Repeat')
    super().__init__(layer=layer, n=n, remat=remat, share_params=share_params, **kwargs)

  @property
  def n_in(self):
    return n_in_of(self.layer)

  @property
  def n_out(self):
    return n_out_of(self.layer)

  def stacked_copies(self) -> tuple[int, bool]:
    """(n, params stacked): see `stacked_copies`."""
    return self.n, not self.share_params

  @nn.compact
  def __call__(self, *inputs):
    stack = check_inputs(self, inputs)

    def body(layer, carry, _):
      return tuple(apply_layer(layer, list(carry))), None

    if self.remat:
      body = nn.remat(body, prevent_cse=False)
    if self.share_params:  # One set of parameters, initialised once, read by every copy.
      scanned = nn.scan(
          body,
          variable_broadcast='params',
          variable_axes=stacked_axes(self, broadcast=('params',)),
          split_rngs={stream: stream != 'params' for stream in STREAMS},
          length=self.n,
          unroll=predict_unroll(self, self.n))
    else:
      scanned = nn.scan(
          body,
          variable_axes=stacked_axes(self),
          split_rngs={stream: True for stream in STREAMS},
          length=self.n,
          unroll=predict_unroll(self, self.n),
          metadata_params={nn.PARTITION_NAME: 'layers'})
    carry, _ = scanned(self.layer, tuple(stack), None)
    return as_return(carry)


class _ChunkFields(_LayersFields):
  chunk_len: int | None = None
  axis: int = 1


class Chunk(_ChunkFields):
  """Runs position-wise layers in serial over chunks of `chunk_len` along `axis`.

  [x_1..x_k] -> Serial(layers)(x_1..x_k), computed chunk by chunk (inputs and
  outputs share the length axis `axis`, default 1 for (b, l, d) arrays). The
  chunks are scanned and rematerialised, so only one chunk's activations are
  alive at a time: a feed-forward block's (b, l, d_ff) hidden state never
  exists whole. Lengths that are not a multiple of `chunk_len` are zero-padded
  and cut back; `chunk_len=None` (or a length <= chunk_len) runs the layers on
  the whole input. Parameter paths do not depend on `chunk_len`, so a model
  can switch chunking on or off without renaming its parameters. n_in/n_out
  are those of the layers in serial.
  """

  def __init__(self, *layers, chunk_len=None, axis=1, **kwargs):
    if chunk_len is not None and (not isinstance(chunk_len, int) or chunk_len < 1):
      raise LayerError(f'Chunk needs chunk_len >= 1 or None, got chunk_len={chunk_len!r}.')
    _layers_init(Chunk, self, layers, dict(kwargs, chunk_len=chunk_len, axis=axis))

  @property
  def n_in(self):
    return serial_n_in_n_out(self.layers)[0]

  @property
  def n_out(self):
    return serial_n_in_n_out(self.layers)[1]

  @nn.compact
  def __call__(self, *inputs):
    stack = check_inputs(self, inputs)
    length = stack[0].shape[self.axis] if stack else 0
    if self.chunk_len is None or length <= self.chunk_len:
      return as_return(run_serial(self.layers, stack))
    n_chunks = math.ceil(length / self.chunk_len)
    padded = n_chunks * self.chunk_len

    def to_chunks(x):
      axis = self.axis % x.ndim
      pad = [(0, 0)] * x.ndim
      pad[axis] = (0, padded - length)
      x = jnp.pad(x, pad).reshape(x.shape[:axis] + (n_chunks, self.chunk_len) + x.shape[axis + 1:])
      return jnp.moveaxis(x, axis, 0)

    def from_chunks(y):
      axis = self.axis % (y.ndim - 1)
      y = jnp.moveaxis(y, 0, axis)
      y = y.reshape(y.shape[:axis] + (padded,) + y.shape[axis + 2:])
      return jax.lax.slice_in_dim(y, 0, length, axis=axis)

    def body(module, carry, chunk):
      return carry, tuple(run_serial(module.layers, list(chunk)))

    scanned = nn.scan(
        nn.remat(body, prevent_cse=False),
        variable_broadcast='params',
        variable_axes={'intermediates': 0},
        split_rngs={stream: stream != 'params' for stream in STREAMS},
        length=n_chunks)
    _, outputs = scanned(self, None, tuple(to_chunks(x) for x in stack))
    return as_return([from_chunks(y) for y in outputs])
