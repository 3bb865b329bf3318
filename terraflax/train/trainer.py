"""The training loop: `train_and_evaluate(config, workdir)`.

The train step is a pure function `train_step(state, batch) -> (state, metrics)`
jitted with the state donated. Its randomness is `fold_in(state.rng, step)`, so
a resumed run draws exactly what an uninterrupted one would. Metrics are sums
(loss, correct predictions, weights) accumulated on the device and only
brought to the host when logging, where they are normalised.

`train.grad_accum_steps = k` splits each global batch into k micro-batches
whose gradients of the summed loss are added up (a `lax.scan`) and divided by
the total weight once: one optimizer update equal to that of the whole batch.

Transfer and partial training, for any model:
  init_from              start from another workdir's parameters, matched by
                         path (`checkpoint.load_matching_params`); fresh rest
  optimizer.trainable    train only the matching parameters; the others stay
                         bit-identical (`optimizers.freeze_unmatched`), and
                         their gradients are not computed (prefix tuning's
                         step: 1.29x faster, 25% fewer flops)
  distill.*              learn from a teacher's softened logits (`distill.py`)
The parameter counts (total, trained) are printed and written to
`WORKDIR/parameters.json`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from terraflax import compiler
from terraflax.layers.distillation import distillation_sum
from terraflax.layers.metrics import accuracy_sum, cross_entropy_sum
from terraflax.train import checkpoint as ckpt
from terraflax.train import config as config_lib
from terraflax.train import distill as distill_lib
from terraflax.train import metrics as metrics_lib
from terraflax.train import optimizers
from terraflax.train import sharding as sharding_lib

SUM_KEYS = ('loss_sum', 'correct_sum', 'weight_sum')
PARAMETERS_FILE = 'parameters.json'
NOISE_STREAMS = ('dropout', 'hash', 'sparse')


class TrainingDivergedError(FloatingPointError):
  """The loss or the parameters became NaN/inf; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 (): optimizer updates applied so far.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 (2,) key data; step s draws from fold_in(rng, s).


def stream_rngs(key: jax.Array) -> dict[str, jax.Array]:
  """One key per noise stream ('dropout', 'hash', 'sparse'), derived from `key`."""
  return {name: jax.random.fold_in(key, i) for i, name in enumerate(NOISE_STREAMS)}


def batch_sums(logits, batch) -> dict[str, jax.Array]:
  """Summed cross-entropy, correct predictions and weights of one batch."""
  loss_sum, weight_sum = cross_entropy_sum(logits, batch['targets'], batch['weights'])
  correct_sum, _ = accuracy_sum(logits, batch['targets'], batch['weights'])
  return {'loss_sum': loss_sum, 'correct_sum': correct_sum, 'weight_sum': weight_sum}


def make_train_step(model, tx, *, grad_accum_steps: int = 1, task: str = 'lm',
                    teacher: distill_lib.Teacher | None = None, trainable: str = ''):
  """`train_step(state, batch) -> (state, metrics)` for `model` in 'train' mode.

  `task` says how the model is called (`config.model_inputs`): model(inputs),
  or model(inputs, targets) for 'seq2seq'. With a `teacher`, the step is
  `train_step(state, batch, teacher_params)` and minimises the distillation
  loss; the metrics stay the student's cross-entropy on the labels.
  `trainable` (`config.optimizer.trainable`, a regex; '' = all) differentiates
  only the matching parameters: the others get zero gradients without their
  weight-gradient products being computed, and `grad_norm` is the trained
  parameters' norm. (`tx` must freeze the same ones; `optimizers.make_optimizer`
  does.)
  """

  def loss_fn(params, batch, key, teacher_params):
    if trainable:
      labels = optimizers.trainable_labels(params, trainable)
      params = jax.tree_util.tree_map(
          lambda p, label: p if label == 'trained' else jax.lax.stop_gradient(p), params, labels)
    inputs = config_lib.model_inputs(batch, task)
    logits = model.apply({'params': params}, *inputs, rngs=stream_rngs(key))
    sums = batch_sums(logits, batch)
    if teacher is None:
      return sums['loss_sum'], sums
    teacher_logits = teacher.model.apply({'params': teacher_params}, *inputs,
                                         rngs=stream_rngs(jax.random.fold_in(key, 1)))
    objective, _ = distillation_sum(logits, teacher_logits, batch['targets'], batch['weights'],
                                    temperature=teacher.temperature, alpha=teacher.alpha)
    return objective, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch, teacher_params=None):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      (_, sums), grads = grad_fn(state.params, batch, key, teacher_params)
    else:
      k = grad_accum_steps
      # Micro-batch j holds rows j, j + k, ...: each stays spread over the 'data' axis.
      micro = jax.tree_util.tree_map(
          lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch)

      def accumulate(carry, xs):
        grads_sum, sums_sum = carry
        micro_batch, index = xs
        (_, sums), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(key, index),
                                   teacher_params)
        return (jax.tree_util.tree_map(jnp.add, grads_sum, grads),
                jax.tree_util.tree_map(jnp.add, sums_sum, sums)), None

      zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params),
               {name: jnp.zeros((), jnp.float32) for name in SUM_KEYS})
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(k)))
    weight = jnp.maximum(sums['weight_sum'], 1e-9)
    grads = jax.tree_util.tree_map(lambda g: g / weight, grads)  # Mean over the whole batch.
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(sums['loss_sum']) & jnp.isfinite(optax.tree.norm(params))
    metrics = dict(sums, nonfinite=jnp.logical_not(finite).astype(jnp.int32),
                   grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, task: str = 'lm'):
  """`eval_step(params, batch, index) -> sums` for `model` in 'eval' mode."""

  def eval_step(params, batch, index):
    key = jax.random.fold_in(jax.random.key(0), index)  # LSH hashing is random in eval too.
    logits = model.apply({'params': params}, *config_lib.model_inputs(batch, task),
                         rngs=stream_rngs(key))
    return batch_sums(logits, batch)

  return eval_step


def jit_eval_step(model, task: str, out_sharding):
  """`make_eval_step` jitted as the trainer and eval-only scoring run it."""
  return jax.jit(make_eval_step(model, task), out_shardings=out_sharding,
                 compiler_options=compiler.options())


def zero_pending() -> dict[str, jax.Array]:
  """Metric sums since the last log, kept on the device (and in checkpoints)."""
  return {'loss_sum': jnp.zeros((), jnp.float32), 'correct_sum': jnp.zeros((), jnp.float32),
          'weight_sum': jnp.zeros((), jnp.float32), 'grad_norm_sum': jnp.zeros((), jnp.float32),
          'steps': jnp.zeros((), jnp.int32)}


@jax.jit
def _accumulate(pending, health, metrics, step):
  pending = {'loss_sum': pending['loss_sum'] + metrics['loss_sum'],
             'correct_sum': pending['correct_sum'] + metrics['correct_sum'],
             'weight_sum': pending['weight_sum'] + metrics['weight_sum'],
             'grad_norm_sum': pending['grad_norm_sum'] + metrics['grad_norm'],
             'steps': pending['steps'] + 1}
  health = jnp.where((health < 0) & (metrics['nonfinite'] > 0), step, health)
  return pending, health


def normalise(sums: dict[str, Any], prefix: str) -> dict[str, float]:
  weight = max(float(sums['weight_sum']), 1e-9)
  return {f'{prefix}/loss': float(sums['loss_sum']) / weight,
          f'{prefix}/accuracy': float(sums['correct_sum']) / weight}


def opt_state_shardings(tx, params, mesh):
  """Optimizer-state shardings: param-shaped leaves follow their parameter, the rest replicate.

  A state leaf follows the parameter whose path ends its own path (Adam's
  `mu['Dense_5']['kernel']` follows `Dense_5/kernel`) when their shapes agree.
  Matching paths rather than tree structures also covers masked states
  (`optax.multi_transform` for frozen parameters), whose subtrees hold
  placeholders where parameters are frozen.
  """
  replicated = sharding_lib.replicated(mesh)
  abstract = jax.eval_shape(tx.init, params)
  by_path = {tuple(optimizers.path_name(p).split('/')): x
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  longest = max((len(k) for k in by_path), default=0)

  def follow(path, leaf):
    keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(max(len(keys) - longest, 0), len(keys)):
      param = by_path.get(keys[start:])
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(follow, abstract)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def write_parameter_counts(workdir: str, n_params: int, n_trained: int, config,
                           init_report=None) -> None:
  """`WORKDIR/parameters.json`: total, trained and frozen counts, and what init_from loaded."""
  record = {'total': n_params, 'trained': n_trained, 'frozen': n_params - n_trained,
            'trainable': config.optimizer.trainable, 'init_from': config.init_from}
  if init_report is not None:
    record['init_from_step'] = init_report['step']
    record['init_from_loaded'] = len(init_report['matched'])
    record['init_from_fresh'] = init_report['fresh']
  with open(os.path.join(workdir, PARAMETERS_FILE), 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
    f.write('\n')


class _StopSignal:
  """Turns SIGTERM into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def _preempted(step: int, local_flag: bool) -> bool:
  """True on every process once any process has been asked to stop."""
  if jax.process_count() == 1:
    return local_flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # No preemption service: fall back to the local flag.
    return local_flag


def evaluate_params(eval_step, data, params, *, batch_size: int, n_batches: int,
                    mesh) -> dict[str, float]:
  """{'eval/loss', 'eval/accuracy'[, 'eval/bits_per_byte']} of `params` on the eval split."""
  sums = {name: jnp.zeros((), jnp.float32) for name in SUM_KEYS}
  for index, batch in enumerate(data.eval_batches(
      batch_size=batch_size, n_batches=n_batches, process_index=jax.process_index(),
      process_count=jax.process_count())):
    batch_sums_ = eval_step(params, sharding_lib.put_batch(batch, mesh), index)
    sums = jax.tree_util.tree_map(jnp.add, sums, batch_sums_)
  result = normalise(jax.device_get(sums), 'eval')
  if data.info.byte_level:
    result['eval/bits_per_byte'] = result['eval/loss'] / math.log(2)
  return result


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains and evaluates as `config` says, in `workdir`; returns the last logged metrics.

  Resumes from the latest checkpoint in `workdir/checkpoints` if there is one.
  SIGTERM saves a checkpoint and returns normally. A NaN/inf loss raises
  `TrainingDivergedError` and leaves the last good checkpoint in place.
  With `eval.only` or any other `eval.*` field set, it trains nothing and
  scores a checkpoint instead (`eval_only.evaluate_checkpoint`).
  """
  from terraflax.train import eval_only  # pylint: disable=import-outside-toplevel
  if eval_only.requested(config_lib.check_fields(config)):
    return eval_only.evaluate_checkpoint(config, workdir)
  with _StopSignal() as stop:  # From the start: a SIGTERM during set-up stops after step 1.
    return _train_and_evaluate(config, workdir, stop)


def initial_state(experiment: config_lib.Experiment, tx, mesh, loaded=None) -> TrainState:
  """Freshly initialised parameters and optimizer state, laid out on `mesh`.

  `loaded` (from `checkpoint.load_matching_params` on the abstract parameters)
  replaces the parameters it holds arrays for; its `ShapeDtypeStruct` leaves
  keep their fresh initialisation.
  """
  config = experiment.config
  replicated = sharding_lib.replicated(mesh)
  param_shardings = sharding_lib.variable_shardings(
      experiment.abstract_variables['params'], mesh, config.sharding.logical_axis_rules)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  model = experiment.model('train')
  zeros = jnp.zeros((1, config.data.seq_len), jnp.int32)
  tokens = config_lib.model_inputs({'inputs': zeros, 'targets': zeros}, experiment.data.info.task)

  def init_params(key):
    variables = model.init({'params': key, **stream_rngs(key)}, *tokens)
    return nn.meta.unbox(variables['params'])

  with jax.set_mesh(mesh):
    params = jax.jit(init_params, out_shardings=param_shardings)(init_key)
    if loaded is not None:
      params = jax.tree_util.tree_map(
          lambda new, fresh: fresh if isinstance(new, jax.ShapeDtypeStruct)
          else jax.device_put(new, fresh.sharding), loaded, params)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                    opt_state=opt_state,
                    rng=jax.device_put(jax.random.key_data(train_key), replicated))


def _train_and_evaluate(config, workdir: str, stop: _StopSignal) -> dict[str, float]:
  began = time.time()
  config = config_lib.check_fields(config)
  sharding_lib.maybe_initialize_distributed(config.distributed)
  experiment = config_lib.validate_config(config)
  config, data = experiment.config, experiment.data
  t = config.train
  mesh = sharding_lib.make_mesh(config.sharding.model_parallel)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    ckpt.write_config(workdir, config)

  train_model, eval_model = experiment.model('train'), experiment.model('eval')
  tx, schedule = optimizers.make_optimizer(config.optimizer, t.steps)
  replicated = sharding_lib.replicated(mesh)
  manager = ckpt.make_manager(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoints)
  start = manager.latest_step() or 0
  # Other workdirs this run reads, checked before anything compiles.
  loaded, init_report = None, None
  if not start and config.init_from:
    try:
      loaded, init_report = ckpt.load_matching_params(
          config.init_from, nn.meta.unbox(experiment.abstract_variables['params']))
    except ckpt.InitFromError as e:
      raise config_lib.ConfigError(str(e)) from None
  teacher, teacher_params = None, None
  if config.distill.teacher_workdir:
    teacher, teacher_params = distill_lib.load_teacher(experiment)

  state = initial_state(experiment, tx, mesh, loaded)
  del loaded
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  pending = jax.device_put(zero_pending(), replicated)
  health = jax.device_put(jnp.array(-1, jnp.int32), replicated)
  data_iter = data.train_iterator(batch_size=t.batch_size, process_index=jax.process_index(),
                                  process_count=jax.process_count(),
                                  num_threads=config.data.num_threads)
  if start:
    params, opt_state, train_items, data_state = ckpt.restore(
        manager, start, params=state.params, opt_state=state.opt_state,
        train={'step': state.step, 'rng': state.rng, 'pending': pending})
    state = TrainState(step=train_items['step'], params=params, opt_state=opt_state,
                       rng=train_items['rng'])
    pending = train_items['pending']
    data_iter.set_state(data_state)

  writer = metrics_lib.MetricsWriter(workdir, resume_step=start, total_steps=t.steps)
  n_params = count_params(state.params)
  n_trained = optimizers.count_trained(state.params, config.optimizer.trainable)
  trained = ('' if n_trained == n_params else
             f' ({n_trained:,} trained, optimizer.trainable={config.optimizer.trainable!r})')
  writer.info(f'terraflax.train: {config.model.name} with {n_params:,} parameters{trained}; '
              f'{jax.device_count()} device(s), mesh {dict(mesh.shape)}; workdir {workdir}')
  if init_report is not None:
    writer.info(f'Initialised {len(init_report["matched"])} of '
                f'{len(init_report["matched"]) + len(init_report["fresh"])} parameter arrays from '
                f'{config.init_from} (step {init_report["step"]}); fresh: '
                f'{", ".join(init_report["fresh"]) or "none"}; not used: '
                f'{", ".join(init_report["unused"]) or "none"}.')
  if start:
    writer.info(f'Resumed from the checkpoint at step {start}.')
  if jax.process_index() == 0 and (not start or not os.path.exists(
      os.path.join(workdir, PARAMETERS_FILE))):  # A resumed run keeps what init_from loaded.
    write_parameter_counts(workdir, n_params, n_trained, config, init_report)

  task = data.info.task
  teacher_args = ()
  if teacher is not None:
    teacher_args = (jax.device_put(teacher_params, replicated),)
    writer.info(f'Distilling from {teacher.name} in {teacher.workdir} '
                f'({count_params(teacher_params):,} parameters; temperature '
                f'{teacher.temperature:g}, alpha {teacher.alpha:g}).')
  train_step = jax.jit(
      make_train_step(train_model, tx, grad_accum_steps=t.grad_accum_steps, task=task,
                      teacher=teacher, trainable=config.optimizer.trainable),
      donate_argnums=(0,), out_shardings=(state_shardings, replicated),
      compiler_options=compiler.options())
  eval_step = jit_eval_step(eval_model, task, replicated)
  tokens_per_step = t.batch_size * config.data.seq_len

  def check_health(step):
    bad = int(jax.device_get(health))
    if bad >= 0:
      last = manager.latest_step()
      where = (f'the last good checkpoint is step {last} in {ckpt.checkpoint_dir(workdir)}'
               if last is not None else 'no checkpoint was written')
      raise TrainingDivergedError(
          f'Training diverged: non-finite (NaN/inf) loss or parameters at step {bad} (noticed at '
          f'step {step}); stopping without saving; {where}. Try a lower '
          'optimizer.learning_rate, a longer optimizer.warmup_steps or optimizer.grad_clip.')

  def evaluate(params):
    return evaluate_params(eval_step, data, params, batch_size=t.batch_size,
                           n_batches=t.eval_batches, mesh=mesh)

  last: dict[str, float] = {}
  timer_start, timed_steps, seconds_per_step = None, 0, 0.0
  with jax.set_mesh(mesh):
    try:
      for step in range(start + 1, t.steps + 1):
        batch = sharding_lib.put_batch(next(data_iter), mesh)
        state, step_metrics = train_step(state, batch, *teacher_args)
        pending, health = _accumulate(pending, health, step_metrics, step)
        if timer_start is None:  # Time from the end of the first (compiling) step.
          jax.block_until_ready(state.step)
          timer_start, timed_steps = time.time(), 0
        else:
          timed_steps += 1
        scalars = {}
        if step % t.log_every == 0 or step == t.steps:
          check_health(step)
          sums = jax.device_get(pending)
          pending = jax.device_put(zero_pending(), replicated)
          scalars.update(normalise(sums, 'train'))
          scalars['train/grad_norm'] = float(sums['grad_norm_sum']) / max(int(sums['steps']), 1)
          scalars['lr'] = float(schedule(step - 1))
          elapsed = time.time() - timer_start
          if timed_steps:
            seconds_per_step = elapsed / timed_steps
            scalars['tokens_per_sec'] = tokens_per_step / seconds_per_step
          timer_start, timed_steps = time.time(), 0
        if step % t.eval_every == 0 or step == t.steps:
          check_health(step)
          eval_start = time.time()
          scalars.update(evaluate(state.params))
          if timer_start is not None:
            timer_start += time.time() - eval_start  # Eval time is not training time.
        if scalars:
          writer.write(step, scalars)
          if 'train/loss' in scalars:
            writer.progress(step, scalars, seconds_per_step)
          if any(k.startswith('eval/') for k in scalars):
            writer.info(f'  eval at step {step}: ' + ', '.join(
                f'{k[5:]} {v:.4f}' for k, v in sorted(scalars.items()) if k.startswith('eval/')))
          last.update(scalars)
        stopping = _preempted(step, stop.requested)
        if step % t.checkpoint_every == 0 or step == t.steps or stopping:
          check_health(step)
          ckpt.save(manager, step, params=state.params, opt_state=state.opt_state,
                    train={'step': state.step, 'rng': state.rng, 'pending': pending},
                    data_state=data_iter.get_state())
        if stopping:
          manager.wait_until_finished()
          writer.info(f'SIGTERM: saved the checkpoint at step {step}; exiting.')
          return last
    finally:
      manager.wait_until_finished()
      manager.close()
      writer.close()
  if start >= t.steps:
    writer.info(f'Already trained to step {start} (train.steps={t.steps}); nothing to do.')
  else:
    summary = ', '.join(f'{k} {v:.4f}' for k, v in sorted(last.items()) if k.startswith('eval/'))
    writer.info(f'Finished step {t.steps} in {metrics_lib.format_duration(time.time() - began)}'
                + (f': {summary}' if summary else '') + '.')
  if config.sample.max_new_tokens and data.info.task == 'lm':
    text = sample_text(experiment, state.params)
    if text is not None:
      writer.info(f'Sample ({config.sample.max_new_tokens} tokens after '
                  f'{config.sample.prompt!r}):\n{text}')
  return last


def generate_text(model, params, prompt: str, *, max_new_tokens: int, byte_level: bool,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0) -> str:
  """`prompt` followed by `max_new_tokens` sampled tokens, as text.

  `model` is a predict-mode LM. Byte-level models read and write UTF-8 text;
  others take the prompt as space-separated token ids and print ids.
  """
  from terraflax import decoding  # pylint: disable=import-outside-toplevel
  if byte_level:
    ids = np.frombuffer(prompt.encode('utf-8'), np.uint8).astype(np.int32)
  else:
    ids = np.asarray([int(t) for t in prompt.split()], np.int32)
  params = jax.device_put(params, jax.devices()[0])
  tokens = decoding.autoregressive_sample(
      model, params, jnp.asarray(ids[None, :]), max_new_tokens, temperature=temperature,
      top_k=top_k, top_p=top_p, rng=jax.random.key(seed))
  tokens = np.concatenate([ids, np.asarray(tokens).reshape(-1)])
  if byte_level:
    return bytes(int(t) % 256 for t in tokens).decode('utf-8', errors='replace')
  return ' '.join(str(int(t)) for t in tokens)


def sample_text(experiment: config_lib.Experiment, params) -> str:
  """Decodes `config.sample.max_new_tokens` tokens after `config.sample.prompt`."""
  config = experiment.config
  return generate_text(
      experiment.model('predict'), params, config.sample.prompt,
      max_new_tokens=config.sample.max_new_tokens, byte_level=experiment.data.info.byte_level,
      temperature=config.sample.temperature, seed=config.seed)
