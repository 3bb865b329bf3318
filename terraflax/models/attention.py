"""Attention specs: one small frozen value per attention kind, and the one builder.

  Full(query_chunk_len=None, n_prefix=0, dropout=None)          kind 'full'
  Local(chunk_len=64, n_chunks_before=1, n_chunks_after=0, dropout=None)  kind 'local'
  LSH(n_hashes=1, chunk_len=64, n_buckets=None, n_chunks_before=1,
      n_chunks_after=0, predict_mem_len=None, convention='terraflax',
      dropout=None)                                              kind 'lsh'
  SparseQKV(n_modules=None, length_kernel_size=3, module_kernel_size=3,
            output_layer='dense', query_chunk_len=None, dropout=None)  kind 'sparse_qkv'

A spec holds its own kind's knobs and `dropout`, the rate of dropout on the
attention weights in 'train' mode (None: the model's default, the builder's
`dropout=`). The sizes every kind shares (`n_heads`, `d_qk`, `d_v`, `causal`,
`mode`, `dtype`, `max_len`) come from the model through `SelfAttention(spec,
...)`, which returns the same layer classes the models always used (so
parameter paths are unchanged).

Every model factory takes `attention=` a spec, a plain dict (`{'kind': 'lsh',
'n_hashes': 4}`, also an ml_collections ConfigDict, as configs write it), a
kind name ('lsh'), or a sequence of them cycled over the layers (layer i gets
entry i % len, like Trax's list of attention types). `specs_from` reads any of
those, `to_config` writes them back as JSON-able dicts (leaving out a
`dropout` of None, so configs written before the field existed read the same).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Sequence

import terraflax.layers as tl
from terraflax.combinators.base import check_int

LSH_CONVENTIONS = ('terraflax', 'hf')
SPARSE_QKV_OUTPUT_LAYERS = ('dense', 'multiplicative', 'none')


def _suggest(name, valid) -> str:
  close = difflib.get_close_matches(str(name), list(valid), n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''


def _check_rate(spec):
  value = spec.dropout
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f'{type(spec).__name__} attention dropout must be None (the model\'s '
                     f'default) or a rate in [0, 1), got {value!r}.')


def _check_int(spec, field, minimum=1, allow_none=False):
  """`check_int` on one field of a spec ('LSH attention n_hashes must be ...')."""
  check_int(f'{type(spec).__name__} attention', field, getattr(spec, field), minimum=minimum,
            allow_none=allow_none)


@dataclasses.dataclass(frozen=True)
class Full:
  """Exact dot-product attention: `CausalAttention` / `Attention` (separate q, k, v).

  query_chunk_len: run this many queries at a time (memory linear in length;
    None: all at once). n_prefix: prefix tuning, that many trainable
    keys/values (`PrefixCausalAttention` / `PrefixAttention`; 0: none).
  dropout (every kind): on the attention weights in 'train' mode; None: the
    model's default.
  """

  kind = 'full'
  query_chunk_len: int | None = None
  n_prefix: int = 0
  dropout: float | None = None

  def __post_init__(self):
    _check_rate(self)
    _check_int(self, 'query_chunk_len', allow_none=True)
    _check_int(self, 'n_prefix', minimum=0)


@dataclasses.dataclass(frozen=True)
class Local:
  """`LocalSelfAttention`: each chunk attends to itself and its neighbouring chunks.

  dropout: as in `Full`.
  """

  kind = 'local'
  chunk_len: int = 64
  n_chunks_before: int = 1
  n_chunks_after: int = 0
  dropout: float | None = None

  def __post_init__(self):
    _check_rate(self)
    _check_int(self, 'chunk_len')
    _check_int(self, 'n_chunks_before', minimum=0)
    _check_int(self, 'n_chunks_after', minimum=0)


@dataclasses.dataclass(frozen=True)
class LSH:
  """`LSHSelfAttention` (Reformer): shared-QK, hashed into buckets, attended in chunks.

  n_hashes: hash rounds. chunk_len: positions per chunk. n_buckets: buckets
  per round: 1 (no hashing), an even int, a pair (n1, n2), or None for
  Trax's rule from the length. n_chunks_before / n_chunks_after: chunks each
  chunk also attends to. predict_mem_len: positions remembered in 'predict'
  mode (None: the model's max_len). convention: 'terraflax' or 'hf'
  (reproduces Hugging Face's LSH layers). dropout: as in `Full`.
  """

  kind = 'lsh'
  n_hashes: int = 1
  chunk_len: int = 64
  n_buckets: Any = None
  n_chunks_before: int = 1
  n_chunks_after: int = 0
  predict_mem_len: int | None = None
  convention: str = 'terraflax'
  dropout: float | None = None

  def __post_init__(self):
    _check_rate(self)
    _check_int(self, 'n_hashes')
    _check_int(self, 'chunk_len')
    _check_int(self, 'n_chunks_before', minimum=0)
    _check_int(self, 'n_chunks_after', minimum=0)
    _check_int(self, 'predict_mem_len', allow_none=True)
    buckets = self.n_buckets
    if isinstance(buckets, (list, tuple)):
      buckets = tuple(buckets)
      object.__setattr__(self, 'n_buckets', buckets)  # Hashable, whatever the config held.
    factors = buckets if isinstance(buckets, tuple) else (buckets,)
    if buckets is not None and (
        not 1 <= len(factors) <= 2
        or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 or (n > 1 and n % 2)
               for n in factors)):
      raise ValueError('LSH attention n_buckets must be None (Trax\'s rule from the length), or '
                       'an int or a pair of ints, each 1 or even; got '
                       f'{self.n_buckets!r}.')
    if self.convention not in LSH_CONVENTIONS:
      raise ValueError(f'LSH attention convention must be one of {LSH_CONVENTIONS}, got '
                       f'{self.convention!r}.')


@dataclasses.dataclass(frozen=True)
class SparseQKV:
  """`MultiplicativeConvCausalAttention` (Terraformer's sparse QKV); causal only.

  n_modules: sparse modules S (None: n_heads). length_kernel_size: causal
  convolution width along the length. module_kernel_size: odd width across
  modules. output_layer: 'dense', 'multiplicative' or 'none'.
  query_chunk_len, dropout: as in `Full`.
  """

  kind = 'sparse_qkv'
  n_modules: int | None = None
  length_kernel_size: int = 3
  module_kernel_size: int = 3
  output_layer: str = 'dense'
  query_chunk_len: int | None = None
  dropout: float | None = None

  def __post_init__(self):
    _check_rate(self)
    _check_int(self, 'n_modules', allow_none=True)
    _check_int(self, 'length_kernel_size')
    _check_int(self, 'module_kernel_size')
    _check_int(self, 'query_chunk_len', allow_none=True)
    if self.module_kernel_size % 2 != 1:
      raise ValueError('SparseQKV attention module_kernel_size must be odd, got '
                       f'{self.module_kernel_size}.')
    if self.output_layer not in SPARSE_QKV_OUTPUT_LAYERS:
      raise ValueError(f'SparseQKV attention output_layer must be one of '
                       f'{SPARSE_QKV_OUTPUT_LAYERS}, got {self.output_layer!r}.')


KINDS = {cls.kind: cls for cls in (Full, Local, LSH, SparseQKV)}
Spec = Full | Local | LSH | SparseQKV


def _field_names(cls) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls))


def _one_spec(value, where: str):
  if isinstance(value, tuple(KINDS.values())):
    return value
  if isinstance(value, str):
    value = {'kind': value}
  if hasattr(value, 'to_dict') and not isinstance(value, Mapping):  # ml_collections ConfigDict.
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ValueError(f'{where} must be an attention spec ({", ".join(c.__name__ for c in KINDS.values())}), '
                     f"a dict with a 'kind' ({', '.join(KINDS)}), or a sequence of them; got "
                     f'{value!r}.')
  fields = dict(value)
  if 'kind' not in fields:
    raise ValueError(f"{where} needs a 'kind' (one of {', '.join(KINDS)}), got {dict(value)!r}.")
  kind = fields.pop('kind')
  if kind not in KINDS:
    raise ValueError(f'{where}: unknown attention kind {kind!r}{_suggest(kind, KINDS)}; valid '
                     f'kinds: {", ".join(KINDS)}.')
  cls = KINDS[kind]
  valid = _field_names(cls)
  for key in fields:
    if key not in valid:
      raise ValueError(f'{where}: {key!r} is not a field of {kind!r} attention '
                       f'({cls.__name__}){_suggest(key, valid)}; valid: kind, {", ".join(valid)}.')
  try:
    return cls(**fields)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def specs_from(value, *, where: str = 'attention') -> tuple[Spec, ...]:
  """A spec, dict, kind name, or a sequence of those -> a non-empty tuple of specs.

  `where` names the argument in errors (e.g. 'ReformerLM attention').
  """
  if isinstance(value, (list, tuple)):
    if not value:
      raise ValueError(f'{where} must not be an empty sequence.')
    return tuple(_one_spec(v, f'{where}[{i}]') for i, v in enumerate(value))
  return (_one_spec(value, where),)


def to_config(specs) -> dict | list[dict]:
  """Specs (one, or a sequence) -> a plain JSON-able dict (or list of dicts) with 'kind'."""
  def one(spec):
    spec = _one_spec(spec, 'to_config')
    out = {'kind': spec.kind}
    for name in _field_names(type(spec)):
      value = getattr(spec, name)
      if name == 'dropout' and value is None:
        continue  # The model's default; configs from before the field read the same.
      out[name] = list(value) if isinstance(value, tuple) else value
    return out
  if isinstance(specs, (list, tuple)):
    return [one(s) for s in specs]
  return one(specs)


def pattern(specs, n_layers: int, *, where: str) -> tuple[Spec, ...]:
  """The repeating unit of `specs` over `n_layers` layers (a run of one spec collapses to it).

  n_layers must be a multiple of len(specs).
  """
  specs = specs_from(specs, where=where)
  if n_layers % len(specs):
    raise ValueError(f'{where} has {len(specs)} specs, cycled over the layers, so the number of '
                     f'layers must be a multiple of {len(specs)}; got {n_layers}.')
  return specs[:1] if len(set(specs)) == 1 else specs


def query_chunk_len(spec) -> int | None:
  """The query chunk of 'full' / 'sparse_qkv' specs (None for the chunked kinds' own chunks)."""
  return spec.query_chunk_len if isinstance(spec, (Full, SparseQKV)) else None


# ----------------------------------------------------------------------------- LSH fields


def has_lsh(specs) -> bool:
  """Whether any of `specs` (anything `specs_from` reads) is LSH attention."""
  return any(isinstance(s, LSH) for s in specs_from(specs))


def replace_lsh(value, **changes):
  """`value` (as `specs_from` reads it) with `changes` applied to every LSH spec.

  Returns the same form `to_config` writes: a dict for one spec, a list of
  dicts for a sequence. Other kinds are left as they are.
  """
  specs = specs_from(value)
  out = [dataclasses.replace(s, **changes) if isinstance(s, LSH) else s for s in specs]
  return to_config(out if isinstance(value, (list, tuple)) else out[0])


def replace_all(value, **changes):
  """`value` (as `specs_from` reads it) with `changes` applied to every spec, in `to_config`'s
  form (a dict for one spec, a list of dicts for a sequence)."""
  specs = [dataclasses.replace(s, **changes) for s in specs_from(value)]
  return to_config(specs if isinstance(value, (list, tuple)) else specs[0])


def full_as_lsh(seq_len: int) -> dict[str, Any]:
  """The LSH fields that make LSH attention exact full shared-QK attention over seq_len."""
  return dict(n_hashes=1, n_buckets=1, chunk_len=seq_len, n_chunks_before=0, n_chunks_after=0)


# ----------------------------------------------------------------------------- builder


def SelfAttention(spec, *, n_heads: int, d_qk: int | None, d_v: int | None, causal: bool,  # pylint: disable=invalid-name
                  mode: str, dtype=None, dropout: float = 0.0, max_len: int = 2048,
                  use_bias: bool = True, packed: bool = False):
  """The self-attention layer of `spec`; n_in -> n_out as below.

    causal (any kind), or non-causal 'local' / 'lsh':
      [x] -> [y]: (b, l, d) -> (b, l, d); 1 -> 1
    non-causal 'full' (`Attention` / `PrefixAttention`):
      [x, mask] -> [y, mask]: (b, l, d), bool (b, l) -> the same; 2 -> 2
    packed=True (every kind; 'train'/'eval'):
      [x, segment_ids] -> [y, segment_ids]: int (b, l) document ids; 2 -> 2

  d_qk / d_v None: the layer class's default. `use_bias` applies to the
  projections of 'full' and 'sparse_qkv' (LSH and local layers have none).
  `max_len` is the predict-mode cache of 'full'/'sparse_qkv' and the default
  `predict_mem_len` of 'lsh'. `dropout` is the model's default rate on the
  attention weights: the layer gets `spec.dropout` unless that is None.
  """
  (spec,) = specs_from(spec, where='SelfAttention spec')
  if not isinstance(causal, bool):
    raise ValueError(f'SelfAttention causal must be True or False, got {causal!r}.')
  rate = dropout if spec.dropout is None else spec.dropout
  sizes = dict(n_heads=n_heads, dropout=rate, mode=mode, dtype=dtype, packed=packed)
  sizes.update({k: v for k, v in (('d_qk', d_qk), ('d_v', d_v)) if v is not None})
  if isinstance(spec, Full):
    full = dict(sizes, chunk_len=spec.query_chunk_len, use_bias=use_bias)
    if causal:
      full['max_len'] = max_len
    if spec.n_prefix:
      layer = tl.PrefixCausalAttention if causal else tl.PrefixAttention
      return layer(n_prefix=spec.n_prefix, **full)
    return (tl.CausalAttention if causal else tl.Attention)(**full)
  if isinstance(spec, Local):
    return tl.LocalSelfAttention(chunk_len=spec.chunk_len, n_chunks_before=spec.n_chunks_before,
                                 n_chunks_after=spec.n_chunks_after, causal=causal, **sizes)
  if isinstance(spec, LSH):
    return tl.LSHSelfAttention(
        n_hashes=spec.n_hashes, n_buckets=spec.n_buckets, chunk_len=spec.chunk_len,
        n_chunks_before=spec.n_chunks_before, n_chunks_after=spec.n_chunks_after, causal=causal,
        predict_mem_len=max_len if spec.predict_mem_len is None else spec.predict_mem_len,
        convention=spec.convention, **sizes)
  if not causal:
    raise ValueError("'sparse_qkv' attention (SparseQKV) is causal only; use 'full', 'local' or "
                     "'lsh' in an encoder.")
  return tl.MultiplicativeConvCausalAttention(
      n_modules=spec.n_modules, length_kernel_size=spec.length_kernel_size,
      module_kernel_size=spec.module_kernel_size, output_layer=spec.output_layer,
      chunk_len=spec.query_chunk_len, max_len=max_len, use_bias=use_bias, **sizes)
