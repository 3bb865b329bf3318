"""Eval-only runs: score a workdir's checkpoint, optionally with other LSH settings.

  python -m terraflax.train --config=configs/duplication.py --workdir=DIR \\
      --config.eval.n_hashes=8

`python -m terraflax.train` trains nothing and only evaluates
(`evaluate_checkpoint`) when `eval.only=True` or any other `eval.*` field is
set away from its default:

  eval.step             the checkpoint to score (0: the latest)
  eval.attention        '' (as trained), 'lsh', or 'full': every LSH layer
                        becomes full shared-QK attention (below)
  eval.n_hashes         hash rounds (0: as trained)
  eval.n_buckets        buckets per round (0: as trained, -1: Trax's rule
                        from the length, 1: no hashing, or an even count)
  eval.chunk_len        LSH chunk length (0: as trained)
  eval.n_chunks_before  chunks each chunk also attends to (-1: as trained)

'full' rests on an identity: LSH attention with one bucket, one round and one
chunk covering the whole sequence (n_buckets=1, n_hashes=1,
chunk_len=data.seq_len, no neighbouring chunks) is exactly full shared-QK
attention, with LSH's rule that a token sees itself only when nothing else
is visible. So a model trained with LSH can be scored with full attention
and vice versa, on the same parameters. The fields replace those of every
LSH spec in the model's attention arguments (`attention`, `encoder_attention`,
...: ReformerLM, TerraformerLM or any factory taking specs); other kinds stay
as trained. Layers that are already full attention (`{'kind': 'full'}`:
separate queries and keys) have no LSH form; asking a model without LSH
layers for LSH settings is an error.

The model is the one the checkpoint was trained as: `config.model.*` must
equal the workdir's `config.json` (change the attention with `eval.*`). The
evaluation set is `config.data`'s, with `train.eval_batches` batches of
`train.batch_size`, and the same hashing noise per batch as the trainer's
evaluations, so `eval.only=True` reproduces the last logged `eval/*` numbers.
Nothing in the workdir is written but one JSON line appended to
`WORKDIR/eval_results.jsonl`: the checkpoint step, the effective LSH
settings, the overrides and `eval/loss`, `eval/accuracy`.
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import ml_collections

from terraflax import workdir as workdir_lib
from terraflax.models import attention as attn
from terraflax.models import spec as spec_lib
from terraflax.train import config as config_lib
from terraflax.train import evaluation
from terraflax.train import sharding as sharding_lib

RESULTS_FILE = 'eval_results.jsonl'
LSH_FIELDS = ('n_hashes', 'n_buckets', 'chunk_len', 'n_chunks_before')
DEFAULTS = {name: config_lib.SCHEMA[f'eval.{name}'].default
            for name in ('only', 'step', 'attention') + LSH_FIELDS}


def requested(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` (as given, or with defaults filled in) asks for an eval-only run."""
  fields = config.get('eval', None) or {}
  return any(fields.get(name, default) != default for name, default in DEFAULTS.items())


def lsh_changes(config: ml_collections.ConfigDict) -> dict:
  """The LSH spec fields `config.eval.*` replaces: {'n_hashes': 8, ...} ({} when none)."""
  e = config.eval
  if e.attention == 'full':
    clash = [f'eval.{name}' for name in LSH_FIELDS if e[name] != DEFAULTS[name]]
    if clash:
      raise config_lib.ConfigError(
          f"config.eval.attention='full' sets the LSH fields itself (one bucket, one round, one "
          f'chunk of data.seq_len); do not also set config.{", config.".join(clash)}.')
    return attn.full_as_lsh(config.data.seq_len)
  out = {}
  if e.n_hashes:
    out['n_hashes'] = e.n_hashes
  if e.n_buckets:
    out['n_buckets'] = None if e.n_buckets == -1 else e.n_buckets
  if e.chunk_len:
    out['chunk_len'] = e.chunk_len
  if e.n_chunks_before >= 0:
    out['n_chunks_before'] = e.n_chunks_before
  return out


def _lsh_arguments(factory, kwargs: dict) -> dict:
  """{argument: its specs} of the attention arguments holding LSH specs (given or default)."""
  parameters = spec_lib.factory_parameters(factory) or {}
  values = {name: p.default for name, p in parameters.items()
            if 'attention' in name and p.default is not p.empty}
  values.update({k: v for k, v in kwargs.items() if 'attention' in k})
  out = {}
  for name, value in values.items():
    try:
      specs = attn.specs_from(value, where=f'config.model.{name}')
    except ValueError:
      continue  # Not a spec (e.g. attention_dropout).
    if any(isinstance(spec, attn.LSH) for spec in specs):
      out[name] = value
  return out


def lsh_overrides(config: ml_collections.ConfigDict, factory, trained: dict) -> dict:
  """The model arguments `config.eval.*` changes: each attention spec argument holding LSH
  specs, with `lsh_changes` replacing the fields of every LSH spec in it."""
  changes = lsh_changes(config)
  if not changes and config.eval.attention != 'lsh':
    return {}
  arguments = _lsh_arguments(factory, trained)
  if not arguments:
    given = {k: v for k, v in trained.items() if 'attention' in k and k != 'attention_dropout'}
    raise config_lib.ConfigError(
        f'config.eval.{", config.eval.".join(sorted(changes)) if changes else "attention"} asks '
        f'for other LSH attention settings, but {config.model.name} has no '
        f'LSH layer (attention: {given or "its default"}); full attention has separate queries '
        "and keys and no LSH form. Train with attention={'kind': 'lsh', ...} (n_buckets=1 and "
        'chunk_len=data.seq_len give full shared-QK attention) to compare attentions on the '
        'same parameters.')
  out = {name: attn.replace_lsh(value, **changes) for name, value in arguments.items()}
  if config.eval.attention == 'lsh' and any(
      spec.n_buckets == 1 for value in out.values() for spec in attn.specs_from(value)
      if isinstance(spec, attn.LSH)):
    raise config_lib.ConfigError(
        "config.eval.attention='lsh' but the trained model has n_buckets=1 (no hashing: full "
        'shared-QK attention); set config.eval.n_buckets (-1: Trax\'s rule from the length) '
        'and config.eval.chunk_len for hashed attention.')
  return out if changes else {}


def effective_settings(factory, kwargs: dict) -> dict:
  """`LSH_FIELDS` of the model's first LSH spec ({} without one)."""
  for value in _lsh_arguments(factory, kwargs).values():
    spec = next(s for s in attn.specs_from(value) if isinstance(s, attn.LSH))
    return {name: getattr(spec, name) for name in LSH_FIELDS}
  return {}


def _check_same_model(config, workdir: str) -> None:
  try:
    stored = workdir_lib.read_config(workdir)
  except FileNotFoundError as e:
    raise config_lib.ConfigError(f'eval-only: {e}') from None
  given = json.loads(ml_collections.ConfigDict(config.model.to_dict()).to_json_best_effort())
  trained = stored.get('model', ml_collections.ConfigDict()).to_dict()
  for key in sorted(set(given) | set(trained)):
    if given.get(key, '<unset>') != trained.get(key, '<unset>'):
      raise config_lib.ConfigError(
          f'config.model.{key}={given.get(key, "<unset>")!r} differs from the trained model\'s '
          f'{trained.get(key, "<unset>")!r} ({os.path.join(workdir, workdir_lib.CONFIG_FILE)}): '
          'eval-only scores the model as it was trained, so pass the same config.model.* '
          'fields and change the attention with config.eval.*.')


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """Scores a checkpoint of `workdir` as `config.eval` says; returns {'eval/loss', ...}.

  Raises `ConfigError` before anything compiles when the workdir has no such
  checkpoint, the model differs from the trained one, or the overrides do
  not fit the model. Appends the result to `WORKDIR/eval_results.jsonl`.
  """
  began = time.time()
  experiment = config_lib.validate_config(config, workdir=workdir)
  config, data = experiment.config, experiment.data
  _check_same_model(config, workdir)
  manager = workdir_lib.make_manager(workdir, read_only=True, async_save=False)
  steps = list(manager.all_steps())
  manager.close()
  if not steps:
    raise config_lib.ConfigError(f'eval-only: {workdir_lib.checkpoint_dir(workdir)} holds no '
                                 'checkpoint to evaluate.')
  step = config.eval.step or max(steps)
  if step not in steps:
    raise config_lib.ConfigError(f'config.eval.step={step} is not a checkpoint of {workdir}; '
                                 f'it has steps {sorted(steps)}.')
  trained = dict(experiment.spec.kwargs)
  overrides = lsh_overrides(config, experiment.spec.factory, trained)
  spec = experiment.spec.with_kwargs(**overrides)
  kwargs = dict(spec.kwargs)
  try:
    config_lib.trace_model(config, spec, data.info)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f'with the config.eval.* overrides {lsh_changes(config)}: '
                                 f'{e}') from None

  # The latest step falls back to the newest intact one (reported) if it is damaged.
  _, params, step = workdir_lib.load_params(
      workdir, config.eval.step or None, nn.meta.unbox(experiment.abstract_variables['params']))
  mesh = sharding_lib.mesh_from_config(config.sharding)
  replicated = sharding_lib.replicated(mesh)
  params = jax.device_put(params, replicated)
  buckets = config.train.eval_position_buckets
  eval_step = evaluation.jit_eval_step(spec.build('eval'), spec.task, replicated,
                                       by_position=bool(buckets))
  with jax.set_mesh(mesh):
    result = evaluation.evaluate_params(eval_step, data, params,
                                        batch_size=config.train.batch_size,
                                        n_batches=config.train.eval_batches, mesh=mesh,
                                        position_buckets=buckets)
  settings = effective_settings(experiment.spec.factory, kwargs)
  label = ('full' if config.eval.attention == 'full' else
           f'lsh-{settings["n_hashes"]}' if overrides and 'n_hashes' in settings else 'as trained')
  record = {'step': int(step), 'attention': label, 'model': settings,
            'overrides': lsh_changes(config) if overrides else {}, **result}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULTS_FILE), 'a', encoding='utf-8') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    print(f'terraflax.train: eval-only, checkpoint {step} of {workdir} with {label} '
          f'{settings}: ' + ', '.join(f'{k[5:]} {v:.4f}' for k, v in sorted(result.items()))
          + f' ({time.time() - began:.0f}s); appended to {RESULTS_FILE}.', flush=True)
  return result
