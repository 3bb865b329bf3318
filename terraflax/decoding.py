"""Autoregressive sampling and beam search with a predict-mode model's cache.

Callers pass the model itself, built with `mode='predict'` (for example
`TransformerLM(..., mode='predict')`), and trained parameters (the same tree
as in 'train'/'eval'). The model is called one token at a time: its input at
position p is the token at p - 1 (pad id 0 at p = 0, what `ShiftRight` would
insert), and its output is the (b, 1, v) logits for position p. A seq2seq
model (`Transformer`, `Terraformer`, `ConcatTerraformer`) is decoded by passing its
encoder `inputs`; it is then called as `model(inputs, token)` (on the command line:
`--inputs=TEXT`).

The whole loop is one jitted `lax.while_loop` (one model step per token, the
key/value cache updated in place, no host work per token), which stops as
soon as every row is finished. It is compiled once per model, shapes and
static options. Inside it each stacked layer's weights and caches are
separate buffers (`split_layers`), so no step copies a layer's weights out
of the stacked arrays. `init_cache` and `decode_step` are the loop's pieces
for callers with their own loop (`stacked_depths` splits for them).

Prompts are right-padded (b, lp) int arrays with `prompt_lengths` (b,);
rows of different lengths decode together: while a row is inside its prompt
its next token is forced from the prompt, afterwards it is generated. Every
row produces exactly the tokens it would produce alone. A generated `eos_id`
ends a row: it is kept, and `pad_id` fills the rest.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from terraflax import compiler
from terraflax import errors
from terraflax import kernels
from terraflax import quantization
from terraflax import rng as rng_lib
from terraflax import tokenizer as tokenizer_lib
from terraflax.combinators import scan as scan_lib
from terraflax.kernels import matvec_cpu
from terraflax.layers.attention import CausalAttention
from terraflax.layers.core import HEAD_AXES, Dense, constrain, first_argmax, lift_to
from terraflax.models import spec as spec_lib

_NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------
# Shared pieces: arguments, cache, one model step.

def _check_prompt(prompt, prompt_lengths, batch_size, inputs):
  """(prompt (b, lp) int32, lengths (b,) int32) with clear errors."""
  if prompt is None:
    if batch_size is None:
      if inputs is None:
        raise ValueError('Pass a prompt (b, lp), or batch_size= (or inputs=) to decode from '
                         'an empty prompt.')
      batch_size = np.shape(inputs)[0]
    prompt = jnp.zeros((batch_size, 0), jnp.int32)
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f'prompt must be an int array (b, lp), got {prompt.dtype}{tuple(prompt.shape)}.')
  b, lp = prompt.shape
  if prompt_lengths is None:
    lengths = np.full((b,), lp, np.int32)  # A host array: no eager device op per call.
  else:
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if lengths.shape != (b,):
      raise ValueError(f'prompt_lengths must have shape (b,) = ({b},), got {tuple(lengths.shape)}.')
    try:
      values = np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:  # Called under jit: no value to check.
      values = None
    if values is not None and (np.any(values < 0) or np.any(values > lp)):
      raise ValueError(f'prompt_lengths must lie in [0, {lp}] (the prompt width), got '
                       f'{values.tolist()}.')
  if inputs is not None and np.shape(inputs)[0] != b:
    raise ValueError(f'inputs have batch {np.shape(inputs)[0]} but the prompt has batch {b}.')
  return (prompt if prompt.dtype == jnp.int32 else prompt.astype(jnp.int32)), lengths


def _check_new_tokens(max_new_tokens):
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be a positive int, got {max_new_tokens!r}.')
  return int(max_new_tokens)


def _model_args(inputs, tokens):
  """The model's positional inputs for a step of (B, 1) tokens."""
  return (tokens,) if inputs is None else (inputs, tokens)


def init_cache(model, batch_size: int, inputs=None, rng=None):
  """The model's predict-mode cache for `batch_size` rows (parameters discarded).

  `inputs`: a seq2seq model's encoder inputs (b, li); `rng`: a key for layers
  that draw randomness at init (LSH rotations; default key 0).
  """
  return _init(model, batch_size, inputs, jax.random.key(0) if rng is None else rng)[0]


def _init(model, batch_size, inputs, rng):
  """(cache, stacks): the predict-mode cache, and (path, n, params stacked) per stack of copies."""
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  stacks = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      copies = scan_lib.stacked_copies(context.module)
      if copies is not None:
        stacks.append((tuple(context.module.path), *copies))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = model.init(rng_lib.stream_keys(rng), *_model_args(inputs, tokens))
  if 'cache' not in variables:
    raise ValueError('The model keeps no cache: build it with mode=\'predict\' '
                     '(e.g. TransformerLM(..., mode=\'predict\')).')
  return variables['cache'], tuple(sorted(set(stacks), key=lambda s: len(s[0])))


# ----------------------------------------------------------------------------
# Weight products of a decoding step.
#
# A step multiplies one row per sequence by every weight matrix, so its time
# is the time to read the weights. Inside `decode_step`, float32 `Dense`
# layers with at most `_STREAM_ROWS` rows and at least `_STREAM_MIN_BYTES` of
# weights run on the native streaming product (`terraflax.kernels.matvec_cpu`:
# each thread reads a contiguous part of the matrix in memory order; XLA:CPU's
# dot read them at ~60% of the bandwidth). A float32 `CausalAttention`'s
# query, key and value projections of at most `_STREAM_ROWS` rows run as one
# product: one streamed call, or below the threshold one XLA dot on the three
# kernels side by side (`_one_dot`). Off the CPU, under `kernels.xla_only()`,
# or for other dtypes and widths the Dense layers run as they are; with
# several devices the projections do too.

# Rows up to which a step's Dense layers stream: at 8 rows (batch 8) XLA's blocked dot was
# ~10% faster over a whole decode (d_model 512), at 4 rows and below the streaming product.
_STREAM_ROWS = 4
# Products whose weights are smaller than this stay XLA dots: they are read from cache more
# often than not, where a dot's fixed cost is the lower (a (1, 128) x (128, 512) product in a
# loop: 2.4 us as a dot, 6.7 us streamed), and a 0.4 MB model decoded ~10% faster per token.
_STREAM_MIN_BYTES = 1 << 19


def _streams(x, *kernels_) -> bool:
  """Whether x @ each kernel runs on the native streaming product (one CPU device only:
  under a mesh the call would gather sharded weights on every device)."""
  if not kernels.native_allowed() or jax.device_count() != 1:
    return False
  if x.ndim < 1 or x.size // max(x.shape[-1], 1) > _STREAM_ROWS:
    return False
  if sum(k.size * k.dtype.itemsize for k in kernels_) < _STREAM_MIN_BYTES:
    return False
  return matvec_cpu.unsupported(x, *kernels_) is None and matvec_cpu.available()


def _dense_params(module: Dense):
  """(kernel, bias or None) of a bound Dense, unboxed."""
  params = nn.meta.unbox(module.variables['params'])
  return params['kernel'], params.get('bias') if module.use_bias else None


def _streamed_dense(module: Dense, x):
  """Dense.__call__ on the streaming product, or None where it does not apply."""
  if module.is_initializing() or module.dtype not in (None, jnp.float32):
    return None
  if 'kernel' not in module.variables.get('params', {}):
    return None
  kernel, bias = _dense_params(module)
  if not _streams(x, kernel):
    return None
  (y,) = matvec_cpu.matmul(x, kernel)
  if bias is not None:
    y = y + lift_to(bias, y)
  return y if module.axes[1] is None else constrain(y, ('batch', 'length', module.axes[1]))


def _one_dot(x, *kernels_):
  """[x @ k for k in kernels_] as one XLA dot on the kernels side by side, or None unless x has
  at most `_STREAM_ROWS` rows and the kernels are float32 on one device.

  In a decoding loop XLA joins the loop-invariant kernels once, before the loop; each step
  then pays one small product's fixed cost instead of three (~0.4 us each on XLA:CPU).
  """
  if (jax.device_count() != 1 or x.ndim < 1 or x.size // max(x.shape[-1], 1) > _STREAM_ROWS
      or any(a.dtype != jnp.float32 for a in (x, *kernels_))):
    return None
  y = jnp.matmul(x, jnp.concatenate(kernels_, axis=1))
  ends = np.cumsum([k.shape[1] for k in kernels_])
  return [y[..., end - k.shape[1]:end] for k, end in zip(kernels_, ends)]


def _joined_queries_keys_values(module: CausalAttention, x, d_qk, d_v, segment_ids=None):
  """CausalAttention.queries_keys_values as one product (a streamed call, or one XLA dot for
  small weights), or None where neither applies."""
  del segment_ids  # Position-wise projections.
  if (module.is_initializing() or module.mode != 'predict'
      or module.dtype not in (None, jnp.float32)
      or type(module).queries_keys_values is not CausalAttention.queries_keys_values):
    return None
  params = nn.meta.unbox(module.variables.get('params', {}))
  if any(name not in params for name in ('query', 'key', 'value')):
    return None
  weights = [params[name]['kernel'] for name in ('query', 'key', 'value')]
  products = matvec_cpu.matmul(x, *weights) if _streams(x, *weights) else _one_dot(x, *weights)
  if products is None:
    return None
  out = []
  for name, y, width in zip(('query', 'key', 'value'), products, (d_qk, d_qk, d_v)):
    if module.use_bias:
      y = y + lift_to(params[name]['bias'], y)
    out.append(constrain(jnp.reshape(y, y.shape[:-1] + (module.n_heads, width)), HEAD_AXES))
  return tuple(out)


def _products_interceptor(next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  out = None
  if type(module) is Dense and method == '__call__':  # pylint: disable=unidiomatic-typecheck
    out = _streamed_dense(module, *args, **kwargs)
  elif isinstance(module, CausalAttention) and method == 'queries_keys_values':
    out = _joined_queries_keys_values(module, *args, **kwargs)
  return next_fun(*args, **kwargs) if out is None else out


def decode_step(model, params, cache, tokens, inputs=None, rng=None):
  """One decoding step: tokens (B,) -> (float32 logits (B, v), the new cache).

  `cache` from `init_cache` (or the previous step); `inputs` a seq2seq
  model's encoder inputs; `rng` a key for layers that draw randomness in
  predict mode (default key 0). Float32 weight products of up to 4 rows and
  at least `_STREAM_MIN_BYTES` (512 KiB) of weights stream the weights
  natively on the CPU; smaller ones stay XLA dots, a CausalAttention's three
  projections one dot (see above).
  """
  rng = jax.random.key(0) if rng is None else rng
  with nn.intercept_methods(_products_interceptor):
    logits, state = model.apply({'params': params, 'cache': cache},
                                *_model_args(inputs, tokens[:, None]),
                                rngs=rng_lib.noise_keys(rng), mutable=['cache'])
  if logits.ndim != 3 or logits.shape[1] != 1:
    raise ValueError(f'A decoding step must return logits (b, 1, v), got {tuple(logits.shape)}.')
  return logits[:, 0].astype(jnp.float32), state['cache']


# Kept for callers of the former private names.
_init_cache = init_cache
_step = decode_step


# ----------------------------------------------------------------------------
# Stacked layers inside the decoding loop.
#
# A `Repeat` keeps its copies' weights and caches stacked on a leading axis. In
# predict mode its copies are unrolled and read their slices at static offsets,
# but XLA:CPU copies such a slice of a loop-carried array on every iteration:
# the weights were read three times per token (slice, write, dot) and the
# stacked caches sliced and concatenated back. The loop therefore carries
# every copy's slice as its own buffer (`split_layers`) and each step joins
# them (`join_layers`); XLA folds slice(concatenate(pieces)) back to the
# piece, so each copy's dot reads its weights in place and its cache is
# updated in place. The values are unchanged: join(split(x)) == x.

def layer_depths(tree, stacks, collection: str):
  """A tree like `tree` holding n for a leaf stacked over n copies, else 0.

  `stacks` from `_init`: (module path, n, params stacked); the outermost
  stack whose path prefixes a leaf's decides (`collection` 'params' skips
  stacks of shared parameters).
  """
  def depth(path, leaf):
    keys = tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path)
    for root, n, stacks_params in stacks:
      if keys[:len(root)] == root and (collection != 'params' or stacks_params):
        return n if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == n and n > 1 else 0
    return 0
  return jax.tree_util.tree_map_with_path(depth, tree)


def stacked_depths(model, params, batch_size: int = 1, inputs=None):
  """(parameter depths, cache depths): `layer_depths` of `params` and of the model's cache.

  For callers that run `decode_step` in their own jitted function (a server
  step): split the parameters once outside it (`split_layers(params,
  depths)`, one copy) and `join_layers` them inside, so each layer's dot reads
  its own buffer; joining inside the function costs nothing, joining outside
  would copy every weight per call.
  """
  found = {}

  def cache_of(inputs):
    cache, found['stacks'] = _init(model, batch_size, inputs, jax.random.key(0))
    return cache

  cache = jax.eval_shape(cache_of, inputs)
  return (layer_depths(params, found['stacks'], 'params'),
          layer_depths(cache, found['stacks'], 'cache'))


def split_layers(tree, depths):
  """Each leaf of depth n > 0 -> a tuple of its n slices x[i]; others kept."""
  return jax.tree_util.tree_map(
      lambda n, x: tuple(x[i] for i in range(n)) if n else x, depths, tree)


def join_layers(pieces, depths):
  """The inverse of `split_layers`: the slices stacked back on axis 0."""
  return jax.tree_util.tree_map(lambda n, x: jnp.stack(x) if n else x, depths, pieces)


class SplitWeights(NamedTuple):
  """Parameters with each stacked layer's weights already split (`split_weights`).

  `pieces`: the parameter tree with every leaf stacked over n > 1 copies
  replaced by the tuple of its n slices. `autoregressive_sample` and
  `beam_search` take it in place of the parameters.
  """
  pieces: Any


def split_weights(model, params, batch_size: int = 1, inputs=None) -> SplitWeights:
  """`params` with the stacked layers split once, for decoding many times with the same weights.

  The decoding loop reads each layer's weights as its own buffer. Given
  plain parameters, every `autoregressive_sample` / `beam_search` call splits
  them inside its jitted function: a copy of every stacked weight per call
  (for a 77 MB model ~20-100 ms of fresh pages, the time of 4-20 tokens), and
  the loop then read those in-call copies ~1.5x slower per token than
  weights passed in as arguments (measured at d_model 512, 6 layers, on the
  busy 2-core machine: 5.7 vs 8.7 ms per token). Split once here instead
  (one copy, kept by the caller) and pass the result as `params`.
  `batch_size` / `inputs` as for `stacked_depths` (only their shapes matter);
  the pieces are unboxed.
  """
  params = nn.meta.unbox(params)
  depths, _ = stacked_depths(model, params, batch_size, inputs)
  return SplitWeights(split_layers(params, depths))


def _pieces_and_depths(params, stacks):
  """(pieces, depths) of plain parameters (split here) or of a `SplitWeights`."""
  if isinstance(params, SplitWeights):
    is_piece = lambda x: isinstance(x, tuple)
    depths = jax.tree_util.tree_map(lambda x: len(x) if is_piece(x) else 0, params.pieces,
                                    is_leaf=is_piece)
    return params.pieces, depths
  depths = layer_depths(params, stacks, 'params')
  return split_layers(params, depths), depths


def _forced_tokens(prompt, position):
  """prompt[:, position], or zeros where `position` is past the prompt width."""
  if prompt.shape[1] == 0:
    return jnp.zeros(prompt.shape[:1], jnp.int32)
  index = jnp.minimum(position, prompt.shape[1] - 1)
  return jax.lax.dynamic_index_in_dim(prompt, index, axis=1, keepdims=False)


def _take_generated(sequence, lengths, max_new_tokens):
  """(b, lp + n) full sequences -> (b, n): each row's tokens after its prompt."""
  index = lengths[:, None] + jnp.arange(max_new_tokens)[None, :]
  return jnp.take_along_axis(sequence, index, axis=1)


# ----------------------------------------------------------------------------
# Sampling.

def sample_logits(logits, rng, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None):
  """Draws token ids (B,) from logits (B, v).

  `temperature == 0` is greedy (argmax). Otherwise logits are divided by the
  temperature, restricted to the `top_k` largest and/or to the smallest set
  of most likely tokens whose probability reaches `top_p` (nucleus), and
  sampled.
  """
  if temperature == 0:
    return first_argmax(logits)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    logits = keep_top_k(logits, top_k)
  if top_p is not None and top_p < 1.0:
    logits = keep_top_p(logits, top_p)
  return categorical_tokens(rng, logits)


# Top-k and nucleus filtering without sorting: XLA:CPU's sort (and lax.top_k) took ~5 ms over
# 32K logits, longer than a 77 MB model's step. Both thresholds are found by bisection over the
# 2^32 float32 values in order (32 passes that count or sum over the row): ~0.1-0.2 ms.

def _order_keys(x):
  """float32 (..., v) -> uint32 (..., v) in the same order (-0.0 as 0.0)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
  bits = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # Negative floats: larger magnitude first.
  return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(0x80000000)


def _bisect_keys(holds, shape, *, largest: bool):
  """The largest (or smallest) uint32 keys t `shape` with holds(t) (bool `shape`), holds
  monotone in t: true up to (or from) the answer, and true at key 0 (or at 2^32 - 1)."""
  def step(_, bounds):
    lo, hi = bounds
    half = (hi - lo) // 2
    if largest:  # holds(lo) stays true; try the upper middle.
      mid = lo + half + (hi - lo) % 2
      ok = holds(mid)
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    mid = lo + half  # holds(hi) stays true; try the lower middle.
    ok = holds(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo = jnp.zeros(shape, jnp.uint32)
  hi = jnp.full(shape, 0xFFFFFFFF, jnp.uint32)
  return jax.lax.fori_loop(0, 32, step, (lo, hi))[0 if largest else 1]


def keep_top_k(logits, k):
  """logits (..., v) with all but the k largest of each row set to -inf (ties with the k-th
  largest kept). k: int, or int (...) per row, in [1, v]."""
  keys = _order_keys(logits)
  shape = jnp.broadcast_shapes(logits.shape[:-1], jnp.shape(k))
  kth = _bisect_keys(lambda t: jnp.sum(keys >= t[..., None], axis=-1) >= k, shape,
                     largest=True)
  return jnp.where(keys < kth[..., None], _NEG_INF, logits)


def keep_top_p(logits, p):
  """logits (..., v) restricted to each row's nucleus: the most likely tokens, from the top,
  until their probability reaches p (the top token always; ties at the edge kept); the rest
  -inf. p: float, or float (...) per row."""
  keys = _order_keys(logits)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  # The edge: the smallest key whose strictly larger keys hold less than p (the top key at
  # most, so the top token stays).
  shape = jnp.broadcast_shapes(logits.shape[:-1], jnp.shape(p))
  edge = _bisect_keys(lambda t: jnp.sum(jnp.where(keys > t[..., None], probs, 0.0), axis=-1) < p,
                      shape, largest=False)
  edge = jnp.minimum(edge, jnp.max(keys, axis=-1))
  return jnp.where(keys < edge[..., None], _NEG_INF, logits)


def categorical_tokens(rng, logits):
  """`jax.random.categorical(rng, logits, axis=-1)` as int32, the same draws: the argmax of
  logits plus Gumbel noise, taken by `layers.core.first_argmax`."""
  return first_argmax(jax.random.gumbel(rng, logits.shape, logits.dtype) + logits)


def _check_sampling(temperature, top_k, top_p, rng):
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0 (0 = greedy), got {temperature}.')
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f'top_k must be a positive int or None, got {top_k!r}.')
  if top_p is not None and not 0.0 <= top_p <= 1.0:
    raise ValueError(f'top_p must be in [0, 1] or None, got {top_p!r}.')
  if rng is None:
    if temperature > 0:
      raise ValueError('Sampling with temperature > 0 needs rng= (a jax.random key).')
    rng = _greedy_key()
  return rng


@functools.cache
def _greedy_key():
  """The key greedy decoding passes (unused by argmax): made once, not per call."""
  return jax.random.key(0)


def autoregressive_sample(model, params, prompt=None, max_new_tokens: int = 1, *,
                          temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None, rng=None, eos_id: int | None = None,
                          pad_id: int = 0, prompt_lengths=None, inputs=None,
                          batch_size: int | None = None):
  """Samples `max_new_tokens` tokens after each prompt with the model's cache.

  Args:
    model: the predict-mode model (a layer built with `mode='predict'`).
    params: its parameters (the 'params' tree, as trained), or `split_weights(model,
      params)` to decode many times with the same weights (split once).
    prompt: int (b, lp), right-padded; None (or width 0) starts from nothing.
    max_new_tokens: tokens to generate per row.
    temperature: softmax temperature; 0 is greedy decoding.
    top_k: sample among the k most likely tokens only.
    top_p: nucleus sampling: among the most likely tokens holding mass top_p.
    rng: a `jax.random` key (needed when temperature > 0).
    eos_id: a generated `eos_id` ends its row (kept; `pad_id` follows).
    pad_id: fills positions after EOS.
    prompt_lengths: int (b,) real prompt lengths; default lp for every row.
    inputs: the encoder inputs (b, li) of a seq2seq model, else None.
    batch_size: rows to decode when there is neither prompt nor inputs.

  Returns:
    int32 (b, max_new_tokens): each row's generated tokens.

  The cache must hold max(prompt_lengths) + max_new_tokens positions (the
  model's `max_len`).
  """
  max_new_tokens = _check_new_tokens(max_new_tokens)
  prompt, lengths = _check_prompt(prompt, prompt_lengths, batch_size, inputs)
  rng = _check_sampling(temperature, top_k, top_p, rng)
  return _sample_jit(model, params, prompt, lengths, inputs, rng, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=top_k,
                     top_p=None if top_p is None else float(top_p), eos_id=eos_id,
                     pad_id=int(pad_id))


@functools.partial(compiler.jit, decoding=True, static_argnames=(
    'model', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'eos_id', 'pad_id'))
def _sample_jit(model, params, prompt, lengths, inputs, rng, *, max_new_tokens, temperature,
                top_k, top_p, eos_id, pad_id):
  b, lp = prompt.shape
  total = lp + max_new_tokens
  init_rng, rng = jax.random.split(rng)
  cache, stacks = _init(model, b, inputs, init_rng)
  pieces, param_depths = _pieces_and_depths(params, stacks)
  cache_depths = layer_depths(cache, stacks, 'cache')

  def cond(state):
    position, _, _, done, _ = state
    return (position < total) & ~jnp.all(done)

  def body(state):
    position, tokens, sequence, done, cache = state
    step_rng = jax.random.fold_in(rng, position)
    logits, cache = decode_step(model, join_layers(pieces, param_depths),
                                join_layers(cache, cache_depths), tokens, inputs, step_rng)
    cache = split_layers(cache, cache_depths)
    sampled = sample_logits(logits, jax.random.fold_in(step_rng, 1), temperature=temperature,
                            top_k=top_k, top_p=top_p)
    in_prompt = position < lengths
    token = jnp.where(in_prompt, _forced_tokens(prompt, position), sampled)
    sequence = jax.lax.dynamic_update_index_in_dim(
        sequence, jnp.where(done, pad_id, token), position, axis=1)
    last = position - lengths == max_new_tokens - 1
    ended = ~in_prompt & (last if eos_id is None else last | (token == eos_id))
    return position + 1, token, sequence, done | ended, cache

  state = (jnp.zeros((), jnp.int32), jnp.zeros((b,), jnp.int32),
           jnp.full((b, total), pad_id, jnp.int32), jnp.zeros((b,), jnp.bool_),
           split_layers(cache, cache_depths))
  _, _, sequence, _, _ = jax.lax.while_loop(cond, body, state)
  return _take_generated(sequence, lengths, max_new_tokens)


# ----------------------------------------------------------------------------
# Beam search.

def cache_batch_axes(model, batch_size: int = 1, inputs=None) -> Any:
  """The batch axis of every cache leaf (None for leaves without one).

  Found by comparing `jax.eval_shape` of the predict-mode cache for two batch
  sizes, so caches need no fixed layout (`Repeat` stacks them on axis 0).
  `inputs` (the encoder inputs of a seq2seq model) only lend their shape.
  """
  spec = None
  if inputs is not None:
    spec = (tuple(np.shape(inputs)[1:]), jnp.asarray(inputs).dtype.name)
  # A fresh copy of the cached tree, so callers may modify it.
  return jax.tree_util.tree_map(lambda axis: axis, _cache_batch_axes(model, batch_size, spec))


@functools.lru_cache(maxsize=64)
def _cache_batch_axes(model, batch_size, inputs_spec):
  shapes = []
  for b in (batch_size, batch_size + 1):
    inputs = None
    if inputs_spec is not None:
      inputs = jax.ShapeDtypeStruct((b,) + inputs_spec[0], jnp.dtype(inputs_spec[1]))
    shapes.append(jax.eval_shape(
        lambda inputs, b=b: init_cache(model, b, inputs, jax.random.key(0)), inputs))

  def axis(a, b):
    differ = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
    return differ[0] if differ else None

  return jax.tree_util.tree_map(axis, shapes[0], shapes[1])


def reorder_cache(cache, axes, indices):
  """Gathers `indices` (B,) along each cache leaf's batch axis (from `cache_batch_axes`)."""
  leaves, treedef = jax.tree_util.tree_flatten(cache)
  axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: x is None)
  if len(axes) != len(leaves):
    raise ValueError(f'reorder_cache: {len(axes)} batch axes for {len(leaves)} cache leaves.')
  return jax.tree_util.tree_unflatten(treedef, [
      leaf if axis is None else jnp.take(leaf, indices, axis=axis)
      for leaf, axis in zip(leaves, axes)])


def length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha: scores are log-probabilities divided by it."""
  return ((5.0 + length) / 6.0) ** alpha


def beam_search(model, params, prompt=None, max_new_tokens: int = 1, *, beam_size: int,
                alpha: float = 0.0, eos_id: int | None = None, pad_id: int = 0,
                prompt_lengths=None, inputs=None, batch_size: int | None = None, rng=None):
  """Beam search for the most likely continuations of each prompt.

  Keeps `beam_size` live hypotheses per row. Each step takes the best
  2 * beam_size extensions; those ending in `eos_id` that rank within the
  first `beam_size` become finished hypotheses (scored by log-probability /
  `length_penalty(generated length, alpha)`), the best `beam_size` others stay
  live, and the caches are reordered along their batch axes. A row stops once
  its worst finished hypothesis beats the best score its live ones could
  still reach; after `max_new_tokens` the live hypotheses are finished too.
  With beam_size 1 and alpha 0 this is greedy decoding.

  Args: as `autoregressive_sample`, plus `beam_size` and `alpha` (length
    penalty exponent, 0 = plain log-probability). `rng` only feeds layers that
    draw randomness in predict mode (none of the Transformer's do).

  Returns:
    (tokens, scores): int32 (b, beam_size, max_new_tokens) generated tokens
    (EOS, then `pad_id`), best first, and float32 (b, beam_size) scores
    (-inf for slots with no valid hypothesis).
  """
  max_new_tokens = _check_new_tokens(max_new_tokens)
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f'beam_size must be a positive int, got {beam_size!r}.')
  if alpha < 0:
    raise ValueError(f'alpha (the length penalty exponent) must be >= 0, got {alpha}.')
  prompt, lengths = _check_prompt(prompt, prompt_lengths, batch_size, inputs)
  if inputs is not None:
    inputs = jnp.repeat(jnp.asarray(inputs), beam_size, axis=0)
  axes = cache_batch_axes(model, prompt.shape[0] * beam_size, inputs)
  axes = tuple(jax.tree_util.tree_leaves(axes, is_leaf=lambda x: x is None))
  return _beam_jit(model, params, prompt, lengths, inputs,
                   jax.random.key(0) if rng is None else rng, max_new_tokens=max_new_tokens,
                   beam_size=beam_size, alpha=float(alpha), eos_id=eos_id, pad_id=int(pad_id),
                   axes=axes)


@functools.partial(compiler.jit, decoding=True, static_argnames=(
    'model', 'max_new_tokens', 'beam_size', 'alpha', 'eos_id', 'pad_id', 'axes'))
def _beam_jit(model, params, prompt, lengths, inputs, rng, *, max_new_tokens, beam_size, alpha,
              eos_id, pad_id, axes):
  b, lp = prompt.shape
  n, steps = beam_size, max_new_tokens
  init_rng, rng = jax.random.split(rng)
  cache, stacks = _init(model, b * n, inputs, init_rng)
  pieces, param_depths = _pieces_and_depths(params, stacks)
  cache_depths = layer_depths(cache, stacks, 'cache')
  rows = jnp.arange(b)[:, None]
  worst_penalty = length_penalty(float(steps), alpha)

  def cond(state):
    return (state['position'] < lp + steps) & ~jnp.all(state['done'])

  def body(state):
    position = state['position']
    logits, cache = decode_step(model, join_layers(pieces, param_depths),
                                join_layers(state['cache'], cache_depths),
                                state['last'].reshape(b * n), inputs,
                                jax.random.fold_in(rng, position))
    log_probs = jax.nn.log_softmax(logits).reshape(b, n, -1)
    vocab = log_probs.shape[-1]
    in_prompt = position < lengths  # (b,)
    forced = _forced_tokens(prompt, position)
    forced_log_probs = jnp.where(jnp.arange(vocab)[None, None, :] == forced[:, None, None],
                                 0.0, _NEG_INF)
    log_probs = jnp.where(in_prompt[:, None, None], forced_log_probs, log_probs)
    candidates = (state['live_log_prob'][:, :, None] + log_probs).reshape(b, n * vocab)
    scores, flat = jax.lax.top_k(candidates, 2 * n)  # (b, 2n), best first
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    generated = position - lengths  # index of this token among the generated ones
    tokens = state['live_tokens'][rows, parent]  # (b, 2n, steps)
    write = (~in_prompt)[:, None, None] & (jnp.arange(steps)[None, None, :] == generated[:, None, None])
    tokens = jnp.where(write, token[:, :, None], tokens)
    is_eos = (~in_prompt)[:, None] & (jnp.zeros_like(token, jnp.bool_) if eos_id is None
                                      else token == eos_id)
    last_step = (generated == steps - 1)[:, None]
    top_n = jnp.arange(2 * n)[None, :] < n
    finishing = top_n & (is_eos | last_step)
    penalty = length_penalty((generated + 1).astype(jnp.float32), alpha)[:, None]
    finished_scores = jnp.where(finishing, scores / penalty, _NEG_INF)
    # Merge with the finished pool; frozen rows keep theirs.
    pool_scores = jnp.concatenate([state['fin_scores'], finished_scores], axis=1)
    pool_tokens = jnp.concatenate([state['fin_tokens'], tokens], axis=1)
    best_scores, best = jax.lax.top_k(pool_scores, n)
    frozen = state['done'][:, None]
    fin_scores = jnp.where(frozen, state['fin_scores'], best_scores)
    fin_tokens = jnp.where(frozen[:, :, None], state['fin_tokens'], pool_tokens[rows, best])
    # The live hypotheses: the best n candidates that did not end.
    live_scores, live = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, scores), n)
    new_parent = parent[rows, live]
    cache = split_layers(reorder_cache(cache, axes, (rows * n + new_parent).reshape(b * n)),
                         cache_depths)
    # A row is done when no live hypothesis can beat its worst finished one.
    reachable = jnp.max(live_scores, axis=1) / worst_penalty
    done = state['done'] | (~in_prompt & ((fin_scores[:, -1] >= reachable) | last_step[:, 0]))
    return dict(position=position + 1, last=token[rows, live], live_tokens=tokens[rows, live],
                live_log_prob=live_scores, fin_tokens=fin_tokens, fin_scores=fin_scores,
                done=done, cache=cache)

  live_log_prob = jnp.full((b, n), _NEG_INF).at[:, 0].set(0.0)
  state = dict(position=jnp.zeros((), jnp.int32), last=jnp.zeros((b, n), jnp.int32),
               live_tokens=jnp.full((b, n, steps), pad_id, jnp.int32),
               live_log_prob=live_log_prob,
               fin_tokens=jnp.full((b, n, steps), pad_id, jnp.int32),
               fin_scores=jnp.full((b, n), _NEG_INF), done=jnp.zeros((b,), jnp.bool_),
               cache=split_layers(cache, cache_depths))
  state = jax.lax.while_loop(cond, body, state)
  return state['fin_tokens'], state['fin_scores']


class DecodingError(errors.UserError, ValueError):
  """A decoding request the model cannot serve (e.g. more positions than it has)."""


def check_length(prompt_len: int, max_new_tokens: int, max_len: int | None) -> None:
  """Raises `DecodingError` when `prompt_len + max_new_tokens` exceeds `max_len`.

  `max_len` is the model's number of positions (`config.model.max_len`, the
  size of its decoding cache); None skips the check (a model without one).
  """
  if max_len is None:
    return
  if prompt_len + max_new_tokens > max_len:
    raise DecodingError(
        f'the prompt ({prompt_len} tokens) plus --max_new_tokens={max_new_tokens} needs '
        f'{prompt_len + max_new_tokens} positions, more than the model has '
        f'(config.model.max_len={max_len}); shorten the prompt or lower --max_new_tokens.')


# ----------------------------------------------------------------------------
# Text in, text out: the trainer's end-of-training sample and the command line.

def generate_text(model, params, prompt: str, *, max_new_tokens: int, byte_level: bool = False,
                  tokenizer: tokenizer_lib.Tokenizer | None = None, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  inputs: str | None = None) -> str:
  """`prompt` followed by `max_new_tokens` sampled tokens, as text.

  `model` is a predict-mode LM, or with `inputs` (the encoder's input text) a
  predict-mode seq2seq model (called `model(inputs, token)`), whose `prompt`
  is the start of its target (often ''). With a `tokenizer` (the workdir's,
  `workdir_tokenizer`) the prompt and inputs are encoded and the ids decoded
  by it; byte-level models (`byte_level`, the 'bytes' tokenizer) read and
  write UTF-8 text; others take the prompt as space-separated token ids and
  print ids.
  """
  if tokenizer is None and byte_level:
    tokenizer = tokenizer_lib.load(tokenizer_lib.BYTES)
  ids = np.asarray(prompt_ids(prompt, tokenizer), np.int32)
  encoder_ids = None
  if inputs is not None:
    encoder_ids = np.asarray(prompt_ids(inputs, tokenizer), np.int32)
    if encoder_ids.size == 0:
      raise DecodingError('--inputs is empty: a seq2seq model needs at least one input token.')
    encoder_ids = jnp.asarray(encoder_ids[None, :])
  params = jax.device_put(params, jax.devices()[0])
  # The loop reads weights passed in faster than copies made inside its call.
  if not isinstance(params, SplitWeights) and jax.tree_util.tree_leaves(params):
    params = split_weights(model, params, inputs=encoder_ids)
  tokens = autoregressive_sample(
      model, params, jnp.asarray(ids[None, :]), max_new_tokens, temperature=temperature,
      top_k=top_k, top_p=top_p, rng=jax.random.key(seed), inputs=encoder_ids)
  tokens = np.concatenate([ids, np.asarray(tokens).reshape(-1)])
  if tokenizer is not None:
    return tokenizer.decode(tokens)
  return ' '.join(str(int(t)) for t in tokens)


def prompt_ids(prompt: str, tokenizer: tokenizer_lib.Tokenizer | None) -> list[int]:
  """The prompt's ids: encoded by `tokenizer`, or (None) parsed as space-separated ids."""
  if tokenizer is not None:
    return tokenizer.encode(prompt)
  try:
    return [int(t) for t in prompt.split()]
  except ValueError:
    raise DecodingError(f'the prompt {prompt[:40]!r} must be token ids separated by spaces: the '
                        'model is not byte-level and its workdir has no tokenizer file (it reads '
                        'ids, not text).') from None


def workdir_tokenizer(workdir: str, config) -> tokenizer_lib.Tokenizer | None:
  """How a workdir's model reads text: its stored tokenizer file, else bytes, else None (ids).

  A stored `WORKDIR/tokenizer.model|json` wins (its vocabulary must fit
  config.model.vocab_size); a byte-level data set (`data.name` in
  BYTE_LEVEL) reads UTF-8 bytes; any other model reads token ids.
  """
  tokenizer = tokenizer_lib.from_workdir(workdir)
  text_bytes = (config.data.get('name') == 'text'  # Real text read with the 'bytes' tokenizer.
                and config.data.get('tokenizer', tokenizer_lib.BYTES) == tokenizer_lib.BYTES)
  if (tokenizer.kind == tokenizer_lib.BYTES and config.data.get('name') not in spec_lib.BYTE_LEVEL
      and not text_bytes):
    return None
  vocab_size = config.model.get('vocab_size')
  if tokenizer.kind != tokenizer_lib.BYTES and isinstance(vocab_size, int):
    tokenizer_lib.check_vocab(tokenizer, vocab_size)
  return tokenizer


def sample_text(spec: spec_lib.ModelSpec, params, prompt: str, *, max_new_tokens: int,
                byte_level: bool, tokenizer: tokenizer_lib.Tokenizer | None = None,
                temperature: float = 1.0, seed: int = 0) -> str:
  """`generate_text` with the spec's model built in 'predict' mode (`config.sample.*`)."""
  return generate_text(spec.build('predict'), params, prompt, max_new_tokens=max_new_tokens,
                       byte_level=byte_level, tokenizer=tokenizer, temperature=temperature,
                       seed=seed)


def check_inputs(task: str, model_name: str, inputs: str | None) -> None:
  """Raises `DecodingError` unless `--inputs` is given exactly for a seq2seq model."""
  if task == 'seq2seq' and inputs is None:
    raise DecodingError(f'the workdir holds a seq2seq model ({model_name}): pass the text its '
                        'encoder reads with --inputs=TEXT (--prompt, if any, starts the output).')
  if task != 'seq2seq' and inputs is not None:
    raise DecodingError(f'--inputs is for seq2seq models (an encoder reads it), but the workdir '
                        f'holds a language model ({model_name}); give the text to continue '
                        'with --prompt.')


def main(argv):
  """`python -m terraflax.decoding --workdir=DIR --prompt=TEXT [--inputs=TEXT] --max_new_tokens=N`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  try:
    config, spec, params = spec_lib.load_workdir(f.workdir, step=f.step)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'terraflax.decoding: {e}')
  if spec.task not in ('lm', 'seq2seq'):
    sys.exit(f'terraflax.decoding: {f.workdir} holds a {spec.task} model '
             f'(data.name={config.data.name!r}); only language and seq2seq models decode.')
  check_inputs(spec.task, spec.name, f.inputs)
  tokenizer = workdir_tokenizer(f.workdir, config)
  max_len = config.model.get('max_len')
  check_length(len(prompt_ids(f.prompt, tokenizer)), f.max_new_tokens, max_len)
  if f.inputs is not None and max_len is not None:
    n_inputs = len(prompt_ids(f.inputs, tokenizer))
    if n_inputs > max_len:
      raise DecodingError(f'--inputs has {n_inputs} tokens, more than the model has positions '
                          f'(config.model.max_len={max_len}); shorten it.')
  model = spec.build('predict')
  context, params = quantization.prepare_for_decoding(model, params, weights=f.weights)
  with context:
    text = generate_text(model, params, f.prompt, max_new_tokens=f.max_new_tokens,
                         tokenizer=tokenizer, temperature=f.temperature, top_k=f.top_k,
                         top_p=f.top_p, seed=f.seed, inputs=f.inputs)
  print(text, flush=True)


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('workdir', None, 'A training workdir with checkpoints/ and config.json.')
  flags.DEFINE_string('prompt', '', 'Text to continue, encoded by the workdir\'s tokenizer '
                      '(WORKDIR/tokenizer.model|json, else UTF-8 bytes for byte-level models); '
                      'token ids separated by spaces for models that read ids.')
  flags.DEFINE_string('inputs', None, 'A seq2seq model\'s encoder input (Transformer, Terraformer, '
                      'ConcatTerraformer), encoded like --prompt; required for those models, '
                      'an error for language models.')
  flags.DEFINE_integer('max_new_tokens', 100, 'Tokens to generate after the prompt.',
                       lower_bound=1)
  flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 is greedy.', lower_bound=0.0)
  flags.DEFINE_integer('top_k', None, 'Sample from the k most likely tokens only.',
                       lower_bound=1)
  flags.DEFINE_float('top_p', None, 'Sample from the smallest set with this probability mass, '
                     'in (0, 1].')
  flags.register_validator('top_p', lambda p: p is None or 0.0 < p <= 1.0,
                           message='--top_p must be in (0, 1] (the probability mass kept).')
  flags.DEFINE_integer('seed', 0, 'Seed of the sampling noise.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the latest).')
  flags.DEFINE_enum('weights', 'f32', quantization.WEIGHTS,
                    'Weights to decode with: f32 as trained, bf16 (matrices stored in bfloat16) '
                    'or int8 (per-channel scales); bf16 and int8 read fewer bytes per token.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from terraflax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, name='terraflax.decoding')
