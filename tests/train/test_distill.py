"""Distillation in the train step: alpha = 0 is plain training; the gradient at alpha = 1 is
that of an independently written KL(teacher || student) loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from terraflax.train import distill
from terraflax.train import evaluation
from terraflax.train import trainer
from tests.train.tiny_models import TinyLM

KEY = jax.random.key(0)


def setup():
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 11, (4, 6)).astype(np.int32)
  batch = {'inputs': inputs, 'targets': inputs,
           'weights': (rng.random((4, 6)) < 0.7).astype(np.float32)}
  student = TinyLM(vocab_size=11, d_model=8, d_ff=16, mode='train')
  teacher = TinyLM(vocab_size=11, d_model=12, d_ff=16, n_layers=2, mode='eval')
  params = nn.meta.unbox(student.init(KEY, inputs)['params'])
  teacher_params = nn.meta.unbox(teacher.init(jax.random.key(1), inputs)['params'])
  tx = optax.sgd(1.0)  # The update is minus the gradient.
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.key_data(KEY))
  return batch, student, teacher, teacher_params, tx, state


class DistillStepTest(absltest.TestCase):

  def test_alpha_zero_is_plain_training(self):
    batch, student, teacher, teacher_params, tx, state = setup()
    plain = trainer.make_train_step(student, tx)(state, batch)
    t = distill.Teacher(model=teacher, temperature=2.0, alpha=0.0, workdir='', name='TinyLM')
    taught = trainer.make_train_step(student, tx, teacher=t)(state, batch, teacher_params)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(taught)):
      np.testing.assert_array_equal(a, b)

  def test_alpha_one_gradient_is_the_soft_kl_gradient(self):
    batch, student, teacher, teacher_params, tx, state = setup()
    temperature = 3.0
    t = distill.Teacher(model=teacher, temperature=temperature, alpha=1.0, workdir='',
                        name='TinyLM')
    new_state, metrics = trainer.make_train_step(student, tx, teacher=t)(state, batch,
                                                                         teacher_params)
    # TinyLM has no dropout by default, so the step's random streams do not matter.
    teacher_logits = teacher.apply({'params': teacher_params}, batch['inputs'])

    def reference(params):
      logits = student.apply({'params': params}, batch['inputs'])
      p = jax.nn.softmax(teacher_logits / temperature)
      log_q = jax.nn.log_softmax(logits / temperature)
      kl = jnp.sum(p * (jnp.log(p) - log_q), axis=-1)
      return temperature ** 2 * jnp.sum(kl * batch['weights']) / jnp.sum(batch['weights'])

    grads = jax.grad(reference)(state.params)
    for new, old, g in zip(jax.tree_util.tree_leaves(new_state.params),
                           jax.tree_util.tree_leaves(state.params),
                           jax.tree_util.tree_leaves(grads)):
      np.testing.assert_allclose(old - new, g, rtol=1e-4, atol=1e-6)
    # Reported loss is still the student's cross-entropy on the labels.
    logits = student.apply({'params': state.params}, batch['inputs'])
    ce = evaluation.batch_sums(logits, batch)['loss_sum']
    np.testing.assert_allclose(metrics['loss_sum'], ce, rtol=1e-6)


if __name__ == '__main__':
  absltest.main()
