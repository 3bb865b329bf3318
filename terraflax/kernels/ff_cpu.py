"""The feed-forward core act(x W1 + b1) W2 + b2 as one native CPU kernel (ff_cpu.cc).

Rows run in blocks whose hidden activations stay in cache between the two
matrix products, with the weights packed into column panels; on the 2-core
machine this is ~1.5x XLA's forward and ~1.1x its backward pass. Up to 8
rows (decoding) each product instead streams the weights row by row, the
output columns split between threads: before, one thread read the weights
column panel by column panel at ~1/5 of XLA's speed (512/2048, one row). The
gradient is a second kernel. `save_hidden=True` keeps the pre-activation
(N, d_ff) for the backward pass, as autodiff would; `False` keeps only the
input and recomputes it block by block (the memory of a chunked
feed-forward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from terraflax import kernels
from terraflax.kernels.spmd import partitioned

FORWARD = 'TerraflaxFfForward'
FORWARD_HIDDEN = 'TerraflaxFfForwardHidden'
BACKWARD = 'TerraflaxFfBackward'
ACTIVATIONS = {'relu': 0, 'fast_gelu': 1}  # fast_gelu: the tanh approximation


def available() -> bool:
  """Whether the kernel library is built and registered (builds it on the first call)."""
  return kernels.load('ff_cpu', (FORWARD, FORWARD_HIDDEN, BACKWARD))


def unsupported(*, d_in: int, d_ff: int, d_out: int, activation) -> str | None:
  """Why the kernel cannot run these sizes and activation, or None if it can."""
  if activation not in ACTIVATIONS:
    return f'activation {activation!r} is not one of {tuple(ACTIVATIONS)}'
  if d_in % kernels.LANES or d_ff % kernels.LANES or d_out % kernels.LANES:
    return f'widths must be multiples of {kernels.LANES}, got {d_in}, {d_ff}, {d_out}'
  return None


def _shape(rows, width):
  return jax.ShapeDtypeStruct((rows, width), jnp.float32)


# Layouts for `partitioned`: rows split like the batch; the hidden width d_ff split like the
# weights' (tensor parallel over 'model'), with the output summed over its shards and b2
# added on the first; any other weight sharding (fsdp) is gathered before the call. The
# weight gradients are summed over the rows' shards; db2 is whole on every hidden shard.
WEIGHTS = ('.f', 'f', 'f.', '.')
SPLITS = dict(once=(4,), multiple_of={'f': kernels.LANES})
FORWARD_LAYOUT = dict(operands=('b.', *WEIGHTS), results=('b.',), **SPLITS)
FORWARD_HIDDEN_LAYOUT = dict(operands=('b.', *WEIGHTS), results=('b.', 'bf'), **SPLITS)


def _backward_layout(save_hidden: bool):
  hidden = 'bf' if save_hidden else '..'  # without it, a (1, 1) placeholder
  return dict(operands=('b.', hidden, '.f', 'f', 'f.', 'b.'), results=('b.', *WEIGHTS),
              same_over={4: 'f'}, multiple_of={'f': kernels.LANES})


def _forward(x, w1, b1, w2, b2, activation: str):
  def call(x, w1, b1, w2, b2):
    return jax.ffi.ffi_call(FORWARD, _shape(x.shape[0], w2.shape[1]), vmap_method='sequential')(
        x, w1, b1, w2, b2, activation=np.int64(ACTIVATIONS[activation]))
  return partitioned(call, **FORWARD_LAYOUT)(x, w1, b1, w2, b2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _feed_forward(x, w1, b1, w2, b2, activation: str, save_hidden: bool):
  del save_hidden
  return _forward(x, w1, b1, w2, b2, activation)


def _feed_forward_fwd(x, w1, b1, w2, b2, activation: str, save_hidden: bool):
  if save_hidden:
    def call(x, w1, b1, w2, b2):
      return jax.ffi.ffi_call(
          FORWARD_HIDDEN, (_shape(x.shape[0], w2.shape[1]), _shape(x.shape[0], w1.shape[1])),
          vmap_method='sequential')(x, w1, b1, w2, b2,
                                    activation=np.int64(ACTIVATIONS[activation]))
    y, hidden = partitioned(call, **FORWARD_HIDDEN_LAYOUT)(x, w1, b1, w2, b2)
  else:
    y = _forward(x, w1, b1, w2, b2, activation)
    hidden = jnp.zeros((1, 1), jnp.float32)  # unused: the backward pass recomputes it
  return y, (x, hidden, w1, b1, w2)


def _feed_forward_bwd(activation: str, save_hidden: bool, residuals, d_y):
  x, hidden, w1, b1, w2 = residuals

  def call(x, hidden, w1, b1, w2, d_y):
    shapes = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, w1, b1, w2)]
    shapes.append(jax.ShapeDtypeStruct((w2.shape[1],), jnp.float32))
    return jax.ffi.ffi_call(BACKWARD, shapes, vmap_method='sequential')(
        x, hidden, w1, b1, w2, d_y, activation=np.int64(ACTIVATIONS[activation]),
        recompute=not save_hidden)
  return tuple(partitioned(call, **_backward_layout(save_hidden))(
      x, hidden, w1, b1, w2, d_y.astype(jnp.float32)))


_feed_forward.defvjp(_feed_forward_fwd, _feed_forward_bwd)


def feed_forward(x, w1, b1, w2, b2, *, activation: str, save_hidden: bool = True):
  """act(x @ w1 + b1) @ w2 + b2 for float32 x (..., d_in): (..., d_out).

  w1 (d_in, d_ff), b1 (d_ff), w2 (d_ff, d_out), b2 (d_out). The caller
  checks `unsupported(...)` and `available()` first.
  """
  rows = x.reshape(-1, x.shape[-1])
  y = _feed_forward(rows, w1, b1, w2, b2, activation, bool(save_hidden))
  return y.reshape(x.shape[:-1] + (w2.shape[1],))
