"""Few-row float32 products that stream the weights (matvec_cpu.cc).

  x (..., K) float32, w_1 (K, M_1), ..., w_n (K, M_n) float32
  -> (x @ w_1, ..., x @ w_n), each float32 (..., M_i)

For decoding, where a step multiplies one row per sequence by every weight
matrix and its time is the time to read the weights: each thread reads a
contiguous range of rows of every w in memory order (XLA:CPU's dot read a
(1, 512) x (512, 512) product at ~60% of the machine's streaming bandwidth).
Products that share x (a layer's query, key and value projections) run in
one call. Meant for at most `MAX_ROWS` rows; M_i multiples of 16.

Inference only (no gradient). Under `jax.vmap` the mapped rows become rows
of one call; under a device mesh (`spmd.partitioned`) each device runs its
own rows with the whole weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from terraflax import kernels
from terraflax.kernels.spmd import partitioned

TARGET = 'TerraflaxStreamMatmul'
MAX_ROWS = 8  # more rows than this reuse the weights from cache: a blocked product wins
MAX_PRODUCTS = 8


def available() -> bool:
  """Whether the kernel library is built and registered (builds it on the first call)."""
  return kernels.load('matvec_cpu', (TARGET,))


def unsupported(x, *ws) -> str | None:
  """Why the kernel cannot compute x @ w for each w, or None if it can."""
  if not 1 <= len(ws) <= MAX_PRODUCTS:
    return f'takes 1 to {MAX_PRODUCTS} weight matrices, got {len(ws)}'
  if x.dtype != jnp.float32 or any(w.dtype != jnp.float32 for w in ws):
    return f'x and w must be float32, got {x.dtype} and {[str(w.dtype) for w in ws]}'
  rows = x.size // max(x.shape[-1], 1) if x.ndim else 0
  if x.ndim < 1 or rows > MAX_ROWS:
    return f'x (..., K) must have at most {MAX_ROWS} rows, got shape {tuple(x.shape)}'
  for w in ws:
    if w.ndim != 2 or w.shape[0] != x.shape[-1] or w.shape[1] % kernels.LANES:
      return (f'w must be (K, M) with K = {x.shape[-1]} and M a multiple of {kernels.LANES}, '
              f'got {tuple(w.shape)}')
  return None


def _call(x, *ws):
  """The custom call on rows: x (N, K) -> tuple of (N, M_i)."""
  shapes = [jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32) for w in ws]
  return tuple(jax.ffi.ffi_call(TARGET, shapes, vmap_method='sequential')(x, *ws))


@jax.custom_batching.custom_vmap
def _rows(x, *ws):
  layout = dict(operands=('b.',) + ('..',) * len(ws), results=('b.',) * len(ws))
  return partitioned(_call, **layout)(x, *ws)


@_rows.def_vmap
def _rows_vmap(axis_size, in_batched, x, *ws):
  x_batched, *weights_batched = in_batched
  if not any(weights_batched):  # Mapped rows of x are more rows of one call.
    ys = _rows(x.reshape(-1, x.shape[-1]), *ws)
    return tuple(y.reshape(x.shape[:-1] + y.shape[-1:]) for y in ys), (True,) * len(ws)
  operands = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
              for a, batched in zip((x, *ws), in_batched)]
  return jax.lax.map(lambda args: _rows(*args), tuple(operands)), (True,) * len(ws)


def matmul(x, *ws):
  """(x @ w_1, ..., x @ w_n) in float32, each (..., M_i).

  The caller checks `unsupported(x, *ws)` and `available()` first.
  """
  ys = _rows(x.reshape(-1, x.shape[-1]), *ws)
  return tuple(y.reshape(x.shape[:-1] + (y.shape[-1],)) for y in ys)
