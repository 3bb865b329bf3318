"""What a server decodes: a base workdir, its prefix-tuned workdirs, and one decoding step.

  load(workdir, prefixes={'NAME': WORKDIR, ...}) -> Served
  DecodeStep(served, n_slots, steps=k)(cache, batch) -> (outputs, cache)   k tokens per slot

Prefix workdirs are prefix-tuning runs (`attention.n_prefix > 0`,
`optimizer.trainable='prefix_'`) on the base workdir's model: their
non-prefix parameters must equal the base's, so one copy of the base weights
serves every prefix. The prefix parameters of all prefixes are stacked along a
new leading axis (p, ...); each slot gathers its own row.

A step is a `jax.vmap` over slots of a batch-1 predict-mode step
(`model.apply(..., mutable=['cache'])`): every slot carries its own cache and
so its own position, and no layer needs to know about slots (the slots sit on
each cache leaf's batch axis: `_slot_axes`). One device call
runs k steps (`lax.scan`), so the host round trip is paid once per k tokens. The base weights
are shared (not mapped), the gathered prefix rows are mapped. A model without
a prefix and one with it keep the same cache (the prefix is prepended at
attention time), so slots without a prefix and slots with one share a cache
tree; a step where both kinds are active runs both models and keeps each
slot's own result.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from terraflax import compiler
from terraflax import decoding
from terraflax import errors
from terraflax import kernels
from terraflax import rng as rng_lib
from terraflax import tokenizer as tokenizer_lib
from terraflax.layers import prefix as prefix_lib
from terraflax.layers.core import first_argmax
from terraflax.models import spec as spec_lib

NO_PREFIX = None  # A request's `prefix` when it asks for the base model.


class ServeError(errors.UserError, ValueError):
  """A workdir or flag the server cannot serve (names the workdir and what is wrong)."""


@dataclasses.dataclass(frozen=True)
class Served:
  """The loaded models and parameters.

  Fields: workdir; config (the base's); base_model / prefix_model (predict
  mode; prefix_model None without prefixes); base_params (no prefix leaves);
  prefixes (name -> row of `stacked`; the base's own prefix, if it has one, is
  row 0 under NO_PREFIX); stacked (the prefix leaves, each (p, ...), or None);
  tokenizer (None: the model reads space-separated ids); eos_id; max_len.
  """
  workdir: str
  config: Any
  base_model: Any
  prefix_model: Any
  base_params: Any
  prefixes: dict
  stacked: Any
  tokenizer: tokenizer_lib.Tokenizer | None
  eos_id: int | None
  max_len: int | None

  def route(self, name: str | None) -> tuple[bool, int]:
    """(uses the prefix model, row of `stacked`) for a request's prefix name."""
    if name in self.prefixes:
      return True, self.prefixes[name]
    if name is NO_PREFIX:
      return False, 0
    raise KeyError(name)

  @property
  def prefix_names(self) -> list[str]:
    return sorted(name for name in self.prefixes if name is not NO_PREFIX)


def _flat(tree) -> dict:
  return {'/'.join(map(str, path)): x for path, x in traverse_util.flatten_dict(tree).items()}


def _has_prefix(params) -> bool:
  return any(prefix_lib.is_prefix_path(p) for p in traverse_util.flatten_dict(params))


def _load_lm(workdir: str, step: int | None, what: str):
  try:
    config, spec, params = spec_lib.load_workdir(workdir, step)
  except (FileNotFoundError, ValueError) as e:
    raise ServeError(f'{what} {workdir!r}: {e}') from None
  if spec.task != 'lm':
    raise ServeError(f'{what} {workdir!r} holds a {spec.task} model (data.name='
                     f'{config.data.get("name")!r}); only language models are served.')
  return config, spec, params


def _model_fields(config) -> dict:
  """config.model without the prefix length (what base and prefix runs must share)."""
  fields = config.model.to_dict()
  attention = fields.get('attention')
  if isinstance(attention, dict):
    fields['attention'] = {k: v for k, v in attention.items() if k != 'n_prefix'}
    if set(fields['attention']) <= {'kind'} and fields['attention'].get('kind', 'full') == 'full':
      fields.pop('attention')  # Full attention is the default: `{kind: 'full'}` == absent.
  return fields


def _check_same_base(name, workdir, base_flat, core_flat, base_fields, fields):
  where = f'--prefix {name}={workdir}'
  if fields != base_fields:
    diff = sorted(k for k in set(fields) | set(base_fields)
                  if fields.get(k) != base_fields.get(k))
    raise ServeError(f'{where}: its config.model differs from the base workdir\'s in '
                     f'{", ".join("model." + k for k in diff)} ({diff[0]}: '
                     f'{fields.get(diff[0])!r} vs the base\'s {base_fields.get(diff[0])!r}); a '
                     'prefix must be trained on the served base model.')
  missing = sorted(set(base_flat) ^ set(core_flat))
  if missing:
    raise ServeError(f'{where}: its parameters differ from the base\'s in their paths (e.g. '
                     f'{missing[0]}); a prefix must be trained on the served base model.')
  for path, x in base_flat.items():
    y = core_flat[path]
    if x.shape != y.shape or x.dtype != y.dtype:
      raise ServeError(f'{where}: parameter {path} is {y.dtype}{tuple(y.shape)}, the base\'s '
                       f'{x.dtype}{tuple(x.shape)}.')
    if not np.array_equal(np.asarray(x), np.asarray(y)):
      raise ServeError(f'{where}: parameter {path} differs from the base workdir\'s: the prefix '
                       'was not trained with the base frozen (config.init_from=BASE, '
                       "optimizer.trainable='prefix_'), so the shared base would change it.")


def load(workdir: str, prefixes: dict[str, str] | None = None, *, step: int | None = None
         ) -> Served:
  """The base LM of `workdir` (latest or `step` checkpoint) and its prefix workdirs.

  Raises `ServeError` naming the workdir for: no checkpoint, not a language
  model, a prefix workdir without prefix parameters, one whose model or
  non-prefix parameters differ from the base's, prefixes of different lengths.
  """
  config, spec, params = _load_lm(workdir, step, 'the workdir')
  base_fields = _model_fields(config)
  rows, names, prefix_spec = [], {}, None
  if _has_prefix(params):  # The base's own prefix serves requests without one.
    params, own = prefix_lib.split_prefix(params)
    rows.append(own)
    names[NO_PREFIX] = 0
    prefix_spec = spec
  base_flat = _flat(params)
  for name, prefix_workdir in (prefixes or {}).items():
    if not name or name in names:
      raise ServeError(f'--prefix {name}={prefix_workdir}: the name must be non-empty and unique.')
    p_config, p_spec, p_params = _load_lm(prefix_workdir, None, f'--prefix {name}=')
    if not _has_prefix(p_params):
      raise ServeError(f'--prefix {name}={prefix_workdir} has no prefix parameters: train it '
                       "with config.model.attention.n_prefix > 0 and "
                       "optimizer.trainable='prefix_' (configs/prefix_tuning.py).")
    core, own = prefix_lib.split_prefix(p_params)
    _check_same_base(name, prefix_workdir, base_flat, _flat(core), base_fields,
                     _model_fields(p_config))
    if rows and jax.tree_util.tree_map(np.shape, own) != jax.tree_util.tree_map(np.shape, rows[0]):
      first = next(n for n, i in names.items() if i == 0)
      raise ServeError(f'--prefix {name}={prefix_workdir}: its prefix shapes differ from '
                       f'{first or "the base"}\'s (another attention.n_prefix?); served prefixes '
                       'must have the same length.')
    names[name] = len(rows)
    rows.append(own)
    prefix_spec = p_spec if prefix_spec is None else prefix_spec
  stacked = (jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *rows) if rows else None)
  tokenizer = decoding.workdir_tokenizer(workdir, config)
  max_len = config.model.get('max_len')
  return Served(workdir=workdir, config=config, base_model=spec.build('predict'),
                prefix_model=None if prefix_spec is None else prefix_spec.build('predict'),
                base_params=params, prefixes=names, stacked=stacked, tokenizer=tokenizer,
                eos_id=None if tokenizer is None else tokenizer.eos_id,
                max_len=max_len if isinstance(max_len, int) else None)


# ----------------------------------------------------------------------------
# Sampling with per-row settings.

def sample_rows(logits, keys, temperature, top_k, top_p):
  """Token ids (s,) from logits (s, v), each row with its own settings.

  temperature (s,) float (0: greedy), top_k (s,) int (0: off), top_p (s,)
  float (1: off), keys (s,) typed keys. A row draws what
  `decoding.sample_logits` draws for it alone (batch 1) with the same key.
  """
  return jax.vmap(_sample_row)(logits, keys, temperature, top_k, top_p)


def _sample_row(logits, key, temperature, top_k, top_p):
  greedy = first_argmax(logits)
  scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  top_k = jnp.where(top_k > 0, jnp.clip(top_k, 1, logits.shape[0]), logits.shape[0])
  scaled = decoding.keep_top_k(scaled, top_k)
  scaled = jnp.where(top_p < 1.0, decoding.keep_top_p(scaled, top_p), scaled)
  sampled = decoding.categorical_tokens(key, scaled[None])[0]
  return jnp.where(temperature > 0, sampled, greedy)


def request_key(seed: int):
  """The key a request's sampling folds its positions into: as `autoregressive_sample`'s."""
  return jax.random.split(jax.random.key(seed))[1]


# ----------------------------------------------------------------------------
# The step.

class DecodeStep:
  """`steps` decoding steps for every slot in one device call, jitted once.

    step(cache, batch) -> ({'tokens': (k, s), 'generated': (k, s) bool,
                            'next_tokens': (s,), 'positions': (s,)}, cache)

  `batch` (numpy, one entry per slot): reset (s,) bool (start a new request:
  the slot's cache is reset first), tokens (s,) int32 (the first step's
  input: the token at the previous position, 0 at position 0), positions
  (s,) int32, prompt (s, P) int32 and prompt_len (s,) (the prompt ids, padded),
  ends (s,) int32 (the position at which the slot stops: prompt length +
  max_tokens), seeds (s,) uint32, temperature/top_k/top_p (s,), active (s,)
  bool (the slot holds a request), use_prefix (s,) bool, prefix_row (s,)
  int32.

  A `lax.scan` over k = `steps` steps carries the caches, each slot's input
  token, position and whether it is still live: a step at a position inside
  the prompt forces the prompt's next token (as `terraflax.decoding` does),
  later steps feed back the sampled token; a slot stops (is no longer live)
  once it reaches `ends` or samples `eos_id`. `tokens[j, i]` is slot i's
  token of step j, a generated one where `generated[j, i]`; `next_tokens` and
  `positions` are where each slot stands after the call. The host checks stop
  strings after the call and drops tokens past one. A call runs the base
  model, the prefixed one, or both (each slot keeps its own result), by which
  kinds of live slots it starts with (one `lax.switch` around the scan: a
  conditional inside it would pass every cache through it each step).
  """

  def __init__(self, served: Served, n_slots: int, *, steps: int = 8):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
      raise ServeError(f'--steps_per_call must be a positive int, got {steps!r}.')
    self.served = served
    self.n_slots = n_slots
    self.steps = steps
    model = served.base_model if served.prefix_model is None else served.prefix_model
    self.init_cache = jax.jit(functools.partial(_batch1_cache, model))()
    if served.prefix_model is not None:
      plain = jax.eval_shape(functools.partial(_batch1_cache, served.base_model))
      if (jax.tree_util.tree_structure(plain) != jax.tree_util.tree_structure(self.init_cache)
          or any(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
              lambda a, b: a.shape != b.shape, plain, self.init_cache)))):
        raise ServeError('the prefix model keeps a different decoding cache than the base model; '
                         'this server cannot share slots between them.')
    self.slot_axes = _slot_axes(model)
    self._jitted = None

  def prompt_width(self, longest: int) -> int:
    """P, the prompt buffer's width: model.max_len, else a power of two >= `longest` (>= 16)."""
    if self.served.max_len is not None:
      return self.served.max_len
    return max(16, 1 << max(0, longest - 1).bit_length())

  def empty_cache(self):
    """The slots' cache: the batch-1 cache stacked n_slots times (leading axis)."""
    # Placed (committed) like the step's outputs, so the second step does not compile again.
    def stack(c, axis):
      c = jnp.expand_dims(c, axis)
      return jnp.broadcast_to(c, c.shape[:axis] + (self.n_slots,) + c.shape[axis + 1:])
    return jax.device_put(jax.tree_util.tree_map(stack, self.init_cache, self.slot_axes),
                          jax.devices()[0])

  def __call__(self, cache, batch: dict):
    if self._jitted is None:
      served = self.served
      plain_model = None if NO_PREFIX in served.prefixes else served.base_model
      eos = -1 if served.eos_id is None else int(served.eos_id)
      self._jitted = compiler.jit(functools.partial(
          _steps, plain_model=plain_model, prefix_model=served.prefix_model, n_steps=self.steps,
          eos_id=eos, slot_axes=self.slot_axes), decoding=True, donate_argnums=(2,))
    return self._jitted(self.served.base_params, self.served.stacked, cache, self.init_cache,
                        {k: jnp.asarray(v) for k, v in batch.items()})


def _batch1_cache(model, batch: int = 1):
  """A fresh predict-mode cache for `batch` rows (one by default)."""
  return decoding._init_cache(model, batch, None, jax.random.key(0))  # pylint: disable=protected-access


def _slot_axes(model):
  """Per cache leaf, the axis the slots are stacked on: the leaf's batch axis (found by
  comparing the shapes of a batch-1 and a batch-2 cache), 0 for leaves without one.

  A layer-stacked (scanned) cache leaf (layers, b, ...) gets its slots at axis 1, so the
  stack's scan over layers slices it without a transposed copy of the whole cache.
  """
  one = jax.eval_shape(functools.partial(_batch1_cache, model, 1))
  two = jax.eval_shape(functools.partial(_batch1_cache, model, 2))

  def axis(a, b):
    changed = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return changed[0] if len(changed) == 1 else 0
  return jax.tree_util.tree_map(axis, one, two)


def _apply_one(model, params, cache, token, key):
  """Batch-1 step: token () -> float32 logits (v,), new cache."""
  logits, state = model.apply({'params': params, 'cache': cache}, token.reshape(1, 1),
                              rngs=rng_lib.noise_keys(key), mutable=['cache'])
  return logits[0, 0].astype(jnp.float32), state['cache']


def _steps(base_params, stacked, cache, init_cache, batch, *, plain_model, prefix_model,
           n_steps, eos_id, slot_axes):
  """`n_steps` decoding steps of every slot (see `DecodeStep`)."""
  def select(mask, a, b, axis):  # Per slot: b where mask, else a; slots on `axis` of a, b.
    shape = [1] * a.ndim
    shape[axis] = mask.shape[0]
    return jnp.where(mask.reshape(shape), b, a)

  reset = batch['reset']
  cache = jax.lax.cond(jnp.any(reset), lambda c: jax.tree_util.tree_map(
      lambda c, i, axis: select(reset, c, jnp.expand_dims(i, axis), axis), c, init_cache,
      slot_axes), lambda c: c, cache)
  keys = jax.vmap(request_key)(batch['seeds'])
  use = batch['use_prefix']
  prompt, prompt_len, ends = batch['prompt'], batch['prompt_len'], batch['ends']
  any_sampling = jnp.any(batch['temperature'] > 0)
  if stacked is not None:
    rows = jax.tree_util.tree_map(lambda s: s[batch['prefix_row']], stacked)

  def one_step(kind, carry, _):
    cache, tokens, positions, live = carry
    step_keys = jax.vmap(jax.random.fold_in)(keys, positions)

    def plain(cache):
      return jax.vmap(functools.partial(_apply_one, plain_model, base_params),
                      in_axes=(slot_axes, 0, 0), out_axes=(0, slot_axes))(
                          cache, tokens, step_keys)

    def prefixed(cache):
      def one(prefix, c, token, key):
        return _apply_one(prefix_model, prefix_lib.merge_prefix(base_params, prefix), c, token,
                          key)
      return jax.vmap(one, in_axes=(0, slot_axes, 0, 0), out_axes=(0, slot_axes))(
          rows, cache, tokens, step_keys)

    def both(cache):
      logits, cache_plain = plain(cache)
      logits_prefixed, cache_prefixed = prefixed(cache)
      return (jnp.where(use[:, None], logits_prefixed, logits),
              jax.tree_util.tree_map(functools.partial(select, use), cache_plain,
                                     cache_prefixed, slot_axes))

    with kernels.xla_only():  # Native kernels would run once per slot under vmap.
      logits, cache = {'plain': plain, 'prefixed': prefixed, 'both': both}[kind](cache)
    sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(step_keys)
    sampled = jax.lax.cond(  # All greedy (the common case): no sorting.
        any_sampling,
        lambda: sample_rows(logits, sample_keys, batch['temperature'], batch['top_k'],
                            batch['top_p']),
        lambda: first_argmax(logits))
    in_prompt = positions < prompt_len
    forced = jnp.take_along_axis(
        prompt, jnp.clip(positions, 0, prompt.shape[1] - 1)[:, None], axis=1)[:, 0]
    token = jnp.where(in_prompt, forced, sampled)
    generated = live & ~in_prompt
    done = generated & ((positions + 1 >= ends) | (sampled == eos_id))
    carry = (cache, jnp.where(live, token, tokens), jnp.where(live, positions + 1, positions),
             live & ~done)
    return carry, (token, generated)

  live = batch['active'] & (batch['positions'] < ends)
  carry = (cache, batch['tokens'], batch['positions'], live)

  def run(kind):
    def scan(carry):
      return jax.lax.scan(functools.partial(one_step, kind), carry, None, length=n_steps)
    return scan

  # Which model(s) run is chosen once per call, by the slots live at its start (a conditional
  # per step would pass every cache through it).
  if prefix_model is None:
    result = run('plain')(carry)
  elif plain_model is None:
    result = run('prefixed')(carry)
  else:
    needs_plain, needs_prefixed = jnp.any(live & ~use), jnp.any(live & use)
    which = jnp.where(needs_plain & needs_prefixed, 2, jnp.where(needs_prefixed, 1, 0))
    result = jax.lax.switch(which, [run('plain'), run('prefixed'), run('both')], carry)
  (cache, tokens, positions, _), (out, generated) = result
  return {'tokens': out, 'generated': generated, 'next_tokens': tokens,
          'positions': positions}, cache
