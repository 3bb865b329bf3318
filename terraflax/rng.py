"""The random streams of terraflax and the one recipe that derives their keys.

  params    initialisation
  dropout   Dropout and attention dropout
  hash      LSH random rotations (fresh per call in train/eval, fixed per sequence in predict)
  sparse    Gumbel noise of the sparse feed-forward controllers

Every place that calls a model (the train and eval steps, decoding, export,
abstract tracing) asks this module for its rngs; combinators that split or
replay randomness (`Repeat`, `Chunk`, `ReversibleSerial`) split every stream
named here and list none of their own.
"""

from __future__ import annotations

import jax

STREAMS = ('params', 'dropout', 'hash', 'sparse')
NOISE_STREAMS = tuple(s for s in STREAMS if s != 'params')  # What `apply` draws from.


def stream_keys(key: jax.Array, streams=STREAMS) -> dict[str, jax.Array]:
  """{stream: fold_in(key, STREAMS.index(stream))}: the rngs of one init/apply call.

  A stream's key does not depend on which other streams are asked for, so the
  dropout key of a training step is the one decoding or export would draw.
  """
  return {stream: jax.random.fold_in(key, STREAMS.index(stream)) for stream in streams}


def noise_keys(key: jax.Array) -> dict[str, jax.Array]:
  """`stream_keys` of the streams `apply` draws from (all but 'params')."""
  return stream_keys(key, NOISE_STREAMS)


def abstract_keys(streams=STREAMS) -> dict[str, jax.Array]:
  """Abstract keys (`jax.eval_shape`) for tracing init/apply without computing anything."""
  key = jax.eval_shape(jax.random.key, 0)
  return {stream: key for stream in streams}
