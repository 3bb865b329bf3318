"""data.name='text': the pipeline in the trainer, bits per byte across tokenizers, loss by
position (hand values), resume, and configs/text_lm.py end to end."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest

from terraflax import tokenizer as tokenizer_lib
from terraflax.train import config as config_lib
from terraflax.train import data as data_lib
from terraflax.train import evaluation
from terraflax.train import metrics as metrics_lib
from terraflax.train import sharding as sharding_lib
from terraflax.train import trainer
from tests.train.tiny_models import tiny_lm_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = [f'Paragraph {i} says: ' + ' '.join(['the quick brown fox', 'jumps over', 'the lazy dog',
                                             'naïve café'][j % 4] for j in range(i % 9 + 1))
        for i in range(60)]


class _CrashAfter:
  """A training iterator whose batch `n + 1` raises (a simulated crash)."""

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


def comparable(records):
  return [{k: v for k, v in r.items() if k not in metrics_lib.TIMING_KEYS} for r in records]


class TextDataTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.corpus = os.path.join(cls.tmp.name, 'corpus.jsonl')
    with open(cls.corpus, 'w', encoding='utf-8') as f:
      for doc in TEXT:
        f.write(json.dumps({'text': doc}, ensure_ascii=False) + '\n')

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def config(self, **overrides):
    base = {'data.name': 'text', 'data.path': self.corpus, 'data.seq_len': 32,
            'data.pack': True, 'data.eval_fraction': 0.2, 'model.vocab_size': 256,
            'train.batch_size': 4, 'train.steps': 6, 'train.eval_every': 3,
            'train.checkpoint_every': 3, 'train.eval_batches': -1,
            'train.eval_position_buckets': 2, 'model.dropout': 0.0}
    base.update(overrides)
    config = tiny_lm_config()
    del config.data['vocab_size'], config.data['eval_examples']
    # A real LM that takes packed rows (TinyLM does not).
    config.model = ml_collections.ConfigDict({
        'name': 'TransformerLM', 'vocab_size': 256, 'd_model': 16, 'd_ff': 32, 'n_layers': 1,
        'n_heads': 2, 'max_len': 32, 'dtype': 'float32'})
    for path, value in base.items():
      section, field = path.split('.')
      config[section][field] = value
    return config

  def test_hand_computed_bits_per_byte_and_loss_by_position(self):
    # Uniform logits over 4 ids: every token costs ln 4 nats = 2 bits.
    logits = jnp.zeros((1, 4, 4))
    batch = {'targets': jnp.array([[1, 2, 3, 0]]), 'weights': jnp.array([[1., 1., 1., 0.]]),
             'bytes': jnp.array([[3., 1., 2., 0.]]), 'positions': jnp.array([[0, 1, 0, 0]])}
    sums = evaluation.text_sums(logits, batch, by_position=True)
    self.assertAlmostEqual(float(sums['byte_sum']), 6.0)
    np.testing.assert_allclose(sums['position_weight_sum'], [2, 1, 0, 0])
    np.testing.assert_allclose(sums['position_loss_sum'], [2 * math.log(4), math.log(4), 0, 0],
                               rtol=1e-6)
    # 3 tokens x 2 bits over 6 bytes: 1 bit per byte.
    self.assertAlmostEqual(3 * math.log(4) / math.log(2) / float(sums['byte_sum']), 1.0)
    buckets = evaluation.loss_by_position(np.array([4., 2., 6., 0.]), np.array([2., 1., 3., 0.]),
                                          2)
    self.assertEqual(buckets, {'eval/loss_by_position/0-1': 2.0,
                               'eval/loss_by_position/2-3': 2.0})
    self.assertEqual(evaluation.loss_by_position(np.ones(4), np.array([0., 0., 1., 1.]), 2),
                     {'eval/loss_by_position/2-3': 1.0})

  def test_bytes_tokenizer_bits_per_byte_is_loss_over_ln2(self):
    experiment = config_lib.validate_config(self.config(), n_devices=1, n_processes=1)
    data = experiment.data
    self.assertEqual(data.info.vocab_size, 256)
    row = data.eval[0]
    self.assertEqual(sorted(row), ['bytes', 'inputs', 'positions', 'segment_ids', 'targets',
                                   'weights'])
    np.testing.assert_array_equal(row['bytes'], row['weights'])  # One byte per byte token.
    model = experiment.spec.build('eval')
    params = jax.tree_util.tree_map(
        lambda s: jnp.full(s.shape, 0.01, s.dtype),
        jax.tree_util.tree_map(lambda x: x.value if hasattr(x, 'value') else x,
                               experiment.abstract_variables['params'],
                               is_leaf=lambda x: hasattr(x, 'value')))
    params = jax.tree_util.tree_map(lambda p: p * jnp.arange(p.size, dtype=p.dtype).reshape(
        p.shape) % 0.3, params)
    mesh = sharding_lib.make_mesh(1)
    step = evaluation.jit_eval_step(model, 'lm', sharding_lib.replicated(mesh), by_position=True)
    with jax.set_mesh(mesh):
      result = evaluation.evaluate_params(step, data, params, batch_size=4, n_batches=-1,
                                          mesh=mesh, position_buckets=4)
    self.assertAlmostEqual(result['eval/bits_per_byte'], result['eval/loss'] / math.log(2),
                           places=5)
    self.assertLen([k for k in result if 'loss_by_position' in k], 4)

  def test_resume_and_worker_processes_give_identical_batches(self):
    data = data_lib.make_data(config_lib.check_fields(self.config())['data'], seed=5)
    iterator = data.train_iterator(batch_size=4)
    for _ in range(3):
      next(iterator)
    state = iterator.get_state()
    want = [next(iterator) for _ in range(4)]
    restored = data.train_iterator(batch_size=4)
    restored.set_state(json.loads(json.dumps(state)))  # As a checkpoint stores it.
    with_workers = data_lib.make_data(
        config_lib.check_fields(self.config(**{'data.num_workers': 2}))['data'],
                                      seed=5).train_iterator(batch_size=4)
    workers = [next(with_workers) for _ in range(7)][3:]
    for a, b, c in zip(want, [next(restored) for _ in range(4)], workers):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])

  def test_eval_rows_decode_back_to_the_held_out_documents(self):
    for tokenizer, vocab in (('bytes', 256), ('train', 50)):
      config = config_lib.check_fields(self.config(**{
          'data.tokenizer': tokenizer, 'data.tokenizer_vocab_size': vocab,
          'model.vocab_size': vocab}))
      data = data_lib.make_data(config.data, seed=0)
      stream = np.concatenate([row['inputs'][row['weights'] > 0] for row in data.eval])
      eos = data.tokenizer.eos_id
      ends = np.flatnonzero(stream == eos)
      documents = np.split(stream, ends + 1)[:-1]
      held_out = TEXT[-len(documents):]
      self.assertLen(documents, round(len(TEXT) * 0.2))
      self.assertEqual([data.tokenizer.decode(d[:-1]) for d in documents], held_out)
      n_bytes = sum(float(row['bytes'].sum()) for row in data.eval)
      self.assertAlmostEqual(n_bytes, sum(len(t.encode()) + 1 for t in held_out), places=2)

  def test_config_errors(self):
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"model\.vocab_size=200 is smaller than the vocabulary of "
                                r"data\.tokenizer='bytes' \(256 ids\)"):
      config_lib.validate_config(self.config(**{'model.vocab_size': 200}), n_devices=1)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'model\.vocab_size=256 is smaller than '
                                r'data\.tokenizer_vocab_size=300'):
      config_lib.validate_config(self.config(**{'data.tokenizer': 'train',
                                                'data.tokenizer_vocab_size': 300}), n_devices=1)
    with self.assertRaisesRegex(config_lib.ConfigError, 'eval_fraction=0 leaves no evaluation'):
      config_lib.validate_config(self.config(**{'data.eval_fraction': 0.0}), n_devices=1)
    with self.assertRaisesRegex(config_lib.ConfigError, r'config\.data\.tokenizer='):
      config_lib.validate_config(self.config(**{'data.tokenizer': '/nonexistent.model'}),
                                 n_devices=1)

  def test_trained_tokenizer_resumes_bit_identically(self):
    config = self.config(**{'data.tokenizer': 'train', 'data.tokenizer_vocab_size': 50,
                            'model.vocab_size': 50})
    straight = os.path.join(self.tmp.name, 'straight')
    resumed = os.path.join(self.tmp.name, 'resumed')
    original = data_lib.Data.train_iterator

    def crashing(data, **kwargs):  # Fetching batch 5 raises: the checkpoint at 3 is the last.
      return _CrashAfter(original(data, **kwargs), 4)

    with contextlib.redirect_stdout(io.StringIO()):
      trainer.train_and_evaluate(config, straight)
      with mock.patch.object(data_lib.Data, 'train_iterator', crashing):
        with self.assertRaises(KeyboardInterrupt):
          trainer.train_and_evaluate(config, resumed)
      self.assertTrue(os.path.exists(os.path.join(resumed, 'tokenizer.model')))
      trainer.train_and_evaluate(config, resumed)
    a, b = metrics_lib.read_metrics(straight), metrics_lib.read_metrics(resumed)
    self.assertEqual(comparable(a), comparable(b))
    self.assertIn('eval/bits_per_byte', a[-1])
    self.assertIn('eval/loss_by_position/16-31', a[-1])
    # The same pieces (the files differ only in the temporary paths spm records).
    tokenizers = [tokenizer_lib.from_workdir(w) for w in (straight, resumed)]
    self.assertEqual(tokenizers[0].kind, 'spm')
    self.assertEqual(tokenizers[0].encode(' '.join(TEXT)), tokenizers[1].encode(' '.join(TEXT)))
  def test_text_lm_config_trains_decodes_and_exports(self):
    workdir = os.path.join(self.tmp.name, 'text_lm')
    artifact = os.path.join(self.tmp.name, 'artifact')
    env = dict(os.environ, PYTHONPATH=ROOT, TERRAFLAX_CACHE=os.path.join(self.tmp.name, 'cache'))
    tiny = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.n_heads=2',
            '--config.model.vocab_size=300', '--config.data.tokenizer_vocab_size=300',
            '--config.data.seq_len=128', '--config.model.max_len=128',
            '--config.model.attention.n_buckets=4', '--config.train.batch_size=2',
            '--config.train.steps=3', '--config.train.eval_every=3', '--config.train.log_every=3',
            '--config.train.eval_batches=2', '--config.optimizer.warmup_steps=1',
            '--config.sample.max_new_tokens=4']
    run = lambda *args: subprocess.run([sys.executable, '-m', *args], capture_output=True,
                                       text=True, cwd=ROOT, env=env, timeout=600)
    trained = run('terraflax.train', '--config=configs/text_lm.py', f'--workdir={workdir}', *tiny)
    self.assertEqual(trained.returncode, 0, trained.stderr[-2000:])
    self.assertIn('bits_per_byte', trained.stdout)
    self.assertTrue(os.path.exists(os.path.join(workdir, 'tokenizer.model')))
    tokenizer = tokenizer_lib.from_workdir(workdir)
    self.assertEqual((tokenizer.kind, tokenizer.vocab_size), ('spm', 300))
    decoded = run('terraflax.decoding', f'--workdir={workdir}', '--prompt=The return',
                  '--max_new_tokens=6', '--temperature=0')
    self.assertEqual(decoded.returncode, 0, decoded.stderr[-2000:])
    self.assertIn('The return', decoded.stdout)
    exported = run('terraflax.export', f'--workdir={workdir}', f'--out={artifact}')
    self.assertEqual(exported.returncode, 0, exported.stderr[-2000:])
    with open(os.path.join(artifact, 'meta.json'), encoding='utf-8') as f:
      self.assertEqual(json.load(f)['tokenizer'], 'spm')


if __name__ == '__main__':
  absltest.main()
