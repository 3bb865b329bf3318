"""Reading Trax 1.4.1 checkpoints and model configurations (without Trax).

  weights = read_weights('/path/to/loop_output_dir')   # Trax's flat weight list
  name, kwargs = trax_config('/path/to/loop_output_dir')  # its factory and kwargs

reads what Trax writes:

  - a `trax.supervised.training.Loop` checkpoint: `model.pkl.gz` (a gzipped
    pickle: step, state, input signature) with its weights in
    `model.weights.npy.gz` (gzipped `np.save` arrays, one per weight); the
    optimizer slots (`model.opt_slots*.npy.gz`) are NOT read: a converted
    model is for evaluation, decoding or fine-tuning from fresh slots;
  - a file written by `Layer.save_to_file` (the weights inside the pickle).

Trax's pickles name Trax classes (the input signature's `ShapeDtype`); they
are read without Trax, as opaque placeholders. The weights are a flat list in
the order of Trax's layer tree, which the checkpoint does not describe: the
model's configuration does. It comes from `config=` (a dict of the Trax
factory's keyword arguments, or a gin file) or from `config.gin` next to the
checkpoint (what gin-driven Trax runs write), and `model=` names the factory
when the gin file binds several; Trax's defaults fill in the rest
(`TRAX_DEFAULTS`), and values the converter does not reproduce are refused
here (`UNSUPPORTED`). `terraflax.models.convert_trax` walks the weights.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import pickle
import re
from typing import Any

import numpy as np

from terraflax import errors

CHECKPOINT_FILE = 'model.pkl.gz'
GIN_FILE = 'config.gin'

# Trax's defaults of the keyword arguments the converter reads (trax 1.4.1 signatures).
TRAX_DEFAULTS = {
    'TransformerLM': dict(d_model=512, d_ff=2048, n_layers=6, n_heads=8, max_len=2048,
                          dropout=0.1, ff_activation='Relu'),
    'ReformerLM': dict(d_model=512, d_ff=2048, d_attention_key=64, d_attention_value=64,
                       n_layers=6, n_heads=8, dropout=0.1, max_len=2048,
                       attention_type='SelfAttention', pos_type=None, pos_axial_shape=(),
                       pos_d_axial_embs=None, ff_activation='FastGelu', ff_use_sru=0,
                       ff_chunk_size=0, ff_sparsity=0, loss_sparsity=0,
                       attention_chunk_size=0),
    # trax.models.research.configurable_transformer: one pre-norm residual stream.
    'ConfigurableTransformerLM': dict(
        d_model=512, d_ff=2048, n_layers=6, n_heads=8, max_len=2048, dropout=0.1,
        ff_activation='Relu', ff_dropout=0.1, ff_chunk_size=0, ff_use_sru=0, ff_sparsity=0,
        ff_sparsity_type='1inN', loss_sparsity=0, attention_chunk_size=0,
        attention_type='CausalAttention', pos_type=None, pos_axial_shape=None,
        pos_d_axial_embs=None),
    # trax.models.research.terraformer: the encoder-decoder over the concatenated sequence.
    'ConfigurableTerraformer': dict(
        output_vocab_size=None, d_model=512, d_ff=2048, d_attention_key=None,
        d_attention_value=None, n_encoder_layers=6, n_decoder_layers=6, n_heads=8, dropout=0.1,
        max_len=2048, encoder_attention_type='SelfAttention',
        encoder_decoder_attention_type='SelfAttention', pos_type='fixed-base',
        pos_axial_shape=(), pos_d_axial_embs=None, ff_activation='Relu', ff_use_sru=0,
        ff_chunk_size=0, ff_dropout=None, ff_sparsity=0, loss_sparsity=0,
        attention_chunk_size=0, n_layers_forget=0, forget_dense=True,
        n_decoder_attention_layers=2, use_bfloat16=False, reversible_encoder=False,
        use_two_swaps_per_encoder_block=True, center_layernorm=True, half_before_layer=None,
        double_after_layer=None),
}
# trax.layers.FixedBasePositionalEncoding's defaults (what ConfigurableTerraformer builds).
FIXED_BASES, FIXED_BASE_DIGITS = (11, 13, 14, 15), 8
# The keyword argument that holds each model's (input) vocabulary size: Trax has no default.
VOCAB_ARGUMENT = {'ConfigurableTerraformer': 'input_vocab_size'}
# Each model's attention-type arguments (a layer or a list cycled over the layers).
ATTENTION_ARGUMENTS = {
    'ReformerLM': ('attention_type',), 'ConfigurableTransformerLM': ('attention_type',),
    'ConfigurableTerraformer': ('encoder_attention_type', 'encoder_decoder_attention_type')}
ATTENTION_DEFAULTS = {  # efficient_attention's layers, as ReformerLM builds them.
    # trax.layers.CausalAttention (ConfigurableTransformerLM's default): Dense q, k, v, o.
    'CausalAttention': dict(),
    'SelfAttention': dict(share_qk=False, chunk_len=None, n_chunks_before=0, n_chunks_after=0,
                          bias=False, predict_mem_len=None),
    'LSHSelfAttention': dict(chunk_len=128, n_chunks_before=1, n_chunks_after=0, n_hashes=1,
                             n_buckets=None, predict_mem_len=2048, bias=False),
    # trax.layers.research.sparsity: the Terraformer's sparse QKV.
    'MultiplicativeConvCausalAttention': dict(sparsity=None, length_kernel_size=3,
                                              share_qk=False, output_layer_type='none',
                                              v_concat_type='none'),
}
# Trax activation layers -> terraflax ff_activation names.
ACTIVATIONS = {'Relu': 'relu', 'FastGelu': 'fast_gelu', 'Gelu': 'gelu'}
# Keyword arguments whose non-default values change the weights or the function in ways the
# converter does not reproduce: name -> the only value it accepts.
UNSUPPORTED = {
    'ReformerLM': dict(ff_use_sru=0, loss_sparsity=0),
    'ConfigurableTransformerLM': dict(ff_use_sru=0, loss_sparsity=0, ff_sparsity_type='1inN',
                                      pos_type=None, loss_sparsity_prob=None),
    'ConfigurableTerraformer': dict(
        ff_use_sru=0, loss_sparsity=0, loss_sparsity_prob=None, attention_chunk_size=0,
        n_layers_forget=0, reversible_encoder=False, use_two_swaps_per_encoder_block=True,
        center_layernorm=True, half_before_layer=None, double_after_layer=None),
}


# Trax models the converter knows of but does not convert: name -> why (the error says it).
# (None at present: ConfigurableTerraformer, once here, converts to a ConcatTerraformer.)
NOT_CONVERTED: dict[str, str] = {}


class TraxConversionError(errors.UserError, ValueError):
  """A Trax checkpoint or configuration that cannot be converted (names the file/field)."""


# ----------------------------------------------------------------------------- reading


class _Opaque:
  """Stands in for a Trax class named in a pickle (ShapeDtype, ...); keeps its state."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state


class _Unpickler(pickle.Unpickler):
  """Unpickles Trax's checkpoint dicts without Trax: Trax/TF classes become `_Opaque`."""

  def find_class(self, module, name):
    if module.split('.')[0] in ('trax', 'tensorflow', 'gin'):
      return type(name, (_Opaque,), {})
    return super().find_class(module, name)


def _load_pickle(file: str) -> Any:
  try:
    with gzip.open(file, 'rb') as f:
      return _Unpickler(f).load()
  except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError,
          TypeError, ValueError) as e:
    raise TraxConversionError(
        f'{file} is not a Trax checkpoint (expected a gzipped pickle as written by '
        f'training.Loop.save_checkpoint or Layer.save_to_file): {type(e).__name__}: {e}'
    ) from None


def _load_arrays(file: str, compresslevel: int) -> list[np.ndarray]:
  """The arrays `np_to_file` wrote: consecutive `np.save` records in one gzip stream."""
  del compresslevel  # gzip reads any level.
  if not os.path.isfile(file):
    raise TraxConversionError(f'{file} is missing: the checkpoint keeps its weights there '
                              '(training.Loop writes it next to model.pkl.gz).')
  arrays = []
  try:
    with gzip.open(file, 'rb') as f:
      data = io.BytesIO(f.read())
    while data.tell() < len(data.getbuffer()):
      arrays.append(np.load(data, allow_pickle=False))
  except (OSError, EOFError, ValueError) as e:
    raise TraxConversionError(f'{file} cannot be read as Trax weights (truncated or corrupt?): '
                              f'{e}') from None
  return arrays


def checkpoint_file(path: str) -> str:
  """The pickle to read: `path` itself, or `DIR/model.pkl.gz` for a Loop output dir."""
  if os.path.isdir(path):
    file = os.path.join(path, CHECKPOINT_FILE)
    if not os.path.isfile(file):
      found = sorted(f for f in os.listdir(path) if f.endswith('.pkl.gz'))
      hint = f' (found {", ".join(found)}: pass one as the path)' if found else ''
      raise TraxConversionError(f'{path} holds no {CHECKPOINT_FILE}{hint}: expected a '
                                'training.Loop output dir or a .pkl.gz checkpoint file.')
    return file
  if not os.path.isfile(path):
    raise TraxConversionError(f'{path} does not exist (expected a training.Loop output dir or '
                              'a .pkl.gz checkpoint file).')
  return path


def read_weights(path: str) -> list[np.ndarray]:
  """The flat weight list of a Trax checkpoint (a Loop dir/pickle or a save_to_file file)."""
  file = checkpoint_file(path)
  content = _load_pickle(file)
  if not isinstance(content, dict) or 'flat_weights' not in content:
    keys = sorted(content) if isinstance(content, dict) else type(content).__name__
    raise TraxConversionError(f'{file} is not a Trax checkpoint: expected a dict with '
                              f"'flat_weights' (training.Loop / Layer.save_to_file), got {keys}.")
  flat = content['flat_weights']
  if isinstance(flat, int) and not isinstance(flat, bool):  # Loop: weights in their own file.
    base = file[:-len('.pkl.gz')] if file.endswith('.pkl.gz') else file
    flat = _load_arrays(base + '.weights.npy.gz', flat)
  if not isinstance(flat, (list, tuple)):
    raise TraxConversionError(f"{file}: 'flat_weights' is a {type(flat).__name__}, expected a "
                              'list of arrays.')
  weights = []
  for i, w in enumerate(flat):
    w = np.asarray(w)
    if w.dtype == np.uint16:  # Loop bit-casts bfloat16 weights to uint16.
      w = (w.astype(np.uint32) << 16).view(np.float32)
    if not np.issubdtype(w.dtype, np.floating):
      raise TraxConversionError(f'{file}: weight #{i} has dtype {w.dtype}; expected floats.')
    weights.append(w.astype(np.float32))
  return weights


# ----------------------------------------------------------------------------- configuration


_BINDING = re.compile(
    r'^(?:(?P<scope>[\w./]+)/)?(?P<name>[\w.]+)\.(?P<param>\w+)\s*=\s*(?P<value>.*)$', re.S)


def _gin_value(text: str, where: str, macros: dict[str, Any]) -> Any:
  """A gin literal; `@name` / `@scope/name` references become the strings '@name',
  `%macro` the macro's value."""
  def macro(m):
    if m.group(1) not in macros:
      raise TraxConversionError(f'{where}: %{m.group(1)} is not a macro defined above it.')
    return repr(macros[m.group(1)])
  quoted = re.sub(r'@([\w./]+)(\(\))?', lambda m: repr('@' + m.group(1)), text)
  quoted = re.sub(r'%([\w.]+)', macro, quoted)
  try:
    return ast.literal_eval(quoted)
  except (ValueError, SyntaxError):
    raise TraxConversionError(f'{where}: cannot read the gin value {text.strip()!r} (the '
                              'converter reads literals, @references and %macros).') from None


def read_gin(file: str) -> dict[tuple[str, str], dict[str, Any]]:
  """Gin bindings {(scope, configurable): {param: value}} of a gin file (literals only).

  Reads what gin's operative configs hold: `[scope/]Name.param = value`
  (values may span lines), `name = value` macros used as `%name`, comments;
  `import` and `include` lines are skipped.
  """
  try:
    with open(file, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise TraxConversionError(f'{file} cannot be read: {e}') from None
  bindings: dict[tuple[str, str], dict[str, Any]] = {}
  macros: dict[str, Any] = {}
  statement, first = '', 0
  for number, line in enumerate(lines, 1):
    line = line.split('#', 1)[0].rstrip() if '#' in line and "'" not in line else line.rstrip()
    if not statement:
      first = number
    statement = f'{statement} {line.strip()}' if statement else line.strip()
    if not statement or statement.count('(') + statement.count('[') > (
        statement.count(')') + statement.count(']')):
      continue  # Empty, or a value continued on the next line.
    if statement.startswith(('import ', 'from ', 'include ')):
      statement = ''
      continue
    where = f'{file}:{first}'
    match = _BINDING.match(statement)
    if match is None:
      macro = re.match(r'^(\w+)\s*=\s*(.*)$', statement, re.S)
      if macro is None:
        raise TraxConversionError(f'{where}: {statement!r} is not a gin binding '
                                  '(configurable.param = value).')
      macros[macro[1]] = _gin_value(macro[2], where, macros)
      statement = ''
      continue
    name = match['name'].split('.')[-1]
    bindings.setdefault((match['scope'] or '', name), {})[match['param']] = _gin_value(
        match['value'], where, macros)
    statement = ''
  return bindings


def _reference(value: Any) -> tuple[str, str] | None:
  """'@scope/trax.layers.Name' -> (scope, 'Name'); None if not a reference."""
  if not isinstance(value, str) or not value.startswith('@'):
    return None
  scope, _, name = value[1:].rpartition('/')
  return scope, name.split('.')[-1]


def _model_name(bindings, model: str | None, source: str) -> str:
  names = sorted({name for (scope, name) in bindings if not scope and name in TRAX_DEFAULTS})
  other = sorted({name for (scope, name) in bindings if not scope and name in NOT_CONVERTED})
  for name in ([model] if model is not None else [] if names else other):
    if name in NOT_CONVERTED:
      raise TraxConversionError(f'{source or "--trax_model"}: Trax\'s {name} is not converted: '
                                f'{NOT_CONVERTED[name]}. The converter knows '
                                f'{", ".join(sorted(TRAX_DEFAULTS))}.')
  if model is not None:
    if model not in TRAX_DEFAULTS:
      raise TraxConversionError(f'unknown Trax model {model!r}: the converter knows '
                                f'{", ".join(sorted(TRAX_DEFAULTS))}.')
    return model
  if len(names) != 1:
    raise TraxConversionError(
        f'{source} binds {"none" if not names else " and ".join(names)} of the Trax models the '
        f'converter knows ({", ".join(sorted(TRAX_DEFAULTS))}); name one with --trax_model.')
  return names[0]


def _layer_config(value: Any, bindings, where: str) -> dict:
  """An attention type (a gin reference or a dict {'type': Name, ...}) -> {'type', **kwargs}."""
  if isinstance(value, dict):
    layer = dict(value)
    kind = str(layer.pop('type', '')).split('.')[-1]
  else:
    ref = _reference(value) if not (isinstance(value, str) and '@' not in value) else ('', value)
    if ref is None:
      raise TraxConversionError(f'{where}: {value!r} is not an attention layer (expected a gin '
                                "reference like @LSHSelfAttention or {'type': 'SelfAttention', "
                                '...}).')
    scope, kind = ref
    kind = kind.split('.')[-1]
    layer = dict(bindings.get(('', kind), {}))
    if scope:
      layer.update(bindings.get((scope, kind), {}))
  if kind not in ATTENTION_DEFAULTS:
    raise TraxConversionError(f'{where}: attention type {kind!r} is not supported; the converter '
                              f'knows {", ".join(ATTENTION_DEFAULTS)} (trax.layers).')
  return {'type': kind, **ATTENTION_DEFAULTS[kind], **layer}


def trax_config(path: str, *, model: str | None = None, config: Any = None) -> tuple[str, dict]:
  """(Trax model name, its keyword arguments with Trax's defaults filled in).

  `config`: a dict of keyword arguments, a JSON string of one, or a gin file;
  None reads `config.gin` next to the checkpoint.
  """
  if config is None or (isinstance(config, str) and not config.lstrip().startswith('{')):
    gin_file = config
    if gin_file is None:
      folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
      gin_file = os.path.join(folder, GIN_FILE)
      if not os.path.isfile(gin_file):
        raise TraxConversionError(
            f'no model configuration: {gin_file} does not exist; pass the Trax model\'s gin '
            'file or its keyword arguments (--trax_config=\'{"d_model": 512, ...}\') and '
            '--trax_model.')
    bindings = read_gin(gin_file)
    name = _model_name(bindings, model, gin_file)
    kwargs = dict(bindings.get(('', name), {}))
    source = gin_file
  else:
    if isinstance(config, str):
      try:
        config = json.loads(config)
      except ValueError as e:
        raise TraxConversionError(f'--trax_config is not a JSON object: {e}') from None
    if not isinstance(config, dict):
      raise TraxConversionError(f'the Trax config must be a dict of keyword arguments, got '
                                f'{type(config).__name__}.')
    if model is None:
      raise TraxConversionError('a keyword-argument config needs the model name (--trax_model, '
                                f'one of {", ".join(sorted(TRAX_DEFAULTS))}).')
    name, bindings, kwargs, source = _model_name({}, model, ''), {}, dict(config), 'the config'
  vocab = VOCAB_ARGUMENT.get(name, 'vocab_size')
  if vocab not in kwargs:
    raise TraxConversionError(f'{source} has no {name}.{vocab} (Trax has no default for it).')
  unknown = sorted(set(kwargs) - set(TRAX_DEFAULTS[name]) - {vocab, 'mode'})
  ignored = {'dropout_shared_axes', 'pos_start_from_zero_prob', 'pos_max_offset_to_add',
             'loss_sparsity_type', 'loss_d_lowrank', 'loss_sparsity_prob'}
  unknown = [k for k in unknown if k not in ignored]
  if unknown:
    raise TraxConversionError(f'{source}: {name} argument(s) {", ".join(unknown)} are not read by '
                              f'the converter; it reads {", ".join(sorted(TRAX_DEFAULTS[name]))}.')
  kwargs = {**TRAX_DEFAULTS[name], **kwargs}
  for key in ('ff_activation',):
    value = kwargs[key]
    ref = _reference(value)
    kwargs[key] = ref[1] if ref else str(value).split('.')[-1]
  for key, allowed in UNSUPPORTED.get(name, {}).items():
    if kwargs.get(key, allowed) != allowed:
      raise TraxConversionError(f'{source}: {name}.{key}={kwargs[key]!r} is not supported (only '
                                f'{allowed!r} converts).')
  for key in ATTENTION_ARGUMENTS.get(name, ()):
    types = kwargs[key]
    types = list(types) if isinstance(types, (list, tuple)) else [types]
    kwargs[key] = [_layer_config(t, bindings, f'{source}: {key}[{i}]')
                   for i, t in enumerate(types)]
  kwargs['_source'] = source
  return name, kwargs
