"""Shared contract helpers for the tests (STYLE.md: eval == predict, ...)."""

import jax
import jax.numpy as jnp


def predict_one_at_a_time(model, params, xs, key=None):
  """A predict-mode `model` fed xs[:, t:t + 1] for every t, cache threaded: outputs on axis 1.

  The cache starts from `model.init(key, xs[:, :1])`; compare the result with
  the eval-mode forward pass of the same params (decoding == the full pass).
  """
  key = jax.random.key(0) if key is None else key
  cache = model.init(key, xs[:, :1])['cache']
  step = jax.jit(lambda cache, x_t: model.apply({'params': params, 'cache': cache}, x_t,
                                                mutable=['cache']))
  outputs = []
  for t in range(xs.shape[1]):
    out, state = step(cache, xs[:, t:t + 1])
    cache = state['cache']
    outputs.append(out)
  return jnp.concatenate(outputs, axis=1)
