"""Hugging Face Reformer checkpoints -> `ReformerLM` parameters and terraflax workdirs.

  kwargs, params = from_hf_reformer('/path/to/reformer-enwik8')
  model = ReformerLM(**kwargs, mode='eval')
  logits = model.apply({'params': params}, tokens, rngs={'hash': key})

reads a `ReformerModelWithLMHead` directory (`config.json` and
`model.safetensors`, with the safetensors numpy API: no torch) and returns the
keyword arguments of the matching `ReformerLM` (axial or learned positions,
`Local`/`LSH` attention specs following `attn_layers`, chunked feed-forward,
the reversible two-stream layout, `LSH(convention='hf')`) and its parameters.
The kwargs are plain JSON (the specs as dicts, `attention.to_config`).

The command line writes a workdir that `python -m terraflax.decoding` samples
from (`config.json` plus an orbax checkpoint of the parameters at step 0):

  python -m terraflax.models.convert --from_hf=DIR --to=WORKDIR [--byte_offset=2]
  python -m terraflax.models.convert --from_trax=DIR_OR_FILE --to=WORKDIR \\
      [--trax_model=ReformerLM] [--trax_config=config.gin|'{...}'] [--tokenizer=FILE]

Trax checkpoints (training.Loop's, Layer.save_to_file's) are read by
`terraflax.models.convert_trax` (`from_trax`, re-exported here); their
optimizer slots are dropped.

A tokenizer in DIR (`spiece.model`, HF's name for a SentencePiece model, or
`tokenizer.json`; `hf_tokenizer(DIR)`) is copied into the workdir
(`WORKDIR/tokenizer.model|json`, `terraflax.tokenizer`), so decoding the
converted model reads and writes text. With --byte_offset the model is
byte-level and a tokenizer in DIR is not used.

Conventions. `ReformerLM` shifts its input right, inserting id 0: its logits
for tokens x equal HF's logits for the ids [0, x[:-1]] (the Trax-trained
checkpoints on the hub were trained that way, with 0 the pad id). HF draws
fresh LSH rotations on every call, like terraflax's 'hash' stream; to
reproduce one HF forward pass exactly, pass the rotations HF drew with
`lsh_rotations(kwargs, {layer: rotations})` as the `lsh_rotations` collection.
The layer norms of HF use `layer_norm_eps` (1e-12 by default) where terraflax
uses 1e-6: a relative difference below 1e-6 for inputs of unit scale.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

from terraflax import tokenizer as tokenizer_lib
from terraflax.models import attention as attn
from terraflax.models.convert_trax import (  # pylint: disable=unused-import
    TraxConversionError, from_trax)

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
HF_TOKENIZER_FILES = ('spiece.model', 'tokenizer.json')  # looked for in this order

# HF activation names -> ReformerLM ff_activation.
ACTIVATIONS = {'relu': 'relu', 'gelu': 'gelu', 'gelu_python': 'gelu', 'gelu_new': 'fast_gelu',
               'gelu_fast': 'fast_gelu', 'gelu_pytorch_tanh': 'fast_gelu',
               'gelu_python_tanh': 'fast_gelu'}
HF_ATTENTION = ('local', 'lsh')
# Positions an LSH layer remembers when decoding a converted model (HF's
# max_position_embeddings can be 65536, too many to keep per layer).
DEFAULT_PREDICT_MEM_LEN = 2048


class ConversionError(ValueError):
  """A Hugging Face checkpoint directory that cannot be converted (names the file/field)."""


# ----------------------------------------------------------------------------- reading


def read_hf_config(path: str) -> dict:
  """The parsed `config.json` of a HF model directory, with clear errors."""
  if not os.path.isdir(path):
    raise ConversionError(f'{path!r} is not a directory (expected a Hugging Face model '
                          f'directory with {CONFIG_FILE} and {WEIGHTS_FILE}).')
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise ConversionError(f'{file} is missing: {path!r} is not a Hugging Face model directory.')
  try:
    with open(file, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f'{file} is not valid JSON: {e}') from None
  if not isinstance(config, dict):
    raise ConversionError(f'{file} must hold a JSON object, got {type(config).__name__}.')
  return config


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors` in a HF model directory, as numpy arrays."""
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(file):
    others = sorted(f for f in os.listdir(path) if f.endswith(('.bin', '.safetensors', '.h5')))
    hint = (f' (found {", ".join(others)}; only a single {WEIGHTS_FILE} is read, re-save with '
            'save_pretrained(..., safe_serialization=True))' if others else '')
    raise ConversionError(f'{file} is missing{hint}.')
  try:
    return load_file(file)
  except (SafetensorError, OSError, ValueError) as e:
    raise ConversionError(f'{file} cannot be read (truncated or corrupt?): {e}') from None


# ----------------------------------------------------------------------------- config


_REQUIRED = object()


def _field(config, name, kinds, *, default: Any = _REQUIRED, check=None, expect=''):
  """config[name] checked against `kinds` and `check` (missing or null: `default`)."""
  value = config.get(name)
  if value is None:
    if default is _REQUIRED:
      raise ConversionError(f'{CONFIG_FILE} has no {name!r}, which a Reformer needs.')
    return default
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  if (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
      or (check is not None and not check(value))):
    raise ConversionError(f'{CONFIG_FILE}: {name}={value!r} is not supported; expected {expect}.')
  return value


def _period(layers: list[str]) -> tuple[str, ...]:
  """The shortest prefix that repeats to `layers` (a ReformerLM attention pattern)."""
  for p in range(1, len(layers) + 1):
    if len(layers) % p == 0 and layers == layers[:p] * (len(layers) // p):
      return tuple(layers[:p])
  return tuple(layers)


def model_kwargs_from_hf(config: dict, *, predict_mem_len: int | None = None,
                        num_buckets: Any = None) -> dict:
  """`ReformerLM` keyword arguments (without `mode`) for a HF Reformer config.

  `num_buckets` (an even int or a list of two) overrides the config's, which
  must then be null: HF picks it from the length at run time.
  """
  positive = lambda v: v > 0
  non_negative = lambda v: v >= 0
  model_type = config.get('model_type', 'reformer')
  if model_type != 'reformer':
    raise ConversionError(f'{CONFIG_FILE}: model_type={model_type!r} is not supported; only '
                          "'reformer' (ReformerModelWithLMHead) converts.")
  if config.get('is_decoder') is not True:
    raise ConversionError(
        f'{CONFIG_FILE}: is_decoder={config.get("is_decoder")!r} is not supported; only causal '
        'language models (is_decoder=true, ReformerModelWithLMHead) convert to ReformerLM.')
  layers = _field(config, 'attn_layers', list, expect="a list of 'local' and 'lsh'")
  if not layers or any(kind not in HF_ATTENTION for kind in layers):
    raise ConversionError(f'{CONFIG_FILE}: attn_layers={layers!r} is not supported; expected a '
                          f"non-empty list of {HF_ATTENTION}.")
  n_layers = config.get('num_hidden_layers', len(layers))
  if n_layers != len(layers):
    raise ConversionError(f'{CONFIG_FILE}: num_hidden_layers={n_layers!r} disagrees with the '
                          f'{len(layers)} entries of attn_layers.')
  act = _field(config, 'hidden_act', str, default='relu',
               check=lambda v: v in ACTIVATIONS, expect=f'one of {sorted(ACTIVATIONS)}')
  d_model = _field(config, 'hidden_size', int, check=positive, expect='a positive int')
  n_heads = _field(config, 'num_attention_heads', int, check=positive, expect='a positive int')
  d_head = _field(config, 'attention_head_size', int, check=positive, expect='a positive int')
  kwargs = dict(
      vocab_size=_field(config, 'vocab_size', int, check=positive, expect='a positive int'),
      d_model=d_model, d_ff=_field(config, 'feed_forward_size', int, check=positive,
                                   expect='a positive int'),
      n_layers=len(layers), n_heads=n_heads, d_qk=d_head, d_v=d_head,
      ff_activation=ACTIVATIONS[act])
  rate = lambda v: 0 <= v < 1
  kwargs['dropout'] = float(_field(config, 'hidden_dropout_prob', (int, float), default=0.0,
                                   check=rate, expect='a rate in [0, 1)'))
  attention_rates = {  # Each kind's spec gets its own rate (only used for training).
      kind: float(_field(config, f'{kind}_attention_probs_dropout_prob', (int, float),
                         default=0.0, check=rate, expect='a rate in [0, 1)'))
      for kind in set(layers)}
  max_len = _field(config, 'max_position_embeddings', int, check=positive,
                   expect='a positive int')
  kwargs['max_len'] = max_len
  if _field(config, 'axial_pos_embds', bool, default=True):
    shape = _field(config, 'axial_pos_shape', list, expect='a list of positive ints')
    dims = _field(config, 'axial_pos_embds_dim', list, expect='a list of positive ints')
    if (not shape or len(dims) != len(shape) or any(not isinstance(n, int) or n < 1
                                                    for n in list(shape) + list(dims))):
      raise ConversionError(f'{CONFIG_FILE}: axial_pos_shape={shape!r} and axial_pos_embds_dim='
                            f'{dims!r} are not supported; expected two lists of positive ints '
                            'of the same length.')
    if sum(dims) != d_model:
      raise ConversionError(f'{CONFIG_FILE}: axial_pos_embds_dim={dims!r} must sum to '
                            f'hidden_size={d_model}.')
    if math.prod(shape) < max_len:  # HF checks this lazily; ReformerLM needs it up front.
      kwargs['max_len'] = max_len = math.prod(shape)
    kwargs['positions'] = {'kind': 'axial', 'shape': list(shape), 'd_embs': list(dims)}
  else:
    kwargs['positions'] = 'learned'
  chunk_fields = {}
  for kind in ('lsh', 'local'):
    if kind in layers:
      chunk_fields[kind] = (
          _field(config, f'{kind}_attn_chunk_length', int, check=positive,
                 expect='a positive int'),
          _field(config, f'{kind}_num_chunks_before', int, check=non_negative,
                 expect='an int >= 0'),
          _field(config, f'{kind}_num_chunks_after', int, check=non_negative,
                 expect='an int >= 0'))
  specs = {}
  if 'local' in chunk_fields:
    local = chunk_fields['local']
    specs['local'] = attn.Local(chunk_len=local[0], n_chunks_before=local[1],
                                n_chunks_after=local[2], dropout=attention_rates['local'])
  if 'lsh' in layers:
    n_hashes = _field(config, 'num_hashes', int, check=positive, expect='a positive int')
    buckets = config.get('num_buckets')
    if num_buckets is not None:
      if buckets is not None:
        raise ConversionError(f'{CONFIG_FILE} sets num_buckets={buckets!r}; an override '
                              f'({num_buckets!r}) only applies when it is null.')
      buckets = list(num_buckets) if isinstance(num_buckets, (list, tuple)) else num_buckets
    ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2 and v % 2 == 0
    if isinstance(buckets, list) and len(buckets) == 1:
      buckets = buckets[0]
    if ok_int(buckets):
      pass
    elif isinstance(buckets, list) and len(buckets) == 2 and all(ok_int(f) for f in buckets):
      buckets = tuple(buckets)
    else:
      raise ConversionError(
          f'{CONFIG_FILE}: num_buckets={buckets!r} is not supported; expected an even int or a '
          'list of one or two even ints (null, chosen by HF from the length at run time, needs '
          'an explicit value: --num_buckets / num_buckets=).')
    main = chunk_fields['lsh']
    if predict_mem_len is None:
      neighbourhood = main[0] * (main[1] + 1)
      predict_mem_len = min(max_len, max(DEFAULT_PREDICT_MEM_LEN, neighbourhood))
    specs['lsh'] = attn.LSH(n_hashes=n_hashes, chunk_len=main[0], n_buckets=buckets,
                            n_chunks_before=main[1], n_chunks_after=main[2],
                            predict_mem_len=predict_mem_len, convention='hf',
                            dropout=attention_rates['lsh'])
  kwargs['attention'] = attn.to_config([specs[kind] for kind in _period(list(layers))])
  ff_chunk = _field(config, 'chunk_size_feed_forward', int, default=0, check=non_negative,
                    expect='an int >= 0')
  kwargs['ff_chunk_len'] = ff_chunk or None
  return kwargs


def _kinds(kwargs: dict) -> tuple[str, ...]:
  """The repeating attention kinds of ReformerLM kwargs ('local', 'lsh', ...)."""
  return tuple(spec.kind for spec in attn.specs_from(kwargs['attention']))


# ----------------------------------------------------------------------------- parameters


def _child(tree: dict, prefix: str, where: str) -> str:
  names = [k for k in tree if k.startswith(prefix + '_')]
  if len(names) != 1:
    raise ConversionError(f'internal: expected one {prefix}_* in {where}, found {names}.')
  return names[0]


class _Tensors:
  """HF tensors by name, checked for presence and shape as they are taken."""

  def __init__(self, tensors: dict[str, np.ndarray], file: str):
    self.tensors, self.file, self.used = tensors, file, set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.tensors:
      raise ConversionError(f'{self.file} has no tensor {name!r}, which this config needs.')
    value = self.tensors[name]
    if tuple(value.shape) != tuple(shape):
      raise ConversionError(f'{self.file}: tensor {name!r} has shape {tuple(value.shape)}, but '
                            f'{CONFIG_FILE} implies {tuple(shape)}.')
    if not np.issubdtype(value.dtype, np.floating):
      raise ConversionError(f'{self.file}: tensor {name!r} has dtype {value.dtype}; expected '
                            'floats.')
    self.used.add(name)
    return np.asarray(value, np.float32)


def _abstract_params(model, streams) -> dict:
  """The shapes of `model.init`'s plain (unboxed) parameters on a (1, 1) token batch."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rngs = {s: jax.random.key(0) for s in streams}
  return nn.meta.unbox(jax.eval_shape(model.init, rngs, jnp.zeros((1, 1), jnp.int32))['params'])


def hf_to_params(tensors: dict[str, np.ndarray], config: dict, kwargs: dict,
                 file: str = WEIGHTS_FILE) -> dict:
  """The `ReformerLM(**kwargs)` parameter tree from HF tensors (numpy float32)."""
  import jax  # pylint: disable=import-outside-toplevel
  from terraflax.models.reformer import ReformerLM  # pylint: disable=import-outside-toplevel
  model = ReformerLM(**kwargs, mode='eval')
  abstract = _abstract_params(model, ('params', 'hash', 'dropout'))
  t = _Tensors(tensors, file)
  d, f, h, k, v = (kwargs[n] for n in ('d_model', 'd_ff', 'n_heads', 'd_qk', 'vocab_size'))
  layers = list(config['attn_layers'])
  pattern = _kinds(kwargs)
  period, n_repeats = len(pattern), len(layers) // len(pattern)
  params: dict[str, Any] = {}

  def dense_in(name):  # HF (h*k, d) -> (d, h, k)
    return t.take(name, (h * k, d)).T.reshape(d, h, k)

  def norm(prefix, width):
    return {'scale': t.take(prefix + '.weight', (width,)),
            'bias': t.take(prefix + '.bias', (width,))}

  params[_child(abstract, 'Embedding', 'the model')] = {
      'embedding': t.take('reformer.embeddings.word_embeddings.weight', (v, d))}
  if kwargs['positions'] != 'learned':
    shape, dims = kwargs['positions']['shape'], kwargs['positions']['d_embs']
    axial = {}
    for i, (size, dim) in enumerate(zip(shape, dims)):
      hf_shape = [1] * len(shape) + [dim]
      hf_shape[i] = size
      axial[f'axial_{i}'] = t.take(f'reformer.embeddings.position_embeddings.weights.{i}',
                                   tuple(hf_shape)).reshape(size, dim)
    params[_child(abstract, 'AxialPositionalEncoding', 'the model')] = axial
  else:
    params[_child(abstract, 'PositionalEncoding', 'the model')] = {'pos_embedding': t.take(
        'reformer.embeddings.position_embeddings.embedding.weight', (kwargs['max_len'], d))}

  serial = _child(abstract, 'ReversibleSerial', 'the model')
  blocks: dict[str, Any] = {}
  for j in range(period):
    per_layer = []
    for r in range(n_repeats):
      i = r * period + j
      p = f'reformer.encoder.layers.{i}.'
      attn_prefix = p + 'attention.self_attention.'
      w_out = t.take(p + 'attention.output.dense.weight', (d, h * k)).T.reshape(h, k, d)
      if layers[i] == 'lsh':
        attention = {'qk': dense_in(attn_prefix + 'query_key.weight'),
                     'value': dense_in(attn_prefix + 'value.weight'), 'output': w_out}
      else:
        attention = {'query': dense_in(attn_prefix + 'query.weight'),
                     'key': dense_in(attn_prefix + 'key.weight'),
                     'value': dense_in(attn_prefix + 'value.weight'), 'output': w_out}
      ff = {'LayerNorm_0': norm(p + 'feed_forward.layer_norm', d),
            'Dense_1': {'kernel': t.take(p + 'feed_forward.dense.dense.weight', (f, d)).T,
                        'bias': t.take(p + 'feed_forward.dense.dense.bias', (f,))},
            'Dense_4': {'kernel': t.take(p + 'feed_forward.output.dense.weight', (d, f)).T,
                        'bias': t.take(p + 'feed_forward.output.dense.bias', (d,))}}
      per_layer.append((norm(p + 'attention.layer_norm', d), attention, ff))
    attn_half = abstract[serial][f'ReversibleHalfResidual_{4 * j}']
    attn_name = _child(attn_half, 'LSHSelfAttention' if pattern[j] == 'lsh'
                       else 'LocalSelfAttention', serial)
    stack = lambda trees: jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)
    blocks[f'ReversibleHalfResidual_{4 * j}'] = {
        'LayerNorm_0': stack([x[0] for x in per_layer]),
        attn_name: stack([x[1] for x in per_layer])}
    blocks[f'ReversibleHalfResidual_{4 * j + 2}'] = {
        'FeedForward_0': stack([x[2] for x in per_layer])}
  params[serial] = blocks
  params[_child(abstract, 'LayerNorm', 'the model')] = norm('reformer.encoder.layer_norm', 2 * d)
  params[_child(abstract, 'Dense', 'the model')] = {
      'kernel': t.take('lm_head.decoder.weight', (v, 2 * d)).T,
      'bias': t.take('lm_head.bias', (v,))}

  # Everything must line up with the model's own tree.
  got = jax.tree_util.tree_structure(params)
  want = jax.tree_util.tree_structure(abstract)
  if got != want:
    raise ConversionError(f'internal: converted parameter tree {got} differs from the '
                          f'model\'s {want}.')
  for (path, x), a in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree_util.tree_leaves(abstract)):
    if x.shape != a.shape:
      raise ConversionError(f'internal: {jax.tree_util.keystr(path)} has shape {x.shape}, the '
                            f'model wants {a.shape}.')
  unused = sorted(set(tensors) - t.used - {'lm_head.decoder.bias'})
  if unused:
    raise ConversionError(f'{file} has tensors this config does not use: {", ".join(unused[:5])}'
                          f'{" ..." if len(unused) > 5 else ""} (does config.json match the '
                          'weights?).')
  return params


def lsh_rotations(kwargs: dict, rotations: dict[int, np.ndarray]) -> dict:
  """The `lsh_rotations` collection of `ReformerLM(**kwargs)` from per-layer rotations.

  `rotations` maps each HF LSH layer index to the (n_heads, d_qk, n_hashes, r)
  rotations HF drew for it. Pass the result as
  `model.apply({'params': params, 'lsh_rotations': result}, ...)`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  pattern = _kinds(kwargs)
  period = len(pattern)
  n_repeats = kwargs['n_layers'] // period
  serial: dict[str, Any] = {}
  for j, kind in enumerate(pattern):
    if kind != 'lsh':
      continue
    per_layer = []
    for r in range(n_repeats):
      i = r * period + j
      if i not in rotations:
        raise ConversionError(f'lsh_rotations: no rotations for LSH layer {i}.')
      per_layer.append(np.asarray(rotations[i], np.float32))
    serial[f'ReversibleHalfResidual_{4 * j}'] = {
        'LSHSelfAttention_1': {'rotations': np.stack(per_layer)}}
  if not serial:
    return {}
  from terraflax.models.reformer import ReformerLM  # pylint: disable=import-outside-toplevel
  model = ReformerLM(**kwargs, mode='eval')
  abstract = _abstract_params(model, ('params', 'hash'))
  return {_child(abstract, 'ReversibleSerial', 'the model'): serial}


def from_hf_reformer(path: str, *, predict_mem_len: int | None = None, num_buckets: Any = None):
  """(ReformerLM kwargs without mode, params) of a HF ReformerModelWithLMHead directory.

  `predict_mem_len`: positions each LSH layer keeps when decoding (default
  min(max_len, 2048)); `num_buckets`: for configs whose num_buckets is null.
  """
  config = read_hf_config(path)
  kwargs = model_kwargs_from_hf(config, predict_mem_len=predict_mem_len, num_buckets=num_buckets)
  tensors = read_safetensors(path)
  params = hf_to_params(tensors, config, kwargs, file=os.path.join(path, WEIGHTS_FILE))
  return kwargs, params


def hf_tokenizer(path: str, vocab_size: int | None = None) -> tokenizer_lib.Tokenizer | None:
  """The tokenizer of a HF model directory (spiece.model, else tokenizer.json), or None.

  With `vocab_size` (the model's), a tokenizer with more ids is a ConversionError.
  """
  for name in HF_TOKENIZER_FILES:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      try:
        tokenizer = tokenizer_lib.load(file)
        if vocab_size is not None:
          tokenizer_lib.check_vocab(tokenizer, vocab_size, field=f'{CONFIG_FILE} vocab_size')
      except tokenizer_lib.TokenizerError as e:
        raise ConversionError(f'the tokenizer in {path}: {e}') from None
      return tokenizer
  return None


# ----------------------------------------------------------------------------- byte-level wrapper


def _token_offset_layer():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from terraflax.combinators import base  # pylint: disable=import-outside-toplevel
  Layer, check_mode = base.Layer, base.check_mode  # pylint: disable=invalid-name
  from terraflax.layers.core import advance_position  # pylint: disable=import-outside-toplevel

  class TokenOffset(Layer):
    """[bytes] -> [bytes + offset]: int (b, l) -> int (b, l); n_in = n_out = 1.

    In 'predict' mode the input at position 0 is the pad id 0 that a shift
    would insert (see `terraflax.decoding`), and it stays 0.
    """

    offset: int = 2
    mode: str = 'train'

    def __post_init__(self):
      check_mode(self.mode, 'TokenOffset mode')
      super().__post_init__()

    @nn.compact
    def __call__(self, ids):
      shifted = ids + self.offset
      if self.mode != 'predict':
        return shifted
      start = advance_position(self, ids.shape[1])
      positions = start + jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :]
      return jnp.where(positions == 0, ids, shifted)

  return TokenOffset


def ByteLM(*, byte_offset: int, mode: str = 'train',  # pylint: disable=invalid-name
           **reformer_kwargs):
  """[bytes] -> [byte logits]: int (b, l) in [0, 256) -> float32 (b, l, 256); 1 -> 1.

  A `ReformerLM` whose token ids are bytes + `byte_offset` (HF's byte-level
  Reformers: google/reformer-enwik8 uses ids 2..257, with 0 the pad id), seen
  as a byte-level LM: bytes are offset before the model's ShiftRight (so the
  inserted pad stays 0) and the logits are cut to the 256 byte ids.
  """
  import terraflax.combinators as cb  # pylint: disable=import-outside-toplevel
  from terraflax.models.reformer import ReformerLM  # pylint: disable=import-outside-toplevel
  vocab_size = reformer_kwargs.get('vocab_size')
  if not isinstance(byte_offset, int) or byte_offset < 0 or (
      isinstance(vocab_size, int) and vocab_size < byte_offset + 256):
    raise ValueError(f'ByteLM byte_offset must be an int >= 0 with byte_offset + 256 <= '
                     f'vocab_size={vocab_size}, got {byte_offset!r}.')
  return cb.Serial(
      _token_offset_layer()(offset=byte_offset, mode=mode),
      ReformerLM(**reformer_kwargs, mode=mode),
      cb.Fn('ByteLogits', lambda logits: logits[..., byte_offset:byte_offset + 256]))


def byte_lm_params(kwargs: dict, params, byte_offset: int):
  """`ByteLM(byte_offset=..., **kwargs)`'s parameters from the ReformerLM's."""
  model = ByteLM(byte_offset=byte_offset, **kwargs, mode='eval')
  abstract = _abstract_params(model, ('params', 'hash'))
  (name,) = abstract
  return {name: params}


# ----------------------------------------------------------------------------- workdir


def write_workdir(workdir: str, kwargs: dict, params, *, byte_offset: int | None = None,
                  seq_len: int | None = None,
                  tokenizer: tokenizer_lib.Tokenizer | None = None,
                  name: str = 'ReformerLM', source: str = 'Hugging Face') -> str:
  """Writes `config.json` and an orbax checkpoint (step 0, `params` only) for decoding.

  With `byte_offset`, the model is wrapped as a byte-level LM (`ByteLM`) whose
  token ids are bytes + offset (2 for google/reformer-enwik8), so that the
  decoding CLI reads and writes text; with a `tokenizer` (`hf_tokenizer`) its
  file is stored as the workdir's (prompts are text it encodes); otherwise
  prompts are token ids. `name` is the factory of `kwargs` (byte-level
  wrapping is for ReformerLM only); `source` goes into config.json.
  """
  if tokenizer is not None and byte_offset is not None:
    raise ConversionError('write_workdir: a byte-level model (byte_offset) takes no tokenizer.')
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from terraflax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  if os.path.isdir(workdir_lib.checkpoint_dir(workdir)) and os.listdir(
      workdir_lib.checkpoint_dir(workdir)):
    raise ConversionError(f'{workdir_lib.checkpoint_dir(workdir)} already holds checkpoints; '
                          'choose an empty --to directory.')
  model = {'name': name, **kwargs}
  if byte_offset is not None and name != 'ReformerLM':
    raise ConversionError(f'write_workdir: byte_offset wraps a ReformerLM, not a {name}.')
  if byte_offset is not None:
    model = {'name': 'terraflax.models.convert:ByteLM', 'byte_offset': byte_offset, **kwargs}
    params = byte_lm_params(kwargs, params, byte_offset)
  chunks = [getattr(spec, 'chunk_len', None) for spec in attn.specs_from(
      kwargs.get('attention', attn.Full()))]
  seq_len = seq_len or min(kwargs['max_len'], 2 * max(c for c in chunks if c) if any(chunks)
                           else kwargs['max_len'])
  config = {'model': model,
            'data': {'name': 'bytes' if byte_offset is not None else 'tokens',
                     'seq_len': seq_len},
            'source': f'converted from {source} by terraflax.models.convert'}
  config['model'] = {k: list(v) if isinstance(v, tuple) else v for k, v in config['model'].items()}
  if tokenizer is not None:
    tokenizer.save_to(workdir)
  workdir_lib.write_config(workdir, ml_collections.ConfigDict(config))
  workdir_lib.save_params(workdir, 0, jax.tree_util.tree_map(np.asarray, params))
  return workdir


# Converted models that decode from encoder inputs (`python -m terraflax.decoding --inputs`).
SEQ2SEQ = ('ConcatTerraformer',)


def _tokenizer_file(path: str, vocab_size: int) -> tokenizer_lib.Tokenizer:
  """The tokenizer file given with --tokenizer (SentencePiece .model or tokenizer.json)."""
  try:
    tokenizer = tokenizer_lib.load(path)
    tokenizer_lib.check_vocab(tokenizer, vocab_size, field='the model\'s vocab_size')
  except tokenizer_lib.TokenizerError as e:
    raise ConversionError(f'--tokenizer={path}: {e}') from None
  return tokenizer


def _main_trax(f):
  """--from_trax: a Trax checkpoint -> a workdir; returns (what was read, model config, params)."""
  model_config, params = from_trax(f.from_trax, model=f.trax_model, config=f.trax_config)
  name = model_config.pop('name')
  tokenizer = _tokenizer_file(f.tokenizer, model_config['vocab_size']) if f.tokenizer else None
  write_workdir(f.to, model_config, params, tokenizer=tokenizer, name=name, source='Trax')
  return name, tokenizer, params


def main(argv):
  import jax  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if f.from_trax:
    if f.byte_offset is not None or f.num_buckets:
      raise ConversionError('--byte_offset and --num_buckets apply to --from_hf only.')
    name, tokenizer, params = _main_trax(f)
    n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    reads = ('token ids' if tokenizer is None
             else f'text ({os.path.basename(tokenizer.path)}, {tokenizer.vocab_size} ids)')
    given = '--inputs=...' if name in SEQ2SEQ else '--prompt=...'
    print(f'Converted {f.from_trax} (Trax) to a terraflax {name} ({n:,} parameters; optimizer '
          f'slots dropped) in {f.to}, reading {reads}; decode with: python -m '
          f'terraflax.decoding --workdir={f.to} {given}')
    return
  if f.trax_model or f.trax_config or f.tokenizer:
    raise ConversionError('--trax_model, --trax_config and --tokenizer apply to --from_trax only.')
  try:
    buckets = None
    if f.num_buckets:
      try:
        buckets = [int(n) for n in f.num_buckets.split(',')]
      except ValueError:
        raise ConversionError(f'--num_buckets must be an int or two ints "n1,n2", got '
                              f'{f.num_buckets!r}.') from None
      buckets = buckets[0] if len(buckets) == 1 else buckets
    kwargs, params = from_hf_reformer(f.from_hf, predict_mem_len=f.predict_mem_len,
                                      num_buckets=buckets)
    tokenizer = None if f.byte_offset is not None else hf_tokenizer(f.from_hf,
                                                                     kwargs['vocab_size'])
    write_workdir(f.to, kwargs, params, byte_offset=f.byte_offset, tokenizer=tokenizer)
  except ConversionError as e:
    sys.exit(f'terraflax.models.convert: {e}')
  n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
  reads = ('text (UTF-8 bytes)' if f.byte_offset is not None else 'token ids' if tokenizer is None
           else f'text ({os.path.basename(tokenizer.path)}, {tokenizer.vocab_size} ids)')
  print(f'Converted {f.from_hf} ({n:,} parameters, attention {"+".join(_kinds(kwargs))}) '
        f'to {f.to}, reading {reads}; decode with: python -m terraflax.decoding '
        f'--workdir={f.to} --prompt=...')


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('from_hf', None, 'A Hugging Face ReformerModelWithLMHead directory '
                      '(config.json + model.safetensors).')
  flags.DEFINE_string('to', None, 'The terraflax workdir to write (config.json + checkpoints/).')
  flags.DEFINE_integer('byte_offset', None, 'Make a byte-level (text in, text out) model whose '
                       'token ids are bytes + this offset (2 for google/reformer-enwik8).')
  flags.DEFINE_integer('predict_mem_len', None, 'Positions each LSH layer remembers when '
                       f'decoding (default min(max_len, {DEFAULT_PREDICT_MEM_LEN})).')
  flags.DEFINE_string('num_buckets', None, 'LSH buckets ("n" or "n1,n2") for configs whose '
                      'num_buckets is null (HF then picks it from the input length).')
  flags.DEFINE_string('from_trax', None, 'A Trax checkpoint: a training.Loop output dir '
                      '(model.pkl.gz + model.weights.npy.gz) or a .pkl.gz file (Loop\'s or '
                      'Layer.save_to_file\'s). Optimizer slots are dropped.')
  flags.DEFINE_string('trax_model', None, 'The Trax model factory (TransformerLM, ReformerLM, '
                      'ConfigurableTransformerLM, ConfigurableTerraformer) when the '
                      'configuration does not name one.')
  flags.DEFINE_string('trax_config', None, 'The Trax model\'s configuration: a gin file, or '
                      'its keyword arguments as JSON (\'{"d_model": 512, ...}\'); default: '
                      'config.gin next to the checkpoint.')
  flags.DEFINE_string('tokenizer', None, 'A tokenizer file for a --from_trax model\'s '
                      'vocabulary (SentencePiece .model or tokenizer.json): the workdir then '
                      'reads and writes text.')
  flags.mark_flags_as_mutual_exclusive(['from_hf', 'from_trax'], required=True)
  flags.mark_flags_as_required(['to'])


if __name__ == '__main__':
  from terraflax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, name='terraflax.models.convert',
          user_errors=(ConversionError, TraxConversionError))
