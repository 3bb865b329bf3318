"""Magnitude pruning: the schedule's hand values, exact mask counts, zeros through training,
resume and config errors."""

import contextlib
import io
import os
import pathlib
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl.testing import absltest, parameterized

from terraflax.train import checkpoint
from terraflax.train import config as config_lib
from terraflax.train import data as data_lib
from terraflax.train import metrics as metrics_lib
from terraflax.train import pruning
from terraflax.train import trainer
from tests.train.test_trainer import _CrashAfter, comparable
from tests.train.tiny_models import tiny_lm_config


def pruned_config(**pruning_fields):
  """A 12-step TransformerLM run (2 scanned layers) with `config.pruning` set."""
  config = tiny_lm_config(**{'train.steps': 12, 'train.log_every': 2, 'train.eval_every': 6,
                             'train.checkpoint_every': 3})
  config.model = ml_collections.ConfigDict({
      'name': 'TransformerLM', 'vocab_size': 16, 'd_model': 16, 'd_ff': 32, 'n_layers': 2,
      'n_heads': 2, 'dropout': 0.0, 'max_len': 16, 'dtype': 'float32'})
  config.pruning = ml_collections.ConfigDict(dict(
      {'method': 'magnitude', 'sparsity': 0.75, 'start_step': 2, 'end_step': 8,
       'frequency': 2}, **pruning_fields))
  return config


def flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class ScheduleTest(absltest.TestCase):

  def test_cubic_schedule_hand_values(self):
    # target 0.8 from step 10 to 20: 0.8 * (1 - (1 - f)^3) at f = (t - 10) / 10.
    want = {1: 0.0, 9: 0.0, 10: 0.0, 12: 0.8 * (1 - 0.8 ** 3), 15: 0.8 * (1 - 0.125),
            19: 0.8 * (1 - 0.1 ** 3), 20: 0.8, 30: 0.8}
    for t, value in want.items():
      got = float(pruning.sparsity_at(t, target=0.8, start_step=10, end_step=20))
      self.assertAlmostEqual(got, value, places=6, msg=t)
    # One-shot (start == end): nothing before, everything at the step.
    self.assertEqual(float(pruning.sparsity_at(4, target=0.5, start_step=5, end_step=5)), 0.0)
    self.assertEqual(float(pruning.sparsity_at(5, target=0.5, start_step=5, end_step=5)), 0.5)

  def test_mask_steps(self):
    steps = [t for t in range(30) if pruning.is_mask_step(t, start_step=10, end_step=22,
                                                          frequency=5)]
    self.assertEqual(steps, [10, 15, 20, 22])  # The grid, and the end step off it.


def toy_params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {'stack': {'kernel': jax.random.normal(keys[0], (3, 4, 5))},
          'norm': {'scale': jax.random.normal(keys[1], (5,))},
          'head': {'kernel': jax.random.normal(keys[2], (6, 7))}}


def run_toy(tx, params, n_steps):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for i in range(n_steps):
    grads = jax.tree_util.tree_map(
        lambda p, i=i: jnp.sin(p * 3.0 + i), params)  # Deterministic, non-trivial gradients.
    updates, state = step(params, state, grads)
    params = optax.apply_updates(params, updates)
  return params, state


class TransformTest(parameterized.TestCase):

  def test_global_prunes_exactly_the_scheduled_count_of_the_chosen_params(self):
    params = toy_params()
    tx = optax.chain(optax.sgd(0.05), pruning.magnitude_pruning(
        sparsity=0.6, start_step=2, end_step=4, frequency=1, pattern='kernel$'))
    pruned, state = run_toy(tx, params, 6)
    plain, _ = run_toy(optax.sgd(0.05), params, 6)
    n = 3 * 4 * 5 + 6 * 7
    zeros = sum(int(np.sum(np.asarray(x) == 0)) for x in (pruned['stack']['kernel'],
                                                           pruned['head']['kernel']))
    self.assertEqual(zeros, round(0.6 * n))
    # The norm scale is not chosen: bit-identical to the unpruned run.
    np.testing.assert_array_equal(pruned['norm']['scale'], plain['norm']['scale'])
    masks = pruning.find_state(state).masks
    self.assertIsInstance(masks['norm']['scale'], optax.MaskedNode)
    for name in ('stack', 'head'):  # Masks say exactly where the zeros are.
      np.testing.assert_array_equal(np.asarray(masks[name]['kernel']),
                                    np.asarray(pruned[name]['kernel']) != 0)
    self.assertAlmostEqual(pruning.sparsity(pruned, masks), round(0.6 * n) / n)

  def test_per_layer_prunes_each_layer_of_a_stack(self):
    params = toy_params()
    stacked = {'stack': {'kernel': True}, 'norm': {'scale': False}, 'head': {'kernel': False}}
    tx = pruning.magnitude_pruning(sparsity=0.5, start_step=1, end_step=1, scope='per_layer',
                                   pattern='kernel$', stacked=stacked)
    pruned, _ = run_toy(optax.chain(optax.sgd(0.05), tx), params, 3)
    per_layer = (np.asarray(pruned['stack']['kernel']) == 0).reshape(3, -1).sum(axis=1)
    np.testing.assert_array_equal(per_layer, [10, 10, 10])  # round(0.5 * 20) in each layer.
    self.assertEqual(int(np.sum(np.asarray(pruned['head']['kernel']) == 0)), 21)

  def test_one_shot_prunes_the_smallest_weights(self):
    w = jnp.array([[0.5, -0.1, 2.0, -3.0], [0.05, 1.0, -0.7, 0.2]])
    tx = pruning.magnitude_pruning(sparsity=0.5, start_step=1, end_step=1, pattern='w')
    updates, _ = tx.update({'w': jnp.zeros_like(w)}, tx.init({'w': w}), {'w': w})
    got = np.asarray(optax.apply_updates({'w': w}, updates)['w'])
    # The 4 smallest |w| (0.05, 0.1, 0.2, 0.5) become exactly 0; the rest are untouched.
    want = np.array([[0.0, 0.0, 2.0, -3.0], [0.0, 1.0, -0.7, 0.0]], np.float32)
    np.testing.assert_array_equal(got, want)

  def test_kept_weights_move_exactly_as_the_optimizer_says(self):
    params = toy_params()
    tx = optax.chain(optax.adam(0.01), pruning.magnitude_pruning(
        sparsity=0.5, start_step=1, end_step=1, pattern='kernel$'))
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.cos, params)
    updates, state = tx.update(grads, state, params)
    adam_updates, _ = optax.adam(0.01).update(grads, optax.adam(0.01).init(params), params)
    masks = pruning.find_state(state).masks
    for name in ('stack', 'head'):
      m = np.asarray(masks[name]['kernel'])
      np.testing.assert_array_equal(np.asarray(updates[name]['kernel'])[m],
                                    np.asarray(adam_updates[name]['kernel'])[m])

  def test_bad_arguments_name_the_argument(self):
    with self.assertRaisesRegex(ValueError, 'scope'):
      pruning.magnitude_pruning(sparsity=0.5, start_step=1, end_step=2, scope='rows')
    with self.assertRaisesRegex(ValueError, 'sparsity'):
      pruning.magnitude_pruning(sparsity=1.0, start_step=1, end_step=2)
    with self.assertRaisesRegex(ValueError, 'end_step'):
      pruning.magnitude_pruning(sparsity=0.5, start_step=3, end_step=2)


class TrainerPruningTest(absltest.TestCase):
  """A gradual run crashed at step 5 and resumed == the uninterrupted run; zeros stay zeros."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.workdir = os.path.join(cls.tmp.name, 'pruned')
    with contextlib.redirect_stdout(io.StringIO()):
      trainer.train_and_evaluate(pruned_config(), cls.workdir)
    cls.metrics = metrics_lib.read_metrics(cls.workdir)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_sparsity_follows_the_schedule_and_reaches_its_target_at_the_end_step(self):
    logged = {m['step']: m['train/sparsity'] for m in self.metrics}
    n = 2 * (3 * 16 * 16 + 16 * 16 + 2 * 16 * 32)  # q, k, v, output and two FF kernels, 2 layers.
    for step, value in logged.items():
      want = round(float(pruning.sparsity_at(step, target=0.75, start_step=2, end_step=8)) * n)
      if step < 8:  # Logged steps 2, 4, 6 are mask steps (frequency 2 from step 2).
        self.assertEqual(round(value * n), want, msg=step)
      else:
        self.assertEqual(round(value * n), round(0.75 * n), msg=step)

  def test_masked_weights_are_exactly_zero_through_training_and_resume(self):
    _, params = checkpoint.load_for_inference(self.workdir)
    chosen = flat(pruning.selected(params, pruning.DEFAULT_PARAMS))
    for name, x in flat(params).items():
      zeros = int(np.sum(np.asarray(x) == 0))
      if chosen[name]:
        self.assertGreater(zeros, 0.6 * x.size, msg=name)
      elif not name.endswith('bias'):  # (A bias starts at 0 and a dead unit's stays there.)
        self.assertEqual(zeros, 0, msg=name)  # Embeddings, norm scales: not pruned.
    # Crash after step 10, resume from the checkpoint at 9 (after the end step, so the
    # restored masks alone keep the zeros): the same metrics and weights.
    workdir = os.path.join(self.tmp.name, 'crashed')
    original = data_lib.Data.train_iterator
    with mock.patch.object(data_lib.Data, 'train_iterator',
                           lambda data, **kw: _CrashAfter(original(data, **kw), 10)), \
        contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaises(KeyboardInterrupt):
        trainer.train_and_evaluate(pruned_config(), workdir)
    with contextlib.redirect_stdout(io.StringIO()):
      trainer.train_and_evaluate(pruned_config(), workdir)
    self.assertEqual(comparable(metrics_lib.read_metrics(workdir)), comparable(self.metrics))
    _, resumed = checkpoint.load_for_inference(workdir)
    for name, x in flat(resumed).items():
      np.testing.assert_array_equal(np.asarray(x), np.asarray(flat(params)[name]), err_msg=name)


# Run with 8 forced CPU devices: prints each pruned parameter's and its mask's partition specs.
MASK_SHARDINGS = """
import ml_collections
from tests.train.test_pruning import pruned_config
from terraflax.train import config as config_lib, optimizers, pruning, sharding, state
config = pruned_config()
config.sharding = ml_collections.ConfigDict({'fsdp': 2, 'tensor_parallel': 2})
experiment = config_lib.validate_config(config)
mesh = sharding.mesh_from_config(experiment.config.sharding)
tx, _ = optimizers.make_optimizer(experiment.config.optimizer, 12)
tx = pruning.add_pruning(tx, experiment.config.pruning, experiment.abstract_variables['params'])
s = state.initial_state(experiment, tx, mesh)
masks = pruning.find_state(s.opt_state).masks
params = {optimizers.path_name(p): x
          for p, x in pruning.jax.tree_util.tree_flatten_with_path(s.params)[0]}
for path, mask in pruning.jax.tree_util.tree_flatten_with_path(masks)[0]:
  name = optimizers.path_name(path)
  print(name, '|', mask.sharding.spec, '|', params[name].sharding.spec)
"""


class ShardedMasksTest(absltest.TestCase):

  def test_masks_are_sharded_like_their_parameters(self):
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(root), XLA_FLAGS=(
        os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip())
    done = subprocess.run([sys.executable, '-c', MASK_SHARDINGS], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    lines = [l for l in done.stdout.splitlines() if ' | ' in l]
    self.assertLen(lines, 6)  # q, k, v, output and the two feed-forward kernels (stacked).
    for line in lines:
      path, mask, param = line.split(' | ')
      self.assertEqual(mask, param, path)
      self.assertIn('fsdp', param, path)  # Split over the mesh, not replicated.


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ({'end_step': 1, 'start_step': 4}, 'config.pruning.end_step=1 must be >= '
                                         'pruning.start_step=4'),
      ({'end_step': 50}, r'config.pruning.end_step=50 must be <= train.steps=12'),
      ({'sparsity': 1.5}, r'config.pruning.sparsity must be a number in \[0, 1\)'),
      ({'sparsity': 0.0}, r'config.pruning.sparsity must be in \(0, 1\)'),
      ({'scope': 'rows'}, r"config.pruning.scope must be one of \('global', 'per_layer'\)"),
      ({'method': 'random'}, r"config.pruning.method must be one of \('none', 'magnitude'\)"),
      ({'params': 'no_such_layer'}, "config.pruning.params='no_such_layer' matches no "
                                    'parameter path'),
      ({'params': '(unclosed'}, 'config.pruning.params must be a valid regular expression'),
      ({'frequency': 0}, 'config.pruning.frequency must be a positive int'),
  )
  def test_bad_pruning_config_names_the_field(self, fields, message):
    with self.assertRaisesRegex(config_lib.ConfigError, message):
      config_lib.validate_config(pruned_config(**fields), n_devices=1, n_processes=1)

  def test_defaults_are_no_pruning(self):
    experiment = config_lib.validate_config(tiny_lm_config(), n_devices=1, n_processes=1)
    self.assertEqual(experiment.config.pruning.method, 'none')
    self.assertEqual(experiment.config.pruning.params, pruning.DEFAULT_PARAMS)


if __name__ == '__main__':
  absltest.main()
