"""The position-wise feed-forward block, optionally chunked along the length."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from terraflax import kernels
from terraflax.combinators.base import check_inputs, check_mode
from terraflax.combinators.core import _layers_init
from terraflax.combinators.scan import Chunk, _ChunkFields
from terraflax.kernels import ff_cpu
from terraflax.layers.core import Dense, Dropout, FastGelu, LayerNorm, Relu

# Activation factories the native kernel computes itself.
NATIVE_ACTIVATIONS = {Relu: 'relu', FastGelu: 'fast_gelu'}


class _FeedForwardFields(_ChunkFields):
  activation_name: str | None = None  # a key of ff_cpu.ACTIVATIONS, or None: XLA only
  kernel: str = 'auto'


class FeedForwardBlock(_FeedForwardFields, Chunk):
  """`Chunk(LayerNorm, Dense, activation, Dropout, Dense, Dropout)` with a native fast path.

  [x] -> [ffn(x)]: (b, l, d) -> (b, l, d); n_in = n_out = 1. Made by
  `FeedForward`. On the CPU, outside training dropout, with float32 weights
  and widths that are multiples of 16, everything after the LayerNorm runs as
  one kernel (`terraflax.kernels.ff_cpu`) on the same parameters; otherwise
  (or with kernel='xla') the layers run as a `Chunk`. kernel='cpu' requires
  the kernel and says what prevents it.
  """

  def __init__(self, *layers, **kwargs):
    _layers_init(FeedForwardBlock, self, layers, kwargs)
    kernels.check_kernel('FeedForward', self.kernel)

  def __call__(self, *inputs):
    stack = check_inputs(self, inputs)
    if not self._runs_native(stack[0]):
      return super().__call__(*inputs)
    norm, first, _, _, second, _ = self.layers
    p1, p2 = first.variables['params'], second.variables['params']
    return ff_cpu.feed_forward(norm(stack[0]), p1['kernel'], p1['bias'], p2['kernel'],
                               p2['bias'], activation=self.activation_name,
                               save_hidden=self.chunk_len is None)

  def _runs_native(self, x) -> bool:
    if self.kernel == 'xla' or self.is_initializing():
      return False
    _, first, _, drop, second, _ = self.layers
    if self.activation_name is None:
      why_not = 'its activation is not one the kernel computes (Relu, FastGelu)'
    elif drop.mode == 'train' and drop.rate > 0:
      why_not = 'dropout in training runs on XLA only'
    elif not (first.use_bias and second.use_bias):
      why_not = 'the kernel adds both biases'
    elif (any(d.dtype not in (None, jnp.float32) for d in (first, second))
          or x.dtype != jnp.float32
          or any(d.variables['params']['kernel'].dtype != jnp.float32 for d in (first, second))):
      why_not = 'the kernel computes in float32, on float32 weights'
    else:
      why_not = ff_cpu.unsupported(d_in=x.shape[-1], d_ff=first.features,
                                   d_out=second.features, activation=self.activation_name)
    return kernels.use_native('FeedForward', self.kernel, why_not, ff_cpu.available)


def FeedForward(*, d_model: int, d_ff: int, dropout: float = 0.0,  # pylint: disable=invalid-name
                activation: Callable[[], object] = Relu, mode: str = 'train',
                chunk_len: int | None = None, dtype=None, kernel: str = 'auto'):
  """[x] -> [ffn(x)]: (b, l, d_model) -> (b, l, d_model); one layer, 1 -> 1.

  LayerNorm, Dense(d_ff), activation, Dropout, Dense(d_model), Dropout: the
  pre-norm branch of a residual feed-forward block, labelled `FeedForward` in
  parameter paths. With `chunk_len`, the block runs `chunk_len` positions at a
  time (`Chunk`), so the (b, l, d_ff) hidden state never exists whole; the
  parameter paths are the same with or without chunking. `kernel` picks the
  implementation (see `FeedForwardBlock`); both compute the same function.
  """
  check_mode(mode, 'FeedForward mode')
  return FeedForwardBlock(
      LayerNorm(),
      Dense(d_ff, dtype=dtype),
      activation(),
      Dropout(dropout, mode=mode),
      Dense(d_model, dtype=dtype),
      Dropout(dropout, mode=mode),
      chunk_len=chunk_len, label='FeedForward',
      activation_name=NATIVE_ACTIVATIONS.get(activation), kernel=kernel)
