"""Structured pruning: the smaller model computes the masked full model's function."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

from terraflax import decoding
from terraflax import prune
from terraflax.models import spec as spec_lib
from terraflax.train.trainer import train_and_evaluate
from tests.test_decoding_cli import tiny_transformer_config

REPO = pathlib.Path(__file__).resolve().parents[1]
LSH = {'kind': 'lsh', 'n_hashes': 1, 'n_buckets': 2, 'chunk_len': 8}


def model_config(name, **extra):
  model = dict(name=name, vocab_size=16, d_model=16, d_ff=12, n_layers=2, n_heads=4, max_len=16,
               dropout=0.0, **extra)
  return ml_collections.ConfigDict({'model': model, 'data': {'name': 'bytes', 'seq_len': 16}})


def init(config):
  model = spec_lib.ModelSpec.from_config(config).build('eval')
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 1, 16)
  return model, tokens, nn.meta.unbox(model.init(jax.random.key(0), tokens))['params']


class StructuredTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('transformer', 'TransformerLM', {}),
      ('reformer_lsh', 'ReformerLM', {'attention': LSH, 'positions': 'sinusoidal'}),
      ('reformer_full', 'ReformerLM', {'attention': {'kind': 'full'}}),
  )
  def test_pruned_model_equals_the_masked_full_model(self, name, extra):
    config = model_config(name, **extra)
    model, tokens, params = init(config)
    new_model, small, report = prune.prune_params(config, params, ff_keep=0.5, heads_keep=0.5)
    self.assertEqual((new_model.d_ff, new_model.n_heads, new_model.d_qk, new_model.d_v),
                     (6, 2, 4, 4))  # The per-head width stays d_model // 4.
    self.assertEqual(report['d_ff'], [12, 6])
    pruned_config = ml_collections.ConfigDict(config.to_dict())
    pruned_config.model = new_model
    prune.check_shapes(pruned_config, small)  # Raises if the config does not fit the arrays.
    self.assertLess(report['params'][1], report['params'][0])
    masked = prune.structured_masks(config, params, ff_keep=0.5, heads_keep=0.5)
    small_model = spec_lib.ModelSpec.from_config(pruned_config).build('eval')
    rngs = {'hash': jax.random.key(3)}
    want = model.apply({'params': masked}, tokens, rngs=rngs)
    got = small_model.apply({'params': small}, tokens, rngs=rngs)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    full = model.apply({'params': params}, tokens, rngs=rngs)
    self.assertGreater(float(jnp.max(jnp.abs(full - want))), 1e-2)  # Pruning did something.

  def test_norm_keeps_the_largest_units_of_each_layer(self):
    config = model_config('TransformerLM')
    _, _, params = init(config)
    ff = params['Repeat_3']['Serial_0']['Residual_1']['FeedForward_0']
    big = {0: [1, 5, 7], 1: [0, 2, 11]}  # Layer -> the hidden units made 100x larger.
    first = np.array(ff['Dense_1']['kernel'])
    for layer, units in big.items():
      first[layer][:, units] *= 100.0
    ff['Dense_1']['kernel'] = first
    _, small, report = prune.prune_params(config, params, ff_keep=0.25)
    kept = report['kept']['Repeat_3/Serial_0/Residual_1/FeedForward_0']
    self.assertEqual(kept, [big[0], big[1]])
    for layer, units in big.items():
      np.testing.assert_array_equal(
          small['Repeat_3']['Serial_0']['Residual_1']['FeedForward_0']['Dense_1']['kernel'][layer],
          first[layer][:, units])

  def test_taylor_scores_are_gradient_times_weight_summed_per_unit(self):
    config = model_config('TransformerLM')
    _, _, params = init(config)
    flat = prune._flat(params)  # pylint: disable=protected-access
    grads = {p: np.cos(np.arange(np.size(x)).reshape(np.shape(x))) for p, x in flat.items()}
    groups = prune.find_groups(flat, d_ff=12, n_heads=4)
    scores = prune.scores_taylor(flat, grads, groups)
    attention = next(i for i, g in enumerate(groups) if g.kind == 'heads')
    prefix = groups[attention].prefix
    layer, head, width = 1, 2, 4  # Brute force: head 2 of layer 1 owns columns 8..11.
    total = 0.0
    for name in ('query', 'key', 'value'):
      for part in ('kernel', 'bias'):
        p = f'{prefix}/{name}/{part}'
        total += np.sum((grads[p] * np.asarray(flat[p], np.float64))[layer][
            ..., head * width:(head + 1) * width])
    p = f'{prefix}/output/kernel'
    total += np.sum((grads[p] * np.asarray(flat[p], np.float64))[layer][
        head * width:(head + 1) * width])
    self.assertAlmostEqual(scores[attention][layer, head], abs(total), places=6)

  def test_sparsity_removes_that_fraction_heads_first_then_units(self):
    config = model_config('TransformerLM')
    _, _, params = init(config)
    flat = prune._flat(params)  # pylint: disable=protected-access
    # Per layer, by hand: a hidden unit owns 16 + 1 + 16 = 33 weights (its column of the
    # first Dense and bias, its row of the second); a head 4 x 16 x 4 + 3 x 4 = 268
    # (its query/key/value/output slices and query/key/value biases); 1468 in all.
    def keep(sparsity, **kwargs):
      return prune.keep_for_sparsity(flat, d_ff=12, n_heads=4, sparsity=sparsity, **kwargs)
    self.assertEqual(keep(0.5), (6, 2))  # 6 x 33 + 2 x 268 = 734 = 1468 / 2.
    self.assertEqual(keep(0.75), (3, 1))  # 1 head, then (367 - 268) / 33 = 3 units.
    self.assertEqual(keep(0.75, ff_multiple=4), (4, 1))
    self.assertEqual(keep(0.9), (1, 1))  # The target is out of reach: one of each stays.
    new_model, _, report = prune.prune_params(config, params, sparsity=0.75)
    self.assertEqual((new_model.d_ff, new_model.n_heads), (3, 1))
    self.assertAlmostEqual(report['removed'], 1 - (3 * 33 + 268) / 1468)
    with self.assertRaisesRegex(prune.PruneError, 'not both'):
      prune.prune_params(config, params, sparsity=0.5, ff_keep=0.5)
    with self.assertRaisesRegex(prune.PruneError, r'--sparsity must be a fraction in \[0, 1\)'):
      keep(1.0)

  def test_bad_fractions_name_the_flag(self):
    config = model_config('TransformerLM')
    _, _, params = init(config)
    with self.assertRaisesRegex(prune.PruneError, r'--ff_keep must be a fraction in \(0, 1\]'):
      prune.prune_params(config, params, ff_keep=0.0)
    with self.assertRaisesRegex(prune.PruneError, '--importance must be one of'):
      prune.prune_params(config, params, importance='random')


class WorkdirTest(absltest.TestCase):

  def test_prune_workdir_decodes_and_the_cli_reports(self):
    with tempfile.TemporaryDirectory() as tmp:
      data = os.path.join(tmp, 'corpus.txt')
      pathlib.Path(data).write_text('def f(x):\n  return (x + 1) * [2, 3]\n' * 40)
      source = os.path.join(tmp, 'trained')
      with contextlib.redirect_stdout(io.StringIO()):
        train_and_evaluate(tiny_transformer_config(data), source)
      out = os.path.join(tmp, 'pruned')
      env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
      done = subprocess.run([sys.executable, '-m', 'terraflax.prune', f'--workdir={source}',
                             f'--to={out}', '--ff_keep=0.5', '--heads_keep=0.5',
                             '--importance=taylor', '--batches=1'],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
      self.assertEqual(done.returncode, 0, done.stderr)
      self.assertRegex(done.stdout, r'd_ff 32 -> 16, n_heads 2 -> 1, [\d,]+ -> [\d,]+ parameters')
      written = json.loads(pathlib.Path(out, 'config.json').read_text())
      self.assertEqual((written['model']['d_ff'], written['model']['n_heads'],
                        written['model']['d_qk']), (16, 1, 8))
      config, spec, params = spec_lib.load_workdir(out)
      self.assertEqual(config.model.d_ff, 16)
      tokens = decoding.autoregressive_sample(spec.build('predict'), params,
                                              jnp.array([[100, 101]]), max_new_tokens=3,
                                              temperature=0.0)
      self.assertEqual(tokens.shape, (1, 3))
      with self.assertRaisesRegex(prune.PruneError, 'already holds checkpoints'):
        prune.prune_workdir(source, out, ff_keep=0.5)


if __name__ == '__main__':
  absltest.main()
