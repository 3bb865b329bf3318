"""Int8 and bfloat16 weights for inference: per-channel symmetric int8 scales, no model changes.

Why not a library: qwix 0.1.8 intercepts `jax.lax.dot_general`, `jnp.dot` and
`jnp.einsum` but not the `jnp.matmul` our `Dense` uses, identifies weights by
tracing `param` calls, and its `quantize_params` dropped the stacked layer axis
of `Repeat`'s scanned kernels (a scan length error); aqtp needs each layer to
take an injected `dot_general`. Both would mean rewriting the foundation
layers, so this module is a small documented implementation instead.

Scheme (weight-only, W8A32 / W8A16):
  quantize(w, axis)   scale = max |w| over `axis` / 127 (1 where that is 0),
                      q = round(w / scale) in [-127, 127] (int8), so that
                      |w - q * scale| <= scale / 2 elementwise.
  Dense kernels (..., d_in, d_out): one scale per output channel (and per
    stacked layer of a `Repeat`): `kernel` becomes int8 and `kernel_scale`
    (..., 1, d_out) float32 sits beside it.
  Embedding tables (v, d): one scale per token row: `embedding` int8 and
    `embedding_scale` (v, 1).
  Everything else (biases, norms, positional tables, prefixes) stays float32.

Running a model on int8 weights: `quantize_model_params(model, params,
*inputs)` finds the `Dense` and `Embedding` layers by tracing the model once,
and `with int8_inference(): model.apply({'params': qparams}, ...)` makes those
layers read their int8 weights: a Dense computes (x @ q) * scale + bias (the
scale applied per output channel), an Embedding gathers int8 rows and scales
them. The model code and every mode (predict-mode decoding included) are
unchanged. For code that needs plain float weights, `dequantize_params` is
the dequantize-on-load path.

bfloat16 storage: `cast_weights(params, jnp.bfloat16)` halves the bytes of
every matrix (kernels, tables); vectors (biases, norms) stay float32. Inside
the same context a Dense reads its bfloat16 kernel as stored and computes
in float32, so eval and decoding give the same numbers. For decoding,
`cast_model_weights` (what `prepare_for_decoding(weights='bf16')` uses)
casts only the Dense kernels and Embedding tables, the weights read as
stored: XLA widens any other bfloat16 matrix to a float32 copy per call,
which made a TerraformerLM (SparseFF, sparse QKV) decode 0.54-0.77x as fast
as with float32 weights.

Reading the weights as stored (`weight_matmul`): batch-1 decoding is bound by
reading the weights once per token, so int8 is only faster if the product
reads 1 byte per weight. XLA:CPU (jax 0.10) does not: a product with an
int8 or bfloat16 operand converted inside it (or an int8 x int8
`dot_general` with int32 results) ran at 0.2-0.9 GB/s on a (1, 1024) x
(1024, 16384) product, 25-100x slower than the float32 one. On the CPU the
native kernel `terraflax.kernels.lowp_cpu` widens 16 weights at a time in
registers (no float copy of the matrix). Its XLA fallback (kernel='xla',
`kernels.xla_only()`, no compiler) converts `_XLA_BLOCK` rows of the matrix
at a time inside a `lax.scan`, so only a small block is ever float (~5x
faster than the whole conversion on the CPU; still slower than float32
weights); other backends convert inside the product, which their compilers
fuse. `prepare_for_decoding(model, params, weights=...)` is the one call
that readies parameters for decoding with 'f32', 'bf16' or 'int8' weights.

Tolerance (what the tests assert): a quantized Dense's output differs from
the float one by at most sum_i |x_i| * scale_j / 2 for output channel j, plus
float32 rounding, since each weight moves by at most half its channel's scale.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from terraflax import kernels
from terraflax.kernels import lowp_cpu
from terraflax.layers.core import Dense, Embedding, lift_to
from terraflax.rng import stream_keys

QMAX = 127
DENSE, EMBEDDING = 'dense', 'embedding'
WEIGHTS = ('f32', 'bf16', 'int8')  # prepare_for_decoding's weight formats
LOW_PRECISION = (jnp.int8, jnp.bfloat16)  # weight dtypes read as stored inside the context
_XLA_BLOCK = 64  # rows of a weight matrix converted at a time by the XLA fallback


def quantize(w, axis: int):
  """(q int8, scale float32): symmetric int8 with one scale per slice along all but `axis`.

  `scale` keeps `axis` with size 1 (it broadcasts against `q`);
  `q * scale` is within `scale / 2` of `w` elementwise.
  """
  w = jnp.asarray(w, jnp.float32)
  peak = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
  scale = jnp.where(peak > 0, peak / QMAX, 1.0)
  q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
  return q, scale.astype(jnp.float32)


def dequantize(q, scale):
  """q * scale in float32."""
  return q.astype(jnp.float32) * scale


def _module_path(module) -> tuple[str, ...]:
  return tuple(module.path)


def find_quantizable(model, *inputs, **apply_kwargs) -> dict[tuple[str, ...], str]:
  """{parameter-tree path of a layer: 'dense' | 'embedding'} for the model's Dense/Embedding layers.

  Traces `model.init` abstractly (nothing is computed) and records every
  `terraflax.layers.Dense` and `Embedding` that runs, by its module path.
  """
  found: dict[tuple[str, ...], str] = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Dense) and context.method_name == '__call__':
      found[_module_path(context.module)] = DENSE
    elif isinstance(context.module, Embedding) and context.method_name in ('__call__', 'attend'):
      found[_module_path(context.module)] = EMBEDDING
    return next_fun(*args, **kwargs)

  rngs = stream_keys(jax.random.key(0))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(rngs, *inputs, **apply_kwargs))
  return found


def quantize_params(params, layers: dict[tuple[str, ...], str]):
  """The parameter tree with the given layers' weights in int8 and their scales beside them.

  `layers` maps a layer's path to 'dense' or 'embedding' (`find_quantizable`).
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  out = dict(flat)
  for path, kind in layers.items():
    name = 'kernel' if kind == DENSE else 'embedding'
    key = path + (name,)
    if key not in flat:
      raise ValueError(f'quantize_params: no parameter {"/".join(key)} for the {kind} layer at '
                       f'{"/".join(path)}; were these parameters made by this model?')
    weight = flat[key]
    # Dense: scale over d_in (axis -2), one per output channel; Embedding: over d, one per row.
    q, scale = quantize(weight, axis=-2 if kind == DENSE else -1)
    out[key], out[path + (f'{name}_scale',)] = q, scale
  return traverse_util.unflatten_dict(out)


def quantize_model_params(model, params, *inputs, embeddings: bool = True, **apply_kwargs):
  """`quantize_params` of every Dense (and, if `embeddings`, Embedding) layer of `model`."""
  layers = find_quantizable(model, *inputs, **apply_kwargs)
  if not embeddings:
    layers = {p: k for p, k in layers.items() if k == DENSE}
  return quantize_params(params, layers)


def dequantize_params(qparams):
  """Float32 parameters from a quantized tree (the `*_scale` leaves folded back in)."""
  flat = traverse_util.flatten_dict(qparams)
  out = {}
  for key, value in flat.items():
    if key[-1].endswith('_scale') and key[:-1] + (key[-1][:-len('_scale')],) in flat:
      continue
    scale = flat.get(key[:-1] + (f'{key[-1]}_scale',))
    out[key] = dequantize(value, scale) if scale is not None else value
  return traverse_util.unflatten_dict(out)


def _scale_of(module, name):
  if not module.has_variable('params', f'{name}_scale'):
    raise ValueError(f'{"/".join(module.path)}: {name} is int8 but there is no {name}_scale; '
                     'quantize parameters with terraflax.quantization.quantize_params.')
  return _get(module, f'{name}_scale')


def _get(module, name):
  """The module's parameter `name` as a plain array (boxed or not)."""
  return nn.meta.unbox(module.get_variable('params', name))


def _xla_matmul(x, w, scale):
  """weight_matmul's XLA path: float32 (..., M); at most `_XLA_BLOCK` rows of w float at once."""
  k_size, m = w.shape
  block = next((b for b in range(min(_XLA_BLOCK, k_size), 0, -1) if k_size % b == 0), 1)
  if (w.dtype == jnp.float32 or jax.default_backend() != 'cpu' or k_size <= _XLA_BLOCK
      or block < 16):
    y = jnp.matmul(x, w.astype(jnp.float32))
  else:
    rows = x.reshape(-1, k_size).reshape(-1, k_size // block, block)
    blocks = w.reshape(k_size // block, block, m)

    def step(total, i):
      return total + rows[:, i] @ blocks[i].astype(jnp.float32), None

    y, _ = jax.lax.scan(step, jnp.zeros((rows.shape[0], m), jnp.float32),
                        jnp.arange(k_size // block))
    y = y.reshape(x.shape[:-1] + (m,))
  return y if scale is None else y * lift_to(scale.reshape(-1), y)


def weight_matmul(x, w, scale=None, *, kernel: str = 'auto'):
  """x (..., K) @ w (K, M) [* scale (M,)] in float32, w read as stored: float32 (..., M).

  w is int8 (with its per-column `scale`, any shape of M entries), bfloat16
  or float32. `kernel`: 'auto' takes the native CPU kernel where it applies,
  'xla' the XLA path, 'cpu' the kernel or an error saying why not.
  """
  x = x.astype(jnp.float32)
  if scale is not None:
    scale = scale.astype(jnp.float32)
  if w.dtype == jnp.float32 and scale is None:
    kernels.check_kernel('weight_matmul', kernel)
    return jnp.matmul(x, w)
  why_not = lowp_cpu.unsupported(x, w, scale)
  if kernels.use_native('weight_matmul', kernel, why_not, lowp_cpu.available):
    return lowp_cpu.matmul(x, w, scale)
  return _xla_matmul(x, w, scale)


def _low_precision_dense(module: Dense, x):
  w = _get(module, 'kernel')
  scale = _scale_of(module, 'kernel') if w.dtype == jnp.int8 else None  # (1, d_out)
  y = weight_matmul(x, w, scale)
  if module.use_bias:
    y = y + lift_to(_get(module, 'bias').astype(y.dtype), y)
  return y.astype(module.dtype or jnp.result_type(x, jnp.float32))


def _low_precision_embedding(module: Embedding, method: str, x):
  table = _get(module, 'embedding')
  scale = _scale_of(module, 'embedding') if table.dtype == jnp.int8 else None  # (v, 1)
  dtype = module.dtype or module.param_dtype
  if method == '__call__':
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f'Embedding expects integer token ids, got {x.dtype}{tuple(x.shape)}.')
    rows = jnp.take(table, x, axis=0).astype(dtype)
    return rows if scale is None else rows * jnp.take(scale, x, axis=0).astype(dtype)
  dtype = module.dtype or jnp.result_type(x, jnp.float32)
  # x @ (q * scale).T == (x @ q.T) * scale.T: no float copy of the (v, d) table.
  logits = jnp.matmul(x.astype(dtype), table.T.astype(dtype))
  return logits if scale is None else logits * scale[:, 0].astype(dtype)


def _has_low_precision(module, name: str) -> bool:
  return module.has_variable('params', name) and _get(module, name).dtype in LOW_PRECISION


def _interceptor(next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  if isinstance(module, Dense) and method == '__call__' and _has_low_precision(module, 'kernel'):
    return _low_precision_dense(module, *args)
  if (isinstance(module, Embedding) and method in ('__call__', 'attend')
      and _has_low_precision(module, 'embedding')):
    return _low_precision_embedding(module, method, *args)
  return next_fun(*args, **kwargs)


class LowPrecisionInference:
  """In `with LowPrecisionInference():` Dense/Embedding layers read int8/bf16 weights as stored.

  Layers whose weights are float32 run as usual, so a partly quantized tree
  works too. Reusable: one instance may be entered any number of times.
  The context must be active, in the tracing thread, when a function is
  traced (jit caches the trace, keyed by the parameters' dtypes, not by
  this context).
  """

  def __init__(self):
    self._active = []

  def __enter__(self):
    manager = nn.intercept_methods(_interceptor)
    manager.__enter__()
    self._active.append(manager)
    return self

  def __exit__(self, *exc):
    return self._active.pop().__exit__(*exc)


def int8_inference() -> LowPrecisionInference:
  """`with int8_inference():` runs Dense/Embedding layers on int8 (and bfloat16) weights."""
  return LowPrecisionInference()


def cast_weights(params, dtype=jnp.bfloat16):
  """The parameter tree with every floating matrix (ndim >= 2) in `dtype`; vectors unchanged.

  Kernels and tables (nearly all the bytes) change; biases and norm scales
  stay as they are. Run the model inside `LowPrecisionInference()` so Dense
  layers read bfloat16 kernels as stored.
  """
  def cast(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2:
      return leaf.astype(dtype)
    return leaf
  return jax.tree_util.tree_map(cast, nn.meta.unbox(params))


def cast_model_weights(model, params, *inputs, dtype=jnp.bfloat16, embeddings: bool = True,
                       **apply_kwargs):
  """The parameter tree with the kernels of `model`'s Dense layers and (if `embeddings`) the
  tables of its Embeddings (`find_quantizable`) in `dtype`; every other parameter unchanged.

  These are the weights a Dense / Embedding reads as stored inside
  `LowPrecisionInference()`. Other layers' matrices (SparseFF, sparse QKV's
  convolutions, LSH projections) would be widened to float32 on every call,
  which costs more than their smaller storage saves, so they stay float32.
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  for path, kind in find_quantizable(model, *inputs, **apply_kwargs).items():
    if kind == EMBEDDING and not embeddings:
      continue
    key = path + ('kernel' if kind == DENSE else 'embedding',)
    if key not in flat:
      raise ValueError(f'cast_model_weights: no parameter {"/".join(key)} for the {kind} layer '
                       f'at {"/".join(path)}; were these parameters made by this model?')
    flat[key] = flat[key].astype(dtype)
  return traverse_util.unflatten_dict(flat)


def prepare_for_decoding(model, params, *inputs, weights: str = 'int8', embeddings: bool = True,
                         **apply_kwargs):
  """(context, params) to decode `model` with 'f32', 'bf16' or 'int8' weights.

  `with context: autoregressive_sample(model, params, ...)`. `inputs` are
  what `model.init` takes to find the layers (default: one token,
  int32 (1, 1)); `embeddings=False` keeps the embedding table float32. 'bf16'
  casts the Dense kernels and Embedding tables only (`cast_model_weights`).
  'f32' returns the parameters unboxed and a context that changes nothing.
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights must be one of {WEIGHTS}, got {weights!r}.')
  params = nn.meta.unbox(params)
  if weights == 'f32':
    return contextlib.nullcontext(), params
  inputs = inputs or (jnp.zeros((1, 1), jnp.int32),)
  if weights == 'bf16':
    return LowPrecisionInference(), cast_model_weights(model, params, *inputs,
                                                       embeddings=embeddings, **apply_kwargs)
  return LowPrecisionInference(), quantize_model_params(model, params, *inputs,
                                                       embeddings=embeddings, **apply_kwargs)


def nbytes(tree: Any) -> int:
  """Bytes of every array in a tree."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(tree)))
