"""Hashed attention, the pure core of LSH attention (see `lsh_attention`).

Given bucket ids, each round of each head is sorted by (bucket, position)
(`sort_rounds`), cut into chunks of `chunk_len`, and each chunk attends to
itself and to `n_chunks_before`/`n_chunks_after` neighbouring chunks (wrapping
around within the round): `attend_sorted`. Keys are the queries normalised to
unit length (shared-QK), so a query's logit with key j is `q . k_j / |k_j|`;
a token never attends to itself unless nothing else is visible to it, and
causal attention masks by original position.

A pair (i, j) can meet in several rounds (and twice in one round when there
are fewer chunks than window slots). Each meeting's logit is lowered by the
log of the number of meetings, so that after the rounds are combined with
their log-sum-exp weights the result is exactly a softmax over the *set* of
keys that i met in any round: `sum_j exp(l_ij) v_j / sum_j exp(l_ij)`.

Implementation (built for XLA:CPU, where fresh memory and reductions in
gradients are expensive): one stable sort per (batch, head, round), row
gathers for every permutation (with gathers, not scatters, as gradients), and
the window attention as a loop over blocks of about `BLOCK_LOGITS` logits
with a hand-written, flash-attention-style backward pass that recomputes each
block's weights from its stored log-normalisers. No array of all logits ever
exists: memory is linear in the length (about n_hashes * l * (2 d_qk + 3 d_v)
floats per head), and time is linear apart from the n log n sort.

This module is XLA only; `terraflax.kernels.lsh_cpu.attend` computes what
`attend_sorted` computes (terraflax convention, no dropout) as a native CPU
kernel, and `lsh_attention.lsh_attend` chooses between them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Logit of a masked key (causal, padding) and of the query itself: the self
# logit is far below any real logit, yet far above the masked ones, so a
# token falls back to itself only when nothing else is visible.
MASKED_LOGIT = -1e9
SELF_LOGIT = -1e5


def normalise(x):
  """x / |x| along the last axis."""
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def _normalise_transpose(x, unit, grad):
  """The gradient wrt x of `normalise(x) . grad`: (grad - unit (unit . grad)) / |x|."""
  along = jnp.sum(unit * grad, axis=-1, keepdims=True)
  return (grad - unit * along) * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def _gather_rows(table, idx):
  """table (N, w), int idx (...) -> (..., w); indices are known to be in range."""
  return table.at[idx].get(mode='promise_in_bounds')


@jax.custom_vjp
def permute_rows(table, idx, inverse):
  """`table[idx]` whose gradient is a gather too, not a scatter-add.

  table (N, w); idx int (...); inverse int (N, copies): for each table row,
  the flat positions in `idx` that read it (every row is read `copies` times).
  """
  return _gather_rows(table, idx)


def _permute_rows_fwd(table, idx, inverse):
  return _gather_rows(table, idx), (inverse,)


def _permute_rows_bwd(residuals, grad):
  (inverse,) = residuals
  rows = _gather_rows(grad.reshape(-1, grad.shape[-1]), inverse)  # (N, copies, w)
  total = rows[:, 0]
  for copy in range(1, inverse.shape[1]):  # A short static sum (XLA:CPU reduces slowly).
    total = total + rows[:, copy]
  return total, None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _meetings(chunk_q, chunk_k, n_chunks: int, n_before: int, n_after: int):
  """How often each (query, key) pair shares a window over all rounds.

  chunk_q, chunk_k (..., n), broadcastable against each other: the chunk that
  each query and key lands in, in each round. Returns int32 of their broadcast
  shape without the round axis: at least 1 for the pairs that share a window
  (every pair in a window does, in its own round).
  """
  offsets = [o % n_chunks for o in range(-n_before, n_after + 1)]
  count = None
  for r in range(chunk_q.shape[-1]):
    gap = chunk_k[..., r] - chunk_q[..., r]
    gap = jnp.where(gap < 0, gap + n_chunks, gap)  # (k - q) mod C, as both are in [0, C).
    for offset in offsets:
      hit = (gap == offset).astype(jnp.int32)
      count = hit if count is None else count + hit
  return count


# Chunks per loop step are chosen so that one step's logits hold about this
# many numbers (1 MiB of float32): the working set stays small and is reused
# by every step. 2**18 trained ReformerLM 5-10% faster than 2**20 at 4K-64K
# tokens on a 2-core CPU with 2 MiB L2 per core.
BLOCK_LOGITS = 2 ** 18


class _Windowing(NamedTuple):
  """Static description of one `lsh_attend` call's chunk windows."""
  length: int  # Positions at and after this are padding.
  n_chunks: int  # Chunks per round (C).
  chunk_len: int
  n_before: int
  n_after: int
  n_rounds: int
  d_qk: int
  causal: bool
  dropout_rate: float
  block: int  # Chunks per loop step (divides n_chunks).

  @property
  def width(self):
    return self.n_before + 1 + self.n_after


def _block_chunks(n_chunks: int, chunk_len: int, width: int) -> int:
  """The largest divisor of n_chunks whose logits (g, c, c * width) fit BLOCK_LOGITS."""
  best = 1
  for g in range(1, n_chunks + 1):
    if n_chunks % g == 0 and g * chunk_len * chunk_len * width <= BLOCK_LOGITS:
      best = g
  return best


def _with_neighbours(w: _Windowing, x, row, start):
  """Chunks start - n_before .. start + block + n_after (mod C) of x[row].

  Returns (block + width - 1, c, ...).
  """
  def chunks(first, size):
    first = first % w.n_chunks
    return lax.dynamic_slice(x, (row, first) + (0,) * (x.ndim - 2), (1, size) + x.shape[2:])[0]
  parts = [chunks(start - o, 1) for o in range(w.n_before, 0, -1)]
  parts.append(chunks(start, w.block))
  parts.extend(chunks(start + w.block + o, 1) for o in range(w.n_after))
  return jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def _window(w: _Windowing, extended):
  """(block + width - 1, c, ...) -> (block, width * c, ...): each chunk's window."""
  parts = [extended[o:o + w.block] for o in range(w.width)]
  return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _unwindow(w: _Windowing, windowed):
  """The transpose of `_window`: (block, width * c, ...) -> (block + width - 1, c, ...)."""
  c = w.chunk_len
  total = None
  for o in range(w.width):
    part = windowed[:, o * c:(o + 1) * c]
    pad = [(o, w.width - 1 - o)] + [(0, 0)] * (part.ndim - 1)
    part = jnp.pad(part, pad)
    total = part if total is None else total + part
  return total


def _add_with_neighbours(w: _Windowing, acc, update, row, start):
  """acc[row] chunks start - n_before .. (mod C) += update (block + width - 1, c, ...)."""
  def add(first, piece):
    first = first % w.n_chunks
    old = lax.dynamic_slice(acc, (row, first) + (0,) * (acc.ndim - 2), (1,) + piece.shape)
    return lax.dynamic_update_slice(acc, old + piece[None], (row, first) + (0,) * (acc.ndim - 2))
  acc = add(start, update[w.n_before:w.n_before + w.block])
  for i, o in enumerate(range(w.n_before, 0, -1)):
    acc = add(start - o, update[i:i + 1])
  for o in range(w.n_after):
    i = w.n_before + w.block + o
    acc = add(start + w.block + o, update[i:i + 1])
  return acc


def _block(x, row, start, size):
  """x[row, start:start + size]."""
  return lax.dynamic_slice(x, (row, start) + (0,) * (x.ndim - 2), (1, size) + x.shape[2:])[0]


def _block_logits(w: _Windowing, sqv, spos, chunks, row, start, sseg=None):
  """One loop step's queries, window keys/values and masked, corrected logits.

  sseg: None, or int (R, C, c) the sorted positions' documents: keys of
  another document are masked.

  Returns q (g, c, k), keys (g, W, k), raw queries of the window (g, W, k),
  values (g, W, dv), logits (g, c, W) and the self mask (g, c, W).
  """
  q = _block(sqv, row, start, w.block)[..., :w.d_qk]
  kv = _window(w, _with_neighbours(w, sqv, row, start))
  raw_k, v = kv[..., :w.d_qk], kv[..., w.d_qk:]
  k = normalise(raw_k)
  q_pos = _block(spos, row, start, w.block)[:, :, None]
  k_pos = _window(w, _with_neighbours(w, spos, row, start))[:, None, :]
  dots = jnp.einsum('gik,gjk->gij', q, k)
  masked = k_pos >= w.length
  if w.causal:
    masked = masked | (k_pos > q_pos)
  if sseg is not None:
    q_seg = _block(sseg, row, start, w.block)[:, :, None]
    k_seg = _window(w, _with_neighbours(w, sseg, row, start))[:, None, :]
    masked = masked | (k_seg != q_seg)
  if chunks is not None:
    q_chunks = _block(chunks, row, start, w.block)[:, :, None]
    k_chunks = _window(w, _with_neighbours(w, chunks, row, start))[:, None]
    meets = _meetings(q_chunks, k_chunks, w.n_chunks, w.n_before, w.n_after)
    dots = dots - jnp.log(meets.astype(dots.dtype))
  is_self = k_pos == q_pos
  logits = jnp.where(is_self, SELF_LOGIT, jnp.where(masked, MASKED_LOGIT, dots))
  return q, k, raw_k, v, logits, is_self


def _dropout_scale(w: _Windowing, rng, row, step, shape):
  """Dropout multipliers (0 or 1/keep) of one step, shared across batch and heads."""
  key = jax.random.fold_in(rng, (row % w.n_rounds) * (w.n_chunks // w.block) + step)
  keep = jax.random.bernoulli(key, 1.0 - w.dropout_rate, shape)
  return keep.astype(jnp.float32) * (1.0 / (1.0 - w.dropout_rate))


def _row_and_start(w: _Windowing, i):
  steps = w.n_chunks // w.block
  return i // steps, (i % steps) * w.block, i % steps


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _window_attention(w: _Windowing, sqv, spos, chunks, rng, sseg):
  """Attention of every sorted chunk to its window, in blocks of chunks.

  sqv (R, C, c, k + dv): sorted queries and values of R = b * h * n rounds;
  spos int (R, C, c): their original positions; chunks int (R, C, c, n): the
  chunk each lands in, per round, or None when pairs meet only once; sseg
  int (R, C, c): their documents in a packed row, or None. Returns
  (R, C, c, dv + 1): each position's output in its round, then the log of
  its softmax normaliser. The gradient recomputes the weights block by
  block from the stored normalisers (as flash attention does), so no array
  of all logits ever exists.
  """
  return _window_attention_fwd(w, sqv, spos, chunks, rng, sseg)[0]


def _window_attention_fwd(w: _Windowing, sqv, spos, chunks, rng, sseg):
  n_rows, n_chunks, c = sqv.shape[:3]
  d_v = sqv.shape[-1] - w.d_qk

  def step(i, out):
    row, start, j = _row_and_start(w, i)
    _, _, _, v, logits, _ = _block_logits(w, sqv, spos, chunks, row, start, sseg)
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = e * (1.0 / total)
    if w.dropout_rate > 0:
      probs = probs * _dropout_scale(w, rng, row, j, probs.shape)
    o = jnp.einsum('gij,gjd->gid', probs, v)
    packed = jnp.concatenate([o, top + jnp.log(total)], axis=-1)
    return lax.dynamic_update_slice(out, packed[None], (row, start, 0, 0))

  out = jnp.zeros((n_rows, n_chunks, c, d_v + 1), sqv.dtype)
  out = lax.fori_loop(0, n_rows * (n_chunks // w.block), step, out)
  return out, (sqv, spos, chunks, rng, out, sseg)


def _window_attention_bwd(w: _Windowing, residuals, d_out):
  sqv, spos, chunks, rng, out, sseg = residuals
  d_v = sqv.shape[-1] - w.d_qk

  def step(i, d_sqv):
    row, start, j = _row_and_start(w, i)
    q, k, raw_k, v, logits, is_self = _block_logits(w, sqv, spos, chunks, row, start, sseg)
    saved, d_saved = _block(out, row, start, w.block), _block(d_out, row, start, w.block)
    o, lse = saved[..., :d_v], saved[..., d_v:]
    d_o, d_lse = d_saved[..., :d_v], d_saved[..., d_v:]
    probs = jnp.exp(logits - lse)
    d_probs = jnp.einsum('gid,gjd->gij', d_o, v)
    dropped = probs
    if w.dropout_rate > 0:
      scale = _dropout_scale(w, rng, row, j, probs.shape)
      d_probs, dropped = d_probs * scale, probs * scale
    # d logit = p * (dp - sum_j p dp + d lse), and sum_j p dp = d_o . o.
    row_term = jnp.sum(d_o * o, axis=-1, keepdims=True) - d_lse
    d_logits = jnp.where(is_self, 0.0, probs * (d_probs - row_term))  # The self logit is fixed.
    d_q = jnp.einsum('gij,gjk->gik', d_logits, k)
    d_k = _normalise_transpose(raw_k, k, jnp.einsum('gij,gik->gjk', d_logits, q))
    d_v_w = jnp.einsum('gij,gid->gjd', dropped, d_o)
    update = _unwindow(w, jnp.concatenate([d_k, d_v_w], axis=-1))
    update = update + jnp.pad(d_q, ((w.n_before, w.n_after), (0, 0), (0, d_v)))
    return _add_with_neighbours(w, d_sqv, update, row, start)

  n_steps = sqv.shape[0] * (w.n_chunks // w.block)
  d_sqv = lax.fori_loop(0, n_steps, step, jnp.zeros_like(sqv))
  return d_sqv, None, None, None, None


_window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)


def _combine_rounds(o, lse, hf: bool = False):
  """Outputs of n rounds weighted by softmax(lse): (..., n, dv), (..., n, 1) -> (..., dv).

  `hf=True` weights round r by exp(lse_r - logsumexp(lse)) as Hugging Face
  does, in float32: when a query saw only itself (lse near SELF_LOGIT), the
  rounding of logsumexp at that magnitude leaves the weights summing to
  slightly less or more than 1 (up to ~0.4%), and so does HF's output.
  """
  n = o.shape[-2]
  if n == 1:
    return o[..., 0, :]
  parts = [lse[..., r, :] for r in range(n)]  # Static loops: XLA:CPU reduces slowly.
  top = functools.reduce(jnp.maximum, parts)
  weights = [jnp.exp(p - top) for p in parts]
  total = functools.reduce(jnp.add, weights)
  if hf:
    log_total = top + jnp.log(total)
    return functools.reduce(jnp.add, [o[..., r, :] * jnp.exp(parts[r] - log_total)
                                      for r in range(n)])
  out = functools.reduce(jnp.add, [o[..., r, :] * weights[r] for r in range(n)])
  return out * (1.0 / total)


def sort_rounds(buckets, n_bucket_ids: int | None):
  """Positions in (bucket, position) order along the last axis: int32, buckets' shape."""
  big_l = buckets.shape[-1]
  iota = lax.broadcasted_iota(jnp.int32, buckets.shape, buckets.ndim - 1)
  if n_bucket_ids is not None and n_bucket_ids * big_l < 2 ** 31:
    # One int32 key per position: XLA:CPU sorts a single operand several
    # times faster than a (key, payload) pair.
    keys = lax.sort(buckets.astype(jnp.int32) * big_l + iota, dimension=buckets.ndim - 1)
    return lax.rem(keys, big_l)
  _, perm = lax.sort((buckets.astype(jnp.int32), iota), dimension=buckets.ndim - 1,
                     num_keys=1, is_stable=True)
  return perm


def attend_sorted(qv, perm, *, d_qk: int, length: int, chunk_len: int,
                  n_chunks_before: int = 1, n_chunks_after: int = 0, causal: bool = False,
                  dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                  rounds_joined: bool = False, segment_ids: jax.Array | None = None):
  """Hashed attention of qv (b, L, h, d_qk + dv) in the order perm int (b, h, n, L).

  `perm` is each round's positions sorted by (bucket, position)
  (`sort_rounds`, gradient stopped); L is a multiple of `chunk_len` and
  positions at and beyond `length` are padding (sorted last, never attended
  to). Returns (b, L, h, dv); rows of padding positions are meaningless.

  `rounds_joined=True` is Hugging Face's (and the original Trax's) layout:
  the n sorted rounds form one sequence of n * L positions, so the windows of
  a round's first chunks reach into the previous round's last chunks, a pair
  that meets several times is counted each time (no discount), and rounds
  combine with HF's float32 formula (see `_combine_rounds`).

  `segment_ids` int (b, L) (a packed row's documents): a query attends only
  to keys of its own document, and to itself only when no other key of its
  document is in its window.
  """
  b, big_l, h, _ = qv.shape
  d_k, d_v = d_qk, qv.shape[-1] - d_qk
  n = perm.shape[2]
  c = chunk_len
  n_chunks = big_l // c
  if big_l % c:
    raise ValueError(f'lsh_attend needs a length that is a multiple of chunk_len={c}, got {big_l}.')
  if dropout_rate > 0 and dropout_rng is None:
    raise ValueError('lsh_attend needs a dropout_rng when dropout_rate > 0.')
  before, after = n_chunks_before, n_chunks_after
  iota = lax.broadcasted_iota(jnp.int32, perm.shape, 3)
  batch = lax.broadcasted_iota(jnp.int32, perm.shape, 0)
  head = lax.broadcasted_iota(jnp.int32, perm.shape, 1)
  rounds = lax.broadcasted_iota(jnp.int32, perm.shape, 2)
  flat_row = ((batch * h + head) * n + rounds) * big_l  # start of (b, head, round), sorted
  inv = jnp.zeros((b * h * n * big_l,), jnp.int32).at[(flat_row + perm).reshape(-1)].set(
      iota.reshape(-1), unique_indices=True).reshape(perm.shape)
  inv = lax.stop_gradient(inv)

  # Sorted copy of [q, v] for every round: row (b, p, head) of the (b, L, h)
  # table goes to (b, head, round, inv).
  table_idx = (batch * big_l + perm) * h + head  # (b, h, n, L) -> row of (b, L, h)
  sorted_idx = jnp.transpose(flat_row + inv, (0, 3, 1, 2))  # (b, L, h, n) -> sorted row
  sqv = permute_rows(qv.reshape(b * big_l * h, d_k + d_v), table_idx,
                     sorted_idx.reshape(b * big_l * h, n))
  sqv = sqv.reshape(b * h * n, n_chunks, c, d_k + d_v)
  spos = perm.reshape(b * h * n, n_chunks, c)
  sseg = None
  if segment_ids is not None:  # Each sorted position's document: segment_ids[b, perm].
    sseg = jnp.take_along_axis(segment_ids.astype(jnp.int32)[:, None, None, :], perm, axis=3)
    sseg = lax.stop_gradient(sseg.reshape(b * h * n, n_chunks, c))
  chunks = None
  row_chunks, row_rounds = n_chunks, n  # What one row of the window loop holds.
  if rounds_joined:  # One row of n * C chunks per (batch, head); same flat layout.
    row_chunks, row_rounds = n * n_chunks, 1
    sqv = sqv.reshape(b * h, row_chunks, c, d_k + d_v)
    spos = spos.reshape(b * h, row_chunks, c)
    sseg = None if sseg is None else sseg.reshape(b * h, row_chunks, c)
  elif n > 1 or n_chunks < 1 + before + after:  # Pairs can meet more than once.
    chunk_of = (inv // c).transpose(0, 1, 3, 2).reshape(b * h * big_l, n)
    chunks = _gather_rows(chunk_of, (batch * h + head) * big_l + perm)  # (b, h, n, L, n)
    chunks = lax.stop_gradient(chunks.reshape(b * h * n, n_chunks, c, n))

  width = before + 1 + after
  windowing = _Windowing(
      length=length, n_chunks=row_chunks, chunk_len=c, n_before=before, n_after=after,
      n_rounds=row_rounds, d_qk=d_k, causal=causal, dropout_rate=float(dropout_rate),
      block=_block_chunks(row_chunks, c, width))
  rng = dropout_rng if dropout_rate > 0 else jax.random.key(0)
  packed = _window_attention(windowing, sqv, spos, chunks, rng, sseg)

  # Back to input order: (b, h, n, L) sorted rows -> (b, L, h, n).
  packed = packed.reshape(b * h * n * big_l, d_v + 1)
  back = permute_rows(packed, sorted_idx, (table_idx * n + rounds).reshape(-1, 1))
  return _combine_rounds(back[..., :d_v], back[..., d_v:], hf=rounds_joined)
