"""Core leaf layers: Dense, Embedding, norms, activations, Dropout, ShiftRight; `project_heads`.

Also the logical axis names (`AXIS_NAMES`) that every parameter and the main
activations carry, and `param_with_axes`, which creates a parameter with them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from terraflax.combinators.base import Layer, check_mode
from terraflax.combinators.core import Fn

Initializer = Callable[..., jax.Array]

# Logical axis names (`nn.with_logical_partitioning` on parameters,
# `nn.with_logical_constraint` on activations); config rules map them to mesh
# axes. embed: d_model (norm scales too); head_dim: per-head width k; mlp:
# feed-forward hidden d_ff; layers: the stacked axis of a scan; modules:
# sparse-QKV modules; controller: SparseFF's low-rank width; kernel: conv
# kernel taps. Any other (small) dimension is None: never sharded.
AXIS_NAMES = ('batch', 'length', 'embed', 'vocab', 'heads', 'head_dim', 'mlp', 'layers',
              'modules', 'controller', 'kernel')
Axes = tuple  # One logical name (or None) per dimension.
# Per-head projection weights: in (d, h, k), out (h, k, d); activations (b, l, h, k).
IN_PROJECTION_AXES = ('embed', 'heads', 'head_dim')
OUT_PROJECTION_AXES = ('heads', 'head_dim', 'embed')
HEAD_AXES = ('batch', 'length', 'heads', 'head_dim')


def check_axes(owner: str, axes, ndim: int | None = None):
  """Raises a ValueError naming `owner` unless `axes` are names of AXIS_NAMES or None."""
  bad = [a for a in axes if a is not None and a not in AXIS_NAMES]
  if bad or (ndim is not None and len(axes) != ndim):
    raise ValueError(
        f'{owner} axes={tuple(axes)} must be {ndim if ndim is not None else "some"} '
        f'logical axis names, each one of {AXIS_NAMES} or None.')


def param_with_axes(module: nn.Module, name: str, axes: Axes, init: Initializer, *args):
  """`module.param(name, init, *args)` whose dimensions carry the logical names `axes`.

  `args` are the initializer's (shape, then optionally dtype), as for
  `module.param`; the value (and the rng it draws) is the same, only boxed in
  `nn.LogicallyPartitioned` metadata in the variables `init` returns. Reading
  the parameter gives the plain array, and plain (unboxed) parameter trees
  apply unchanged.
  """
  check_axes(f'{type(module).__name__} parameter {name!r}', axes,
             len(args[0]) if args else None)
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), *args)


def constrain(x, axes: Axes):
  """`nn.with_logical_constraint(x, axes)` when x has one dimension per name, else x.

  Pins an activation's layout under a mesh and rules (`nn.logical_axis_rules`);
  without them (one device) it returns x itself.
  """
  return nn.with_logical_constraint(x, tuple(axes)) if x.ndim == len(axes) else x


def lift_to(vector, x):
  """Reshapes a (d,) vector to (1, ..., 1, d) so it adds to `x` without rank promotion."""
  return jnp.reshape(vector, (1,) * (x.ndim - 1) + vector.shape)


def first_argmax(x):
  """x (..., n) -> int32 (...): `jnp.argmax(x, axis=-1)`, the first largest entry (or the
  first NaN).

  Two plain reductions, the maximum and then the first index holding it. XLA:CPU runs
  jnp.argmax's paired value-and-index reduction slowly: over 32K logits 142 us against 3.5 us
  for these (in a decoding loop), over (4096, 64, 32) 15 ms against 4.5 ms.
  """
  largest = jnp.max(x, axis=-1, keepdims=True)
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  hits = (x == largest) | jnp.isnan(x)  # With a NaN, `largest` is NaN.
  return jnp.min(jnp.where(hits, index, x.shape[-1] - 1), axis=-1)


def advance_position(module: nn.Module, length: int):
  """First position of this call: 0, or the `cache` counter in predict mode.

  In `'predict'` mode, keeps an int32 scalar `position` in the module's
  `cache` collection and advances it by `length` on every call except `init`.
  `module` must have a `mode` field.
  """
  if module.mode != 'predict':
    return 0
  position = module.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
  start = position.value
  if not module.is_initializing():
    position.value = start + length
  return start


def after_reads(update, *results):
  """`update` made to depend on `results`: update + 0 * sum(results), its exact value.

  For a predict-mode cache written in place after the step has read it: XLA
  writes a loop-carried buffer in place only when every read of the old
  value is ordered before the write, else it copies the buffer (twice, per
  step). A data dependency on what the reads computed is that order (XLA:CPU
  drops optimization barriers before it places copies). A NaN or inf in
  `results` would reach the cache, as it reaches the outputs anyway.
  """
  zero = sum(jnp.sum(r.astype(jnp.float32)) for r in results) * 0.0
  return update + zero.astype(update.dtype)


def chunk_padded(owner: str, x, chunk_len: int, mode: str):
  """(b, l, d) -> (b, L, d), L the next multiple of chunk_len, zeros after l.

  For the chunked attention layers; 'predict' mode (positions one call at a
  time) is not padded. A rank other than 3 is an error naming `owner`.
  """
  if x.ndim != 3:
    raise ValueError(f'{owner} expects (batch, length, d_model) inputs, got shape {x.shape}.')
  pad = 0 if mode == 'predict' else -x.shape[1] % chunk_len
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x


@jax.custom_vjp
def project_heads(x, w):
  """x (b, l, d) @ w (d, h, k) -> (b, l, h, k), whose weight gradient transposes x.

  Autodiff would transpose the (wider) output cotangent for the weight
  gradient x^T @ dy; transposing x instead moves half as much memory when
  h * k = 2 d, as for the packed query/value projection.
  """
  return jnp.einsum('bld,dhk->blhk', x, w)


def _project_heads_fwd(x, w):
  return project_heads(x, w), (x, w)


def _project_heads_bwd(residuals, d_y):
  x, w = residuals
  b, length, d = x.shape
  d_y2 = d_y.reshape(b * length, -1)
  d_x = jnp.matmul(d_y2, w.reshape(d, -1).T).reshape(x.shape)
  d_w = jnp.matmul(x.reshape(b * length, d).T, d_y2).reshape(w.shape)
  return d_x, d_w


project_heads.defvjp(_project_heads_fwd, _project_heads_bwd)


class Dense(Layer):
  """[x] -> [x @ kernel + bias]: (..., d_in) -> (..., features); n_in = n_out = 1.

  `kernel` (d_in, features) is created from the first input's width. `dtype`
  is the compute dtype (e.g. bfloat16); parameters are stored in
  `param_dtype`. `axes` are the logical names of (d_in, features), e.g.
  ('embed', 'mlp') for a feed-forward layer's first kernel; the bias takes
  the second. A (b, l, features) output is pinned to ('batch', 'length',
  axes[1]) when axes[1] is not None.
  """

  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axes: Axes = (None, None)

  def __post_init__(self):
    check_axes('Dense', self.axes, 2)
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    kernel = param_with_axes(self, 'kernel', self.axes, self.kernel_init,
                             (x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.matmul(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = param_with_axes(self, 'bias', self.axes[1:], self.bias_init, (self.features,),
                             self.param_dtype)
      y = y + lift_to(bias.astype(dtype), y)
    if self.axes[1] is None:  # A layout the caller did not name: left to XLA.
      return y
    return constrain(y, ('batch', 'length', self.axes[1]))


class Embedding(Layer):
  """[ids] -> [vectors]: int (b, l) -> (b, l, d_feature); n_in = n_out = 1.

  `embedding` is (vocab_size, d_feature), with logical names `axes`
  (('vocab', 'embed'); a factorised embedding narrower than d_model names its
  width None). `attend(x)` maps (..., d_feature) back to (..., vocab_size)
  logits with the same table (weight tying). Outputs of rank 3 are pinned to
  ('batch', 'length', axes[1]) and ('batch', 'length', axes[0]).
  """

  vocab_size: int
  d_feature: int
  embedding_init: Initializer = nn.initializers.variance_scaling(1.0, 'fan_out', 'truncated_normal')
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axes: Axes = ('vocab', 'embed')

  def __post_init__(self):
    check_axes('Embedding', self.axes, 2)
    super().__post_init__()

  def setup(self):
    self.embedding = param_with_axes(self, 'embedding', self.axes, self.embedding_init,
                                     (self.vocab_size, self.d_feature), self.param_dtype)

  def __call__(self, ids):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f'Embedding expects integer token ids, got {ids.dtype}{tuple(ids.shape)}.')
    table = self.embedding.astype(self.dtype or self.param_dtype)
    return constrain(jnp.take(table, ids, axis=0), ('batch', 'length', self.axes[1]))

  def attend(self, x):
    """(..., d_feature) -> (..., vocab_size): dot products with every row."""
    dtype = self.dtype or jnp.result_type(x, self.embedding)
    logits = jnp.matmul(x.astype(dtype), self.embedding.astype(dtype).T)
    return constrain(logits, ('batch', 'length', self.axes[0]))


class LayerNorm(Layer):
  """[x] -> [normalised x]: (..., d) -> (..., d), statistics in float32.

  `scale` and `bias` (d,) have the logical name `axes` (('embed',)); a
  (b, l, d) output is pinned to ('batch', 'length', axes[0]).
  """

  epsilon: float = 1e-6
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Any = jnp.float32
  axes: Axes = ('embed',)

  def __post_init__(self):
    check_axes('LayerNorm', self.axes, 1)
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    variance = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(variance + self.epsilon)
    if self.use_scale:
      scale = param_with_axes(self, 'scale', self.axes, nn.initializers.ones, (d,),
                              self.param_dtype)
      y = y * lift_to(scale, y)
    if self.use_bias:
      bias = param_with_axes(self, 'bias', self.axes, nn.initializers.zeros, (d,),
                             self.param_dtype)
      y = y + lift_to(bias, y)
    return constrain(y.astype(x.dtype), ('batch', 'length') + tuple(self.axes))


class RMSNorm(Layer):
  """[x] -> [x / rms(x) * scale]: (..., d) -> (..., d), statistics in float32.

  `scale` (d,) has the logical name `axes` (('embed',)).
  """

  epsilon: float = 1e-6
  param_dtype: Any = jnp.float32
  axes: Axes = ('embed',)

  def __post_init__(self):
    check_axes('RMSNorm', self.axes, 1)
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon)
    scale = param_with_axes(self, 'scale', self.axes, nn.initializers.ones, (x.shape[-1],),
                            self.param_dtype)
    y = y * lift_to(scale, y)
    return constrain(y.astype(x.dtype), ('batch', 'length') + tuple(self.axes))


def dropout(x, rate: float, rng: jax.Array, shared_axes: Sequence[int] = ()):
  """Inverted dropout of `x` with one mask value shared along `shared_axes`."""
  if rate == 0.0:
    return x
  mask_shape = [1 if axis in [a % x.ndim for a in shared_axes] else n
                for axis, n in enumerate(x.shape)]
  keep = jax.random.bernoulli(rng, 1.0 - rate, mask_shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Dropout(Layer):
  """[x] -> [x with units zeroed at `rate`, rescaled]: any shape; 1 -> 1.

  Active in `'train'` mode only, drawing from the `dropout` rng stream; the
  identity in `'eval'` and `'predict'`. `shared_axes` share one mask value.
  """

  rate: float = 0.0
  mode: str = 'train'
  shared_axes: Sequence[int] = ()

  def __post_init__(self):
    check_mode(self.mode, 'Dropout mode')
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f'Dropout rate must be in [0, 1), got {self.rate}.')
    super().__post_init__()

  def __call__(self, x):
    if self.mode != 'train' or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'), self.shared_axes)


def check_packed(owner: str, packed, mode: str) -> None:
  """Raises unless `packed` is a bool, and False in 'predict' mode (decoding is unpacked)."""
  if not isinstance(packed, bool):
    raise ValueError(f'{owner} packed must be True or False, got {packed!r}.')
  if packed and mode == 'predict':
    raise ValueError(f"{owner}: packed=True (segment ids) is for 'train' and 'eval' mode; "
                     "'predict' mode decodes one unpacked sequence per row.")


def checked_segments(owner: str, segment_ids, x, what: str = 'segment_ids'):
  """`segment_ids` as int32 (b, l), after checking it is integer and matches x's (b, l)."""
  if segment_ids.shape != x.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f'{owner} needs {what} int (b, l) = {tuple(x.shape[:2])} (document ids, '
                     f'0 = padding), got {segment_ids.dtype}{tuple(segment_ids.shape)}.')
  return segment_ids.astype(jnp.int32)


class SegmentsPassThrough:
  """Stack signature of a packable 1 -> 1 layer: [x] -> [y], or packed [x, segment_ids] ->
  [y, segment_ids] (2 -> 2). A mixin for layers with a `packed` field; list it first."""

  @property
  def n_in(self):
    return 2 if self.packed else 1

  @property
  def n_out(self):
    return self.n_in


class ShiftRight(SegmentsPassThrough, Layer):
  """[x] -> [x shifted right by `n_positions` along axis 1, padded]: (b, l, ...).

  Teacher forcing: position i then sees the tokens before i. In `'predict'`
  mode the input is already the previous token, so this is the identity.

  `packed=True` ('train'/'eval'): [x, segment_ids] -> [shifted, segment_ids],
  2 -> 2, segment_ids int (b, l): each document is shifted on its own (its
  first `n_positions` tokens become `pad_id`, never its neighbour's tokens).
  """

  n_positions: int = 1
  mode: str = 'train'
  pad_id: int = 0
  packed: bool = False

  def __post_init__(self):
    check_mode(self.mode, 'ShiftRight mode')
    check_packed('ShiftRight', self.packed, self.mode)
    super().__post_init__()

  def __call__(self, x, *segment_ids):
    if self.mode == 'predict':
      return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (self.n_positions, 0)
    shifted = jnp.pad(x, pad, constant_values=self.pad_id)[:, :x.shape[1]]
    if not self.packed:
      return shifted
    segments = checked_segments('ShiftRight', segment_ids[0], x)
    before = jnp.pad(segments, ((0, 0), (self.n_positions, 0)), constant_values=-1)
    same = (before[:, :x.shape[1]] == segments).reshape(segments.shape + (1,) * (x.ndim - 2))
    return jnp.where(same, shifted, jnp.asarray(self.pad_id, x.dtype)), segment_ids[0]


def Relu():  # pylint: disable=invalid-name
  """[x] -> [max(x, 0)]."""
  return Fn('Relu', jax.nn.relu)


def Gelu():  # pylint: disable=invalid-name
  """[x] -> [x * Phi(x)] (exact, with erf)."""
  return Fn('Gelu', lambda x: jax.nn.gelu(x, approximate=False))


def FastGelu():  # pylint: disable=invalid-name
  """[x] -> [gelu(x)] with the tanh approximation."""
  return Fn('FastGelu', lambda x: jax.nn.gelu(x, approximate=True))


def Sigmoid():  # pylint: disable=invalid-name
  """[x] -> [1 / (1 + exp(-x))]."""
  return Fn('Sigmoid', jax.nn.sigmoid)


def Tanh():  # pylint: disable=invalid-name
  """[x] -> [tanh(x)]."""
  return Fn('Tanh', jnp.tanh)


def Softmax(axis: int = -1):  # pylint: disable=invalid-name
  """[x] -> [softmax(x) along axis]."""
  return Fn('Softmax', lambda x: jax.nn.softmax(x, axis=axis))


def LogSoftmax(axis: int = -1):  # pylint: disable=invalid-name
  """[x] -> [log_softmax(x) along axis]."""
  return Fn('LogSoftmax', lambda x: jax.nn.log_softmax(x, axis=axis))
