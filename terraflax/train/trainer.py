"""The training loop: `train_and_evaluate(config, workdir)`.

It reads top to bottom:

  _set_up           validate the config, load the teacher, `prepare_workdir`
                    (mkdir, config.json, checkpoint manager, start step, restore),
                    the data iterator, the metrics writer, the step functions
  _loop             per step: `_one_step`, then `_train_scalars` (log),
                    `_evaluate` (eval), `_save` (checkpoint), SIGTERM
  _finish           the summary line and the end-of-training sample

The step itself (`steps.make_train_step`), evaluation (`evaluation.py`), the
state and its initialisation (`state.py`) and SIGTERM (`preemption.py`) live
in their own modules. The first step lowers and compiles the train step once
(`steps.compile_train_step`); its FLOPs from XLA's cost analysis give
`train/mfu`, the model FLOPs utilisation, logged beside `tokens_per_sec`.

Transfer and partial training, for any model:
  init_from              start from another workdir's parameters, matched by
                         path (`checkpoint.load_matching_params`); fresh rest
  optimizer.trainable    train only the matching parameters; the others stay
                         bit-identical (`optimizers.freeze_unmatched`), and
                         their gradients are not computed (prefix tuning's
                         step: 1.29x faster, 25% fewer flops)
  distill.*              learn from a teacher's softened logits (`distill.py`)
  pruning.*              magnitude pruning, one-shot or gradual, masks in the
                         optimizer state (`pruning.py`); train/sparsity logged
The parameter counts (total, trained) are printed and written to
`WORKDIR/parameters.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from terraflax import decoding
from terraflax import tokenizer as tokenizer_lib
from terraflax import workdir as workdir_lib
from terraflax.train import checkpoint as ckpt
from terraflax.train import config as config_lib
from terraflax.train import distill as distill_lib
from terraflax.train import eval_only
from terraflax.train import guard as guard_lib
from terraflax.train import metrics as metrics_lib
from terraflax.train import optimizers
from terraflax.train import preemption
from terraflax.train import pruning as pruning_lib
from terraflax.train import sharding as sharding_lib
from terraflax.train import state as state_lib
from terraflax.train import steps as steps_lib
from terraflax.train.evaluation import evaluate_params, jit_eval_step, normalise
from terraflax.train.state import TrainState as TrainState  # Re-exported with make_train_step.
from terraflax.train.steps import make_train_step as make_train_step


class TrainingDivergedError(FloatingPointError):
  """The loss or the parameters became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Prepared:
  """What `prepare_workdir` found in (or made of) the workdir."""

  manager: Any  # orbax CheckpointManager over WORKDIR/checkpoints.
  start: int  # The step to resume after (0: a fresh run).
  state: TrainState  # Restored, or fresh.
  pending: Any  # Metric sums since the last log (restored with the state).
  data_state: dict | None  # The train iterator's state to restore, if resuming.
  init_report: dict | None  # What init_from loaded (fresh runs only).


def prepare_workdir(config, workdir: str, mesh,
                    fresh_state: Callable[[int], tuple[TrainState, dict | None]]) -> Prepared:
  """The workdir set-up of a run: check a resume, restore, then write config.json.

  The workdir's contract (README, "The workdir"): a resume whose settings
  differ from `WORKDIR/config.json` beyond `workdir.RESUMABLE_FIELDS` is
  refused before anything is written; the latest checkpoint that restores is
  used (damaged newer steps are reported and moved to `damaged_checkpoints/`,
  never deleted); only then is config.json written, atomically.
  `fresh_state(start)` gives (freshly initialised state, init_from report);
  when the workdir holds a checkpoint it is the layout it is restored into
  (`state.abstract_state`: sharded ShapeDtypeStructs, nothing allocated).
  """
  _refuse_changed_resume(config, workdir)
  t = config.train
  manager = workdir_lib.make_manager(workdir, keep=t.keep_checkpoints,
                                     async_save=t.async_checkpoints)
  start = manager.latest_step() or 0
  state, init_report = fresh_state(start)
  pending = jax.device_put(steps_lib.zero_pending(), sharding_lib.replicated(mesh))
  data_state = None
  if start:
    start, (params, opt_state, train_items, data_state) = workdir_lib.restore_with_fallback(
        manager, lambda step: ckpt.restore(
            manager, step, params=state.params, opt_state=state.opt_state,
            train={'step': state.step, 'rng': state.rng, 'pending': pending}),
        what='the training state', set_aside=jax.process_index() == 0)
    state = TrainState(step=train_items['step'], params=params, opt_state=opt_state,
                       rng=train_items['rng'])
    pending = train_items['pending']
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, config)
  return Prepared(manager, start, state, pending, data_state, init_report)


def _refuse_changed_resume(config, workdir: str) -> None:
  """`ConfigError` listing the fields that differ from a workdir's run, before any write."""
  if not (workdir_lib.has_checkpoints(workdir)
          and os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE))):
    return
  stored = workdir_lib.read_config(workdir)
  try:  # Fields added since the run began (e.g. pruning.*) take their defaults.
    stored = config_lib.check_fields(stored)
  except config_lib.ConfigError:
    pass  # Compared as stored: the conflicts list says what differs.
  conflicts = workdir_lib.resume_conflicts(stored, config)
  if conflicts:
    raise config_lib.ConfigError(
        f'{workdir} holds a run with other settings ({"; ".join(conflicts)}); resuming may '
        f'change only {", ".join(workdir_lib.RESUMABLE_FIELDS)}. Start elsewhere with a new '
        '--workdir, or fine-tune from this one with --config.init_from=' + workdir + '.')


@dataclasses.dataclass
class _Run:
  """Everything the loop reads and updates, made by `_set_up`."""

  experiment: config_lib.Experiment
  workdir: str
  mesh: Any
  rules: tuple  # Logical axis rules (`sharding.axis_rules`), active while tracing the steps.
  manager: Any
  writer: metrics_lib.MetricsWriter
  start: int
  state: TrainState
  pending: Any
  health: jax.Array  # int32 (): the first step with a non-finite loss, or -1.
  data_iter: Any
  train_step: Callable  # Jitted on the first step (`steps.compile_train_step`).
  eval_step: Callable
  schedule: Callable
  teacher_args: tuple
  began: float
  guard: guard_lib.DivergenceGuard | None = None
  compiled_step: Callable | None = None
  flops: float | None = None  # Per train step and device (XLA's cost analysis).

  @property
  def config(self):
    return self.experiment.config


class _Timer:
  """Seconds per train step, from the end of the first (compiling) step; eval excluded."""

  def __init__(self):
    self.start, self.steps, self.seconds_per_step = None, 0, 0.0

  def step_done(self, step: jax.Array) -> None:
    if self.start is None:
      jax.block_until_ready(step)
      self.start, self.steps = time.time(), 0
    else:
      self.steps += 1

  def lap(self) -> float | None:
    """Seconds per step since the last lap (None if no step was timed)."""
    timed = None
    if self.steps:
      self.seconds_per_step = timed = (time.time() - self.start) / self.steps
    self.start, self.steps = time.time(), 0
    return timed

  def exclude(self, seconds: float) -> None:
    if self.start is not None:
      self.start += seconds


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains and evaluates as `config` says, in `workdir`; returns the last logged metrics.

  Resumes from the latest checkpoint in `workdir/checkpoints` if there is one.
  SIGTERM saves a checkpoint and returns normally. A NaN/inf loss raises
  `TrainingDivergedError` and leaves the last good checkpoint in place.
  Eval-only runs (`config.eval.*`) are `eval_only.evaluate_checkpoint`'s;
  `python -m terraflax.train` chooses between the two.
  """
  # From the start: SIGTERM in set-up stops after step 1. The workdir lock is held to the end.
  with preemption.StopSignal() as stop, contextlib.ExitStack() as held:
    run = _set_up(config, workdir, held)
    try:
      last, stopped = _loop(run, stop)
    finally:
      run.manager.wait_until_finished()
      run.manager.close()
      run.writer.close()
  if not stopped:
    _finish(run, last)
  return last


def _set_up(config, workdir: str, held: contextlib.ExitStack) -> _Run:
  """Validates `config` (checking its fields once) and prepares everything the loop needs.

  The workdir lock (`workdir.WorkdirLock`, process 0) enters `held` once the
  config is valid: a second trainer on the same workdir refuses at once.
  """
  began = time.time()
  config = config_lib.check_fields(config)
  if eval_only.requested(config):
    raise config_lib.ConfigError(
        'config.eval.* asks for an eval-only run, which train_and_evaluate does not do: call '
        'terraflax.train.evaluate_checkpoint(config, workdir) (python -m terraflax.train '
        'chooses it itself).')
  sharding_lib.maybe_initialize_distributed(config.distributed)
  experiment = config_lib.validate_config(config, fields_checked=True, workdir=workdir)
  config, data, t = experiment.config, experiment.data, experiment.config.train
  mesh = sharding_lib.mesh_from_config(config.sharding)
  replicated = sharding_lib.replicated(mesh)
  if jax.process_index() == 0:
    held.enter_context(workdir_lib.WorkdirLock(workdir))
  tx, schedule = optimizers.make_optimizer(config.optimizer, t.steps)
  tx = pruning_lib.add_pruning(tx, config.pruning, experiment.abstract_variables['params'])
  teacher, teacher_params = None, None
  if config.distill.teacher_workdir:
    teacher, teacher_params = distill_lib.load_teacher(experiment)

  def fresh_state(start):
    if start:  # Restored into this layout: nothing to initialise.
      return state_lib.abstract_state(experiment, tx, mesh), None
    loaded, report = _load_init_from(experiment) if config.init_from else (None, None)
    return state_lib.initial_state(experiment, tx, mesh, loaded), report

  prepared = prepare_workdir(config, workdir, mesh, fresh_state)
  if data.tokenizer is not None and jax.process_index() == 0:
    data.tokenizer.save_to(workdir)  # The workdir decodes and exports on its own.
  data_iter = data.train_iterator(batch_size=t.batch_size, process_index=jax.process_index(),
                                  process_count=jax.process_count(),
                                  num_threads=config.data.num_threads)
  if prepared.data_state is not None:
    data_iter.set_state(prepared.data_state)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=prepared.start, total_steps=t.steps)
  _log_start(experiment, workdir, mesh, prepared, writer)
  teacher_args = ()
  if teacher is not None:
    teacher_args = (jax.device_put(teacher_params, replicated),)
    writer.info(f'Distilling from {teacher.name} in {teacher.workdir} '
                f'({state_lib.count_params(teacher_params):,} parameters; temperature '
                f'{teacher.temperature:g}, alpha {teacher.alpha:g}).')
  train_step = steps_lib.make_train_step(
      experiment.spec.build('train'), tx, grad_accum_steps=t.grad_accum_steps,
      task=experiment.spec.task, teacher=teacher, trainable=config.optimizer.trainable,
      compute_dtype=experiment.spec.kwargs.get('dtype'), loss_chunk_len=t.loss_chunk_len)
  eval_step = jit_eval_step(experiment.spec.build('eval'), experiment.spec.task, replicated,
                            by_position=bool(t.eval_position_buckets))
  return _Run(experiment=experiment, workdir=workdir, mesh=mesh,
              rules=sharding_lib.axis_rules(config.sharding), manager=prepared.manager,
              writer=writer, start=prepared.start, state=prepared.state,
              pending=prepared.pending,
              health=jax.device_put(jnp.array(-1, jnp.int32), replicated), data_iter=data_iter,
              train_step=train_step, eval_step=eval_step, schedule=schedule,
              teacher_args=teacher_args, began=began, guard=_divergence_guard(experiment))


def _divergence_guard(experiment: config_lib.Experiment) -> guard_lib.DivergenceGuard:
  """The `train.divergence_*` guard; a uniform guess's loss, log(vocab), counts as logged."""
  t, vocab = experiment.config.train, experiment.data.info.vocab_size
  return guard_lib.DivergenceGuard(
      factor=t.divergence_factor, window=t.divergence_window, bound=t.divergence_bound,
      stop=t.stop_on_divergence, baseline=math.log(vocab) if vocab and vocab > 1 else 0.0)


def _load_init_from(experiment: config_lib.Experiment):
  """(loaded params, report) of `config.init_from`, checked before anything compiles."""
  try:
    return ckpt.load_matching_params(experiment.config.init_from,
                                     nn.meta.unbox(experiment.abstract_variables['params']))
  except ckpt.InitFromError as e:
    raise config_lib.ConfigError(str(e)) from None


def _log_start(experiment, workdir: str, mesh, prepared: Prepared, writer) -> None:
  """The start lines (parameter counts, init_from, resume) and `parameters.json`."""
  config, start, report = experiment.config, prepared.start, prepared.init_report
  n_params = state_lib.count_params(prepared.state.params)
  n_trained = optimizers.count_trained(prepared.state.params, config.optimizer.trainable)
  trained = ('' if n_trained == n_params else
             f' ({n_trained:,} trained, optimizer.trainable={config.optimizer.trainable!r})')
  writer.info(f'terraflax.train: {config.model.name} with {n_params:,} parameters{trained}; '
              f'{jax.device_count()} device(s), mesh {dict(mesh.shape)}; workdir {workdir}')
  if report is not None:
    writer.info(f'Initialised {len(report["matched"])} of '
                f'{len(report["matched"]) + len(report["fresh"])} parameter arrays from '
                f'{config.init_from} (step {report["step"]}); fresh: '
                f'{", ".join(report["fresh"]) or "none"}; not used: '
                f'{", ".join(report["unused"]) or "none"}.')
  if start:
    writer.info(f'Resumed from the checkpoint at step {start}.')
  if jax.process_index() == 0 and (not start or not os.path.exists(
      os.path.join(workdir, state_lib.PARAMETERS_FILE))):  # A resumed run keeps init_from's.
    state_lib.write_parameter_counts(workdir, n_params, n_trained, config, report)


def _loop(run: _Run, stop: preemption.StopSignal) -> tuple[dict[str, float], bool]:
  """Steps `start + 1 .. train.steps`; (last logged metrics, whether SIGTERM stopped it)."""
  t = run.config.train
  last: dict[str, float] = {}
  timer = _Timer()
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    for step in range(run.start + 1, t.steps + 1):
      _one_step(run, step)
      timer.step_done(run.state.step)
      scalars = {}
      if step % t.log_every == 0 or step == t.steps:
        scalars.update(_train_scalars(run, step, timer))
      if step % t.eval_every == 0 or step == t.steps:
        scalars.update(_evaluate(run, step, timer))
      if scalars:
        _log(run, step, scalars, timer.seconds_per_step)
        last.update(scalars)
      stopping = preemption.preempted(step, stop.requested)
      if step % t.checkpoint_every == 0 or step == t.steps or stopping:
        _save(run, step)
      if stopping:
        run.manager.wait_until_finished()
        run.writer.info(f'SIGTERM: saved the checkpoint at step {step}; exiting.')
        return last, True
  return last, False


def _one_step(run: _Run, step: int) -> None:
  """One optimizer update on the next batch; compiles the step on the first call."""
  batch = sharding_lib.put_batch(next(run.data_iter), run.mesh)
  if run.compiled_step is None:
    run.compiled_step, run.flops = steps_lib.compile_train_step(
        run.train_step, run.state, batch, *run.teacher_args,
        state_shardings=jax.tree_util.tree_map(lambda x: x.sharding, run.state),
        replicated=sharding_lib.replicated(run.mesh))
    _report_memory(run)
  run.state, metrics = run.compiled_step(run.state, batch, *run.teacher_args)
  run.pending, run.health = steps_lib.accumulate(run.pending, run.health, metrics, step)


def _report_memory(run: _Run) -> None:
  """The memory line and `WORKDIR/memory.json` (process 0): what one device holds."""
  report = state_lib.memory_report(run.state, run.compiled_step, run.mesh)
  mib = lambda n: f'{n / 2**20:,.1f} MiB' if n is not None else '?'  # pylint: disable=unnecessary-lambda-assignment
  run.writer.info(
      f'Memory per device (mesh {report["mesh"]}): parameters '
      f'{mib(report["params_bytes_per_device"])}, optimizer state '
      f'{mib(report["opt_state_bytes_per_device"])} (replicated: '
      f'{mib(report["params_bytes_replicated"])} + {mib(report["opt_state_bytes_replicated"])}); '
      f'train step temp {mib(report["temp_bytes_per_device"])}.')
  if jax.process_index() == 0:
    state_lib.write_memory_report(run.workdir, report)


def _train_scalars(run: _Run, step: int, timer: _Timer) -> dict[str, float]:
  """train/loss, train/accuracy, train/grad_norm, lr, tokens_per_sec and train/mfu since the
  last log (and train/sparsity when pruning); resets the pending sums."""
  _check_health(run, step)
  sums = jax.device_get(run.pending)
  run.pending = jax.device_put(steps_lib.zero_pending(), sharding_lib.replicated(run.mesh))
  scalars = normalise(sums, 'train')
  pruned = pruning_lib.find_state(run.state.opt_state)
  if pruned is not None:
    scalars['train/sparsity'] = pruning_lib.sparsity(run.state.params, pruned.masks)
  scalars['train/grad_norm'] = float(sums['grad_norm_sum']) / max(int(sums['steps']), 1)
  scalars['lr'] = float(run.schedule(step - 1))
  seconds_per_step = timer.lap()
  if seconds_per_step:
    t = run.config.train
    scalars['tokens_per_sec'] = t.batch_size * run.config.data.seq_len / seconds_per_step
    mfu = steps_lib.mfu(run.flops, 1.0 / seconds_per_step, steps_lib.peak_flops(t.peak_flops))
    if mfu is not None:
      scalars['train/mfu'] = mfu
  return scalars


def _evaluate(run: _Run, step: int, timer: _Timer) -> dict[str, float]:
  """eval/* of the current parameters; the time it takes is not training time."""
  _check_health(run, step)
  began = time.time()
  t = run.config.train
  result = evaluate_params(run.eval_step, run.experiment.data, run.state.params,
                           batch_size=t.batch_size, n_batches=t.eval_batches, mesh=run.mesh,
                           position_buckets=t.eval_position_buckets)
  timer.exclude(time.time() - began)
  return result


def _log(run: _Run, step: int, scalars: dict[str, float], seconds_per_step: float) -> None:
  warning = run.guard.update(step, scalars['train/loss']) if 'train/loss' in scalars else None
  if warning:
    scalars['train/diverging'] = 1
  run.writer.write(step, scalars)
  if warning:
    run.writer.info(f'WARNING: {warning}')
    if run.guard.stop:
      run.manager.wait_until_finished()
      raise TrainingDivergedError(
          f'{warning} Stopped (train.stop_on_divergence) without saving; the last checkpoint '
          f'is step {run.manager.latest_step()} in {workdir_lib.checkpoint_dir(run.workdir)}.')
  if 'train/loss' in scalars:
    run.writer.progress(step, scalars, seconds_per_step)
  if any(k.startswith('eval/') for k in scalars):
    run.writer.info(f'  eval at step {step}: ' + ', '.join(
        f'{k[5:]} {v:.4f}' for k, v in sorted(scalars.items()) if k.startswith('eval/')))


def _save(run: _Run, step: int) -> None:
  _check_health(run, step)
  ckpt.save(run.manager, step, params=run.state.params, opt_state=run.state.opt_state,
            train={'step': run.state.step, 'rng': run.state.rng, 'pending': run.pending},
            data_state=run.data_iter.get_state())


def _check_health(run: _Run, step: int) -> None:
  """Raises `TrainingDivergedError` if any step so far had a non-finite loss or parameters."""
  bad = int(jax.device_get(run.health))
  if bad >= 0:
    last = run.manager.latest_step()
    where = (f'the last good checkpoint is step {last} in {workdir_lib.checkpoint_dir(run.workdir)}'
             if last is not None else 'no checkpoint was written')
    raise TrainingDivergedError(
        f'Training diverged: non-finite (NaN/inf) loss or parameters at step {bad} (noticed at '
        f'step {step}); stopping without saving; {where}. Try a lower '
        'optimizer.learning_rate, a longer optimizer.warmup_steps or optimizer.grad_clip.')


def _sample_tokenizer(run: _Run) -> tokenizer_lib.Tokenizer | None:
  """The workdir's tokenizer file for the closing sample (None: bytes or ids, as the data says)."""
  tokenizer = tokenizer_lib.from_workdir(run.workdir)
  return None if tokenizer.kind == tokenizer_lib.BYTES else tokenizer


def _finish(run: _Run, last: dict[str, float]) -> None:
  """The closing line and, for LMs with `sample.max_new_tokens`, a decoded sample."""
  config, writer, t = run.config, run.writer, run.config.train
  if run.start >= t.steps:
    writer.info(f'Already trained to step {run.start} (train.steps={t.steps}); nothing to do.')
  else:
    summary = ', '.join(f'{k} {v:.4f}' for k, v in sorted(last.items()) if k.startswith('eval/'))
    writer.info(f'Finished step {t.steps} in '
                f'{metrics_lib.format_duration(time.time() - run.began)}'
                + (f': {summary}' if summary else '') + '.')
  if config.sample.max_new_tokens and run.experiment.spec.task == 'lm':
    text = decoding.sample_text(
        run.experiment.spec, run.state.params, config.sample.prompt,
        max_new_tokens=config.sample.max_new_tokens,
        byte_level=run.experiment.data.info.byte_level, tokenizer=_sample_tokenizer(run),
        temperature=config.sample.temperature, seed=config.seed)
    writer.info(f'Sample ({config.sample.max_new_tokens} tokens after '
                f'{config.sample.prompt!r}):\n{text}')
