"""The model-breadth configs train end to end (tiny sizes, a few steps), with their transfers.

bert_mlm -> bert_classify (init_from), albert_mlm (shared count), fnet_listops,
vit_digits, transformer_lm -> prefix_tuning (frozen base, init_from) and
distillation (teacher_workdir).
"""

import contextlib
import io
import json
import os
import pathlib
import re
import tempfile

import jax
import numpy as np
from absl.testing import absltest

from terraflax.layers import prefix as prefix_lib
from terraflax.train import checkpoint
from terraflax.train import config as config_lib
from terraflax.train import metrics as metrics_lib
from terraflax.train import optimizers
from terraflax.train import sharding as sharding_lib
from terraflax.train import state as state_lib
from terraflax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOOP = {'train.steps': 3, 'train.batch_size': 4, 'train.log_every': 1, 'train.eval_every': 3,
        'train.eval_batches': 1, 'train.checkpoint_every': 3, 'train.async_checkpoints': False,
        'optimizer.warmup_steps': 1}
TINY_ENCODER = {'model.d_model': 16, 'model.d_ff': 32, 'model.n_layers': 2, 'model.n_heads': 2,
                'model.max_len': 32, 'data.seq_len': 32}
TINY_LM = dict(TINY_ENCODER, **{'sample.max_new_tokens': 0})


def config(name, **overrides):
  """configs/<name>.py with dotted-path overrides."""
  cfg = config_lib.load_sibling(str(ROOT / 'configs' / 'x.py'), name)
  for path, value in {**LOOP, **overrides}.items():
    node = cfg
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def train(cfg, workdir):
  """(last metrics, printed text) of a training run."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    last = trainer.train_and_evaluate(cfg, workdir)
  return last, printed.getvalue()


def flat(params):
  return {optimizers.path_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


def parameters_json(workdir):
  return json.loads(pathlib.Path(workdir, state_lib.PARAMETERS_FILE).read_text())


class BertTest(absltest.TestCase):

  def test_pretrain_then_fine_tune_from_the_checkpoint(self):
    with tempfile.TemporaryDirectory() as tmp:
      pretrained = os.path.join(tmp, 'mlm')
      last, _ = train(config('bert_mlm', **TINY_ENCODER), pretrained)
      self.assertTrue(np.isfinite(last['eval/loss']))
      _, body = checkpoint.load_for_inference(pretrained)
      classify = config('bert_classify', init_from=pretrained, **TINY_ENCODER,
                        **{'data.eval_examples': 8})
      last, printed = train(classify, os.path.join(tmp, 'classify'))
      self.assertIn('eval/accuracy', last)
      info = parameters_json(os.path.join(tmp, 'classify'))
      self.assertEqual(info['init_from_fresh'], ['Dense_6/bias', 'Dense_6/kernel'])
      self.assertEqual(info['init_from_loaded'], len(flat(body)) - 6)  # Not the MLM head's 6.
      self.assertRegex(printed, r'Initialised \d+ of \d+ parameter arrays from .*fresh: '
                                r'Dense_6/bias, Dense_6/kernel; not used: MLMHead_6/')
      # The shapes must agree: a wider feed-forward cannot start from this checkpoint.
      wider = config('bert_classify', init_from=pretrained,
                     **dict(TINY_ENCODER, **{'model.d_ff': 48}))
      with self.assertRaisesRegex(config_lib.ConfigError,
                                  r'init_from=.* shape or dtype differs .*FeedForward_0/Dense_1/'
                                  r'bias: checkpoint float32\(2, 32\), model float32\(2, 48\)'):
        train(wider, os.path.join(tmp, 'wider'))

  def test_albert_count_reflects_sharing(self):
    with tempfile.TemporaryDirectory() as tmp:
      cfg = config('albert_mlm', **dict(TINY_ENCODER, **{'model.n_layers': 3,
                                                         'model.d_embedding': 8}))
      _, printed = train(cfg, tmp)
      v, e, d, f = 258, 8, 16, 32
      block = 2 * d + 4 * (d * d + d) + 2 * d + (d * f + f + f * d + d)  # One, shared.
      head = (d * e + e) + 2 * e + (e * v + v)
      expected = v * e + (e * d + d) + block + 2 * d + head
      self.assertIn(f'BertMLM with {expected:,} parameters', printed)
      self.assertEqual(parameters_json(tmp)['total'], expected)


class EncoderConfigsTest(absltest.TestCase):

  def test_fnet_listops(self):
    with tempfile.TemporaryDirectory() as tmp:
      cfg = config('fnet_listops', **{'model.d_model': 16, 'model.d_ff': 32, 'model.n_layers': 2,
                                      'model.max_len': 32, 'data.seq_len': 32, 'data.max_len': 32,
                                      'data.min_len': 4, 'data.max_depth': 3,
                                      'data.eval_examples': 8})
      last, printed = train(cfg, tmp)
      self.assertIn('FNet with', printed)
      self.assertTrue(np.isfinite(last['eval/loss']))

  def test_vit_digits(self):
    with tempfile.TemporaryDirectory() as tmp:
      cfg = config('vit_digits', **{'model.d_model': 16, 'model.d_ff': 32, 'model.n_layers': 1,
                                    'train.batch_size': 40})
      last, printed = train(cfg, tmp)
      self.assertIn('ViT with', printed)
      self.assertBetween(last['eval/accuracy'], 0.0, 1.0)


class LanguageModelTransferTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.base = os.path.join(cls.tmp.name, 'base')
    train(config('transformer_lm', **TINY_LM), cls.base)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_prefix_tuning_trains_only_the_prefix(self):
    workdir = os.path.join(self.tmp.name, 'prefix')
    cfg = config('prefix_tuning', init_from=self.base,
                 **dict(TINY_LM, **{'model.attention.n_prefix': 2,
                                    'sample.max_new_tokens': 4}))
    _, printed = train(cfg, workdir)
    n_trained = 2 * 2 * 2 * 16  # layers x n_prefix x (key, value) x d_model
    self.assertRegex(printed, rf'TransformerLM with [\d,]+ parameters \({n_trained} trained, '
                              r"optimizer.trainable='prefix_'\)")
    self.assertIn('Sample (4 tokens', printed)  # Predict-mode decoding with the prefix.
    self.assertEqual(parameters_json(workdir)['trained'], n_trained)
    _, tuned = checkpoint.load_for_inference(workdir)
    _, base = checkpoint.load_for_inference(self.base)
    tuned_base, tuned_prefix = prefix_lib.split_prefix(tuned)
    self.assertEqual(flat(tuned_base).keys(), flat(base).keys())
    for path, value in flat(base).items():
      np.testing.assert_array_equal(flat(tuned_base)[path], value, err_msg=path)  # Bit-identical.
    experiment = config_lib.validate_config(cfg)
    tx, _ = optimizers.make_optimizer(experiment.config.optimizer, 3)
    initial = state_lib.initial_state(experiment, tx, sharding_lib.make_mesh()).params
    _, initial_prefix = prefix_lib.split_prefix(initial)
    for path, value in flat(initial_prefix).items():
      self.assertFalse(np.array_equal(flat(tuned_prefix)[path], value), path)

  def test_distillation(self):
    student = dict(TINY_LM, **{'model.d_model': 8, 'model.d_ff': 16, 'model.n_layers': 1})
    workdir = os.path.join(self.tmp.name, 'distilled')
    last, printed = train(config('distillation', **student,
                                 **{'distill.teacher_workdir': self.base}), workdir)
    self.assertRegex(printed, r'Distilling from TransformerLM in .*base \([\d,]+ parameters; '
                              r'temperature 2, alpha 0.5\)')
    self.assertTrue(np.isfinite(last['eval/loss']))
    # A teacher with another vocabulary is refused before anything compiles.
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'teacher gives logits of shape \(4, 32, 256\), the student '
                                r'\(4, 32, 300\)'):
      train(config('distillation', **dict(student, **{'model.vocab_size': 300,
                                                      'distill.teacher_workdir': self.base})),
            os.path.join(self.tmp.name, 'bad'))

  def test_init_from_must_share_parameters(self):
    cfg = config('vit_digits', init_from=self.base, **{'model.d_model': 16, 'model.d_ff': 32,
                                                       'model.n_layers': 1,
                                                       'train.batch_size': 40})
    with self.assertRaisesRegex(config_lib.ConfigError, r'shares no parameter path with this '
                                                        r'model; its paths look like Dense_5/bias'):
      train(cfg, os.path.join(self.tmp.name, 'nothing'))
    cfg = config('bert_mlm', init_from=os.path.join(self.tmp.name, 'missing'), **TINY_ENCODER)
    with self.assertRaisesRegex(config_lib.ConfigError, r'init_from=.* is not a training workdir'):
      train(cfg, os.path.join(self.tmp.name, 'nothing2'))


if __name__ == '__main__':
  absltest.main()
