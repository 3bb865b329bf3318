"""What the model factories share: checks, dtype, small layers, embeddings, stacks, renames.

  check_hyperparameters(model, mode, **sizes)   clear errors before anything is built
  compute_dtype(dtype)                          None / dtype / 'bfloat16' -> jnp dtype or None
  Float32()                                     [x] -> [x as float32], 1 -> 1
  PaddingMask(pad_id)                           [ids] -> [ids != pad_id], 1 -> 1
  masked_mean(x, mask)                          (b, l, d), (b, l) -> (b, d)
  Embed(...)                                    [ids] -> [x], token embedding + positions
  mixing_kinds / Stack                          per-layer kinds and their scanned runs
  deprecated_arguments(...)                     old keyword names of a factory, for one release
  split_lm_head(model)                          (body, head): a Serial cut before its LM head
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from typing import Any, Callable, Hashable, Mapping, Sequence

import jax.numpy as jnp

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import check_mode

MIXING_KINDS = ('attention', 'fourier')
_MAY_BE_NONE = ('ff_chunk_len', 'd_embedding', 'd_qk', 'd_v')


def suggest(name: str, valid) -> str:
  """' (did you mean 'x'?)' for the closest of `valid`, or ''."""
  close = difflib.get_close_matches(str(name), list(valid), n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''


def check_hyperparameters(model: str, mode: str, **values):
  """Clear errors for a bad `mode`, a dropout outside [0, 1) and non-positive sizes.

  Sizes named in `_MAY_BE_NONE` may be None. Checks d_model % n_heads when
  both are given (unless the per-head widths d_qk and d_v are both given).
  """
  check_mode(mode, f'{model} mode')
  for name, value in values.items():
    if name in _MAY_BE_NONE and value is None:
      continue
    if name == 'dropout':
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f'{model} {name} must be in [0, 1), got {value!r}.')
      continue
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{model} {name} must be a positive int, got {value!r}.')
  widths_given = values.get('d_qk') is not None and values.get('d_v') is not None
  if ('d_model' in values and 'n_heads' in values and values['d_model'] % values['n_heads']
      and not widths_given):
    raise ValueError(f'{model} d_model={values["d_model"]} must be divisible by '
                     f'n_heads={values["n_heads"]}.')


def compute_dtype(dtype):
  """None, a dtype or its name ('bfloat16') -> a jnp dtype or None."""
  return None if dtype is None else jnp.dtype(dtype)


def Float32():  # pylint: disable=invalid-name
  """[x] -> [x.astype(float32)]: any shape; 1 -> 1."""
  return cb.Fn('Float32', lambda x: x.astype(jnp.float32))


def PaddingMask(pad_id: int | None):  # pylint: disable=invalid-name
  """[ids] -> [ids != pad_id]: int (b, l) -> bool (b, l) (all True when pad_id is None); 1 -> 1."""
  if pad_id is None:
    return cb.Fn('PaddingMask', lambda ids: jnp.ones(ids.shape, jnp.bool_))
  return cb.Fn('PaddingMask', lambda ids: ids != pad_id)


def masked_mean(x, mask):
  """(b, l, d), (b, l) -> (b, d): the mean over real tokens."""
  weights = mask.astype(x.dtype)[:, :, None]
  total = jnp.sum(x * weights, axis=1)
  count = jnp.maximum(jnp.sum(weights, axis=1), 1)
  return total / count


def Embed(vocab_size, d_model, max_len, dropout, mode, dtype, d_embedding=None,  # pylint: disable=invalid-name
          packed=False, positions='sinusoidal'):
  """[ids] -> [x]: int (b, l) -> (b, l, d_model); a list, 1 -> 1.

  Token embedding plus positions (`positions`: 'sinusoidal' or 'learned', the
  kinds of `tl.PositionalEncoding`), with dropout. With
  `d_embedding`, tokens embed to d_embedding and a Dense projects to d_model.
  `packed=True`: [ids, segment_ids, positions] -> [x, segment_ids], 3 -> 2,
  each token's encoding that of its position within its document (the same
  layers and parameter paths as unpacked).
  """
  if d_embedding is None:
    layers = [tl.Embedding(vocab_size, d_model, dtype=dtype)]
  else:
    layers = [
        tl.Embedding(vocab_size, d_embedding, dtype=dtype, axes=('vocab', None)),
        tl.Dense(d_model, dtype=dtype, axes=(None, 'embed')),  # The factorised projection.
    ]
  layers.append(tl.PositionalEncoding(max_len=max_len, kind=positions, dropout=dropout, mode=mode,
                                      packed=packed))
  return layers


def DropSegments(packed: bool):  # pylint: disable=invalid-name
  """[y, segment_ids] -> [y] when `packed` (a model's last layer), else nothing (None)."""
  return cb.Select([0], n_in=2) if packed else None


def check_d_embedding(model, d_embedding, d_model):
  if d_embedding is not None and d_embedding > d_model:
    raise ValueError(f'{model} d_embedding={d_embedding} must be <= d_model={d_model} (a '
                     'factorised embedding is narrower than the model).')


def mixing_kinds(model, mixing, n_layers) -> tuple[str, ...]:
  """`mixing` ('attention', 'fourier' or one of them per layer) as n_layers kinds."""
  kinds = (mixing,) * n_layers if isinstance(mixing, str) else tuple(mixing)
  if len(kinds) != n_layers or any(kind not in MIXING_KINDS for kind in kinds):
    raise ValueError(f'{model} mixing must be one of {MIXING_KINDS} or a sequence of n_layers='
                     f'{n_layers} of them, got {mixing!r}.')
  return kinds


def Stack(make_block: Callable[[Hashable], list], kinds: Sequence[Hashable],  # pylint: disable=invalid-name
          share_layers: bool, model: str):
  """`Repeat`s of the blocks of each run of equal `kinds` (one Repeat when all are equal).

  `make_block(kind)` makes a fresh block (a list of layers) of that kind; the
  stack signature is the blocks' (n_in = n_out). Runs after the first are
  labelled inside a Serial named 'Encoder', as they always were.
  """
  runs = []
  for kind in kinds:
    if runs and runs[-1][0] == kind:
      runs[-1][1] += 1
    else:
      runs.append([kind, 1])
  if share_layers and len(runs) > 1:
    raise ValueError(f'{model} share_layers needs the same kind of layer everywhere (one shared '
                     f'block), got {len(runs)} runs of different layers.')
  repeats = [cb.Repeat(make_block(kind), n, share_params=share_layers) for kind, n in runs]
  return repeats[0] if len(repeats) == 1 else cb.Serial(*repeats, label='Encoder')


def FeedForwardResidual(d_model, d_ff, dropout, mode, dtype, ff_chunk_len):  # pylint: disable=invalid-name
  """[x] -> [x + FeedForward(x)]: (b, l, d) -> (b, l, d); 1 -> 1."""
  return cb.Residual(tl.FeedForward(d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode,
                                    chunk_len=ff_chunk_len, dtype=dtype))


# ----------------------------------------------------------------------------- renamed arguments


def deprecated_arguments(deprecated: Mapping[str, str],
                         translate: Callable[[dict, dict], dict]):
  """Decorates a model factory so its old keyword names keep working for one release.

  `deprecated` maps each old name to its new spelling (for the warning);
  `translate(old, kwargs)` returns `kwargs` (new names only) with the old
  values `old` folded in. The wrapped factory keeps the new signature
  (`inspect.signature` shows only the new parameters) and gains
  `factory.upgrade_kwargs(kwargs) -> kwargs`, which does the translation
  alone: one `DeprecationWarning` per old name naming its new spelling, and
  a `TypeError` naming any argument that is neither new nor old, with the
  closest valid name.
  """
  def decorate(factory):
    name = factory.__name__
    parameters = inspect.signature(factory).parameters

    def upgrade_kwargs(kwargs: dict) -> dict:
      kwargs = dict(kwargs)
      old = {k: kwargs.pop(k) for k in list(kwargs) if k in deprecated and k not in parameters}
      for key in kwargs:
        if key not in parameters:
          raise TypeError(f'{name} got an unexpected keyword argument {key!r}'
                          f'{suggest(key, parameters)}; valid: {", ".join(parameters)}.')
      if not old:
        return kwargs
      for key in old:
        warnings.warn(f'{name}({key}=...) is deprecated and will be removed in the next '
                      f'release; use {deprecated[key]} instead.', DeprecationWarning,
                      stacklevel=3)
      return translate(old, kwargs)

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
      return factory(*args, **upgrade_kwargs(kwargs))

    wrapper.upgrade_kwargs = upgrade_kwargs
    wrapper.deprecated_arguments = dict(deprecated)
    return wrapper

  return decorate


def no_new_and_old(model: str, kwargs: Mapping[str, Any], new: str, old: Mapping[str, Any]):
  """Raises when a call gives both `new` and old arguments that translate into it."""
  if new in kwargs:
    raise TypeError(f'{model} got {new}= and the deprecated {", ".join(sorted(old))}; pass '
                    f'only {new}=.')


# Labels of the `Fn` layers that work on each position alone (an LM head may hold them).
_POSITION_WISE_FNS = ('Float32', 'MergeStreams')


def _position_wise(layer) -> bool:
  """Whether `layer` computes each position from that position alone, with the same
  randomness when run on a slice of the positions (dropout shared along the length)."""
  if isinstance(layer, (tl.LayerNorm, tl.Dense, cb.Select)):
    return True
  if isinstance(layer, tl.Dropout):
    return layer.mode != 'train' or layer.rate == 0.0 or 1 in tuple(layer.shared_axes)
  return isinstance(layer, cb.Fn) and layer.label in _POSITION_WISE_FNS


def split_lm_head(model):
  """(body, head) of a language model, or None when it has no position-wise head.

  `model` a `Serial` ending in position-wise layers with a Dense among them
  (ReformerLM: MergeStreams, LayerNorm, Dropout, Dense, Float32): `body` is a
  `Serial` of the layers before that tail, `head` a `Serial` of the tail,
  both holding the model's own layer instances, so `apply` with the model's
  variables and rngs runs the same parameters (same paths) and draws the same
  randomness. body: [inputs...] -> [hidden states (b, l, ...)...]; head:
  the hidden states -> [logits] (b, l, v), and any slice of the positions of
  the hidden states gives those positions' logits (`layers.metrics.
  chunked_lm_sums` runs it in chunks).
  """
  if not isinstance(model, cb.Serial) or model.label is not None:
    return None
  layers = tuple(model.layers)
  cut = len(layers)
  while cut > 0 and _position_wise(layers[cut - 1]):
    cut -= 1
  if cut == 0 or not any(isinstance(layer, tl.Dense) for layer in layers[cut:]):
    return None
  return cb.Serial(*layers[:cut]), cb.Serial(*layers[cut:])
