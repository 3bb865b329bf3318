"""The position-wise feed-forward block, optionally chunked along the length."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from terraflax import kernels
from terraflax.combinators.base import (
    LayerError, check_inputs, check_mode, flatten_layers, label_of, name_children)
from terraflax.combinators.core import _layers_init
from terraflax.combinators.scan import Chunk, _ChunkFields
from terraflax.kernels import ff_cpu
from terraflax.layers.core import Dense, Dropout, FastGelu, LayerNorm, Relu

# Activation factories the native kernel computes itself.
NATIVE_ACTIVATIONS = {Relu: 'relu', FastGelu: 'fast_gelu'}


# The sub-layers the native path reads, by role; the others are the activation and Dropouts.
ROLES = ('norm', 'first', 'second')


class _FeedForwardFields(_ChunkFields):
  activation_name: str | None = None  # a key of ff_cpu.ACTIVATIONS, or None: XLA only
  kernel: str = 'auto'
  roles: tuple[tuple[str, str], ...] = ()  # (role, child name) for every role of ROLES


class FeedForwardBlock(_FeedForwardFields, Chunk):
  """`Chunk(LayerNorm, Dense, activation, Dropout, Dense, Dropout)` with a native fast path.

  [x] -> [ffn(x)]: (b, l, d) -> (b, l, d); n_in = n_out = 1. Made by
  `FeedForward`. On the CPU, outside training dropout, with float32 weights
  and widths that are multiples of 16, everything after the LayerNorm runs as
  one kernel (`terraflax.kernels.ff_cpu`) on the same parameters; otherwise
  (or with kernel='xla') the layers run as a `Chunk`. kernel='cpu' requires
  the kernel and says what prevents it.

  `roles` maps 'norm', 'first' and 'second' (the LayerNorm and the two Dense
  layers) to children (instances, or their names), so the native path finds
  them by name whatever their order; besides those, the block may hold only
  Dropouts and the one activation layer that `activation_name` names, or it
  runs on XLA.
  """

  def __init__(self, *layers, roles=(), **kwargs):
    children = flatten_layers(kwargs.get('layers', layers))
    name_children(children, 'FeedForwardBlock')  # So that roles given as instances have names.
    roles = tuple((role, child if isinstance(child, str) else child.name)
                  for role, child in dict(roles).items())
    _layers_init(FeedForwardBlock, self, layers, dict(kwargs, roles=roles))
    kernels.check_kernel('FeedForward', self.kernel)
    names = [child.name for child in self.layers]
    if sorted(dict(roles)) != sorted(ROLES) or any(n not in names for _, n in roles):
      raise LayerError(
          f'FeedForwardBlock roles must map each of {ROLES} to one of its layers {names}, '
          f'got {dict(roles)}.')

  def _role(self, role: str):
    name = dict(self.roles)[role]
    return next(child for child in self.layers if child.name == name)

  def __call__(self, *inputs):
    stack = check_inputs(self, inputs)
    if not self._runs_native(stack[0]):
      return super().__call__(*inputs)
    first, second = self._role('first'), self._role('second')
    p1, p2 = (nn.meta.unbox(d.variables['params']) for d in (first, second))
    return ff_cpu.feed_forward(self._role('norm')(stack[0]), p1['kernel'], p1['bias'],
                               p2['kernel'], p2['bias'], activation=self.activation_name,
                               save_hidden=self.chunk_len is None)

  def _runs_native(self, x) -> bool:
    if self.kernel == 'xla' or self.is_initializing():
      return False
    first, second = self._role('first'), self._role('second')
    role_names = set(dict(self.roles).values())
    others = [child for child in self.layers
              if child.name not in role_names and not isinstance(child, Dropout)]
    if self.activation_name is None:
      why_not = 'its activation is not one the kernel computes (Relu, FastGelu)'
    elif len(others) != 1:
      why_not = (f'besides its LayerNorm, Dense layers and Dropouts it must hold one '
                 f'activation, got {[label_of(child) for child in others]}')
    elif any(isinstance(child, Dropout) and child.mode == 'train' and child.rate > 0
             for child in self.layers):
      why_not = 'dropout in training runs on XLA only'
    elif not (first.use_bias and second.use_bias):
      why_not = 'the kernel adds both biases'
    elif (any(d.dtype not in (None, jnp.float32) for d in (first, second))
          or x.dtype != jnp.float32
          or any(nn.meta.unbox(d.variables['params']['kernel']).dtype != jnp.float32
                 for d in (first, second))):
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
  norm = LayerNorm()
  first = Dense(d_ff, dtype=dtype, axes=('embed', 'mlp'))
  second = Dense(d_model, dtype=dtype, axes=('mlp', 'embed'))
  return FeedForwardBlock(
      norm,
      first,
      activation(),
      Dropout(dropout, mode=mode),
      second,
      Dropout(dropout, mode=mode),
      chunk_len=chunk_len, label='FeedForward', roles={'norm': norm, 'first': first,
                                                       'second': second},
      activation_name=NATIVE_ACTIVATIONS.get(activation), kernel=kernel)
