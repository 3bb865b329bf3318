"""Stack combinators: Serial, Parallel, Branch, Residual, Select, Fn and friends.

Layers run over a data stack whose top is the first item. A layer takes its
`n_in` items from the top and pushes its `n_out` outputs back:

  Serial(F, G)     F 1->1, G 2->1 on stack [a, b]          gives [G(F(a), b)]
  Parallel(F, G)   F 1->1, G 3->1 on stack [a, b, c, d]    gives [F(a), G(b, c, d)]
  Branch(F, G)     F 1->1, G 2->1 on stack [a, b]          gives [F(a), G(a, b)]
  Residual(F)      F 1->1 on stack [a]                     gives [a + F(a)]
  Select([0, 0, 1])                on stack [a, b]         gives [a, a, b]

Constructors take layers positionally; nested lists are flattened and `None`
is skipped. In `Parallel`/`Branch` each argument is one child: a list is its
`Serial`, and `None` or `[]` is the identity on one item (not a layer that
takes nothing, which would shift the other children's inputs); so is a
`Residual` shortcut of `None` or `[]`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from terraflax.combinators.base import (
    Layer, LayerError, apply_layer, as_outputs, as_return, check_inputs, flatten_layers,
    label_of, layer_path, n_in_of, n_out_of, name_children)


def serial_n_in_n_out(layers: Sequence[Any]) -> tuple[int, int]:
  """(n_in, n_out) of running `layers` one after another on a stack."""
  depth = deepest = 0
  for layer in layers:
    depth += n_in_of(layer)
    deepest = max(deepest, depth)
    depth -= n_out_of(layer)
  return deepest, deepest - depth


def run_serial(layers: Sequence[Any], stack: list[Any]) -> list[Any]:
  """Runs `layers` in order on `stack` (top first) and returns the new stack."""
  for layer in layers:
    n = n_in_of(layer)
    stack = list(apply_layer(layer, stack[:n])) + stack[n:]
  return stack


def add_same_shape(a, b, what: str = 'Add'):
  """`a + b` for arrays of one shape; a clear error otherwise."""
  if a.shape != b.shape:
    raise ValueError(f'{what} needs two arrays of the same shape, got {a.shape} and {b.shape}.')
  return a + b


def multiply_same_shape(a, b):
  """`a * b` for arrays of one shape; a clear error otherwise."""
  if a.shape != b.shape:
    raise ValueError(f'Multiply needs two arrays of the same shape, got {a.shape} and {b.shape}.')
  return a * b


class _LayersFields(Layer):
  """Fields of the combinators that hold a sequence of child layers.

  `label` (optional) is the name the combinator shows in parameter paths and
  errors instead of its class name: `Serial(..., label='Encoder')`.
  """

  layers: Sequence[Any] = ()
  label: str | None = None
  preserve_adopted_names = True  # Keep the names `name_children` gave.


def _layers_init(cls, self, layers, kwargs):
  """Shared positional `__init__`: `Cls(a, [b, c])` or `Cls(layers=(a, b, c))`."""
  if 'layers' in kwargs:  # The keyword form that clone() uses.
    if layers:
      raise TypeError(f'{cls.__name__} got layers both positionally and as layers=.')
    layers = kwargs.pop('layers')
  flat = tuple(flatten_layers(layers))
  name_children(flat, cls.__name__)
  super(cls, self).__init__(layers=flat, **kwargs)


class Serial(_LayersFields):
  """Runs its layers one after another on the stack.

  n_in/n_out are derived: Serial(F 1->2, G 2->1) is 1 -> 1;
  Serial(F 1->1, G 2->1) on [a, b] gives [G(F(a), b)] and is 2 -> 1.
  """

  def __init__(self, *layers, **kwargs):
    _layers_init(Serial, self, layers, kwargs)

  @property
  def n_in(self):
    return serial_n_in_n_out(self.layers)[0]

  @property
  def n_out(self):
    return serial_n_in_n_out(self.layers)[1]

  def __call__(self, *inputs):
    return as_return(run_serial(self.layers, check_inputs(self, inputs)))


def _as_one_layer(items):
  """A list of layers as one layer: its only layer, its `Serial`, or None if empty."""
  flat = flatten_layers(items)
  if not flat:
    return None
  return flat[0] if len(flat) == 1 else Serial(*flat)


def _one_item_children(layers):
  """Parallel/Branch children: a list is its `Serial` (or its only layer).

  `None` and an empty list are the identity on one item (`Select([0])`), as
  in Trax: an empty `Serial` would take and give nothing, shifting the other
  children onto different inputs.
  """
  children = []
  for layer in layers:
    if isinstance(layer, (list, tuple)):
      layer = _as_one_layer(layer)
    children.append(Select([0]) if layer is None else layer)
  return children


class Parallel(_LayersFields):
  """Runs each layer on its own slice of the stack.

  F 1->1, G 3->1 on [a, b, c, d] gives [F(a), G(b, c, d)]; n_in and n_out are
  the sums of the children's. A list argument becomes a `Serial`; `None` and
  `[]` are the identity on one item: Parallel([], F) on [a, b] gives [a, F(b)].
  """

  def __init__(self, *layers, **kwargs):
    if 'layers' not in kwargs:
      layers = _one_item_children(layers)
    _layers_init(Parallel, self, layers, kwargs)

  @property
  def n_in(self):
    return sum(n_in_of(layer) for layer in self.layers)

  @property
  def n_out(self):
    return sum(n_out_of(layer) for layer in self.layers)

  def __call__(self, *inputs):
    stack, outputs = check_inputs(self, inputs), []
    for layer in self.layers:
      n = n_in_of(layer)
      outputs.extend(apply_layer(layer, stack[:n]))
      stack = stack[n:]
    return as_return(outputs)


class Branch(_LayersFields):
  """Runs each layer on a copy of the top of the stack; concatenates outputs.

  F 1->1, G 2->1 on [a, b] gives [F(a), G(a, b)]. n_in is the largest child
  n_in (all of those inputs are consumed), n_out the sum. A list argument
  becomes a `Serial`; `None` and `[]` are the identity on the top item:
  Branch([], Dup()) on [a] gives [a, a, a].
  """

  def __init__(self, *layers, **kwargs):
    if 'layers' not in kwargs:
      layers = _one_item_children(layers)
    _layers_init(Branch, self, layers, kwargs)

  @property
  def n_in(self):
    return max((n_in_of(layer) for layer in self.layers), default=0)

  @property
  def n_out(self):
    return sum(n_out_of(layer) for layer in self.layers)

  def __call__(self, *inputs):
    stack, outputs = check_inputs(self, inputs), []
    for layer in self.layers:
      outputs.extend(apply_layer(layer, stack[:n_in_of(layer)]))
    return as_return(outputs)


class _ResidualFields(_LayersFields):
  shortcut: Any = None


class Residual(_ResidualFields):
  """Adds a shortcut to the first output of its layers run in serial.

  [x, ...] -> [shortcut(x) + layers(x, ...)[0], layers(x, ...)[1:]]; the
  shortcut defaults to the identity on the top item (`None` or `[]`; a list
  is run in serial). F 2->2 on [x, m] gives [x + F(x, m)[0], F(x, m)[1]].
  """

  def __init__(self, *layers, shortcut=None, **kwargs):
    if isinstance(shortcut, (list, tuple)):
      shortcut = _as_one_layer(shortcut)
    if 'layers' not in kwargs and shortcut is not None and shortcut.name is None:
      object.__setattr__(shortcut, 'name', 'shortcut')
    _layers_init(Residual, self, layers, dict(kwargs, shortcut=shortcut))
    main_n_out = serial_n_in_n_out(self.layers)[1]
    if main_n_out < 1:
      raise LayerError(f'Residual needs layers with n_out >= 1, got n_out={main_n_out}.')
    if self.shortcut is not None and n_out_of(self.shortcut) != 1:
      raise LayerError(
          f'Residual needs a shortcut with n_out=1, got {label_of(self.shortcut)} '
          f'with n_out={n_out_of(self.shortcut)}.')

  @property
  def n_in(self):
    shortcut_n_in = 1 if self.shortcut is None else n_in_of(self.shortcut)
    return max(serial_n_in_n_out(self.layers)[0], shortcut_n_in)

  @property
  def n_out(self):
    return serial_n_in_n_out(self.layers)[1]

  def __call__(self, *inputs):
    stack = check_inputs(self, inputs)
    main = run_serial(self.layers, stack[:serial_n_in_n_out(self.layers)[0]])
    if self.shortcut is None:
      shortcut = stack[0]
    else:
      shortcut = apply_layer(self.shortcut, stack[:n_in_of(self.shortcut)])[0]
    try:
      total = add_same_shape(shortcut, main[0], 'The residual sum')
    except ValueError as e:
      raise LayerError(f'{layer_path(self)} (Residual): {e}') from None
    return as_return([total] + main[1:])


class _SelectFields(Layer):
  indices: tuple[int, ...] = ()
  n_in: int = 1
  label: str = 'Select'


class Select(_SelectFields):
  """Copies and reorders the top `n_in` items: `[stack[i] for i in indices]`.

  Select([0, 0, 1]) on [a, b] gives [a, a, b]; `n_in` defaults to
  `max(indices) + 1`, and items below the indices are consumed.
  """

  def __init__(self, indices=(), n_in=None, **kwargs):
    indices = tuple(int(i) for i in indices)
    if any(i < 0 for i in indices):
      raise LayerError(f'Select indices must be >= 0, got {indices}.')
    if n_in is None:
      n_in = max(indices, default=-1) + 1
    if indices and max(indices) >= n_in:
      raise LayerError(f'Select indices {indices} need n_in > {max(indices)}, got n_in={n_in}.')
    super().__init__(indices=indices, n_in=n_in, **kwargs)

  @property
  def n_out(self):
    return len(self.indices)

  def __call__(self, *inputs):
    stack = check_inputs(self, inputs)
    return as_return([stack[i] for i in self.indices])


class _FnFields(Layer):
  label: str = 'Fn'
  f: Callable[..., Any] | None = None
  n_out: int = 1
  n_in: int = 1


def _positional_arity(label: str, f: Callable[..., Any]) -> int:
  parameters = inspect.signature(f).parameters.values()
  if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
    raise LayerError(f'Fn {label!r}: f takes *args/**kwargs; pass n_in= explicitly.')
  return sum(1 for p in parameters
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)


class Fn(_FnFields):
  """A parameter-free layer from a pure function: `Fn('Square', lambda x: x * x)`.

  n_in is the number of positional arguments of `f` (or `n_in=`); `f` returns
  one array when `n_out == 1`, else a tuple of `n_out`.
  """

  def __init__(self, label='Fn', f=None, n_out=1, *, n_in=None, **kwargs):
    if f is None or not callable(f):
      raise LayerError(f'Fn {label!r} needs a callable f, got {f!r}.')
    if n_in is None:
      n_in = _positional_arity(label, f)
    super().__init__(label=label, f=f, n_out=n_out, n_in=n_in, **kwargs)

  def __call__(self, *inputs):
    check_inputs(self, inputs)
    # Checked here too, not only by the combinator around it: an Fn called on its own.
    return as_return(as_outputs(self, self.f(*inputs)))


def Dup():  # pylint: disable=invalid-name
  """[x] -> [x, x]."""
  return Fn('Dup', lambda x: (x, x), n_out=2)


def Swap():  # pylint: disable=invalid-name
  """[a, b] -> [b, a]."""
  return Fn('Swap', lambda a, b: (b, a), n_out=2)


def Drop():  # pylint: disable=invalid-name
  """[x] -> []."""
  return Fn('Drop', lambda x: (), n_out=0)


def Add():  # pylint: disable=invalid-name
  """[a, b] -> [a + b], for arrays of the same shape."""
  return Fn('Add', add_same_shape)


def Multiply():  # pylint: disable=invalid-name
  """[a, b] -> [a * b], for arrays of the same shape."""
  return Fn('Multiply', multiply_same_shape)


def Concatenate(n_items: int = 2, axis: int = -1):  # pylint: disable=invalid-name
  """[x_1, ..., x_n] -> [concatenate(x_1..x_n, axis)]; n_in = n_items."""
  return Fn('Concatenate', lambda *xs: jnp.concatenate(xs, axis=axis), n_in=n_items)
