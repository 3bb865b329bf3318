"""terraflax.train.steps: the train step's noise comes from terraflax.rng's recipe."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

import terraflax.models as tm
from terraflax import rng as rng_lib
from terraflax.layers.metrics import cross_entropy_sum
from terraflax.models.attention import LSH
from terraflax.train import evaluation
from terraflax.train import state as state_lib
from terraflax.train import steps

VOCAB = 3


class NoisyLogits(nn.Module):
  """[ids] -> [logits]: (b, l) -> (b, l, VOCAB), a bias plus one uniform draw per noise stream."""

  @nn.compact
  def __call__(self, ids):
    bias = self.param('bias', nn.initializers.zeros, (VOCAB,))
    draws = jnp.stack([jax.random.uniform(self.make_rng(s)) for s in rng_lib.NOISE_STREAMS])
    logits = bias + jnp.pad(draws, (0, VOCAB - len(draws)))
    return jnp.broadcast_to(logits, ids.shape + (VOCAB,))


def logits_of(key, shape):
  """NoisyLogits (zero bias) applied directly with the rngs `noise_keys(key)`."""
  return NoisyLogits().apply({'params': {'bias': jnp.zeros((VOCAB,))}},
                             jnp.zeros(shape, jnp.int32), rngs=rng_lib.noise_keys(key))


class TrainStepTest(absltest.TestCase):

  def test_step_s_draws_from_noise_keys_of_fold_in_rng_s(self):
    model, tx = NoisyLogits(), optax.sgd(0.0)
    params = {'bias': jnp.zeros((VOCAB,))}
    base = jax.random.key(11)
    state = state_lib.TrainState(step=jnp.asarray(5, jnp.int32), params=params,
                                 opt_state=tx.init(params), rng=jax.random.key_data(base))
    batch = {'inputs': jnp.zeros((2, 4), jnp.int32), 'targets': jnp.ones((2, 4), jnp.int32),
             'weights': jnp.ones((2, 4), jnp.float32)}
    _, metrics = jax.jit(steps.make_train_step(model, tx))(state, batch)
    want, _ = cross_entropy_sum(logits_of(jax.random.fold_in(base, 5), (2, 4)),
                                batch['targets'], batch['weights'])
    np.testing.assert_allclose(metrics['loss_sum'], want, rtol=1e-6)

  def test_eval_batch_i_draws_from_noise_keys_of_fold_in_key0_i(self):
    batch = {'inputs': jnp.zeros((2, 4), jnp.int32), 'targets': jnp.ones((2, 4), jnp.int32),
             'weights': jnp.ones((2, 4), jnp.float32)}
    sums = evaluation.make_eval_step(NoisyLogits())({'bias': jnp.zeros((VOCAB,))}, batch, 3)
    want, _ = cross_entropy_sum(logits_of(jax.random.fold_in(jax.random.key(0), 3), (2, 4)),
                                batch['targets'], batch['weights'])
    np.testing.assert_allclose(sums['loss_sum'], want, rtol=1e-6)

  def test_mfu_and_peak(self):
    self.assertAlmostEqual(steps.mfu(2e9, 45.0, 180e9), 0.5)
    self.assertIsNone(steps.mfu(None, 45.0, 180e9))
    self.assertEqual(steps.peak_flops(0, 'cpu'), 180e9)
    self.assertEqual(steps.peak_flops(1e12, 'gpu'), 1e12)
    self.assertIsNone(steps.peak_flops(0, 'gpu'))


if __name__ == '__main__':
  absltest.main()


class ChunkedLossStepTest(absltest.TestCase):
  """train.loss_chunk_len: the head and loss in chunks == the whole logits (loss, gradients)."""

  def test_reformer_lm_chunked_equals_whole_logits(self):
    l = 32
    tokens = jax.random.randint(jax.random.key(0), (2, l), 1, 11)
    weights = (jax.random.uniform(jax.random.key(3), (2, l)) > 0.2).astype(jnp.float32)
    seg = jnp.concatenate([jnp.ones((2, 20), jnp.int32), jnp.full((2, 12), 2, jnp.int32)], 1)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(20), jnp.arange(12)]), (2, l))
    for packed in (False, True):
      model = tm.ReformerLM(vocab_size=11, d_model=16, d_ff=32, n_layers=1, n_heads=2,
                            dropout=0.1, max_len=l, attention=LSH(n_hashes=2, chunk_len=8),
                            packed=packed)
      batch = {'inputs': tokens, 'targets': tokens, 'weights': weights}
      if packed:
        batch.update(segment_ids=seg, positions=pos)
      inputs = (tokens, seg, pos) if packed else (tokens,)
      params = jax.jit(model.init)(rng_lib.stream_keys(jax.random.key(1)), *inputs)['params']
      tx = optax.sgd(1.0)  # The update is the gradient itself.
      state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=tx.init(params),
                                   rng=jax.random.key_data(jax.random.key(2)))
      (whole, m_whole), (chunked, m_chunked) = (
          jax.jit(steps.make_train_step(model, tx, loss_chunk_len=c))(state, batch)
          for c in (0, 8))
      for name in ('loss_sum', 'correct_sum', 'weight_sum', 'grad_norm'):
        np.testing.assert_allclose(m_chunked[name], m_whole[name], rtol=1e-5, err_msg=name)
      self.assertGreater(float(m_whole['grad_norm']), 0.0)
      for got, want in zip(jax.tree_util.tree_leaves(chunked.params),
                           jax.tree_util.tree_leaves(whole.params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_a_model_without_an_lm_head_keeps_the_whole_logits(self):
    model, tx = NoisyLogits(), optax.sgd(0.0)
    params = {'bias': jnp.zeros((VOCAB,))}
    state = state_lib.TrainState(step=jnp.asarray(5, jnp.int32), params=params,
                                 opt_state=tx.init(params),
                                 rng=jax.random.key_data(jax.random.key(11)))
    batch = {'inputs': jnp.zeros((2, 4), jnp.int32), 'targets': jnp.ones((2, 4), jnp.int32),
             'weights': jnp.ones((2, 4), jnp.float32)}
    _, whole = jax.jit(steps.make_train_step(model, tx))(state, batch)
    _, chunked = jax.jit(steps.make_train_step(model, tx, loss_chunk_len=2))(state, batch)
    np.testing.assert_allclose(chunked['loss_sum'], whole['loss_sum'], rtol=1e-6)


def step_temp_bytes(length: int, loss_chunk_len: int, *, vocab: int, d_model: int) -> int:
  """Compiled temp memory of a tiny ReformerLM's train step (Adam) at `length`; compile only."""
  model = tm.ReformerLM(vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, n_layers=1,
                        n_heads=2, dropout=0.0, max_len=length,
                        attention=LSH(n_hashes=2, chunk_len=16))
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens,
           'weights': jax.ShapeDtypeStruct((1, length), jnp.float32)}
  tx = optax.adam(1e-3)
  params = jax.eval_shape(lambda key: model.init(rng_lib.stream_keys(key),
                                                 jnp.zeros((1, 64), jnp.int32))['params'],
                          jax.random.key(0))
  state = state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      opt_state=jax.eval_shape(tx.init, params), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  step = jax.jit(steps.make_train_step(model, tx, loss_chunk_len=loss_chunk_len),
                 donate_argnums=(0,))
  return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


class StepMemoryTest(absltest.TestCase):
  """Compiled temp memory per token of the train step: linear in the length, and bounded."""

  def test_temp_memory_per_token_is_bounded_and_linear(self):
    vocab, d_model = 512, 32
    # Per token: 20 float32 rows of d_model (residual streams, their cotangents, q/v and
    # attention outputs of one block) plus one row of logits (a chunk's at most). The whole
    # logits path holds several (l, vocab) rows and must exceed it (the bound can fail).
    bound = 4 * (20 * d_model + vocab)
    small = step_temp_bytes(2048, 256, vocab=vocab, d_model=d_model)
    large = step_temp_bytes(4096, 256, vocab=vocab, d_model=d_model)
    whole = step_temp_bytes(2048, 0, vocab=vocab, d_model=d_model)
    self.assertLess(small / 2048, bound)
    self.assertLess(large / 4096, bound)
    self.assertLess(large / small, 2.25)  # ~linear (hash buckets grow with the length)
    self.assertGreater(whole / 2048, bound)
