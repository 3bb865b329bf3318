"""Terraformer's sparse QKV pieces: a multiplicative dense layer and a causal conv.

Jaszczur et al., "Sparse is Enough in Scaling Transformers" (2021), section
on sparse QKV: the d x d projections of attention are replaced by
`MultiplicativeDense` (d * (S + M) parameters, S modules of M = d / S units)
followed by `ModularCausalConv`, a small convolution over (length, modules)
that is causal along the length. Both map flat (b, l, S * M) arrays, so they
compose with `Serial` and attention can feed their outputs straight to its
head split.

Axis letters (beyond the package's): s modules (S), m units of a module (M),
i input features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from terraflax.combinators.base import Layer, check_mode
from terraflax.layers.core import lift_to

Initializer = Callable[..., jax.Array]


def _positive_int(owner: str, name: str, value: Any) -> None:
  if not isinstance(value, int) or value < 1:
    raise ValueError(f'{owner} {name} must be a positive int, got {value!r}.')


class MultiplicativeDense(Layer):
  """[x] -> [y]: (..., d_in) -> (..., d_out); n_in = n_out = 1.

  The output is split into `n_modules` (S) modules of M = d_out / S units:
  y[s, m] = sum_i x[i] * gating[i, s] * kernel[i, m] (+ bias[s * M + m]),
  returned flat, module-major (feature s * M + m). Every output still sees
  every input, yet the layer has d_in * (S + M) (+ d_out) parameters instead
  of d_in * d_out. `d_out` defaults to the input width.

  Parameters: `gating` (d_in, S), `kernel` (d_in, M), `bias` (d_out,).
  """

  _: dataclasses.KW_ONLY
  n_modules: int
  d_out: int | None = None
  use_bias: bool = True
  gating_init: Initializer = nn.initializers.normal(0.5)
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _positive_int('MultiplicativeDense', 'n_modules', self.n_modules)
    if self.d_out is not None:
      _positive_int('MultiplicativeDense', 'd_out', self.d_out)
      if self.d_out % self.n_modules:
        raise ValueError(
            f'MultiplicativeDense d_out={self.d_out} must be a multiple of '
            f'n_modules={self.n_modules}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    d_in = x.shape[-1]
    d_out = self.d_out or d_in
    if d_out % self.n_modules:
      raise ValueError(
          f'MultiplicativeDense output width {d_out} (the input width, as d_out is unset) '
          f'must be a multiple of n_modules={self.n_modules}.')
    d_module = d_out // self.n_modules
    gating = self.param('gating', self.gating_init, (d_in, self.n_modules), self.param_dtype)
    kernel = self.param('kernel', self.kernel_init, (d_in, d_module), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.einsum('...i,is,im->...sm', x.astype(dtype), gating.astype(dtype),
                   kernel.astype(dtype))
    y = y.reshape(x.shape[:-1] + (d_out,))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (d_out,), self.param_dtype)
      y = y + lift_to(bias.astype(dtype), y)
    return y


class ModularCausalConv(Layer):
  """[x] -> [y]: (b, l, S * M_in) -> (b, l, S * M_out); n_in = n_out = 1.

  The features are split into `n_modules` (S) modules of M_in units, and one
  convolution kernel (`length_kernel_size`, `module_kernel_size`, M_in, M_out)
  slides over the (length, module) grid, shared by all modules:
    y[t, s, o] = bias[o] + sum_{a, c, m} kernel[a, c, m, o]
                 * x[t - (length_kernel_size - 1) + a, s - h + c, m],
  with h = (module_kernel_size - 1) / 2 and x = 0 outside the grid. Along the
  length it is causal: output t sees inputs t - length_kernel_size + 1 .. t.
  `module_kernel_size` 1 (the default) treats each module on its own (Trax's
  `LocallyConvDense` with kernel_size=1); larger odd sizes also mix
  neighbouring modules. `d_module_out` (M_out) defaults to M_in.

  `'predict'` mode: the cache holds `inputs`, the last
  length_kernel_size - 1 inputs as (b, length_kernel_size - 1, S, M_in),
  zeros at the start of a sequence, so calls on consecutive pieces of a
  sequence (one token, or a prompt) give the full-sequence outputs. `init`
  creates it and leaves it zero. No cache when `length_kernel_size` is 1.

  Parameters: `kernel` (length_kernel_size, module_kernel_size, M_in, M_out),
  `bias` (M_out,).
  """

  _: dataclasses.KW_ONLY
  n_modules: int
  d_module_out: int | None = None
  length_kernel_size: int = 3
  module_kernel_size: int = 1
  use_bias: bool = True
  mode: str = 'train'
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_mode(self.mode, 'ModularCausalConv mode')
    for name in ('n_modules', 'length_kernel_size', 'module_kernel_size'):
      _positive_int('ModularCausalConv', name, getattr(self, name))
    if self.d_module_out is not None:
      _positive_int('ModularCausalConv', 'd_module_out', self.d_module_out)
    if self.module_kernel_size % 2 != 1:
      raise ValueError(
          f'ModularCausalConv module_kernel_size must be odd (centred on the module), '
          f'got {self.module_kernel_size}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    if x.ndim != 3:
      raise ValueError(f'ModularCausalConv expects (b, l, d) inputs, got shape {x.shape}.')
    batch, length, d_in = x.shape
    if d_in % self.n_modules:
      raise ValueError(
          f'ModularCausalConv input width {d_in} must be a multiple of '
          f'n_modules={self.n_modules}.')
    d_module_in = d_in // self.n_modules
    d_module_out = self.d_module_out or d_module_in
    n_past = self.length_kernel_size - 1
    kernel = self.param(
        'kernel', self.kernel_init,
        (self.length_kernel_size, self.module_kernel_size, d_module_in, d_module_out),
        self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    xs = x.astype(dtype).reshape(batch, length, self.n_modules, d_module_in)

    if n_past and self.mode == 'predict':
      past = self.variable('cache', 'inputs', jnp.zeros,
                           (batch, n_past, self.n_modules, d_module_in), x.dtype)
      xs = jnp.concatenate([past.value.astype(dtype), xs], axis=1)
      if not self.is_initializing():
        past.value = xs[:, -n_past:].astype(past.value.dtype)
    elif n_past:
      xs = jnp.pad(xs, ((0, 0), (n_past, 0), (0, 0), (0, 0)))
    half = (self.module_kernel_size - 1) // 2
    y = jax.lax.conv_general_dilated(
        xs, kernel.astype(dtype), window_strides=(1, 1),
        padding=((0, 0), (half, half)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))  # (b, l, S, M_out)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (d_module_out,), self.param_dtype)
      y = y + lift_to(bias.astype(dtype), y)
    return y.reshape(batch, length, self.n_modules * d_module_out)
