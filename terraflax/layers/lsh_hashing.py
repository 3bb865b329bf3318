"""Random-rotation hashing for LSH attention (Andoni et al. 2015, Reformer).

A vector x is hashed into one of `n` buckets by a random matrix R of shape
(k, n/2): its bucket is `argmax([x R, -x R])`, the nearest of the n signed
rotated axes, so vectors at a small angle tend to share a bucket. A factorised
count `(n1, n2)` hashes with two independent rotations (n1/2 and n2/2 columns)
and combines the two arg-maxes into `b1 + n1 * b2`, giving n1 * n2 buckets
with only (n1 + n2)/2 rotation columns. A factor of 1 is a trivial hash that
always answers 0 (so `n_buckets=1` puts every vector in one bucket).

Shapes use the layers' axis letters: k per-head width, n hash rounds, l length.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp

NBuckets = Union[int, Sequence[int], None]

# Trax's rule switches to a factorised hash above this many buckets.
MAX_UNFACTORISED_BUCKETS = 128


def default_n_buckets(length: int, chunk_len: int) -> int | tuple[int, int]:
  """The bucket count used when `n_buckets=None`; the rule of Trax's LSHSelfAttention.

  About two buckets per chunk, so an average bucket fills half a chunk:
  n = 2 * max(1, length // chunk_len). Above 128 buckets the hash is
  factorised into (n1, n2) with n1 the power of two at or above sqrt(n) and
  n2 = 2 * (n // (2 * n1)), both even.
  """
  n = 2 * max(1, length // chunk_len)
  if n <= MAX_UNFACTORISED_BUCKETS:
    return n
  n1 = 2 ** math.ceil(math.log2(math.sqrt(n)))
  return (n1, 2 * (n // (2 * n1)))


def bucket_factors(n_buckets: NBuckets, where: str = 'n_buckets') -> tuple[int, ...]:
  """`n_buckets` as a tuple of factors, after checking it; None is not accepted here."""
  if isinstance(n_buckets, bool) or n_buckets is None:
    raise ValueError(f'{where} must be an int or a pair of ints, got {n_buckets!r}.')
  factors = (n_buckets,) if isinstance(n_buckets, int) else tuple(n_buckets)
  if not factors or len(factors) > 2 or not all(
      isinstance(f, int) and not isinstance(f, bool) for f in factors):
    raise ValueError(
        f'{where} must be an int or a pair (n1, n2) of ints (n1 * n2 buckets), '
        f'got {n_buckets!r}.')
  for f in factors:
    if f < 1 or (f > 1 and f % 2):
      raise ValueError(
          f'{where} factors must be 1 or even (the hash is an argmax over [xR, -xR]), '
          f'got {n_buckets!r}.')
  return factors


def total_buckets(n_buckets: NBuckets) -> int:
  """How many distinct bucket ids the hash produces."""
  return math.prod(bucket_factors(n_buckets))


def rotation_width(n_buckets: NBuckets) -> int:
  """Columns of the random rotation: the sum of n_i / 2 over the factors (> 1)."""
  return sum(f // 2 for f in bucket_factors(n_buckets) if f > 1)


def draw_rotations(rng: jax.Array, batch_shape: Sequence[int], d_qk: int, n_hashes: int,
                   n_buckets: NBuckets) -> jax.Array:
  """Gaussian rotations, float32 (*batch_shape, d_qk, n_hashes, rotation_width)."""
  shape = (*batch_shape, d_qk, n_hashes, rotation_width(n_buckets))
  return jax.random.normal(rng, shape, jnp.float32)


def hash_vectors(vecs: jax.Array, rotations: jax.Array, n_buckets: NBuckets) -> jax.Array:
  """Bucket ids of `vecs` under `rotations`: (..., l, k), (..., k, n, r) -> int32 (..., n, l).

  The leading axes of `vecs` and `rotations` must match (one rotation per
  batch element and head).
  """
  rotated = jnp.einsum('...lk,...knr->...nlr', vecs.astype(jnp.float32), rotations,
                       precision=jax.lax.Precision.HIGHEST)
  return buckets_of_rotated(rotated, n_buckets)


def buckets_of_rotated(rotated: jax.Array, n_buckets: NBuckets, axis: int = -1) -> jax.Array:
  """Bucket ids from rotated vectors: float (..., r) -> int32 (...,).

  Each factor f > 1 takes the next f/2 columns and answers the argmax over
  [x, -x] (the first maximum on ties, so a column of x beats the same
  column of -x); factor ids combine as b1 + n1 * b2. Vectors that rotate to
  exactly zero land in bucket 0, like any argmax tie. `axis` is the column
  axis (removed from the result); a major axis (e.g. (..., r, l) with
  axis=-2) is the fast layout on CPU.

  The argmax is a running max/min over the f/2 columns (elementwise updates
  of whole rows), which XLA fuses into one pass: a reduction along the
  columns (`jnp.argmax`) is many times slower on XLA:CPU.
  """
  factors = bucket_factors(n_buckets)
  axis = axis % rotated.ndim
  if rotated.shape[axis] != rotation_width(n_buckets):
    raise ValueError(
        f'rotations have {rotated.shape[axis]} columns but n_buckets={n_buckets!r} needs '
        f'{rotation_width(n_buckets)}.')
  shape = rotated.shape[:axis] + rotated.shape[axis + 1:]
  buckets = jnp.zeros(shape, jnp.int32)
  column, stride = 0, 1
  for f in factors:
    if f == 1:
      continue
    half = f // 2
    first = jax.lax.index_in_dim(rotated, column, axis, keepdims=False)
    hi, lo = first, first
    hi_id = lo_id = jnp.zeros(shape, jnp.int32)
    for j in range(1, half):
      x = jax.lax.index_in_dim(rotated, column + j, axis, keepdims=False)
      up, down = x > hi, x < lo
      hi, hi_id = jnp.where(up, x, hi), jnp.where(up, j, hi_id)
      lo, lo_id = jnp.where(down, x, lo), jnp.where(down, j, lo_id)
    column += half
    ids = jnp.where(hi >= -lo, hi_id, half + lo_id)  # argmax over [x, -x]
    buckets = buckets + stride * ids
    stride *= f
  return buckets
