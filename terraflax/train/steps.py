"""The train step: `train_step(state, batch) -> (state, metrics)`, and its FLOPs.

The step is a pure function jitted with the state donated. Its randomness is
`noise_keys(fold_in(state.rng, step))`, so a resumed run draws exactly what an
uninterrupted one would. Metrics are sums (loss, correct predictions,
weights) accumulated on the device (`accumulate`) and only brought to the
host when logging, where they are normalised.

`train.grad_accum_steps = k` splits each global batch into k micro-batches
whose gradients of the summed loss are added up (a `lax.scan`) and divided by
the total weight once: one optimizer update equal to that of the whole batch.

Model FLOPs utilisation: `compile_train_step` lowers and compiles the step
once and reads its FLOPs from XLA's `cost_analysis()`; `mfu` divides the
FLOP/s achieved by the device's peak (`train.peak_flops`, else `PEAK_FLOPS`
of the backend). Both are per device: XLA compiles one device's program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from terraflax import compiler
from terraflax import rng as rng_lib
from terraflax.layers.distillation import distillation_sum
from terraflax.layers.metrics import chunked_lm_sums
from terraflax.models import spec as spec_lib
from terraflax.models.common import split_lm_head
from terraflax.train import distill as distill_lib
from terraflax.train import optimizers
from terraflax.train.evaluation import SUM_KEYS, batch_sums
from terraflax.train.state import TrainState

# Peak FLOP/s of one device by `jax.default_backend()` when `train.peak_flops` is 0.
# cpu: a jitted float32 matmul on the 2-core machine with YNNPACK (DESIGN.md 7).
PEAK_FLOPS = {'cpu': 180e9}


def cast_for_compute(params, dtype):
  """`params` with every floating matrix (rank >= 2) cast to the compute `dtype` (None: as is).

  Applied to the sharded parameters before the model runs, so the cast is
  done shard by shard and the all-gathers of fsdp / tensor parallelism move
  `dtype` (bfloat16: half the bytes); the gradients flow back through the
  cast in float32. Vectors (norm scales, biases) keep their float32 values.
  """
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return params
  def cast(p):
    if jnp.issubdtype(p.dtype, jnp.floating) and p.ndim >= 2:
      return p.astype(dtype)
    return p
  return jax.tree_util.tree_map(cast, params)


def head_in_chunks(split, params, inputs, batch, rngs, chunk_len: int) -> dict[str, jax.Array]:
  """`batch_sums` of a model split as (body, head) by `split_lm_head`, the head and loss run
  `chunk_len` positions at a time (`chunked_lm_sums`)."""
  body, head = split
  hidden = body.apply({'params': params}, *inputs, rngs=rngs)
  hidden = hidden if isinstance(hidden, tuple) else (hidden,)
  return chunked_lm_sums(lambda *xs: head.apply({'params': params}, *xs, rngs=rngs), hidden,
                         batch['targets'], batch['weights'], chunk_len=chunk_len)


def make_train_step(model, tx, *, grad_accum_steps: int = 1, task: str = 'lm',
                    teacher: distill_lib.Teacher | None = None, trainable: str = '',
                    compute_dtype=None, loss_chunk_len: int = 0):
  """`train_step(state, batch) -> (state, metrics)` for `model` in 'train' mode.

  `task` says how the model is called (`spec.model_inputs`): model(inputs),
  or model(inputs, targets) for 'seq2seq'. With a `teacher`, the step is
  `train_step(state, batch, teacher_params)` and minimises the distillation
  loss; the metrics stay the student's cross-entropy on the labels.
  `trainable` (`config.optimizer.trainable`, a regex; '' = all) differentiates
  only the matching parameters: the others get zero gradients without their
  weight-gradient products being computed, and `grad_norm` is the trained
  parameters' norm. (`tx` must freeze the same ones; `optimizers.make_optimizer`
  does.) `compute_dtype` (the model's `dtype`, e.g. bfloat16) casts the
  parameter matrices before the model reads them (`cast_for_compute`).

  `loss_chunk_len` > 0: an LM with a head `split_lm_head` finds runs head and
  loss that many positions at a time (`head_in_chunks`: no whole (b, l, v)
  logits; float32-close to the whole logits, which 0 or a teacher keep).
  """
  split = split_lm_head(model) if loss_chunk_len and teacher is None and task == 'lm' else None

  def loss_fn(params, batch, key, teacher_params):
    if trainable:
      labels = optimizers.trainable_labels(params, trainable)
      params = jax.tree_util.tree_map(
          lambda p, label: p if label == 'trained' else jax.lax.stop_gradient(p), params, labels)
    inputs = spec_lib.model_inputs(batch, task)
    params = cast_for_compute(params, compute_dtype)
    if split is not None:
      sums = head_in_chunks(split, params, inputs, batch, rng_lib.noise_keys(key),
                            loss_chunk_len)
      return sums['loss_sum'], sums
    logits = model.apply({'params': params}, *inputs, rngs=rng_lib.noise_keys(key))
    sums = batch_sums(logits, batch)
    if teacher is None:
      return sums['loss_sum'], sums
    teacher_logits = teacher.model.apply({'params': teacher_params}, *inputs,
                                         rngs=rng_lib.noise_keys(jax.random.fold_in(key, 1)))
    objective, _ = distillation_sum(logits, teacher_logits, batch['targets'], batch['weights'],
                                    temperature=teacher.temperature, alpha=teacher.alpha)
    return objective, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated_grads(params, batch, key, teacher_params):
    k = grad_accum_steps
    # Micro-batch j holds rows j, j + k, ...: each stays spread over the 'data' axis.
    micro = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch)

    def accumulate_micro(carry, xs):
      grads_sum, sums_sum = carry
      micro_batch, index = xs
      (_, sums), grads = grad_fn(params, micro_batch, jax.random.fold_in(key, index),
                                 teacher_params)
      return (jax.tree_util.tree_map(jnp.add, grads_sum, grads),
              jax.tree_util.tree_map(jnp.add, sums_sum, sums)), None

    zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
             {name: jnp.zeros((), jnp.float32) for name in SUM_KEYS})
    (grads, sums), _ = jax.lax.scan(accumulate_micro, zeros, (micro, jnp.arange(k)))
    return sums, grads

  def train_step(state: TrainState, batch, teacher_params=None):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      (_, sums), grads = grad_fn(state.params, batch, key, teacher_params)
    else:
      sums, grads = accumulated_grads(state.params, batch, key, teacher_params)
    weight = jnp.maximum(sums['weight_sum'], 1e-9)
    grads = jax.tree_util.tree_map(lambda g: g / weight, grads)  # Mean over the whole batch.
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(sums['loss_sum']) & jnp.isfinite(optax.tree.norm(params))
    metrics = dict(sums, nonfinite=jnp.logical_not(finite).astype(jnp.int32),
                   grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def compile_train_step(train_step, state, batch, *extra, state_shardings, replicated):
  """(compiled step, its FLOPs per call or None): `train_step` jitted (state donated, in and
  out with `state_shardings`, the batch and `extra` as they are laid out, the metrics
  `replicated`), lowered on these arguments and compiled once; the FLOPs are XLA's cost
  analysis."""
  in_shardings = (state_shardings,) + tuple(
      jax.tree_util.tree_map(lambda x: x.sharding, arg) for arg in (batch, *extra))
  jitted = jax.jit(train_step, donate_argnums=(0,), in_shardings=in_shardings,
                   out_shardings=(state_shardings, replicated),
                   compiler_options=compiler.options())
  compiled = jitted.lower(state, batch, *extra).compile()
  return compiled, step_flops(compiled)


def step_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function (`cost_analysis()['flops']`), None if unknown."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return None
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per device program.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def peak_flops(configured: float, backend: str | None = None) -> float | None:
  """`train.peak_flops` if set, else `PEAK_FLOPS` of the backend (None: not listed)."""
  if configured:
    return float(configured)
  return PEAK_FLOPS.get(backend or jax.default_backend())


def mfu(flops_per_step: float | None, steps_per_sec: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation: flops_per_step * steps_per_sec / peak (None if either unknown)."""
  if not flops_per_step or not peak:
    return None
  return flops_per_step * steps_per_sec / peak


def zero_pending() -> dict[str, jax.Array]:
  """Metric sums since the last log, kept on the device (and in checkpoints)."""
  return {'loss_sum': jnp.zeros((), jnp.float32), 'correct_sum': jnp.zeros((), jnp.float32),
          'weight_sum': jnp.zeros((), jnp.float32), 'grad_norm_sum': jnp.zeros((), jnp.float32),
          'steps': jnp.zeros((), jnp.int32)}


@jax.jit
def accumulate(pending, health, metrics, step):
  """Adds one step's metrics to the pending sums; `health` keeps the first non-finite step."""
  pending = {'loss_sum': pending['loss_sum'] + metrics['loss_sum'],
             'correct_sum': pending['correct_sum'] + metrics['correct_sum'],
             'weight_sum': pending['weight_sum'] + metrics['weight_sum'],
             'grad_norm_sum': pending['grad_norm_sum'] + metrics['grad_norm'],
             'steps': pending['steps'] + 1}
  health = jnp.where((health < 0) & (metrics['nonfinite'] > 0), step, health)
  return pending, health
