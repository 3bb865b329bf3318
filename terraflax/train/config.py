"""Config schema and validation: every problem is found before anything compiles.

`validate_config(config)` checks a `ml_collections.ConfigDict` against the
schema below, fills in the defaults of optional fields, resolves the model
factory, checks `config.model.*` against the factory's signature, builds the
data set (so that a missing path is reported now) and traces the model once
with `jax.eval_shape` (so that a sequence length the model cannot take is
reported now, naming the fields). It raises a single `ConfigError` whose
message names the offending field, e.g.

  config.train.batch_size must be a positive int, got -3

Model factories: `config.model.name` is either a name in `terraflax.models`
(`'TransformerLM'`) or `'package.module:Factory'` for a user's own model. The
other `config.model.*` fields are the factory's keyword arguments; the trainer
adds `mode` itself. Fields named `dtype` or `*_dtype` may be given as strings
(`'bfloat16'`). `terraflax.models.spec.ModelSpec` resolves and checks them
(its `ModelSpecError` surfaces here as a `ConfigError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from terraflax import cli
from terraflax import rng as rng_lib
from terraflax.data import sources as data_sources
from terraflax.models import spec as spec_lib
from terraflax.train import data as data_lib
from terraflax.train import optimizers
from terraflax.train import pruning as pruning_lib
from terraflax.train import sharding as sharding_lib

_REQUIRED = object()


class ConfigError(ValueError):
  """A config field is unknown, has the wrong type or value, or conflicts with another."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its type, default (`_REQUIRED` if none) and a value check."""

  kind: type | tuple[type, ...]
  default: Any = _REQUIRED
  check: Callable[[Any], bool] | None = None
  expect: str = ''  # What `check` wants, for the error message.


def _positive(v):
  return v > 0


def _non_negative(v):
  return v >= 0


def _fraction(v):
  return 0.0 <= v < 1.0


def _one_of(*choices):
  return Field(str, choices[0], lambda v: v in choices, f'one of {choices}')


def _regex(v):
  try:
    re.compile(v)
  except re.error:
    return False
  return True


SCHEMA: dict[str, Field] = {
    'seed': Field(int, 0, _non_negative, 'a non-negative int'),
    # A workdir whose latest checkpoint initialises the parameters it shares (by path and shape)
    # with this model; the others start fresh. Ignored when resuming this run's own checkpoint.
    'init_from': Field(str, ''),
    # data
    'data.name': Field(str, _REQUIRED, lambda v: v in data_lib.DATASETS,
                       f'one of {data_lib.DATASETS}'),
    'data.seq_len': Field(int, _REQUIRED, _positive, 'a positive int'),
    'data.path': Field(str, ''),
    'data.glob': Field(str, '*'),
    'data.eval_fraction': Field((int, float), 0.05, _fraction, 'in [0, 1)'),
    'data.test_fraction': Field((int, float), 0.0, _fraction, 'in [0, 1)'),
    'data.vocab_size': Field(int, 0, _non_negative, 'a non-negative int'),
    'data.eval_examples': Field(int, 256, _positive, 'a positive int'),
    'data.min_len': Field(int, 1, _positive, 'a positive int'),
    'data.max_len': Field(int, 0, _non_negative, 'a non-negative int'),
    'data.max_depth': Field(int, 10, _positive, 'a positive int'),
    'data.max_args': Field(int, 10, lambda v: v >= 2, 'an int >= 2'),
    'data.n_classes': Field(int, 2, lambda v: v >= 2, 'an int >= 2'),
    'data.num_threads': Field(int, 1, _positive, 'a positive int'),
    'data.mask_rate': Field((int, float), 0.15, lambda v: 0.0 < v < 1.0,
                            'a number in (0, 1)'),
    'data.classes': Field((tuple, list), ()),
    # data.name='text' (terraflax/data/): path and eval_path are comma-separated files,
    # directories or globs (or a directory made by `python -m terraflax.data prepare`).
    'data.format': Field(str, 'auto', lambda v: v in data_sources.FORMATS,
                         f'one of {data_sources.FORMATS}'),
    'data.field': Field(str, 'text', bool, 'a non-empty str'),  # JSON Lines field, Parquet column.
    'data.eval_path': Field(str, ''),  # Evaluation documents ('': data.eval_fraction of path's).
    'data.pack': Field(bool, False),  # Pack documents into rows with segment_ids/positions.
    # 'bytes', a SentencePiece model / HF tokenizer.json, or 'train' (a SentencePiece model of
    # tokenizer_vocab_size ids trained on the training documents on first use, kept in the workdir).
    'data.tokenizer': Field(str, 'bytes', bool, "'bytes', a tokenizer file or 'train'"),
    'data.tokenizer_vocab_size': Field(int, 4096, _positive, 'a positive int'),
    'data.utf8_errors': Field(str, 'error', lambda v: v in data_sources.UTF8_ERRORS,
                              f'one of {data_sources.UTF8_ERRORS}'),
    'data.num_workers': Field(int, 0, _non_negative, 'a non-negative int (0: in-process)'),
    # data.name='retrieval': keys defined per sequence, queries (0: n_pairs), the key, value
    # and filler alphabets (data.py, retrieval_example).
    'data.n_pairs': Field(int, 64, _positive, 'a positive int'),
    'data.n_queries': Field(int, 0, _non_negative, 'a non-negative int (0: data.n_pairs)'),
    'data.n_keys': Field(int, 64, _positive, 'a positive int'),
    'data.n_values': Field(int, 16, lambda v: v >= 2, 'an int >= 2'),
    'data.n_filler': Field(int, 1, _positive, 'a positive int'),
    # train
    'train.steps': Field(int, _REQUIRED, _positive, 'a positive int'),
    'train.batch_size': Field(int, _REQUIRED, _positive, 'a positive int'),
    'train.grad_accum_steps': Field(int, 1, _positive, 'a positive int'),
    # An LM's head and loss run this many positions at a time, never holding the whole
    # (batch, length, vocab) logits (long contexts; steps.make_train_step); 0: all at once.
    'train.loss_chunk_len': Field(int, 0, _non_negative, 'a non-negative int (0: whole logits)'),
    'train.log_every': Field(int, 100, _positive, 'a positive int'),
    'train.eval_every': Field(int, 1000, _positive, 'a positive int'),
    'train.eval_batches': Field(int, 10, lambda v: v > 0 or v == -1, 'a positive int or -1 (all)'),
    'train.checkpoint_every': Field(int, 1000, _positive, 'a positive int'),
    'train.keep_checkpoints': Field(int, 3, _positive, 'a positive int'),
    'train.async_checkpoints': Field(bool, True),
    # eval/loss_by_position/<first>-<last>: the eval loss in this many equal buckets of the
    # position (within its document when packed) over data.seq_len; 0: not logged (LMs only).
    'train.eval_position_buckets': Field(int, 0, _non_negative, 'a non-negative int'),
    # Peak FLOP/s of one device, for train/mfu (model FLOPs utilisation); 0: the backend's
    # entry in trainer.PEAK_FLOPS (cpu 180e9, float32), no MFU for a backend not listed.
    'train.peak_flops': Field((int, float), 0.0, _non_negative, 'a non-negative number'),
    # Divergence guard (`guard.py`): a logged train loss above divergence_factor x the best of
    # the last divergence_window logs, or above divergence_bound (0: off), is a loud warning and
    # `train/diverging: 1` in metrics.jsonl; stop_on_divergence also stops the run.
    'train.divergence_factor': Field((int, float), 1e3, lambda v: v > 1, 'a number > 1'),
    'train.divergence_window': Field(int, 10, _positive, 'a positive int'),
    'train.divergence_bound': Field((int, float), 0.0, _non_negative,
                                    'a non-negative number (0: off)'),
    'train.stop_on_divergence': Field(bool, False),
    # optimizer
    'optimizer.name': _one_of('adam', 'adamw', 'adafactor', 'sgd'),
    'optimizer.learning_rate': Field((int, float), 1e-3, _positive, 'a positive number'),
    'optimizer.warmup_steps': Field(int, 0, _non_negative, 'a non-negative int'),
    'optimizer.decay': _one_of('constant', 'rsqrt', 'cosine'),
    'optimizer.final_lr_fraction': Field((int, float), 0.0, lambda v: 0.0 <= v <= 1.0, 'in [0, 1]'),
    'optimizer.b1': Field((int, float), 0.9, lambda v: 0.0 <= v < 1.0, 'in [0, 1)'),
    'optimizer.b2': Field((int, float), 0.98, lambda v: 0.0 <= v < 1.0, 'in [0, 1)'),
    'optimizer.eps': Field((int, float), 1e-9, _positive, 'a positive number'),
    'optimizer.momentum': Field((int, float), 0.0, lambda v: 0.0 <= v < 1.0, 'in [0, 1)'),
    'optimizer.weight_decay': Field((int, float), 0.0, _non_negative, 'a non-negative number'),
    'optimizer.grad_clip': Field((int, float), 0.0, _non_negative,
                                 'a non-negative number (0: off)'),
    # A regex searched in each parameter path ('Repeat_3/.../prefix_key'): only matching
    # parameters are trained, the others stay frozen ('' : train everything).
    'optimizer.trainable': Field(str, '', _regex, 'a valid regular expression'),
    # Magnitude pruning (`pruning.py`): masks in the optimizer state, pruned weights exactly 0.
    'pruning.method': _one_of(*pruning_lib.METHODS),  # 'none' or 'magnitude'.
    'pruning.scope': _one_of(*pruning_lib.SCOPES),  # One threshold for all, or per parameter.
    'pruning.sparsity': Field((int, float), 0.5, _fraction, 'in [0, 1)'),  # Final sparsity.
    # The schedule's first and last train steps (equal: one-shot), steps between mask updates,
    # and its exponent (3: Zhu & Gupta's cubic).
    'pruning.start_step': Field(int, 0, _non_negative, 'a non-negative int'),
    'pruning.end_step': Field(int, 0, _non_negative, 'a non-negative int'),
    'pruning.frequency': Field(int, 100, _positive, 'a positive int'),
    'pruning.power': Field(int, 3, _positive, 'a positive int'),
    # A regex searched in each parameter path: which ones are pruned (default: the dense
    # kernels of attention and feed-forward blocks; not embeddings, norms or biases).
    'pruning.params': Field(str, pruning_lib.DEFAULT_PARAMS, _regex, 'a valid regular expression'),
    # Knowledge distillation from a trained teacher (a workdir; '' : no teacher).
    'distill.teacher_workdir': Field(str, ''),
    'distill.temperature': Field((int, float), 2.0, _positive, 'a positive number'),
    'distill.alpha': Field((int, float), 0.5, lambda v: 0.0 <= v <= 1.0, 'in [0, 1]'),
    # sharding and multi-process start
    'sharding.fsdp': Field(int, 1, _positive, 'a positive int'),
    'sharding.tensor_parallel': Field(int, 1, _positive, 'a positive int'),
    # Deprecated alias of tensor_parallel (0: unset); old config.json files hold 1.
    'sharding.model_parallel': Field(int, 0, _non_negative, 'a non-negative int (0: unset)'),
    'sharding.logical_axis_rules': Field((tuple, list), ()),
    'distributed.initialize': Field(bool, False),
    'distributed.coordinator_address': Field(str, ''),
    'distributed.num_processes': Field(int, 0, _non_negative, 'a non-negative int (0: auto)'),
    'distributed.process_id': Field(int, -1, lambda v: v >= -1, 'an int >= -1 (-1: auto)'),
    # Eval-only (`eval_only.py`): score a workdir's checkpoint and train nothing. Any field
    # below set away from its default asks for it; the LSH fields override the trained model's.
    'eval.only': Field(bool, False),
    'eval.step': Field(int, 0, _non_negative, 'a non-negative int (0: the latest checkpoint)'),
    # 'full': every LSH layer as full shared-QK attention (n_buckets=1, one chunk of seq_len).
    'eval.attention': _one_of('', 'lsh', 'full'),
    'eval.n_hashes': Field(int, 0, _non_negative, 'a non-negative int (0: as trained)'),
    'eval.n_buckets': Field(int, 0, lambda v: v in (-1, 0, 1) or (v > 0 and v % 2 == 0),
                            "0 (as trained), -1 (Trax's rule from the length), 1 or a positive "
                            'even int'),
    'eval.chunk_len': Field(int, 0, _non_negative, 'a non-negative int (0: as trained)'),
    'eval.n_chunks_before': Field(int, -1, lambda v: v >= -1, 'an int >= -1 (-1: as trained)'),
    # a decoded sample at the end of training (LM tasks)
    'sample.prompt': Field(str, ''),
    'sample.max_new_tokens': Field(int, 0, _non_negative, 'a non-negative int (0: no sample)'),
    'sample.temperature': Field((int, float), 1.0, _non_negative, 'a non-negative number'),
}
SECTIONS = ('seed', 'init_from', 'model', 'data', 'train', 'optimizer', 'distill', 'sharding',
            'distributed', 'sample', 'eval', 'pruning')
_KIND_NAMES = {int: 'int', float: 'float', str: 'str', bool: 'bool', tuple: 'tuple', list: 'list'}


def _kind_name(kind):
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if kinds == (int, float):
    return 'number'
  return ' or '.join(_KIND_NAMES.get(k, k.__name__) for k in kinds)


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict) and value and path.split('.')[0] != 'model':
      out.update(_flatten(value, path + '.'))
    elif isinstance(value, dict) and path == 'model':
      out.update(_flatten(value, 'model.'))
    else:
      out[path] = value
  return out


def _suggest(name: str, valid) -> str:
  close = difflib.get_close_matches(name, list(valid), n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''


def check_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Schema check of every field but `model.*`; returns a copy with defaults filled in."""
  flat = _flatten(config.to_dict())
  for path in flat:
    section = path.split('.')[0]
    if section not in SECTIONS:
      raise ConfigError(f'config.{section} is not a config section{_suggest(section, SECTIONS)}; '
                        f'valid sections: {", ".join(SECTIONS)}.')
    if section != 'model' and path not in SCHEMA:
      siblings = sorted(p for p in SCHEMA if p.startswith(section + '.'))
      raise ConfigError(f'config.{path} is not a known field{_suggest(path, siblings)}; valid '
                        f'{section} fields: {", ".join(s.split(".", 1)[1] for s in siblings)}.')
  resolved = {}
  for path, field in SCHEMA.items():
    if path not in flat:
      if field.default is _REQUIRED:
        raise ConfigError(f'config.{path} is required ({_kind_name(field.kind)}).')
      resolved[path] = field.default
      continue
    value = flat[path]
    if isinstance(value, bool) and bool not in (field.kind if isinstance(field.kind, tuple)
                                                else (field.kind,)):
      ok = False
    else:
      ok = isinstance(value, field.kind)
    if not ok or (field.check is not None and not field.check(value)):
      raise ConfigError(f'config.{path} must be {_wanted(field)}, got {value!r}.')
    resolved[path] = value
  if 'model.name' not in flat:
    raise ConfigError('config.model.name is required: a factory in terraflax.models '
                      "(e.g. 'TransformerLM') or 'package.module:Factory'.")
  out = ml_collections.ConfigDict()
  for path, value in resolved.items():
    cli.set_field(out, path, value)
  out.model = ml_collections.ConfigDict(config.model.to_dict())
  return out


def _wanted(field: Field) -> str:
  """'a positive int', 'a number in [0, 1)', "one of ('adam', ...)", 'a str'."""
  kind = _kind_name(field.kind)
  if field.expect.startswith('one of'):
    return field.expect
  if field.expect.startswith('in ['):
    return f'a {kind} {field.expect}'
  if field.expect:
    return field.expect
  return ('an ' if kind[0] in 'aeiou' else 'a ') + kind


def check_combinations(config, n_devices: int, n_processes: int = 1) -> None:
  """Cross-field checks that need no model and no data."""
  t, o, d = config.train, config.optimizer, config.data
  if d.eval_fraction + d.test_fraction >= 1.0:
    raise ConfigError(f'config.data.eval_fraction + data.test_fraction must be < 1, got '
                      f'{d.eval_fraction} + {d.test_fraction}.')
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'config.train.batch_size={t.batch_size} must be divisible by '
                      f'train.grad_accum_steps={t.grad_accum_steps}.')
  if t.batch_size % n_processes:
    raise ConfigError(f'config.train.batch_size={t.batch_size} must be divisible by the '
                      f'{n_processes} processes.')
  with sharding_errors():
    sharding_lib.check_rules(config.sharding.logical_axis_rules)
    sizes = sharding_lib.mesh_shape(config.sharding, n_devices)
    sharding_lib.check_batch(t.batch_size, t.grad_accum_steps, sizes, n_processes)
  if o.weight_decay and o.name == 'adam':
    raise ConfigError('config.optimizer.weight_decay is not applied by adam; use '
                      "optimizer.name='adamw' (decoupled weight decay) or set weight_decay=0.")
  if o.decay == 'cosine' and o.warmup_steps >= t.steps:
    raise ConfigError(f'config.optimizer.warmup_steps={o.warmup_steps} must be < train.steps='
                      f'{t.steps} for cosine decay.')
  if d.name in ('duplication', 'reverse') and d.vocab_size < 2:
    raise ConfigError(f'config.data.vocab_size must be >= 2 for {d.name}, got {d.vocab_size}.')
  vocab = config.model.get('vocab_size') if 'model' in config else None
  if (d.name == 'text' and d.tokenizer == 'train' and isinstance(vocab, int)
      and vocab < d.tokenizer_vocab_size):  # Before spending time training the tokenizer.
    raise ConfigError(f'config.model.vocab_size={vocab} is smaller than '
                      f'data.tokenizer_vocab_size={d.tokenizer_vocab_size} (the tokenizer '
                      "data.tokenizer='train' makes); make them equal.")
  check_pruning(config.pruning, t.steps)
  if d.name == 'listops' and d.max_len == 0:
    raise ConfigError('config.data.max_len must be set (> 0) for listops: the longest '
                      'expression in tokens.')


def check_pruning(p, train_steps: int) -> None:
  """`config.pruning`'s schedule: start <= end <= train.steps, a sparsity to reach."""
  if p.method == 'none':
    return
  if p.end_step < p.start_step:
    raise ConfigError(f'config.pruning.end_step={p.end_step} must be >= pruning.start_step='
                      f'{p.start_step} (equal: one-shot pruning).')
  if p.end_step > train_steps:
    raise ConfigError(f'config.pruning.end_step={p.end_step} must be <= train.steps='
                      f'{train_steps}, or the target sparsity is never reached.')
  if p.sparsity <= 0:
    raise ConfigError(f'config.pruning.sparsity must be in (0, 1) with pruning.method='
                      f"{p.method!r}, got {p.sparsity!r}; use method='none' for no pruning.")


def check_pruned_params(p, params) -> None:
  """`config.pruning.params` must select at least one parameter when pruning."""
  if p.method == 'none':
    return
  if not any(jax.tree_util.tree_leaves(pruning_lib.selected(params, p.params))):
    paths = param_paths(params)
    raise ConfigError(f'config.pruning.params={p.params!r} matches no parameter path; paths '
                      f'look like {", ".join(repr(x) for x in paths[:3])}, ...')


# ----------------------------------------------------------------------------- model


@contextlib.contextmanager
def sharding_errors():
  """`with sharding_errors():` re-raises `sharding.ShardingError` as a `ConfigError`."""
  try:
    yield
  except sharding_lib.ShardingError as e:
    raise ConfigError(str(e)) from None


@contextlib.contextmanager
def model_errors():
  """`with model_errors():` re-raises the model spec's `ModelSpecError` as a `ConfigError`."""
  try:
    yield
  except spec_lib.ModelSpecError as e:
    raise ConfigError(str(e)) from None


def model_spec(config) -> spec_lib.ModelSpec:
  """`ModelSpec.from_config(config)`, raising `ConfigError`."""
  with model_errors():
    return spec_lib.ModelSpec.from_config(config)


def check_model_against_data(config, info: data_lib.DataInfo, kwargs) -> None:
  """Vocabulary, classes and length the model was given against what the data needs."""
  vocab = kwargs.get('vocab_size')
  if isinstance(vocab, int) and vocab < info.vocab_size:
    of = (f'data.tokenizer={config.data.tokenizer!r}' if config.data.name == 'text' else
          f'data.name={config.data.name!r}')
    raise ConfigError(f'config.model.vocab_size={vocab} is smaller than the vocabulary of {of} '
                      f'({info.vocab_size} ids); set config.model.vocab_size >= '
                      f'{info.vocab_size}.')
  max_len = kwargs.get('max_len')
  if isinstance(max_len, int) and max_len < config.data.seq_len:
    raise ConfigError(f'config.model.max_len={max_len} is shorter than '
                      f'config.data.seq_len={config.data.seq_len}.')
  n_classes = kwargs.get('n_classes')
  if info.task == 'classification' and isinstance(n_classes, int) and n_classes != info.n_classes:
    raise ConfigError(f'config.model.n_classes={n_classes} must equal the {info.n_classes} '
                      f'classes of data.name={config.data.name!r}.')


def trace_model(config, spec: spec_lib.ModelSpec, info: data_lib.DataInfo) -> Any:
  """Builds the model and traces `init` and `apply` abstractly; returns the abstract variables.

  Any error the model raises for this shape is re-raised as a `ConfigError`
  naming `config.model.*` and `config.data.seq_len`.
  """
  micro_batch = config.train.batch_size // config.train.grad_accum_steps
  shape = (micro_batch, config.data.seq_len)
  try:
    model = spec.build('train')
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'config.model (name={config.model.name!r}) was rejected by its factory: '
                      f'{type(e).__name__}: {e}') from e
  try:  # Abstract: nothing is computed or compiled.
    variables = spec.abstract_variables(*shape, model=model)
    noise = rng_lib.abstract_keys(rng_lib.NOISE_STREAMS)
    logits = jax.eval_shape(lambda v, x, k: model.apply(v, *x, rngs=k), variables,
                            spec.abstract_inputs(*shape), noise)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'config.model.* (name={config.model.name!r}) cannot take inputs of '
                      f'shape {shape} (train.batch_size/grad_accum_steps, '
                      f'config.data.seq_len={config.data.seq_len}): {type(e).__name__}: {e}') from e
  if info.task in ('lm', 'seq2seq', 'mlm'):
    want = shape + (spec.kwargs.get('vocab_size', '?'),)
    ok = (logits.ndim == 3 and logits.shape[:2] == shape and logits.shape[2] >= info.vocab_size)
  else:
    want = (micro_batch, info.n_classes)
    ok = logits.shape == want
  if not ok:
    raise ConfigError(f'config.model (name={config.model.name!r}) returns logits of shape '
                      f'{tuple(logits.shape)} for inputs {shape}; data.name='
                      f'{config.data.name!r} needs {want}.')
  return variables


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A validated config with what it resolved to."""

  config: ml_collections.ConfigDict  # Complete: defaults filled in.
  spec: spec_lib.ModelSpec
  data: data_lib.Data
  abstract_variables: Any  # Boxed abstract init at the micro-batch shape (`trace_model`).


def validate_config(config, *, n_devices: int | None = None, n_processes: int | None = None,
                    fields_checked: bool = False, workdir: str | None = None) -> Experiment:
  """Checks `config` completely, before compiling anything; raises one `ConfigError`.

  `workdir`: the run's, whose stored tokenizer data.tokenizer='train' reuses.

  `fields_checked`: `config` is already `check_fields`' result (the trainer
  checks the fields first to start the processes), so it is not checked again.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'config must be an ml_collections.ConfigDict, got {type(config).__name__}.')
  if not fields_checked:
    config = check_fields(config)
  check_combinations(config, jax.device_count() if n_devices is None else n_devices,
                     jax.process_count() if n_processes is None else n_processes)
  spec = model_spec(config)
  try:
    data = data_lib.make_data(config.data, config.seed, workdir=workdir)
  except data_lib.DataError as e:
    raise ConfigError(str(e)) from None
  if data.n_eval_batches(config.train.batch_size) == 0:
    field = ('data.eval_fraction' if config.data.name in ('bytes', 'text') else
             'data.eval_examples' if not config.data.path else 'data.path')
    raise ConfigError(f'config.{field}={config.data[field.split(".")[1]]!r} leaves '
                      f'{len(data.eval)} evaluation examples, fewer than one batch of '
                      f'train.batch_size={config.train.batch_size}.')
  check_model_against_data(config, data.info, spec.kwargs)
  if config.sample.max_new_tokens and data.info.task != 'lm':
    raise ConfigError('config.sample.max_new_tokens must be 0 unless the task is a language '
                      f'model (data.name={config.data.name!r} is {data.info.task}).')
  variables = trace_model(config, spec, data.info)
  with sharding_errors():
    sharding_lib.check_variables(
        variables['params'], sharding_lib.mesh_shape(config.sharding, jax.device_count()
                                                     if n_devices is None else n_devices),
        sharding_lib.axis_rules(config.sharding), config.model)
  check_trainable(config.optimizer.trainable, nn.meta.unbox(variables['params']))
  check_pruned_params(config.pruning, nn.meta.unbox(variables['params']))
  for field, workdir in (('init_from', config.init_from),
                         ('distill.teacher_workdir', config.distill.teacher_workdir)):
    if workdir and not os.path.isdir(os.path.join(os.path.expanduser(workdir), 'checkpoints')):
      raise ConfigError(f'config.{field}={workdir!r} is not a training workdir (it has no '
                        'checkpoints/ directory).')
  return Experiment(config, spec, data, variables)


def param_paths(params) -> list[str]:
  """'Repeat_3/Serial_0/.../kernel' for every parameter leaf, in tree order."""
  return [optimizers.path_name(path)  # Boxed (logically partitioned) trees too.
          for path, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]]


def check_trainable(pattern: str, params) -> None:
  """`config.optimizer.trainable` must select at least one parameter when set."""
  if not pattern:
    return
  if not optimizers.count_trained(params, pattern):
    paths = param_paths(params)
    raise ConfigError(f'config.optimizer.trainable={pattern!r} matches no parameter path; paths '
                      f'look like {", ".join(repr(p) for p in paths[:3])}, ...')


def load_sibling(this_file: str, name: str) -> ml_collections.ConfigDict:
  """`get_config()` of `name`.py beside `this_file`: how a variant config imports its base."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_terraflax_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
