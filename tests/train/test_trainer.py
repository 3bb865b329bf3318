"""End-to-end training runs on generated data: outputs, resume, SIGTERM, 8 devices, NaN."""

import contextlib
import glob
import io
import json
import math
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from unittest import mock

import jax
import ml_collections
import numpy as np
from absl.testing import absltest

from terraflax import compiler
from terraflax import decoding
from terraflax import workdir as workdir_lib
from terraflax.train import checkpoint
from terraflax.train import config as config_lib
from terraflax.train import data as data_lib
from terraflax.train import evaluation
from terraflax.train import metrics as metrics_lib
from terraflax.train import optimizers
from terraflax.train import sharding as sharding_lib
from terraflax.train import state as state_lib
from terraflax.train import steps
from terraflax.train import trainer
from tests.train.tiny_models import tiny_lm_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Checkpoints at 3, 6, 9, 12 and logs at even steps: a resume from step 3 has
# one step of pending metric sums to restore.
CONFIG = {'train.steps': 12, 'train.log_every': 2, 'train.eval_every': 4,
          'train.checkpoint_every': 3}


def comparable(records):
  """metrics.jsonl records without the wall-clock keys."""
  return [{k: v for k, v in r.items() if k not in metrics_lib.TIMING_KEYS} for r in records]


def read_events(directory):
  """(tag, step, value) of every scalar in the TensorBoard event files under `directory`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars = []
  for path in glob.glob(os.path.join(directory, '**', 'events.out.tfevents.*'), recursive=True):
    data = pathlib.Path(path).read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: length, crc, payload, crc.
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(payload)
      for value in event.summary.value:
        if value.HasField('simple_value'):
          scalars.append((value.tag, event.step, value.simple_value))
  return scalars


class _CrashAfter:
  """Wraps a training iterator so that fetching batch `n + 1` raises (a simulated crash)."""

  def __init__(self, iterator, n):
    self._iterator, self._left = iterator, n

  def __next__(self):
    if self._left == 0:
      raise KeyboardInterrupt('simulated crash')
    self._left -= 1
    return next(self._iterator)

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)


class TrainerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.workdir = os.path.join(cls.tmp.name, 'uninterrupted')
    cls.stdout = io.StringIO()
    with contextlib.redirect_stdout(cls.stdout):
      cls.last = trainer.train_and_evaluate(tiny_lm_config(**CONFIG), cls.workdir)
    cls.metrics = metrics_lib.read_metrics(cls.workdir)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_writes_all_outputs(self):
    written = json.loads(pathlib.Path(self.workdir, 'config.json').read_text())
    self.assertEqual(written['model']['name'], 'tests.train.tiny_models:TinyLM')
    self.assertEqual(written['train']['grad_accum_steps'], 1)  # Defaults are written too.
    steps = [m['step'] for m in self.metrics]
    self.assertEqual(steps, [2, 4, 6, 8, 10, 12])
    for m in self.metrics:
      self.assertContainsSubset({'train/loss', 'train/accuracy', 'lr'}, m.keys())
      self.assertTrue(math.isfinite(m['train/loss']))
      self.assertEqual('eval/loss' in m, m['step'] % 4 == 0)
      if m['step'] > 2:
        self.assertIn('tokens_per_sec', m)
    self.assertLess(self.metrics[-1]['train/loss'], self.metrics[0]['train/loss'])
    self.assertEqual(self.last['train/loss'], self.metrics[-1]['train/loss'])
    manager = workdir_lib.make_manager(self.workdir, read_only=True, async_save=False)
    self.assertEqual(list(manager.all_steps()), [3, 6, 9, 12])
    events = read_events(os.path.join(self.workdir, 'tensorboard'))
    losses = {step: value for tag, step, value in events if tag == 'train/loss'}
    self.assertEqual(sorted(losses), steps)
    for m in self.metrics:
      self.assertAlmostEqual(losses[m['step']], m['train/loss'], places=5)
    printed = self.stdout.getvalue()
    self.assertRegex(printed, r'TinyLM with [\d,]+ parameters')
    self.assertRegex(printed, r'step 12/12 \| loss \d+\.\d+ \| acc [\d.]+ \| [\d,]+ tokens/s \| '
                              r'MFU [\d.]+% \| lr [\d.e-]+ \| ETA 0m00s')

  def test_mfu_is_the_compiled_steps_flops_at_the_logged_speed_over_the_peak(self):
    if jax.default_backend() != 'cpu':
      self.skipTest('The peak of train.peak_flops=0 is known here for the CPU only.')
    experiment = config_lib.validate_config(tiny_lm_config(**CONFIG))
    config, mesh = experiment.config, sharding_lib.make_mesh()
    tx, _ = optimizers.make_optimizer(config.optimizer, config.train.steps)
    state = state_lib.initial_state(experiment, tx, mesh)
    batch = sharding_lib.put_batch(
        next(experiment.data.train_iterator(batch_size=config.train.batch_size)), mesh)
    step = steps.make_train_step(experiment.spec.build('train'), tx)
    # Compiled with the trainer's XLA options, which change the fused program's flop count.
    analysis = jax.jit(step, compiler_options=compiler.options()).lower(
        state, batch).compile().cost_analysis()
    flops = (analysis[0] if isinstance(analysis, list) else analysis)['flops']
    self.assertGreater(flops, 0)
    tokens_per_step = config.train.batch_size * config.data.seq_len
    timed = [m for m in self.metrics if 'tokens_per_sec' in m]
    self.assertNotEmpty(timed)
    for m in timed:  # steps/s = tokens/s / tokens per step; the CPU's peak is 180 GFLOP/s.
      want = flops * (m['tokens_per_sec'] / tokens_per_step) / 180e9
      self.assertAlmostEqual(m['train/mfu'] / want, 1.0, places=6, msg=m)
    self.assertTrue(all('train/mfu' not in m for m in self.metrics if m not in timed))
    self.assertEqual(steps.peak_flops(2.5e12, 'cpu'), 2.5e12)  # train.peak_flops wins.
    self.assertIsNone(steps.peak_flops(0, 'no-such-backend'))
    self.assertIsNone(steps.mfu(flops, 1.0, None))

  def test_a_run_checks_the_config_fields_once(self):
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
        mock.patch.object(config_lib, 'check_fields', wraps=config_lib.check_fields) as check:
      trainer.train_and_evaluate(tiny_lm_config(**{'train.steps': 3}), os.path.join(tmp, 'run'))
    self.assertEqual(check.call_count, 1)

  def test_crash_and_rerun_is_bit_identical(self):
    workdir = os.path.join(self.tmp.name, 'crashed')
    original = data_lib.Data.train_iterator

    def crashing(data, **kwargs):
      return _CrashAfter(original(data, **kwargs), 5)

    with mock.patch.object(data_lib.Data, 'train_iterator', crashing), \
        contextlib.redirect_stdout(io.StringIO()):
      with self.assertRaises(KeyboardInterrupt):
        trainer.train_and_evaluate(tiny_lm_config(**CONFIG), workdir)
    before = metrics_lib.read_metrics(workdir)
    self.assertEqual([m['step'] for m in before], [2, 4])  # Step 4 was logged after the
    # checkpoint at 3.
    manager = workdir_lib.make_manager(workdir, read_only=True, async_save=False)
    self.assertEqual(manager.latest_step(), 3)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # The same command again.
      trainer.train_and_evaluate(tiny_lm_config(**CONFIG), workdir)
    self.assertIn('Resumed from the checkpoint at step 3', printed.getvalue())
    self.assertRegex(printed.getvalue(),
                     r'Finished step 12 in \d+m\d\ds: eval/accuracy [\d.]+, eval/loss')
    self.assertEqual(comparable(metrics_lib.read_metrics(workdir)), comparable(self.metrics))

  def test_load_for_inference_reproduces_the_logged_eval_loss(self):
    config, params = checkpoint.load_for_inference(self.workdir)
    self.assertEqual(config.train.steps, 12)
    experiment = config_lib.validate_config(config)
    model = checkpoint.model_from_config(config, 'eval')
    eval_step = jax.jit(evaluation.make_eval_step(model))
    mesh = sharding_lib.make_mesh()
    sums = [eval_step(params, sharding_lib.put_batch(batch, mesh), i) for i, batch in enumerate(
        experiment.data.eval_batches(batch_size=config.train.batch_size, n_batches=2))]
    loss = sum(float(s['loss_sum']) for s in sums) / sum(float(s['weight_sum']) for s in sums)
    self.assertAlmostEqual(loss, self.metrics[-1]['eval/loss'], places=5)

  def test_eight_devices_give_the_same_losses(self):
    script = textwrap.dedent(f"""
        import jax
        from terraflax.train import trainer
        from tests.train.tiny_models import tiny_lm_config
        assert jax.device_count() == 8, jax.devices()
        trainer.train_and_evaluate(tiny_lm_config(**{CONFIG!r}), {self.tmp.name + '/eight'!r})
        """)
    env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                                      ' --xla_force_host_platform_device_count=8').strip(),
               JAX_PLATFORMS='cpu')
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn("mesh {'data': 8, 'fsdp': 1, 'model': 1}", result.stdout)
    eight = metrics_lib.read_metrics(self.tmp.name + '/eight')
    self.assertEqual([m['step'] for m in eight], [m['step'] for m in self.metrics])
    for one, many in zip(self.metrics, eight):
      for key in ('train/loss', 'train/accuracy', 'eval/loss'):
        if key in one:
          self.assertAlmostEqual(one[key], many[key], delta=1e-5 * max(1.0, abs(one[key])),
                                 msg=f'{key} at step {one["step"]}')


  def test_two_processes_give_the_same_losses(self):
    """jax.distributed over 2 local CPU processes (gloo) with fsdp=2 across them: each reads
    half of every batch and holds half of every parameter; outputs are written once."""
    workdir = self.tmp.name + '/two'
    processes = start_two_processes(CONFIG, workdir)
    outputs = finish(processes, timeout=300)
    for p, (_, stderr) in zip(processes, outputs):
      self.assertEqual(p.returncode, 0, stderr[-3000:])
    self.assertIn("2 device(s), mesh {'data': 1, 'fsdp': 2, 'model': 1}", outputs[0][0])
    self.assertNotIn('step 2/12', outputs[1][0])  # Only process 0 reports.
    two = metrics_lib.read_metrics(workdir)
    self.assertEqual([m['step'] for m in two], [m['step'] for m in self.metrics])  # Once each.
    for one, many in zip(self.metrics, two):
      for key in ('train/loss', 'eval/loss'):
        if key in one:
          self.assertAlmostEqual(one[key], many[key], delta=1e-5 * max(1.0, abs(one[key])),
                                 msg=f'{key} at step {one["step"]}')
    events = read_events(os.path.join(workdir, 'tensorboard'))
    losses = [(step, v) for tag, step, v in events if tag == 'train/loss']
    self.assertEqual([s for s, _ in losses], [m['step'] for m in two if 'train/loss' in m])
    with open(os.path.join(workdir, 'memory.json'), encoding='utf-8') as f:
      memory = json.load(f)
    self.assertLess(memory['params_bytes_per_device'], memory['params_bytes_replicated'])
    manager = workdir_lib.make_manager(workdir, read_only=True, async_save=False)
    self.assertEqual(list(manager.all_steps()), [3, 6, 9, 12])
    _, params = checkpoint.load_for_inference(workdir)  # Restores on this one device.
    _, want = checkpoint.load_for_inference(self.workdir)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def start_two_processes(overrides, workdir):
  """Two local CPU processes (gloo) training tiny_lm_config(**overrides) with fsdp=2."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  script = textwrap.dedent(f"""
      import sys
      import jax
      import ml_collections
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      from terraflax.train import trainer
      from tests.train.tiny_models import tiny_lm_config
      config = tiny_lm_config(**{overrides!r})
      config.sharding = ml_collections.ConfigDict({{'fsdp': 2}})
      config.distributed = ml_collections.ConfigDict(dict(
          initialize=True, coordinator_address='localhost:{port}', num_processes=2,
          process_id=int(sys.argv[1])))
      trainer.train_and_evaluate(config, {workdir!r})
      assert jax.process_count() == 2
      """)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return [subprocess.Popen([sys.executable, '-c', script, str(i)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def finish(processes, timeout):
  """(stdout, stderr) of each process; kills those still running after `timeout` seconds."""
  try:
    return [p.communicate(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()


class SignalTest(absltest.TestCase):

  def test_sigterm_saves_a_restorable_checkpoint_and_exits_zero(self):
    with tempfile.TemporaryDirectory() as tmp:
      config_file = os.path.join(tmp, 'long_run.py')
      pathlib.Path(config_file).write_text(textwrap.dedent("""
          from tests.train.tiny_models import tiny_lm_config

          def get_config():
            return tiny_lm_config(**{'train.steps': 100000, 'train.log_every': 1,
                                     'train.eval_every': 100000,
                                     'train.checkpoint_every': 100000})
          """))
      workdir = os.path.join(tmp, 'run')
      env = dict(os.environ, JAX_PLATFORMS='cpu')
      process = subprocess.Popen(
          [sys.executable, '-m', 'terraflax.train', f'--config={config_file}',
           f'--workdir={workdir}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True)
      try:
        deadline = time.time() + 240
        while len(metrics_lib.read_metrics(workdir)) < 3:
          self.assertIsNone(process.poll(), 'training exited early')
          self.assertLess(time.time(), deadline, 'no metrics after 240 s')
          time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
      finally:
        if process.poll() is None:
          process.kill()
      self.assertEqual(process.returncode, 0, stderr[-3000:])
      self.assertIn('SIGTERM: saved the checkpoint at step', stdout)
      manager = workdir_lib.make_manager(workdir, read_only=True, async_save=False)
      step = manager.latest_step()
      self.assertGreaterEqual(step, 3)
      config, params = checkpoint.load_for_inference(workdir)
      self.assertTrue(all(np.isfinite(np.asarray(x)).all()
                          for x in jax.tree_util.tree_leaves(params)))
      self.assertEqual(config.train.steps, 100000)

  def test_sigterm_to_one_of_two_processes_checkpoints_and_stops_both(self):
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'run')
      processes = start_two_processes({'train.steps': 100000, 'train.log_every': 1,
                                       'train.eval_every': 100000,
                                       'train.checkpoint_every': 100000}, workdir)
      try:
        deadline = time.time() + 240
        while len(metrics_lib.read_metrics(workdir)) < 3:
          self.assertTrue(all(p.poll() is None for p in processes), 'training exited early')
          self.assertLess(time.time(), deadline, 'no metrics after 240 s')
          time.sleep(0.2)
        processes[1].send_signal(signal.SIGTERM)  # Not the one that writes the metrics.
        outputs = finish(processes, timeout=120)
      finally:
        finish(processes, timeout=1)
      for p, (_, stderr) in zip(processes, outputs):
        self.assertEqual(p.returncode, 0, stderr[-3000:])
      self.assertIn('SIGTERM: saved the checkpoint at step', outputs[0][0])
      manager = workdir_lib.make_manager(workdir, read_only=True, async_save=False)
      step = manager.latest_step()
      self.assertGreaterEqual(step, 3)
      self.assertEqual(max(m['step'] for m in metrics_lib.read_metrics(workdir)), step)
      _, params = checkpoint.load_for_inference(workdir)
      self.assertTrue(all(np.isfinite(np.asarray(x)).all()
                          for x in jax.tree_util.tree_leaves(params)))


  def test_command_line_bad_override_exits_with_the_message(self):
    result = subprocess.run(
        [sys.executable, '-m', 'terraflax.train', f'--config={ROOT}/configs/duplication.py',
         '--workdir=/tmp/unused_terraflax_workdir', '--config.train.batch_size=-3'],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
        timeout=120)
    self.assertEqual(result.returncode, 1)
    self.assertIn('terraflax.train: config.train.batch_size must be a positive int, got -3.',
                  result.stderr)
    self.assertFalse(os.path.exists('/tmp/unused_terraflax_workdir'))

class Seq2SeqTest(absltest.TestCase):

  def test_encoder_decoder_model_trains_on_reverse(self):
    config = tiny_lm_config(**{'train.steps': 3, 'train.log_every': 1, 'train.eval_every': 3,
                               'train.checkpoint_every': 3})
    config.model = ml_collections.ConfigDict({
        'name': 'tests.train.tiny_models:TinySeq2Seq', 'vocab_size': 16, 'd_model': 8})
    config.data.name = 'reverse'
    with tempfile.TemporaryDirectory() as workdir:
      with contextlib.redirect_stdout(io.StringIO()):
        last = trainer.train_and_evaluate(config, workdir)
      self.assertTrue(math.isfinite(last['eval/loss']))
      self.assertNotIn('eval/bits_per_byte', last)
      _, params = checkpoint.load_for_inference(workdir)
      self.assertEqual(jax.tree_util.tree_map(np.shape, params), {  # Two inputs at init.
          'Dense_2': {'bias': (16,), 'kernel': (8, 16)},
          'Parallel_0': {'Serial_0': {'Embedding_0': {'embedding': (16, 8)}},
                         'Serial_1': {'Embedding_1': {'embedding': (16, 8)}}}})

class DivergenceTest(absltest.TestCase):

  def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(self):
    config = tiny_lm_config(**{'train.steps': 6, 'train.log_every': 100, 'train.eval_every': 100,
                               'train.checkpoint_every': 1})
    config.optimizer.name = 'sgd'
    config.optimizer.learning_rate = 1e38  # Update 1 has lr 0 (warm-up); update 2 overflows.
    config.optimizer.warmup_steps = 1
    config.optimizer.decay = 'constant'
    config.optimizer.grad_clip = 0.0
    with tempfile.TemporaryDirectory() as workdir:
      with contextlib.redirect_stdout(io.StringIO()), self.assertRaisesRegex(
          trainer.TrainingDivergedError,
          r'non-finite \(NaN/inf\) loss or parameters at step 2 .* last good checkpoint is step 1'):
        trainer.train_and_evaluate(config, workdir)
      manager = workdir_lib.make_manager(workdir, read_only=True, async_save=False)
      self.assertEqual(list(manager.all_steps()), [1])
      _, params = checkpoint.load_for_inference(workdir)
      self.assertTrue(all(np.isfinite(np.asarray(x)).all()
                          for x in jax.tree_util.tree_leaves(params)))


class ValidationBeforeCompileTest(absltest.TestCase):

  def test_bad_config_fails_before_anything_is_written_or_compiled(self):
    config = tiny_lm_config(**{'train.batch_size': -3})
    with tempfile.TemporaryDirectory() as workdir, mock.patch.object(
        jax, 'jit', side_effect=AssertionError('compiled before validating')):
      with self.assertRaisesRegex(config_lib.ConfigError,
                                  r'config\.train\.batch_size must be a positive int, got -3'):
        trainer.train_and_evaluate(config, workdir)
      self.assertEmpty(os.listdir(workdir))

  def test_validating_a_model_compiles_nothing(self):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *args, **kwargs: compiles.append(name) if 'backend_compile' in name else None)
    with self.assertRaisesRegex(config_lib.ConfigError, r'not a multiple of chunk_len=6'):
      config_lib.validate_config(tiny_lm_config(**{'model.chunk_len': 6}))
    config_lib.validate_config(tiny_lm_config())
    self.assertEmpty(compiles)


if __name__ == '__main__':
  absltest.main()


class SampleTest(absltest.TestCase):

  def test_sample_calls_decoding_once_with_a_predict_model_and_decodes_bytes(self):
    config = tiny_lm_config(**{'data.name': 'bytes', 'data.path': __file__,
                                'data.eval_fraction': 0.2, 'model.vocab_size': 256})
    config.sample = ml_collections.ConfigDict({'prompt': 'def ', 'max_new_tokens': 3,
                                               'temperature': 0.5})
    experiment = config_lib.validate_config(config)
    calls = []

    def autoregressive_sample(model, params, prompt, max_new_tokens, *, temperature, rng,
                              **unused_options):
      calls.append((model, prompt, max_new_tokens, temperature))
      del params, rng
      return np.asarray([[ord('x'), ord('y'), 0xE2]])  # Only the new tokens, like the real one.

    c = experiment.config.sample
    with mock.patch.object(decoding, 'autoregressive_sample', autoregressive_sample):
      text = decoding.sample_text(experiment.spec, {}, c.prompt, max_new_tokens=c.max_new_tokens,
                                  byte_level=experiment.data.info.byte_level,
                                  temperature=c.temperature)
    self.assertLen(calls, 1)
    model, prompt, max_new_tokens, temperature = calls[0]
    self.assertEqual(model.layers[1].mode, 'predict')  # TinyLM's ShiftRight.
    np.testing.assert_array_equal(prompt, [[ord(c) for c in 'def ']])
    self.assertEqual((max_new_tokens, temperature), (3, 0.5))
    self.assertEqual(text, 'def xy\ufffd')  # A cut UTF-8 sequence is replaced, not an error.
