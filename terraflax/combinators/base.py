"""The layer protocol: `Layer`, modes, stack calls and the errors they raise.

Every terraflax layer is a `flax.linen.Module` that declares how many items it
takes from the top of the data stack (`n_in`) and how many it pushes back
(`n_out`). `__call__(*inputs)` takes exactly `n_in` arrays and returns one array
when `n_out == 1`, else a tuple of `n_out` arrays.

Combinators name their children after the child's class and position
(`Serial_1/Dense_0/kernel`), so parameter paths read like the model.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax

MODES = ('train', 'eval', 'predict')


class LayerError(ValueError):
  """A layer was wired or called wrongly; the message names the layer."""


def check_mode(mode: str, where: str = 'mode') -> str:
  """Returns `mode` if it is one of `MODES`, else raises a clear error."""
  if mode not in MODES:
    raise ValueError(f'{where} must be one of {MODES}, got {mode!r}.')
  return mode


def check_int(owner: str, name: str, value: Any, minimum: int = 1,
              allow_none: bool = False) -> None:
  """Raises '{owner} {name} must be a positive int, got ...' unless value is an int >= minimum."""
  if value is None and allow_none:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    what = 'a positive int' if minimum == 1 else f'an int >= {minimum}'
    raise ValueError(f'{owner} {name} must be {what}{" or None" if allow_none else ""}, '
                     f'got {value!r}.')


def check_rate(owner: str, name: str, value: Any) -> None:
  """Raises '{owner} {name} must be in [0, 1), got ...' unless 0 <= value < 1."""
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
    raise ValueError(f'{owner} {name} must be in [0, 1), got {value!r}.')


class Layer(nn.Module):
  """Base class of terraflax layers: `n_in` arrays in, `n_out` arrays out.

  Subclasses override `n_in`/`n_out` (class attributes or properties) when they
  are not 1 -> 1.
  """

  n_in = 1
  n_out = 1


def n_in_of(layer: Any) -> int:
  """`layer.n_in`, or 1 for a plain flax module."""
  return getattr(layer, 'n_in', 1)


def n_out_of(layer: Any) -> int:
  """`layer.n_out`, or 1 for a plain flax module."""
  return getattr(layer, 'n_out', 1)


def label_of(layer: Any) -> str:
  """The name a layer shows in parameter paths, errors and summaries."""
  return getattr(layer, 'label', None) or type(layer).__name__


def layer_path(layer: Any) -> str:
  """`'Serial_0/Dense_1'` for a bound layer; its label when unbound or root."""
  try:
    path = layer.path
  except (AttributeError, ValueError, TypeError):
    path = ()
  return '/'.join(path) if path else label_of(layer)


def describe_shapes(items: Iterable[Any]) -> str:
  """`'[f32(2, 3), i32(2,)]'`: dtype and shape of each array on the stack."""
  parts = []
  for x in items:
    if hasattr(x, 'shape') and hasattr(x, 'dtype'):
      parts.append(f'{jax.numpy.dtype(x.dtype).name}{tuple(x.shape)}')
    else:
      parts.append(type(x).__name__)
  return '[' + ', '.join(parts) + ']'


def flatten_layers(layers: Iterable[Any]) -> list[Any]:
  """Flattens nested lists/tuples of layers and drops `None`."""
  flat = []
  for item in layers:
    if item is None:
      continue
    if isinstance(item, (list, tuple)):
      flat.extend(flatten_layers(item))
    elif isinstance(item, nn.Module):
      flat.append(item)
    else:
      raise LayerError(
          f'Expected a flax Module (or a list of them), got {type(item).__name__}: '
          f'{item!r}.')
  return flat


def name_children(children: Sequence[Any], owner: str) -> None:
  """Gives each unnamed child the name `'<Label>_<position>'`.

  A child that already has a name (given by the user, or by an earlier
  combinator that shares it) keeps it; fresh names avoid those. Naming is done
  on the instance, so reusing one instance anywhere shares its parameters.
  """
  owners: dict[str, Any] = {}
  for child in children:
    if child.name is not None and owners.setdefault(child.name, child) is not child:
      raise LayerError(
          f'{owner}: two different layers are both named {child.name!r}; give '
          'them distinct names, or reuse one instance to share its parameters.')
  for position, child in enumerate(children):
    if child.name is None and child.parent is None:
      candidate, suffix = f'{label_of(child)}_{position}', 1
      while candidate in owners:
        candidate, suffix = f'{label_of(child)}_{position}_{suffix}', suffix + 1
      object.__setattr__(child, 'name', candidate)
      owners[candidate] = child


def check_inputs(layer: Any, inputs: Sequence[Any]) -> list[Any]:
  """The inputs as a stack (top first), after checking there are `n_in`."""
  if len(inputs) != n_in_of(layer):
    raise LayerError(
        f'{layer_path(layer)} ({label_of(layer)}) takes n_in={n_in_of(layer)} '
        f'inputs but was called with {len(inputs)}: {describe_shapes(inputs)}.')
  return list(inputs)


def as_outputs(layer: Any, result: Any) -> tuple[Any, ...]:
  """Normalises a layer's return value to a tuple of `n_out` items."""
  n_out = n_out_of(layer)
  if n_out == 1:
    if isinstance(result, (tuple, list)):
      raise LayerError(
          f'{layer_path(layer)} ({label_of(layer)}) declares n_out=1 but returned '
          f'a {type(result).__name__} of {len(result)}: {describe_shapes(result)}.')
    return (result,)
  if result is None:
    result = ()
  if not isinstance(result, (tuple, list)) or len(result) != n_out:
    got = (f'{len(result)} outputs {describe_shapes(result)}'
           if isinstance(result, (tuple, list)) else f'one array {describe_shapes([result])}')
    raise LayerError(
        f'{layer_path(layer)} ({label_of(layer)}) declares n_out={n_out} but returned {got}.')
  return tuple(result)


def as_return(outputs: Sequence[Any]) -> Any:
  """What `__call__` returns for a stack of outputs: one array or a tuple."""
  return outputs[0] if len(outputs) == 1 else tuple(outputs)


def apply_layer(layer: Any, inputs: Sequence[Any]) -> tuple[Any, ...]:
  """Runs `layer` on `inputs` (top of stack first); returns its outputs.

  Any failure inside the layer is re-raised as a `LayerError` that names the
  innermost failing layer's path and the shapes it was given.
  """
  if len(inputs) != n_in_of(layer):
    raise LayerError(
        f'Stack underflow at {layer_path(layer)} ({label_of(layer)}): it needs '
        f'n_in={n_in_of(layer)} inputs but the stack holds {len(inputs)}: '
        f'{describe_shapes(inputs)}.')
  try:
    result = layer(*inputs)
  except LayerError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise LayerError(
        f'{layer_path(layer)} ({label_of(layer)}) failed on inputs '
        f'{describe_shapes(inputs)}: {type(e).__name__}: {e}') from e
  return as_outputs(layer, result)
