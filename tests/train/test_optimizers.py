"""Schedules, weight-decay masks, clipping, and gradient accumulation == one big batch."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import traverse_util

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.train import optimizers
from terraflax.train import trainer
from tests.train.tiny_models import TinyLM


def opt_config(**fields):
  defaults = dict(name='adam', learning_rate=1.0, warmup_steps=0, decay='constant',
                  final_lr_fraction=0.0, b1=0.9, b2=0.98, eps=1e-9, momentum=0.0,
                  weight_decay=0.0, grad_clip=0.0)
  defaults.update(fields)
  return ml_collections.ConfigDict(defaults)


class ScheduleTest(parameterized.TestCase):

  def test_linear_warmup_then_constant(self):
    schedule = optimizers.make_schedule(opt_config(learning_rate=2.0, warmup_steps=10), 100)
    for step, want in ((0, 0.0), (5, 1.0), (10, 2.0), (99, 2.0)):
      self.assertAlmostEqual(float(schedule(step)), want, places=6)

  def test_rsqrt(self):
    schedule = optimizers.make_schedule(opt_config(warmup_steps=100, decay='rsqrt'), 1000)
    self.assertAlmostEqual(float(schedule(50)), 0.5, places=6)
    self.assertAlmostEqual(float(schedule(100)), 1.0, places=6)
    self.assertAlmostEqual(float(schedule(400)), 0.5, places=6)  # sqrt(100 / 400)
    no_warmup = optimizers.make_schedule(opt_config(decay='rsqrt'), 1000)
    self.assertAlmostEqual(float(no_warmup(0)), 1.0, places=6)
    self.assertAlmostEqual(float(no_warmup(16)), 0.25, places=6)

  def test_cosine_ends_at_the_final_fraction(self):
    schedule = optimizers.make_schedule(
        opt_config(warmup_steps=10, decay='cosine', final_lr_fraction=0.1), 110)
    self.assertAlmostEqual(float(schedule(10)), 1.0, places=6)
    self.assertAlmostEqual(float(schedule(60)), 0.1 + 0.9 * 0.5, places=5)
    self.assertAlmostEqual(float(schedule(110)), 0.1, places=6)


def norm_model():
  return cb.Serial(tl.Embedding(8, 4),
                   cb.Repeat(cb.Residual(tl.LayerNorm(), tl.Dense(4)), 2),
                   tl.RMSNorm(), tl.Dense(8))


class WeightDecayTest(absltest.TestCase):

  def test_mask_skips_biases_and_norm_scales(self):
    params = nn.meta.unbox(
        norm_model().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))['params'])
    mask = optimizers.decay_mask(params)
    flat = {'/'.join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    self.assertEqual(flat, {
        'Embedding_0/embedding': True,
        'Repeat_1/Residual_0/LayerNorm_0/scale': False,
        'Repeat_1/Residual_0/LayerNorm_0/bias': False,
        'Repeat_1/Residual_0/Dense_1/kernel': True,  # Stacked (2, 4, 4): still decayed.
        'Repeat_1/Residual_0/Dense_1/bias': False,  # Stacked (2, 4): still not decayed.
        'RMSNorm_2/scale': False,
        'Dense_3/kernel': True,
        'Dense_3/bias': False,
    })

  def test_adamw_decays_only_masked_leaves(self):
    params = {'Dense_0': {'kernel': jnp.full((2, 2), 2.0), 'bias': jnp.full((2,), 2.0)}}
    tx, _ = optimizers.make_optimizer(
        opt_config(name='adamw', learning_rate=0.5, weight_decay=0.1), 10)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates['Dense_0']['kernel'], -0.5 * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates['Dense_0']['bias'], 0.0)

  def test_gradient_clipping(self):
    params = {'w': jnp.zeros((4,))}
    tx, _ = optimizers.make_optimizer(opt_config(name='sgd', grad_clip=1.0), 10)
    grads = {'w': jnp.array([6.0, 8.0, 0.0, 0.0])}  # norm 10
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates['w'], [-0.6, -0.8, 0.0, 0.0], rtol=1e-6)

  def test_adafactor_and_sgd_momentum_build_and_step(self):
    params = {'w': jnp.ones((3, 4))}
    for cfg in (opt_config(name='adafactor', weight_decay=0.01, learning_rate=0.1),
                opt_config(name='sgd', momentum=0.9, weight_decay=0.01, learning_rate=0.1)):
      tx, _ = optimizers.make_optimizer(cfg, 10)
      updates, _ = tx.update({'w': jnp.ones((3, 4))}, tx.init(params), params)
      self.assertTrue(np.all(np.asarray(updates['w']) < 0), cfg.name)


class FrozenParametersTest(absltest.TestCase):

  def test_only_matching_parameters_change_and_follow_the_plain_optimizer(self):
    params = nn.meta.unbox(
        norm_model().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))['params'])
    config = opt_config(name='adamw', learning_rate=0.1, weight_decay=0.1, grad_clip=0.5,
                        trainable='Dense_3|Dense_1/kernel')
    tx, _ = optimizers.make_optimizer(config, 10)
    plain, _ = optimizers.make_optimizer(opt_config(**dict(config, trainable='')), 10)
    is_trained = lambda path: 'Dense_3' in path or 'Dense_1/kernel' in path
    flat = lambda tree: {optimizers.path_name(p): x
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    nest = lambda items: traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in items})
    trained = nest((k, v) for k, v in flat(params).items() if is_trained(k))
    self.assertLen(flat(trained), 3)
    self.assertEqual(optimizers.count_trained(params, config.trainable),
                     sum(x.size for x in flat(trained).values()))
    rng = np.random.default_rng(0)
    state, plain_state = tx.init(params), plain.init(trained)
    for _ in range(3):
      grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                                     params)
      updates, state = tx.update(grads, state, params)
      new = optax.apply_updates(params, updates)
      # Reference: the plain optimizer (clipping, adamw, decay mask) on the trained leaves only.
      plain_grads = nest((k, v) for k, v in flat(grads).items() if is_trained(k))
      plain_updates, plain_state = plain.update(plain_grads, plain_state, trained)
      trained = optax.apply_updates(trained, plain_updates)
      for path, value in flat(new).items():
        if is_trained(path):
          np.testing.assert_allclose(value, flat(trained)[path], rtol=1e-6, atol=1e-7,
                                     err_msg=path)
        else:  # Frozen: bit-identical.
          np.testing.assert_array_equal(value, flat(params)[path], err_msg=path)
      params = new

  def test_train_step_differentiates_only_trained_parameters(self):
    """Same update as differentiating everything; fewer flops; grad_norm of the trained."""
    model = TinyLM(vocab_size=11, d_model=8, d_ff=16, n_layers=2, mode='train')
    tokens = (jnp.arange(24, dtype=jnp.int32).reshape(2, 12) * 7) % 11
    batch = {'inputs': tokens, 'targets': tokens, 'weights': jnp.ones((2, 12))}
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)['params'])
    pattern = 'Residual_3/'  # The first feed-forward block: frozen layers lie above it.
    tx, _ = optimizers.make_optimizer(opt_config(learning_rate=0.1, trainable=pattern), 10)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params),
                               rng=jax.random.key_data(jax.random.key(2)))
    everything = jax.jit(trainer.make_train_step(model, tx))
    only_trained = jax.jit(trainer.make_train_step(model, tx, trainable=pattern))
    want, want_metrics = everything(state, batch)
    got, metrics = only_trained(state, batch)
    chex.assert_trees_all_close(got.params, want.params, rtol=1e-6, atol=1e-7)
    self.assertEqual(float(metrics['loss_sum']), float(want_metrics['loss_sum']))

    def mean_loss(p):
      logp = jax.nn.log_softmax(model.apply({'params': p}, tokens))
      return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))

    grads = jax.grad(mean_loss)(params)
    trained_norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for path, g in
                                 jax.tree_util.tree_leaves_with_path(grads)
                                 if pattern in optimizers.path_name(path)))
    self.assertAlmostEqual(float(metrics['grad_norm']), trained_norm, places=5)
    self.assertGreater(float(want_metrics['grad_norm']), trained_norm * 1.01)

    flops = lambda step: step.lower(state, batch).compile().cost_analysis()['flops']
    self.assertLess(flops(only_trained), 0.9 * flops(everything))


class GradAccumulationTest(absltest.TestCase):

  def test_four_micro_batches_equal_one_four_times_larger_batch(self):
    model = TinyLM(vocab_size=11, d_model=8, d_ff=16, n_layers=1, mode='train')
    rng = np.random.default_rng(0)
    batch = {'inputs': rng.integers(0, 11, (8, 6)).astype(np.int32)}
    batch['targets'] = batch['inputs']
    batch['weights'] = (rng.random((8, 6)) < 0.6).astype(np.float32)  # Unequal per micro-batch.
    params = nn.meta.unbox(model.init(jax.random.key(1), batch['inputs'])['params'])
    tx = optax.adam(1e-2)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params),
                               rng=jax.random.key_data(jax.random.key(2)))

    # Independent reference: the gradient of the weighted mean loss over all 8 rows.
    def mean_loss(p):
      logits = model.apply({'params': p}, batch['inputs'])
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
      return jnp.sum(nll * batch['weights']) / jnp.sum(batch['weights'])

    @jax.jit
    def reference_step(p):
      loss, grads = jax.value_and_grad(mean_loss)(p)
      updates, _ = tx.update(grads, tx.init(p), p)
      return loss, optax.apply_updates(p, updates)

    loss, want = reference_step(params)

    for k in (1, 4):
      new_state, metrics = jax.jit(trainer.make_train_step(model, tx, grad_accum_steps=k))(
          state, batch)
      chex.assert_trees_all_close(new_state.params, want, rtol=1e-5, atol=1e-6)
      self.assertAlmostEqual(float(metrics['loss_sum'] / metrics['weight_sum']), float(loss),
                             places=5)
      self.assertEqual(float(metrics['weight_sum']), float(batch['weights'].sum()))
      self.assertEqual(int(new_state.step), 1)
      self.assertEqual(int(metrics['nonfinite']), 0)
    self.assertFalse(math.isnan(float(loss)))



class MixedPrecisionTest(absltest.TestCase):

  def test_bfloat16_compute_keeps_float32_params(self):
    model = TinyLM(vocab_size=11, d_model=8, d_ff=16, mode='train', dtype=jnp.bfloat16)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 11
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)['params'])
    self.assertEqual(model.apply({'params': params}, tokens).dtype, jnp.bfloat16)
    tx = optax.adam(1e-2)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params),
                               rng=jax.random.key_data(jax.random.key(2)))
    batch = {'inputs': tokens, 'targets': tokens, 'weights': jnp.ones((2, 6))}
    new_state, metrics = jax.jit(trainer.make_train_step(model, tx))(state, batch)
    for leaf in jax.tree_util.tree_leaves(new_state.params):
      self.assertEqual(leaf.dtype, jnp.float32)
    self.assertEqual(metrics['loss_sum'].dtype, jnp.float32)
    self.assertTrue(np.isfinite(float(metrics['loss_sum'])))


if __name__ == '__main__':
  absltest.main()
