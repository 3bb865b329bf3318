"""Int8 weight quantization for inference: per-channel symmetric scales, no model changes.

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
int8 matrix is converted inside the matmul, the scale applied per output
channel), an Embedding gathers int8 rows and scales them. The model code and
every mode (predict-mode decoding included) are unchanged. For code that needs
plain float weights, `dequantize_params` is the dequantize-on-load path.

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

from terraflax.layers.core import Dense, Embedding, lift_to
from terraflax.rng import stream_keys

QMAX = 127
DENSE, EMBEDDING = 'dense', 'embedding'


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


def _int8_dense(module: Dense, x):
  q = _get(module, 'kernel')
  scale = _scale_of(module, 'kernel')  # (1, d_out)
  dtype = module.dtype or jnp.result_type(x, scale)
  y = jnp.matmul(x.astype(dtype), q.astype(dtype))
  y = y * lift_to(scale[0].astype(dtype), y)
  if module.use_bias:
    y = y + lift_to(_get(module, 'bias').astype(dtype), y)
  return y


def _int8_embedding(module: Embedding, method: str, x):
  q = _get(module, 'embedding')
  scale = _scale_of(module, 'embedding')  # (v, 1)
  if method == '__call__':
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f'Embedding expects integer token ids, got {x.dtype}{tuple(x.shape)}.')
    dtype = module.dtype or module.param_dtype
    return (jnp.take(q, x, axis=0).astype(dtype) * jnp.take(scale, x, axis=0).astype(dtype))
  dtype = module.dtype or jnp.result_type(x, scale)
  # x @ (q * scale).T == (x @ q.T) * scale.T: no float copy of the (v, d) table.
  return jnp.matmul(x.astype(dtype), q.T.astype(dtype)) * scale[:, 0].astype(dtype)


@contextlib.contextmanager
def int8_inference():
  """Within this context, Dense and Embedding layers whose weights are int8 compute with them.

  Layers whose weights are still float run as usual, so a partly quantized
  tree works too.
  """

  def interceptor(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if isinstance(module, Dense) and method == '__call__':
      if module.has_variable('params', 'kernel') and _get(module, 'kernel').dtype == jnp.int8:
        return _int8_dense(module, *args)
    elif isinstance(module, Embedding) and method in ('__call__', 'attend'):
      if module.has_variable('params', 'embedding') and \
          _get(module, 'embedding').dtype == jnp.int8:
        return _int8_embedding(module, method, *args)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def nbytes(tree: Any) -> int:
  """Bytes of every array in a tree."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(tree)))
