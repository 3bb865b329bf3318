"""LSH attention's sorted chunk windows as one native CPU kernel (lsh_cpu.cc).

`attend(qv, perm, ...)` computes what `lsh_core.attend_sorted` (the XLA path
of `lsh_attention.lsh_attend`) computes, for the terraflax convention without
dropout: every round's sorted chunks attend to their windows (shared-QK,
causal, padding and document (segment) masks, the self logit, repeated meetings discounted) and
the rounds are combined by their log-sum-exp weights. Its gradient is a
second kernel that recomputes the weights chunk by chunk from the saved
log-normalisers (as flash attention does). Memory stays linear in the
length: the residuals are the inputs, the output and two floats per
position and head.

Both kernels split the work by (batch, head) over XLA's CPU thread pool,
gather each round into sorted order themselves and write outputs in input
order, so no sorted copy or window array exists outside them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from terraflax import kernels
from terraflax.kernels.spmd import partitioned

FORWARD = 'TerraflaxLshForward'
BACKWARD = 'TerraflaxLshBackward'


class Spec(NamedTuple):
  """The static arguments of one call (the kernels' attributes)."""
  d_qk: int
  length: int
  chunk_len: int
  n_chunks_before: int
  n_chunks_after: int
  causal: bool

  def attributes(self) -> dict:
    return dict(d_qk=np.int64(self.d_qk), length=np.int64(self.length),
                chunk_len=np.int64(self.chunk_len),
                n_chunks_before=np.int64(self.n_chunks_before),
                n_chunks_after=np.int64(self.n_chunks_after), causal=np.bool_(self.causal))


def unsupported(*, d_qk: int, d_v: int, padded_length: int, chunk_len: int,
                n_chunks_before: int, n_chunks_after: int) -> str | None:
  """Why the kernel cannot run this configuration, or None if it can."""
  if chunk_len % kernels.LANES or d_qk % kernels.LANES or d_v % kernels.LANES:
    return (f'chunk_len, d_qk and d_v must be multiples of {kernels.LANES}, got {chunk_len}, '
            f'{d_qk}, {d_v}')
  if padded_length // chunk_len < n_chunks_before + 1 + n_chunks_after:
    return (f'the {padded_length // chunk_len} chunks are fewer than the '
            f'{n_chunks_before + 1 + n_chunks_after} window slots')
  return None


def scratch_bytes(*, n_hashes: int, padded_length: int, chunk_len: int, d_qk: int, d_v: int,
                  n_chunks_before: int, n_chunks_after: int, n_threads: int,
                  backward: bool = True) -> int:
  """Bytes of the kernels' own scratch (which XLA's memory analysis does not see), at most.

  Each thread of XLA's CPU pool keeps one workspace (grown to the largest call,
  kept between calls; lsh_cpu.cc `Workspace`): per position the chunk of every
  round (4 n_hashes bytes), in the backward pass the row term (4 bytes) and
  a flag per chunk; per window of `width` chunks the gathered rows, logits
  and their gradients. So 20 bytes per position and thread at 4 hashes: 21
  MiB per thread at 1M tokens, against ~12 KB per token of XLA's buffers.
  """
  c, width = chunk_len, n_chunks_before + 1 + n_chunks_after
  n_chunks = padded_length // c
  window = width * c * (3 * d_qk + d_v + 3 + max(n_hashes - 1, 1)) + 2 * c * width * c
  window += c * (d_v + 2) + n_hashes
  per_position = n_hashes
  if backward:
    window += width * c * (d_qk * 2 + d_v * 3)
    per_position += 1
  total = 4 * (window + per_position * padded_length) + (n_chunks if backward else 0)
  return n_threads * total


def available() -> bool:
  """Whether the kernel library is built and registered (builds it on the first call)."""
  return kernels.load('lsh_cpu', (FORWARD, BACKWARD))


# Layouts for `partitioned` (split over batch and heads): qv and the output (b, L, h, w),
# perm and the log-normalisers (b, h, n, L), the segment ids (b, L).
QV, PERM, SEG = 'b.h.', 'bh..', 'b.'


def _forward(qv, perm, seg, spec: Spec):
  def call(qv, perm, seg):
    b, big_l, h, width = qv.shape
    shapes = (jax.ShapeDtypeStruct((b, big_l, h, width - spec.d_qk), jnp.float32),
              jax.ShapeDtypeStruct((b, h, 2, big_l), jnp.float32))
    return jax.ffi.ffi_call(FORWARD, shapes, vmap_method='sequential')(
        qv, perm, seg, **spec.attributes())
  return partitioned(call, operands=(QV, PERM, SEG), results=(QV, PERM))(qv, perm, seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend(qv, perm, seg, spec: Spec):
  return _forward(qv, perm, seg, spec)[0]


def _attend_fwd(qv, perm, seg, spec: Spec):
  out, log_norm = _forward(qv, perm, seg, spec)
  return out, (qv, perm, seg, out, log_norm)


def _attend_bwd(spec: Spec, residuals, d_out):
  qv, perm, seg, out, log_norm = residuals

  def call(qv, perm, seg, out, log_norm, d_out):
    return jax.ffi.ffi_call(BACKWARD, jax.ShapeDtypeStruct(qv.shape, jnp.float32),
                            vmap_method='sequential')(qv, perm, seg, out, log_norm, d_out,
                                                      **spec.attributes())
  d_qv = partitioned(call, operands=(QV, PERM, SEG, QV, PERM, QV), results=(QV,))(
      qv, perm, seg, out, log_norm, d_out.astype(jnp.float32))
  return d_qv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(qv, perm, *, d_qk: int, length: int, chunk_len: int, n_chunks_before: int,
           n_chunks_after: int, causal: bool, segment_ids=None):
  """Sorted, chunked LSH attention with rounds combined: (b, L, h, dv).

  qv float32 (b, L, h, d_qk + dv): queries (= keys before normalising) and
  values in input order; perm int32 (b, h, n, L): each round's positions in
  (bucket, position) order, padding (positions >= `length`) last;
  segment_ids int (b, L) or None: a packed row's documents (a query attends
  only to keys of its own). The caller checks `unsupported(...)` and
  `available()` first.
  """
  spec = Spec(d_qk, length, chunk_len, n_chunks_before, n_chunks_after, bool(causal))
  if segment_ids is None:
    segment_ids = jnp.zeros(qv.shape[:2], jnp.int32)
  return _attend(qv.astype(jnp.float32), perm.astype(jnp.int32),
                 lax.stop_gradient(segment_ids.astype(jnp.int32)), spec)
