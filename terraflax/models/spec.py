"""One model spec: `config.model` (+ the data set's task) -> a model in any mode.

  spec = ModelSpec.from_config(config)    # resolves and checks config.model.*
  model = spec.build('predict')            # 'train', 'eval' or 'predict'
  variables = spec.abstract_variables(batch_size=8, seq_len=512)   # nothing computed
  logits = model.apply({'params': params}, *spec.model_inputs(batch), rngs=...)

`config.model.name` is a factory in `terraflax.models` (`'TransformerLM'`) or
`'package.module:Factory'`; the other `config.model.*` fields are its keyword
arguments (the spec adds `mode`). Fields named `dtype` or `*_dtype` may be
dtype names (`'bfloat16'`), lists become tuples. A factory may translate
deprecated keyword names with an `upgrade_kwargs(kwargs) -> kwargs` attribute;
it runs before the kwargs are checked against the factory's signature.

The task (how the model is called, what its logits are) comes from the data
set's name, through `TASKS`, the one table of it:

  lm              model(inputs) -> (b, l, v); with config.data.pack
                  model(inputs, segment_ids, positions) -> (b, l, v)
  mlm             model(inputs) -> (b, l, v), bidirectional
  classification  model(inputs) -> (b, n_classes)
  seq2seq         model(inputs, targets) -> (b, l, v)

A data set name outside `TASKS` (a converted checkpoint's 'tokens') is an LM, or seq2seq when
config.model.name is an encoder-decoder factory (`SEQ2SEQ_FACTORIES`).

The trainer, eval-only scoring, the checkpoint loader, distillation, decoding
and export all build their models here; `load_workdir(workdir)` restores a
training workdir's spec and parameters without importing `terraflax.train`.
Errors are `ModelSpecError` naming the `config.model.*` field; the training
package reports them as its `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from terraflax import rng as rng_lib
from terraflax import workdir as workdir_lib

MODES = ('train', 'eval', 'predict')
# Data set name -> task. Names not listed (a converted checkpoint's 'tokens') are LMs.
TASKS = {'bytes': 'lm', 'duplication': 'lm', 'listops': 'classification',
         'text_classification': 'classification', 'reverse': 'seq2seq', 'mlm': 'mlm',
         'byte_classification': 'classification', 'digits': 'classification', 'text': 'lm',
         'retrieval': 'lm'}
# Encoder-decoder factories: called (inputs, targets) whatever the data set's name says when the
# name is not in TASKS (a converted checkpoint's 'tokens').
SEQ2SEQ_FACTORIES = frozenset({'Transformer', 'Reformer', 'Terraformer', 'ConcatTerraformer'})
BYTE_LEVEL = frozenset({'bytes'})  # Data sets whose tokens are raw bytes (text in, text out).


class ModelSpecError(ValueError):
  """`config.model.*` names no factory, or fields the factory does not take."""


def task_of(data_name: str) -> str:
  """The task of data set `data_name` ('lm' for names outside `TASKS`)."""
  return TASKS.get(data_name, 'lm')


PACKING_KEYS = ('segment_ids', 'positions')  # A packed batch's extra (b, l) int32 arrays.
PACKED_TASKS = ('lm', 'mlm')  # Tasks whose models may read packed rows.


def model_inputs(batch, task: str) -> tuple:
  """The model's positional inputs for a batch: (inputs,), or (inputs, targets) for seq2seq.

  A packed LM or MLM batch (with 'segment_ids' and 'positions') gives (inputs,
  segment_ids, positions): the inputs of a model built with packed=True.
  """
  if task == 'seq2seq':
    return (batch['inputs'], batch['targets'])
  if task in PACKED_TASKS and all(key in batch for key in PACKING_KEYS):
    return (batch['inputs'],) + tuple(batch[key] for key in PACKING_KEYS)
  return (batch['inputs'],)


def _suggest(name: str, valid) -> str:
  close = difflib.get_close_matches(name, list(valid), n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''


def resolve_factory(name: str) -> Callable[..., Any]:
  """The model factory `name` names: `terraflax.models.<name>` or `'module:Factory'`."""
  if not isinstance(name, str) or not name:
    raise ModelSpecError(f'config.model.name must be a non-empty str, got {name!r}.')
  if ':' in name:
    module_name, _, attr = name.partition(':')
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise ModelSpecError(f'config.model.name={name!r}: cannot import {module_name!r}: '
                           f'{e}') from None
    where = module_name
  else:
    try:
      module = importlib.import_module('terraflax.models')
    except ImportError as e:
      raise ModelSpecError(f'config.model.name={name!r}: terraflax.models is not importable '
                           f"({e}); name a factory as 'package.module:Factory' instead.") from None
    attr, where = name, 'terraflax.models'
  factory = getattr(module, attr, None)
  if factory is None or not callable(factory):
    available = sorted(n for n in dir(module) if n[:1].isupper() and callable(getattr(module, n)))
    raise ModelSpecError(f'config.model.name={name!r}: {where} has no factory {attr!r}'
                         f'{_suggest(attr, available)}; available: '
                         f'{", ".join(available) or "none"}.')
  return factory


def model_kwargs(model_config) -> dict[str, Any]:
  """`config.model.*` (ConfigDict or dict) minus `name`; dtype names -> dtypes, lists -> tuples."""
  fields = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  kwargs = {k: v for k, v in fields.items() if k != 'name'}
  for key, value in kwargs.items():
    if (key == 'dtype' or key.endswith('_dtype')) and isinstance(value, str):
      try:
        kwargs[key] = jnp.dtype(value)
      except TypeError:
        raise ModelSpecError(f"config.model.{key} must be a dtype name such as 'float32' or "
                             f"'bfloat16', got {value!r}.") from None
    elif isinstance(value, list):
      kwargs[key] = tuple(value)
  return kwargs


def factory_parameters(factory):
  """`inspect.signature(factory).parameters`, or None when it has no signature to read."""
  try:
    return inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return None


def check_model_fields(factory, kwargs: Mapping[str, Any], name: str) -> None:
  """`kwargs` against the factory's signature: unknown, missing and `mode` fields."""
  parameters = factory_parameters(factory)
  if parameters is None:
    return
  if 'mode' in kwargs:
    raise ModelSpecError('config.model.mode must not be set: the trainer builds the model in '
                         "'train', 'eval' and 'predict' mode itself.")
  takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
  named = {n: p for n, p in parameters.items()
           if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
  valid = sorted(n for n in named if n not in ('mode', 'self'))
  if not takes_any:
    for key in kwargs:
      if key not in named:
        raise ModelSpecError(f'config.model.{key} is not an argument of {name}'
                             f'{_suggest(key, valid)}; valid model fields: name, '
                             f'{", ".join(valid)}.')
    if 'mode' not in named:
      raise ModelSpecError(f'config.model.name={name!r}: the factory must take a `mode` argument '
                           "('train', 'eval' or 'predict').")
  missing = [n for n, p in named.items()
             if p.default is p.empty and n not in kwargs and n not in ('mode', 'self')]
  if missing:
    raise ModelSpecError(f'config.model.{missing[0]} is required by {name} (missing: '
                         f'{", ".join(missing)}).')
  d_model, n_heads = kwargs.get('d_model'), kwargs.get('n_heads')
  if isinstance(d_model, int) and isinstance(n_heads, int):
    if n_heads <= 0 or d_model % n_heads:
      raise ModelSpecError(f'config.model.d_model={d_model} must be divisible by '
                           f'config.model.n_heads={n_heads}.')


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A resolved `config.model`: the factory, its keyword arguments and the task."""

  name: str  # config.model.name
  factory: Callable[..., Any]
  kwargs: Mapping[str, Any]  # Checked against the factory's signature; no `mode`.
  task: str  # A value of TASKS.

  @classmethod
  def from_config(cls, config) -> ModelSpec:
    """The spec of `config.model` and `config.data.name`; raises `ModelSpecError`."""
    if 'model' not in config or 'name' not in config.model:
      raise ModelSpecError("config.model.name is required: a factory in terraflax.models "
                           "(e.g. 'TransformerLM') or 'package.module:Factory'.")
    name = config.model.name
    factory = resolve_factory(name)
    kwargs = model_kwargs(config.model)
    upgrade = getattr(factory, 'upgrade_kwargs', None)
    if upgrade is not None:  # Deprecated keyword names of old config.json files.
      kwargs = upgrade(kwargs)
    data = config.get('data', None)
    data_name = data.get('name', '') if data is not None else ''
    task = task_of(data_name)
    if data_name not in TASKS and name in SEQ2SEQ_FACTORIES:
      task = 'seq2seq'
    if data is not None and data.get('pack', False):
      kwargs = dict(kwargs, packed=True)
      parameters = factory_parameters(factory)
      if task not in PACKED_TASKS or (parameters is not None and 'packed' not in parameters):
        raise ModelSpecError(
            f'config.data.pack=True needs a (masked) language model that takes packed rows (a '
            f'factory with a `packed` argument: TransformerLM, ReformerLM, TerraformerLM, '
            f'BertMLM); '
            f'config.model.name={name!r} for the {task!r} task does not.')
    check_model_fields(factory, kwargs, name)
    return cls(name=name, factory=factory, kwargs=kwargs, task=task)

  def with_kwargs(self, **overrides) -> ModelSpec:
    """This spec with some keyword arguments replaced (eval-time attention settings)."""
    return dataclasses.replace(self, kwargs=dict(self.kwargs, **overrides))

  def build(self, mode: str, *, packed: bool | None = None):
    """The model in `mode` ('train', 'eval' or 'predict').

    `packed` None: the spec's (config.data.pack), except in 'predict' mode,
    which decodes one unpacked sequence per row; False: an unpacked model
    (export's forward pass). Parameters are the same either way.
    """
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
    kwargs = dict(self.kwargs)
    if packed is None:
      packed = self.packed and mode != 'predict'
    kwargs.pop('packed', None)
    if packed:
      kwargs['packed'] = True
    return self.factory(**kwargs, mode=mode)

  def model_inputs(self, batch) -> tuple:
    """(batch['inputs'],), or (inputs, targets) for seq2seq: the model's positional inputs."""
    return model_inputs(batch, self.task)

  @property
  def packed(self) -> bool:
    """Whether the model reads packed rows ([tokens, segment_ids, positions])."""
    return bool(self.kwargs.get('packed', False))

  def abstract_inputs(self, batch_size: int, seq_len: int, *, mode: str = 'train') -> tuple:
    """`model_inputs` of an abstract int32 (batch_size, seq_len) batch.

    A packed model's batch has segment_ids and positions too, except in
    'predict' mode (decoding is unpacked).
    """
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    return self.model_inputs(self._batch_of(tokens, mode))

  def example_inputs(self, batch_size: int, seq_len: int, *, mode: str = 'train') -> tuple:
    """`model_inputs` of an all-zero int32 batch (one document per row when packed)."""
    return self.model_inputs(self._batch_of(jnp.zeros((batch_size, seq_len), jnp.int32), mode))

  def _batch_of(self, tokens, mode: str) -> dict:
    batch = {'inputs': tokens, 'targets': tokens}
    if self.packed and mode != 'predict':
      batch.update({key: tokens for key in PACKING_KEYS})
    return batch

  def abstract_variables(self, batch_size: int, seq_len: int, *, mode: str = 'train',
                         model=None):
    """`jax.eval_shape` of `init` (boxed, with partitioning metadata): nothing is computed."""
    model = self.build(mode) if model is None else model
    return jax.eval_shape(model.init, rng_lib.abstract_keys(),
                          *self.abstract_inputs(batch_size, seq_len, mode=mode))


def load_workdir(workdir: str, step: int | None = None):
  """(config, spec, params) of the latest (or the given) checkpoint of a training workdir.

  The spec comes from `WORKDIR/config.json`; its abstract init gives the
  parameters' shapes, and only the `params` item is restored, onto the
  default device (`terraflax.workdir.load_params`).
  """
  config = workdir_lib.read_config(workdir)
  spec = ModelSpec.from_config(config)
  abstract = spec.abstract_variables(1, config.data.seq_len, mode='eval')
  _, params, _ = workdir_lib.load_params(workdir, step, nn.meta.unbox(abstract)['params'])
  return config, spec, params
