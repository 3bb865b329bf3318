"""Reversible layers: a backward pass whose memory does not grow with depth.

A reversible layer can rebuild its inputs from its outputs (`reverse`). A
`ReversibleSerial` of such layers therefore keeps no activations for its
backward pass: a custom VJP walks the blocks from the last to the first,
rebuilding each block's inputs from its outputs and recomputing the block's
forward pass to get its gradients. The residuals of that VJP are the stack's
outputs and the parameters, nothing per block.

  ReversibleHalfResidual(F)  [x1, x2, ctx...] -> [x1 + F(x2, ctx...), x2, ctx...]
  ReversibleSwap()           [x1, x2] -> [x2, x1]

A RevNet/Reformer block on two residual streams is
`[ReversibleHalfResidual(attention), ReversibleSwap(), ReversibleHalfResidual(ff),
ReversibleSwap()]`; a model wires it as `Dup()` (one stream to two), the
`ReversibleSerial`, then `MergeStreams('mean')` or `MergeStreams('concat')`.

Identical blocks are one block with `n_repeats=n`: its parameters are stacked
on a leading axis (like `Repeat`) and both the forward and the backward pass
are a `lax.scan` over the blocks, so compile time and memory stay flat in n.

Randomness is replayed exactly: layer number i of the stack (counting through
the repeats) draws from `fold_in(make_rng(stream), i)` for every rng stream
the caller gave (see `terraflax.rng.STREAMS`), and its recomputation reuses
the same keys.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from terraflax.combinators.base import (
    Layer, LayerError, as_outputs, as_return, check_inputs, describe_shapes,
    label_of, layer_path, n_in_of, n_out_of)
from terraflax.combinators.core import (
    Fn, _layers_init, run_serial, serial_n_in_n_out)
from terraflax.combinators.scan import predict_unroll, stacked_axes
from terraflax.rng import STREAMS


def is_reversible(layer: Any) -> bool:
  """Whether `layer` has a `reverse` method and as many outputs as inputs."""
  return callable(getattr(layer, 'reverse', None)) and n_in_of(layer) == n_out_of(layer)


class ReversibleLayer(Layer):
  """Base of layers whose inputs can be rebuilt from their outputs.

  [x_1..x_k] -> [y_1..y_k], and `reverse(y_1..y_k) -> (x_1..x_k)`. n_in ==
  n_out. `reverse` must draw the same randomness as `__call__` (call the same
  children with the same rng streams). A `ReversibleSerial` runs any such layer
  by reversing it and then differentiating its forward pass; the layers below
  have cheaper special cases.
  """

  def reverse(self, *outputs):
    raise NotImplementedError(f'{label_of(self)} does not define reverse().')


class ReversibleSwap(ReversibleLayer):
  """[x1, x2] -> [x2, x1]: any shapes; its own reverse. n_in = n_out = 2."""

  n_in = 2
  n_out = 2

  def __call__(self, x1, x2):
    return x2, x1

  def reverse(self, y1, y2):
    return y2, y1


class _HalfResidualFields(ReversibleLayer):
  layers: Sequence[Any] = ()
  preserve_adopted_names = True


def _check_same_shape(owner: Any, a, b, what: str):
  if a.shape != b.shape:
    raise LayerError(
        f'{layer_path(owner)} ({label_of(owner)}): {what} needs the residual '
        f'f(x2, ctx...) to have the shape of x1, got x1 {describe_shapes([a])} '
        f'and f {describe_shapes([b])}.')


class ReversibleHalfResidual(_HalfResidualFields):
  """[x1, x2, ctx...] -> [x1 + f(x2, ctx...), x2, ctx...]: f = the layers in serial.

  Shapes: x1 and f's output (b, l, d); x2 and the context items (a mask, an
  encoder output) are whatever f takes. n_in = n_out = 1 + f.n_in: F 1->1
  gives a 2 -> 2 layer on [x1, x2]; F 2->1 on [x, mask] gives 3 -> 3 on
  [x1, x2, mask]. The context passes through untouched; f's first output is
  the residual, and f may also return its inputs' context (an attention
  layer `[x, mask] -> [y, mask]`), which is dropped. The sum keeps x1's dtype.

  `reverse(y1, x2, ctx...)` gives `(y1 - f(x2, ctx...), x2, ctx...)`.
  """

  def __init__(self, *layers, **kwargs):
    _layers_init(ReversibleHalfResidual, self, layers, kwargs)
    f_in, f_out = serial_n_in_n_out(self.layers)
    if f_in < 1:
      raise LayerError(
          'ReversibleHalfResidual needs layers that take at least x2 (n_in >= 1), '
          f'got layers with n_in={f_in}.')
    if f_out not in (1, f_in):
      raise LayerError(
          'ReversibleHalfResidual needs layers with n_out=1 (the residual) or '
          f'n_out=n_in (residual plus passed-through context), got n_in={f_in}, '
          f'n_out={f_out}.')

  @property
  def n_in(self):
    return serial_n_in_n_out(self.layers)[0] + 1

  @property
  def n_out(self):
    return self.n_in

  def residual(self, *inputs):
    """[x2, ctx...] -> f(x2, ctx...): the branch added to x1."""
    return run_serial(self.layers, list(inputs))[0]

  def __call__(self, *inputs):
    stack = check_inputs(self, inputs)
    x1, rest = stack[0], stack[1:]
    fx = self.residual(*rest)
    _check_same_shape(self, x1, fx, 'The half residual')
    return as_return([(x1 + fx).astype(x1.dtype)] + rest)

  def reverse(self, *outputs):
    stack = check_inputs(self, outputs)
    y1, rest = stack[0], stack[1:]
    fx = self.residual(*rest)
    _check_same_shape(self, y1, fx, 'Reversing the half residual')
    return as_return([(y1 - fx).astype(y1.dtype)] + rest)


def MergeStreams(how: str = 'mean'):  # pylint: disable=invalid-name
  """[x1, x2] -> [merged]: the end of a two-stream reversible stack.

  how='mean': (x1 + x2) / 2, (b, l, d) -> (b, l, d);
  how='concat': concatenate on the last axis, (b, l, d) -> (b, l, 2d).
  Before the stack, `Dup()` turns [x] into [x, x].
  """
  if how == 'mean':
    return Fn('MergeStreams', lambda x1, x2: (x1 + x2) / 2)
  if how == 'concat':
    return Fn('MergeStreams', lambda x1, x2: jnp.concatenate([x1, x2], axis=-1))
  raise ValueError(f"MergeStreams how must be 'mean' or 'concat', got {how!r}.")


# -- The pure machinery: unbound copies of the layers, applied functionally. --

class _Program(NamedTuple):
  """What the pure stack functions need to know about a ReversibleSerial."""
  owner: str                 # path of the ReversibleSerial, for error messages
  templates: tuple[Any, ...]  # unbound copies of its layers, named as its children
  n_blocks: int | None       # None: unstacked parameters, the layers run once


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _layer_rngs(program: _Program, keys: dict[str, Any], block, position: int):
  """The keys of the layer at `position` of block `block` (replayed as they are).

  Layer number `block * len(block) + position` folds its number into each base
  key, so a scanned stack draws what the unrolled stack of the same layers does.
  """
  index = block * len(program.templates) + position
  return {stream: jax.random.fold_in(key, index) for stream, key in keys.items()}


def _apply(program: _Program, t: Any, params: Any, rngs, inputs, method=None):
  """Runs the unbound layer `t` (or its `method`) on `inputs`.

  Returns a tuple of the layer's outputs; `method='residual'` returns f's array.
  """
  variables = {} if params is None else {'params': params}
  try:
    with jax.named_scope(t.name):
      result = t.apply(variables, *inputs, rngs=rngs, method=method)
  except LayerError as e:
    raise LayerError(f'In {program.owner}/{t.name}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    raise LayerError(
        f'{program.owner}/{t.name} ({label_of(t)}) failed on inputs '
        f'{describe_shapes(inputs)}: {type(e).__name__}: {e}') from e
  return result if method == 'residual' else as_outputs(t, result)


def _ordered_rngs(program, keys, block, position, values):
  """The layer's keys, tied to `values` (its inputs) by an optimization barrier.

  The tie pins each layer's random draws (dropout masks, any other noise) to
  the point where its inputs exist, so XLA cannot draw every layer's bits up front
  or share them between the forward pass and the recomputation.
  """
  rngs = _layer_rngs(program, keys, block, position)
  rngs, values = jax.lax.optimization_barrier((rngs, values))
  return rngs, values


def _block_forward(program, params, keys, block, stack):
  for position, t in enumerate(program.templates):
    n = n_in_of(t)
    rngs, inputs = _ordered_rngs(program, keys, block, position, stack[:n])
    stack = list(_apply(program, t, params.get(t.name), rngs, inputs)) + stack[n:]
  return stack


def _block_reverse(program, params, keys, block, stack):
  for position in reversed(range(len(program.templates))):
    t = program.templates[position]
    n = n_in_of(t)
    rngs, outputs = _ordered_rngs(program, keys, block, position, stack[:n])
    inputs = _apply(program, t, params.get(t.name), rngs, outputs, method='reverse')
    stack = list(inputs) + stack[n:]
  return stack


def _half_residual_reverse_and_grad(program, t, params, rngs, outputs, cts):
  """Rebuilds [x1, x2, ctx] and their cotangents with one forward of f."""
  y1, rest = outputs[0], list(outputs[1:])
  dy1, d_rest = cts[0], list(cts[1:])
  diff = [j for j, v in enumerate(rest) if d_rest[j] is not None]

  def f(p, *diff_values):
    values = list(rest)
    for j, v in zip(diff, diff_values):
      values[j] = v
    return _apply(program, t, p, rngs, values, method='residual')

  p = {} if params is None else params
  if dy1 is None:  # An integer accumulator: nothing to differentiate.
    x1 = (y1 - f(p, *[rest[j] for j in diff])).astype(y1.dtype)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
    return [x1] + rest, [None] + d_rest, (None if params is None else zeros)
  fx, f_vjp = jax.vjp(f, p, *[rest[j] for j in diff])
  x1 = (y1 - fx).astype(y1.dtype)
  dp, *d_diff = f_vjp(dy1.astype(fx.dtype))
  for j, d in zip(diff, d_diff):
    d_rest[j] = d_rest[j] + d
  return [x1] + rest, [dy1] + d_rest, (None if params is None else dp)


def _generic_reverse_and_grad(program, t, params, rngs, outputs, cts):
  """Any reversible layer: `reverse`, then the VJP of its forward pass."""
  inputs = list(_apply(program, t, params, rngs, outputs, method='reverse'))
  diff = [j for j, x in enumerate(inputs) if _is_float(x)]
  scored = [k for k, ct in enumerate(cts) if ct is not None]

  def forward(p, *diff_values):
    values = list(inputs)
    for j, v in zip(diff, diff_values):
      values[j] = v
    ys = _apply(program, t, p, rngs, values)
    return tuple(ys[k] for k in scored)

  p = {} if params is None else params
  _, f_vjp = jax.vjp(forward, p, *[inputs[j] for j in diff])
  dp, *d_diff = f_vjp(tuple(cts[k] for k in scored))
  in_cts = [None] * len(inputs)
  for j, d in zip(diff, d_diff):
    in_cts[j] = d
  return inputs, in_cts, (None if params is None else dp)


def _reverse_and_grad(program, t, params, rngs, outputs, cts):
  """(inputs, input cotangents, parameter gradients) of one layer."""
  if isinstance(t, ReversibleSwap):
    return [outputs[1], outputs[0]], [cts[1], cts[0]], None
  if isinstance(t, ReversibleHalfResidual):
    return _half_residual_reverse_and_grad(program, t, params, rngs, outputs, cts)
  return _generic_reverse_and_grad(program, t, params, rngs, outputs, cts)


def _block_backward(program, params, keys, block, stack, cts):
  """Walks one block backwards; returns its inputs, their cotangents, its gradients."""
  grads: dict[str, Any] = {}
  for position in reversed(range(len(program.templates))):
    t = program.templates[position]
    n = n_in_of(t)
    # The barriers order the walk: a layer is rebuilt, and draws its random
    # bits, only once the layer after it has its gradients, so XLA cannot
    # hoist all rebuilds ahead of the gradient computations and keep their
    # activations alive.
    rngs, (outputs, out_cts) = _ordered_rngs(program, keys, block, position, (stack[:n], cts[:n]))
    inputs, in_cts, g = _reverse_and_grad(program, t, params.get(t.name), rngs, outputs, out_cts)
    if g is not None:
      grads[t.name] = g if t.name not in grads else jax.tree_util.tree_map(
          operator.add, grads[t.name], g)
    inputs, in_cts, grads = jax.lax.optimization_barrier((inputs, in_cts, grads))
    stack, cts = list(inputs) + stack[n:], list(in_cts) + cts[n:]
  return stack, cts, {name: grads[name] for name in params}


def _stack_forward(program, params, keys, stack):
  """The forward pass of the whole stack, a scan over stacked blocks."""
  if program.n_blocks is None:
    return tuple(_block_forward(program, params, keys, 0, list(stack)))

  def step(carry, xs):
    block_params, block = xs
    return tuple(_block_forward(program, block_params, keys, block, list(carry))), None

  out, _ = jax.lax.scan(step, tuple(stack), (params, jnp.arange(program.n_blocks)))
  return out


def _stack_reverse(program, params, keys, stack):
  if program.n_blocks is None:
    return tuple(_block_reverse(program, params, keys, 0, list(stack)))

  def step(carry, xs):
    block_params, block = xs
    return tuple(_block_reverse(program, block_params, keys, block, list(carry))), None

  out, _ = jax.lax.scan(
      step, tuple(stack), (params, jnp.arange(program.n_blocks)), reverse=True)
  return out


def _stack_backward(program, params, keys, outputs, cts):
  if program.n_blocks is None:
    _, in_cts, grads = _block_backward(program, params, keys, 0, list(outputs), list(cts))
    return tuple(in_cts), grads

  def step(carry, xs):
    block_params, block = xs
    stack, block_cts, grads = _block_backward(
        program, block_params, keys, block, list(carry[0]), list(carry[1]))
    return (tuple(stack), tuple(block_cts)), grads

  (_, in_cts), grads = jax.lax.scan(
      step, (tuple(outputs), tuple(cts)), (params, jnp.arange(program.n_blocks)), reverse=True)
  return in_cts, grads


def reversible_stack(program: _Program, params, keys, stack):
  """`_stack_forward` with a backward pass that rebuilds instead of storing."""

  @jax.custom_vjp
  def run(params, keys, stack):
    return _stack_forward(program, params, keys, stack)

  def run_fwd(params, keys, stack):
    outputs = _stack_forward(program, params, keys, stack)
    return outputs, (outputs, params, keys)  # Outputs and parameters only.

  def run_bwd(residuals, out_cts):
    outputs, params, keys = residuals
    cts = tuple(ct if _is_float(y) else None for y, ct in zip(outputs, out_cts))
    in_cts, grads = _stack_backward(program, params, keys, outputs, cts)
    return grads, None, tuple(in_cts)

  run.defvjp(run_fwd, run_bwd)
  return run(params, keys, tuple(stack))


class _ReversibleSerialFields(ReversibleLayer):
  layers: Sequence[Any] = ()
  n_repeats: int | None = None
  reversible: bool = True
  preserve_adopted_names = True


class ReversibleSerial(_ReversibleSerialFields):
  """Reversible layers in serial, with a backward pass that stores no activations.

  [x_1..x_k] -> [x_1..x_k] transformed; n_in = n_out = k, derived from the
  layers like `Serial` (all must be reversible: n_in == n_out and `reverse`).
  A two-stream Reformer stack on (b, l, d) arrays:

    Serial(Dup(),                                    # stack: x, x
           ReversibleSerial(ReversibleHalfResidual(LayerNorm(), attention),
                            ReversibleSwap(),
                            ReversibleHalfResidual(FeedForward(...)),
                            ReversibleSwap(), n_repeats=12),
           MergeStreams('mean'))                     # stack: (x1 + x2) / 2

  `n_repeats=None` (default): the layers run once, each with its own
  parameters. `n_repeats=n`: the layers are one block run n times with
  parameters stacked on a leading axis of size n (parameters read like
  `Serial(*layers)`'s, e.g. `ReversibleHalfResidual_0/Dense_1/kernel` of shape
  (n, d, d)); forward and backward are scanned over the blocks.

  When training (`apply` with only `params`), the backward pass rebuilds each
  block's inputs from its outputs (`reverse`) and recomputes the block to get
  its gradients. `reversible=False` runs the same computation, with the same
  parameters and randomness, under plain autodiff (all activations stored).
  During `init`, when `cache` or `intermediates` is mutable (predict-mode
  decoding, sown attention weights), or when the caller passes any other
  collection than `params`, the layers simply run forward (scanned
  with `nn.scan` like `Repeat`, caches stacked per block); their randomness is
  then Flax's own and differs from the training path's.

  `reverse(*outputs)` rebuilds the inputs, drawing the same randomness as a
  forward call under the same rngs.
  """

  def __init__(self, *layers, n_repeats=None, reversible=True, **kwargs):
    if n_repeats is not None and (not isinstance(n_repeats, int) or n_repeats < 1):
      raise LayerError(
          f'ReversibleSerial needs n_repeats=None or an int >= 1, got n_repeats={n_repeats!r}.')
    if not isinstance(reversible, bool):
      raise LayerError(f'ReversibleSerial reversible must be True or False, got {reversible!r}.')
    _layers_init(ReversibleSerial, self, layers,
                 dict(kwargs, n_repeats=n_repeats, reversible=reversible))
    if not self.layers:
      raise LayerError('ReversibleSerial needs at least one layer.')
    for position, layer in enumerate(self.layers):
      if not is_reversible(layer):
        raise LayerError(
            f'ReversibleSerial needs reversible layers (ReversibleHalfResidual, '
            f'ReversibleSwap, or a ReversibleLayer with n_in == n_out), got '
            f'{label_of(layer)} at position {position} with n_in={n_in_of(layer)}, '
            f'n_out={n_out_of(layer)}'
            + ('' if callable(getattr(layer, 'reverse', None)) else ' and no reverse()') + '.')

  @property
  def n_in(self):
    return serial_n_in_n_out(self.layers)[0]

  @property
  def n_out(self):
    return self.n_in

  def stacked_copies(self) -> tuple[int, bool] | None:
    """(n_repeats, True) when the blocks' variables are stacked, else None.

    See `scan.stacked_copies`.
    """
    return None if self.n_repeats is None else (self.n_repeats, True)

  def _runs_forward_only(self) -> bool:
    # The pure (custom VJP) path carries parameters only: any other collection passed in
    # or written (caches, sown values) needs the flax forward.
    return (self.is_initializing() or self.is_mutable_collection('cache')
            or self.is_mutable_collection('intermediates')
            or bool(set(self.variables) - {'params'}))

  def _flax_forward(self, stack):
    """Runs the bound children: init, predict-mode caches, sown intermediates."""
    if self.n_repeats is None:
      return run_serial(self.layers, stack)

    def body(module, carry, _):
      return tuple(run_serial(module.layers, list(carry))), None

    scanned = nn.scan(
        body,
        variable_axes=stacked_axes(self),
        split_rngs={stream: True for stream in STREAMS},
        length=self.n_repeats,
        unroll=predict_unroll(self, self.n_repeats),
        metadata_params={nn.PARTITION_NAME: 'layers'})
    carry, _ = scanned(self, tuple(stack), None)
    return list(carry)

  def _pure_arguments(self):
    """(program, params, base keys) for the functional stack."""
    templates = {}
    for layer in self.layers:  # A shared instance appears once.
      templates.setdefault(layer.name, layer.clone(parent=None, _deep_clone=True))
    program = _Program(
        owner=layer_path(self),
        templates=tuple(templates[layer.name] for layer in self.layers),
        n_blocks=self.n_repeats)
    # Plain arrays: the caller may pass `init`'s boxed (LogicallyPartitioned) variables.
    params = nn.meta.unbox(dict(self.variables.get('params', {})))
    # Every stream the caller gave: a layer may also fall back on `params`.
    keys = {stream: self.make_rng(stream) for stream in sorted(self.scope.rngs)}
    return program, params, keys

  def __call__(self, *inputs):
    stack = check_inputs(self, inputs)
    if self._runs_forward_only():
      return as_return(self._flax_forward(stack))
    program, params, keys = self._pure_arguments()
    if self.reversible:
      return as_return(reversible_stack(program, params, keys, stack))
    return as_return(_stack_forward(program, params, keys, stack))

  def reverse(self, *outputs):
    stack = check_inputs(self, outputs)
    program, params, keys = self._pure_arguments()
    return as_return(_stack_reverse(program, params, keys, stack))
