"""Matrix products with int8 or bfloat16 weights read as stored (lowp_cpu.cc).

  int8      (x @ w) * scale: x (..., K) float32, w (K, M) int8, scale (M,) float32
  bfloat16  x @ w:           x (..., K) float32, w (K, M) bfloat16

Both give float32 (..., M). The kernel widens each 16 weights to float32 in
registers and keeps float32 sums, so a product reads 1 (int8) or 2
(bfloat16) bytes per weight where float32 reads 4: batch-1 decoding, which
is bound by reading the weights, runs at the bytes' speed. Threads split the
output columns.

Inference only (no gradient). Under `jax.vmap` the mapped rows become rows of
one product (the weights are read once for all of them, as when the server
decodes its slots together); per-example weights run one product each.
Under a device mesh (`spmd.partitioned`) each device multiplies its own
shard of the rows by the whole matrix (weights sharded by fsdp or tensor
parallelism are gathered first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from terraflax import kernels
from terraflax.kernels.spmd import partitioned

INT8 = 'TerraflaxInt8Matmul'
BF16 = 'TerraflaxBf16Matmul'
# Layouts for `partitioned`: rows split like the batch; w and scale whole.
LAYOUT = dict(operands=('b.', '..', '.'), results=('b.',))


def available() -> bool:
  """Whether the kernel library is built and registered (builds it on the first call)."""
  return kernels.load('lowp_cpu', (INT8, BF16))


def unsupported(x, w, scale=None) -> str | None:
  """Why the kernel cannot multiply these arrays, or None if it can."""
  if w.ndim != 2 or x.shape[-1:] != w.shape[:1]:
    return f'x (..., K) and w (K, M) must agree, got {tuple(x.shape)} and {tuple(w.shape)}'
  if x.dtype != jnp.float32:
    return f'x must be float32, got {x.dtype}'
  if w.dtype == jnp.int8:
    if scale is None or scale.size != w.shape[1] or scale.dtype != jnp.float32:
      return f'int8 w {tuple(w.shape)} needs a float32 scale with {w.shape[1]} entries'
    return None
  if w.dtype == jnp.bfloat16:
    return None if scale is None else 'bfloat16 w takes no scale'
  return f'w must be int8 or bfloat16, got {w.dtype}'


def _call(x, w, *scale):
  """The custom call on rows: x (N, K) -> (N, M)."""
  target = INT8 if w.dtype == jnp.int8 else BF16
  out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method='sequential')(x, w, *scale)


@jax.custom_batching.custom_vmap
def _rows(x, w, *scale):
  return partitioned(_call, **LAYOUT)(x, w, *scale)


@_rows.def_vmap
def _rows_vmap(axis_size, in_batched, x, w, *scale):
  x_batched, *weights_batched = in_batched
  if not any(weights_batched):  # Mapped rows of x are more rows of one product.
    y = _rows(x.reshape(-1, x.shape[-1]), w, *scale)
    return y.reshape(x.shape[:-1] + y.shape[-1:]), True
  operands = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
              for a, batched in zip((x, w, *scale), in_batched)]
  return jax.lax.map(lambda args: _rows(*args), tuple(operands)), True


def matmul(x, w, scale=None):
  """(x @ w) * scale for int8 w, x @ w for bfloat16 w: float32 (..., M).

  The caller checks `unsupported(x, w, scale)` and `available()` first.
  """
  rows = x.reshape(-1, x.shape[-1])
  scale = () if scale is None else (scale.reshape(-1),)
  y = _rows(rows, w, *scale)
  return y.reshape(x.shape[:-1] + (w.shape[1],))
