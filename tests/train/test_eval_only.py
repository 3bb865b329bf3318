"""Eval-only runs (`config.eval.*`): scoring a checkpoint with other LSH settings."""

import copy
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from terraflax.models.attention import LSH, Full, to_config
from terraflax.train import config as config_lib
from terraflax.train import eval_only
from terraflax.train import metrics as metrics_lib
from terraflax.train import trainer
from tests.train.tiny_models import tiny_lm_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEQ_LEN = 16
# A tiny ReformerLM on the duplication task, trained with 2 hash rounds of 4 buckets.
MODEL = {'name': 'ReformerLM', 'vocab_size': 8, 'd_model': 16, 'd_ff': 16, 'n_layers': 1,
         'n_heads': 2, 'dropout': 0.0, 'max_len': SEQ_LEN,
         'attention': {'kind': 'lsh', 'n_hashes': 2, 'n_buckets': 4, 'chunk_len': 4},
         'positions': 'learned'}
# A tiny TerraformerLM with LSH attention (the same spec as ReformerLM's), dense feed-forward.
TERRAFORMER = {'name': 'TerraformerLM', 'vocab_size': 8, 'd_model': 16, 'd_ff': 16,
               'n_layers': 2, 'n_heads': 2, 'dropout': 0.0, 'max_len': SEQ_LEN,
               'ff_sparsity': 0,
               'attention': {'kind': 'lsh', 'n_hashes': 2, 'n_buckets': 4, 'chunk_len': 4}}
STEPS = {'train.steps': 4, 'train.log_every': 2, 'train.eval_every': 4,
         'train.checkpoint_every': 2, 'data.vocab_size': 8, 'optimizer.warmup_steps': 1}


def make_config(model=None, **overrides):
  config = tiny_lm_config(**STEPS)
  config.model = copy.deepcopy(model or MODEL)
  config.eval = dict(eval_only.DEFAULTS)  # The section command-line overrides need.
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      if p not in node:
        node[p] = {}
      node = node[p]
    node[leaf] = value
  return config


def snapshot(workdir):
  """{relative path: sha256} of every file in `workdir` but the eval results."""
  out = {}
  for path in sorted(pathlib.Path(workdir).rglob('*')):
    if path.is_file() and path.name != eval_only.RESULTS_FILE:
      out[str(path.relative_to(workdir))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


class EvalOnlyTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.workdir = os.path.join(cls.tmp.name, 'run')
    trainer.train_and_evaluate(make_config(), cls.workdir)
    cls.logged = [m for m in metrics_lib.read_metrics(cls.workdir) if 'eval/loss' in m][-1]

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def results(self):
    path = os.path.join(self.workdir, eval_only.RESULTS_FILE)
    with open(path, encoding='utf-8') as f:
      return [json.loads(line) for line in f]

  def test_rescoring_as_trained_reproduces_the_log_and_writes_nothing_else(self):
    before = snapshot(self.workdir)
    result = eval_only.evaluate_checkpoint(make_config(**{'eval.only': True}), self.workdir)
    self.assertEqual(snapshot(self.workdir), before)  # Checkpoints, metrics, config untouched.
    self.assertAlmostEqual(result['eval/loss'], self.logged['eval/loss'], places=5)
    self.assertAlmostEqual(result['eval/accuracy'], self.logged['eval/accuracy'], places=6)
    record = self.results()[-1]
    self.assertEqual(record['step'], 4)
    self.assertEqual((record['attention'], record['overrides']), ('as trained', {}))
    self.assertEqual(record['model'], {'n_hashes': 2, 'n_buckets': 4, 'chunk_len': 4,
                                       'n_chunks_before': 1})

  def test_full_equals_one_bucket_in_many_rounds_and_differs_from_lsh(self):
    full = eval_only.evaluate_checkpoint(make_config(**{'eval.attention': 'full'}), self.workdir)
    self.assertEqual(self.results()[-1]['model'], {
        'n_hashes': 1, 'n_buckets': 1, 'chunk_len': SEQ_LEN, 'n_chunks_before': 0})
    self.assertEqual(self.results()[-1]['attention'], 'full')
    # Another route to full attention: 3 rounds of one bucket, and each chunk of 8 also seeing
    # the other one (wrapping around, masked when later): repeated meetings count once.
    again = eval_only.evaluate_checkpoint(make_config(**{
        'eval.n_hashes': 3, 'eval.n_buckets': 1, 'eval.chunk_len': 8,
        'eval.n_chunks_before': 1}), self.workdir)
    self.assertAlmostEqual(full['eval/loss'], again['eval/loss'], places=5)
    self.assertEqual(full['eval/accuracy'], again['eval/accuracy'])
    self.assertGreater(abs(full['eval/loss'] - self.logged['eval/loss']), 1e-4)

  def test_older_step_with_other_hash_rounds(self):
    before = snapshot(self.workdir)
    result = eval_only.evaluate_checkpoint(
        make_config(**{'eval.n_hashes': 8, 'eval.step': 2}), self.workdir)
    record = self.results()[-1]
    self.assertEqual((record['step'], record['attention']), (2, 'lsh-8'))
    self.assertEqual(record['overrides'], {'n_hashes': 8})
    self.assertEqual(record['model'], {'n_hashes': 8, 'n_buckets': 4, 'chunk_len': 4,
                                       'n_chunks_before': 1})
    self.assertEqual(record['eval/loss'], result['eval/loss'])
    self.assertTrue(np.isfinite(result['eval/loss']))
    self.assertEqual(snapshot(self.workdir), before)

  def test_the_duplication_config_takes_the_documented_override(self):
    config = config_lib.load_sibling(str(ROOT / 'configs' / 'x.py'), 'duplication')
    self.assertEqual(config.eval.to_dict(), eval_only.DEFAULTS)
    self.assertFalse(eval_only.requested(config_lib.check_fields(config)))
    config.eval.n_hashes = 8  # --config.eval.n_hashes=8
    self.assertTrue(eval_only.requested(config_lib.check_fields(config)))

  def test_errors_name_the_field(self):
    cases = [
        ({'eval.attention': 'full', 'eval.n_hashes': 4},
         r"eval\.attention='full' sets the LSH fields itself.*config\.eval\.n_hashes"),
        ({'eval.n_buckets': 3}, r'config\.eval\.n_buckets must be 0 \(as trained\)'),
        ({'eval.n_hashes': 4, 'model.attention.chunk_len': 8},
         r"config\.model\.attention=.*'chunk_len': 8.* differs from the trained model's"),
        ({'eval.step': 3}, r'config\.eval\.step=3 is not a checkpoint .* steps \[2, 4\]'),
        ({'eval.attention': 'lsh', 'eval.n_buckets': 1},
         r"eval\.attention='lsh' but the trained model has n_buckets=1"),
    ]
    for overrides, message in cases:
      with self.subTest(overrides=overrides):
        with self.assertRaisesRegex(config_lib.ConfigError, message):
          eval_only.evaluate_checkpoint(make_config(**overrides), self.workdir)
    with self.assertRaisesRegex(config_lib.ConfigError, r'not a terraflax workdir'):
      eval_only.evaluate_checkpoint(make_config(**{'eval.only': True}),
                                 os.path.join(self.tmp.name, 'empty'))
    self.assertFalse(os.path.exists(os.path.join(self.tmp.name, 'empty')))

  def test_command_line_scores_and_train_and_evaluate_refuses(self):
    config_file = os.path.join(self.tmp.name, 'eval_config.py')
    pathlib.Path(config_file).write_text(
        'from tests.train.test_eval_only import make_config\n\n\n'
        'def get_config():\n'
        "  return make_config(**{'eval.only': True})\n")
    results_file = os.path.join(self.workdir, eval_only.RESULTS_FILE)
    n_results = len(self.results()) if os.path.exists(results_file) else 0
    result = subprocess.run(
        [sys.executable, '-m', 'terraflax.train', f'--config={config_file}',
         f'--workdir={self.workdir}'], cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT)), capture_output=True,
        text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn(f'eval-only, checkpoint 4 of {self.workdir}', result.stdout)
    self.assertLen(self.results(), n_results + 1)
    self.assertAlmostEqual(self.results()[-1]['eval/loss'], self.logged['eval/loss'], places=5)
    before = snapshot(self.workdir)
    with self.assertRaisesRegex(config_lib.ConfigError, r'config\.eval\.\* asks for an eval-only'):
      trainer.train_and_evaluate(make_config(**{'eval.only': True}), self.workdir)
    self.assertEqual(snapshot(self.workdir), before)

  def test_full_attention_model_has_no_lsh_form(self):
    config = make_config(**{'eval.n_hashes': 4})
    config.model.attention = {'kind': 'full', 'query_chunk_len': 4}
    experiment = config_lib.validate_config(config)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"ReformerLM has no LSH layer .*'kind': 'full'.*no LSH form"):
      eval_only.lsh_overrides(experiment.config, experiment.spec.factory,
                              dict(experiment.spec.kwargs))
    # Only the LSH entries of a pattern change; a model's default attention counts too.
    del config.model['attention']  # A dict before; a list now.
    config.model.attention = [{'kind': 'lsh', 'chunk_len': 4}, {'kind': 'full'}]
    config.model.n_layers = 2
    experiment = config_lib.validate_config(config)
    self.assertEqual(eval_only.lsh_overrides(experiment.config, experiment.spec.factory,
                                             dict(experiment.spec.kwargs))['attention'],
                     [to_config(LSH(n_hashes=4, chunk_len=4)), to_config(Full())])
    self.assertEqual(eval_only.lsh_overrides(experiment.config, experiment.spec.factory, {}),
                     {'attention': to_config(LSH(n_hashes=4))})  # ReformerLM's default: LSH().


class TerraformerEvalOnlyTest(absltest.TestCase):
  """TerraformerLM with LSH attention re-scores like ReformerLM: the spec is the same."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.workdir = os.path.join(cls.tmp.name, 'run')
    trainer.train_and_evaluate(make_config(TERRAFORMER), cls.workdir)
    cls.logged = [m for m in metrics_lib.read_metrics(cls.workdir) if 'eval/loss' in m][-1]

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def last_record(self):
    with open(os.path.join(self.workdir, eval_only.RESULTS_FILE), encoding='utf-8') as f:
      return [json.loads(line) for line in f][-1]

  def test_the_model_has_lsh_layers(self):
    experiment = config_lib.validate_config(make_config(TERRAFORMER))
    paths = config_lib.param_paths(experiment.abstract_variables['params'])
    self.assertNotEmpty([p for p in paths if 'LSHSelfAttention' in p and p.endswith('qk')])

  def test_rescoring_with_other_hash_rounds_and_full_attention(self):
    same = eval_only.evaluate_checkpoint(make_config(TERRAFORMER, **{'eval.only': True}),
                                         self.workdir)
    self.assertAlmostEqual(same['eval/loss'], self.logged['eval/loss'], places=5)
    more = eval_only.evaluate_checkpoint(make_config(TERRAFORMER, **{'eval.n_hashes': 8}),
                                         self.workdir)
    record = self.last_record()
    self.assertEqual((record['attention'], record['overrides']), ('lsh-8', {'n_hashes': 8}))
    self.assertEqual(record['model'], {'n_hashes': 8, 'n_buckets': 4, 'chunk_len': 4,
                                       'n_chunks_before': 1})
    self.assertTrue(np.isfinite(more['eval/loss']))
    self.assertGreater(abs(more['eval/loss'] - self.logged['eval/loss']), 1e-6)
    # 'full' is one bucket, one round, one chunk of the sequence: the same numbers as asking
    # for those fields directly, on the same parameters.
    full = eval_only.evaluate_checkpoint(make_config(TERRAFORMER, **{'eval.attention': 'full'}),
                                         self.workdir)
    self.assertEqual(self.last_record()['model'], {
        'n_hashes': 1, 'n_buckets': 1, 'chunk_len': SEQ_LEN, 'n_chunks_before': 0})
    one_chunk = eval_only.evaluate_checkpoint(make_config(TERRAFORMER, **{
        'eval.n_hashes': 1, 'eval.n_buckets': 1, 'eval.chunk_len': SEQ_LEN,
        'eval.n_chunks_before': 0}), self.workdir)
    self.assertEqual(full['eval/loss'], one_chunk['eval/loss'])
    self.assertEqual(full['eval/accuracy'], one_chunk['eval/accuracy'])
    self.assertGreater(abs(full['eval/loss'] - self.logged['eval/loss']), 1e-6)


if __name__ == '__main__':
  absltest.main()
