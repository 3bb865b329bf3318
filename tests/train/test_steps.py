"""terraflax.train.steps: the train step's noise comes from terraflax.rng's recipe."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from terraflax import rng as rng_lib
from terraflax.layers.metrics import cross_entropy_sum
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
