"""Terraformer's sparse QKV: a multiplicative dense layer, a causal conv, and attention.

Jaszczur et al., "Sparse is Enough in Scaling Transformers" (2021), section
on sparse QKV: the d x d projections of attention are replaced by
`MultiplicativeDense` (d * (S + M) parameters, S modules of M = d / S units)
followed by `ModularCausalConv`, a small convolution over (length, modules)
that is causal along the length. Both map flat (b, l, S * M) arrays, so they
compose with `Serial` and attention can feed their outputs straight to its
head split. `MultiplicativeConvCausalAttention` is causal self-attention whose
queries, keys and values come from them.

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
from terraflax.layers.attention import CausalAttention
from terraflax.layers.core import (
    HEAD_AXES, Axes, check_axes, check_packed, checked_segments, constrain, lift_to,
    param_with_axes)

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

  Parameters: `gating` (d_in, S), `kernel` (d_in, M), `bias` (d_out,); `axes`
  are the logical names of (d_in, d_out): gating (axes[0], 'modules'),
  kernel (axes[0], None), bias (axes[1],).
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
  axes: Axes = ('embed', None)

  def __post_init__(self):
    _positive_int('MultiplicativeDense', 'n_modules', self.n_modules)
    check_axes('MultiplicativeDense', self.axes, 2)
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
    d_in_axis, d_out_axis = self.axes
    gating = param_with_axes(self, 'gating', (d_in_axis, 'modules'), self.gating_init,
                             (d_in, self.n_modules), self.param_dtype)
    kernel = param_with_axes(self, 'kernel', (d_in_axis, None), self.kernel_init,
                             (d_in, d_module), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.einsum('...i,is,im->...sm', x.astype(dtype), gating.astype(dtype),
                   kernel.astype(dtype))
    y = y.reshape(x.shape[:-1] + (d_out,))
    if self.use_bias:
      bias = param_with_axes(self, 'bias', (d_out_axis,), self.bias_init, (d_out,),
                             self.param_dtype)
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
  logical axes ('kernel', None, None, None), and `bias` (M_out,), (None,):
  small, never sharded.

  `packed=True` ('train'/'eval'): [x, segment_ids] -> [y], 2 -> 1, with
  segment_ids int (b, l) of a packed row: output t sees only the inputs of
  its own document (as if each document were convolved alone).
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
  packed: bool = False

  def __post_init__(self):
    check_mode(self.mode, 'ModularCausalConv mode')
    check_packed('ModularCausalConv', self.packed, self.mode)
    for name in ('n_modules', 'length_kernel_size', 'module_kernel_size'):
      _positive_int('ModularCausalConv', name, getattr(self, name))
    if self.d_module_out is not None:
      _positive_int('ModularCausalConv', 'd_module_out', self.d_module_out)
    if self.module_kernel_size % 2 != 1:
      raise ValueError(
          f'ModularCausalConv module_kernel_size must be odd (centred on the module), '
          f'got {self.module_kernel_size}.')
    super().__post_init__()

  @property
  def n_in(self):
    return 2 if self.packed else 1

  def conv_inputs(self, x):
    """(xs, kernel, d_module_out): x (b, l, S * M_in) as (b, l, S, M_in) in the compute
    dtype, and the kernel (length_kernel_size, module_kernel_size, M_in, M_out)."""
    name = type(self).__name__
    if x.ndim != 3:
      raise ValueError(f'{name} expects (b, l, d) inputs, got shape {x.shape}.')
    batch, length, d_in = x.shape
    if d_in % self.n_modules:
      raise ValueError(f'{name} input width {d_in} must be a multiple of '
                       f'n_modules={self.n_modules}.')
    d_module_in = d_in // self.n_modules
    d_module_out = self.d_module_out or d_module_in
    kernel = param_with_axes(
        self, 'kernel', ('kernel', None, None, None), self.kernel_init,
        (self.length_kernel_size, self.module_kernel_size, d_module_in, d_module_out),
        self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    xs = x.astype(dtype).reshape(batch, length, self.n_modules, d_module_in)
    return xs, kernel, d_module_out

  def with_cached_past(self, xs, cache_dtype, window=None):
    """(b, n_past + l, S, M_in): the cached inputs of the previous positions, then `xs`.

    The cache keeps the last n_past rows, or `window(rows)` where a subclass keeps others.
    """
    n_past = self.length_kernel_size - 1
    past = self.variable('cache', 'inputs', jnp.zeros, (xs.shape[0], n_past) + xs.shape[2:],
                         cache_dtype)
    xs = jnp.concatenate([past.value.astype(xs.dtype), xs], axis=1)
    if not self.is_initializing():
      past.value = (xs[:, -n_past:] if window is None else window(xs)).astype(past.value.dtype)
    return xs

  @nn.compact
  def __call__(self, x, *segment_ids):
    xs, kernel, d_module_out = self.conv_inputs(x)
    batch, length = x.shape[:2]
    dtype = xs.dtype
    n_past = self.length_kernel_size - 1
    if n_past and self.mode == 'predict':
      xs = self.with_cached_past(xs, x.dtype)
    elif n_past:
      xs = jnp.pad(xs, ((0, 0), (n_past, 0), (0, 0), (0, 0)))
    half = (self.module_kernel_size - 1) // 2
    if half:  # Whole modules for the window over them: XLA:CPU's partitioner got a module
      # axis sharded over 'model' wrong inside a scanned stack (jax 0.10).
      xs = constrain(xs, ('batch', None, None, None))
    conv = lambda inputs, taps: jax.lax.conv_general_dilated(
        inputs, taps.astype(dtype), window_strides=(1, 1),
        padding=((0, 0), (half, half)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))  # (b, l, S, M_out)
    if self.packed:
      segments = checked_segments('ModularCausalConv', segment_ids[0], x)
      padded = jnp.pad(segments, ((0, 0), (n_past, 0)), constant_values=-1)
      y = None
      for a in range(self.length_kernel_size):  # Tap a reads input t - n_past + a.
        same = (padded[:, a:a + length] == segments).astype(dtype)[:, :, None, None]
        term = conv(xs[:, a:a + length] * same, kernel[a:a + 1])
        y = term if y is None else y + term
    else:
      y = conv(xs, kernel)
    if self.use_bias:
      bias = param_with_axes(self, 'bias', (None,), self.bias_init, (d_module_out,),
                             self.param_dtype)
      y = y + lift_to(bias.astype(dtype), y)
    return y.reshape(batch, length, self.n_modules * d_module_out)


OUTPUT_LAYERS = ('dense', 'multiplicative', 'none')


class MultiplicativeConvCausalAttention(CausalAttention):
  """[x] -> [y]: (b, l, d) -> (b, l, d); n_in = n_out = 1. Causal attention, sparse QKV.

  `CausalAttention` whose d x d query/key/value projections are replaced by
  the Terraformer's sparse QKV (arranged as Trax's layer of this name):

    shared = MultiplicativeDense(n_modules)(x)                  (b, l, S * M)
    q = ModularCausalConv(module_kernel_size)(shared)           per head
    k = ModularCausalConv(module_kernel_size)(shared)           per head
    v = ModularCausalConv(module_kernel_size=1)(shared)         per head

  One multiplicative layer is shared by Q, K and V; each has its own
  convolution over (length, modules), causal along the length
  (`length_kernel_size` positions: the token and the ones before it). The
  query and key convolutions also mix `module_kernel_size` neighbouring
  modules; the value convolution treats each module on its own. With
  `n_modules` (S, default `n_heads`) equal to `n_heads`, module s becomes
  head s. The heads attend causally (`dot_product_attention`) and
  `output_layer` maps them back to d: 'dense' (a `Dense`, as in
  `CausalAttention`), 'multiplicative' (a `MultiplicativeDense` with S
  modules) or 'none' (the merged heads as they are; needs n_heads * d_v = d).
  Parameters: `multiplicative/{gating, kernel, bias}`,
  `{query,key,value}_conv/{kernel, bias}`, `output/...`, d * (S + M) +
  O(M^2) for the projections instead of 3 d^2.

  `'predict'` mode: the key/value cache of `CausalAttention`
  (`cached_key`, `cached_value`, `position`, `max_len` positions) plus each
  convolution's last `length_kernel_size - 1` inputs (`{query,key,value}_conv/
  inputs`), so one call per token (or a longer prefill call) equals the full
  causal pass. Other fields as in `CausalAttention`.
  """

  n_modules: int | None = None
  length_kernel_size: int = 3
  module_kernel_size: int = 3
  output_layer: str = 'dense'

  def __post_init__(self):
    name = type(self).__name__
    if self.n_modules is not None:
      _positive_int(name, 'n_modules', self.n_modules)
    _positive_int(name, 'length_kernel_size', self.length_kernel_size)
    _positive_int(name, 'module_kernel_size', self.module_kernel_size)
    if self.module_kernel_size % 2 != 1:
      raise ValueError(f'{name} module_kernel_size must be odd (centred on the module), got '
                       f'{self.module_kernel_size}.')
    if self.output_layer not in OUTPUT_LAYERS:
      raise ValueError(f'{name} output_layer must be one of {OUTPUT_LAYERS}, got '
                       f'{self.output_layer!r}.')
    super().__post_init__()

  def _n_modules(self, d_model: int, d_qk: int, d_v: int) -> int:
    n_modules = self.n_modules or self.n_heads
    for what, width in (('the input width', d_model), ('n_heads * d_qk', self.n_heads * d_qk),
                        ('n_heads * d_v', self.n_heads * d_v)):
      if width % n_modules:
        raise ValueError(f'{type(self).__name__}: {what} = {width} must be a multiple of '
                         f'n_modules={n_modules}' + ('' if self.n_modules else ' (n_heads)')
                         + '.')
    return n_modules

  def queries_keys_values(self, x, d_qk: int, d_v: int, segment_ids=None):
    if segment_ids is None:
      return self.project_heads(x, d_qk, d_v, ModularCausalConv)
    return self.project_heads(x, d_qk, d_v, ModularCausalConv, (segment_ids,), packed=True)

  def project_heads(self, x, d_qk: int, d_v: int, conv_cls, conv_args=(), **conv_fields):
    """(q, k, v), (b, l, n_heads, d_qk / d_qk / d_v): the shared MultiplicativeDense of x, then
    one `conv_cls` (ModularCausalConv or a subclass) per projection, applied as
    conv(shared, *conv_args) with the extra dataclass fields `conv_fields`."""
    n_modules = self._n_modules(x.shape[-1], d_qk, d_v)
    shared = MultiplicativeDense(n_modules=n_modules, use_bias=self.use_bias, dtype=self.dtype,
                                 name='multiplicative')(x)

    def heads(name, width, module_kernel_size):
      conv = conv_cls(
          n_modules=n_modules, d_module_out=self.n_heads * width // n_modules,
          length_kernel_size=self.length_kernel_size, module_kernel_size=module_kernel_size,
          use_bias=self.use_bias, mode=self.mode, dtype=self.dtype, name=name, **conv_fields)
      y = conv(shared, *conv_args)
      return constrain(jnp.reshape(y, y.shape[:-1] + (self.n_heads, width)), HEAD_AXES)

    return (heads('query_conv', d_qk, self.module_kernel_size),
            heads('key_conv', d_qk, self.module_kernel_size),
            heads('value_conv', d_v, 1))

  def combine(self, out, d_model: int):
    if self.output_layer == 'dense':
      return super().combine(out, d_model)
    out = jnp.reshape(out, out.shape[:-2] + (out.shape[-2] * out.shape[-1],))
    if self.output_layer == 'none':
      if out.shape[-1] != d_model:
        raise ValueError(f"{type(self).__name__} output_layer='none' needs n_heads * d_v = "
                         f'{out.shape[-1]} to equal the input width {d_model}.')
      return out
    return MultiplicativeDense(n_modules=self.n_modules or self.n_heads, d_out=d_model,
                               use_bias=self.use_bias, dtype=self.dtype, axes=(None, 'embed'),
                               name='output')(out)
