"""Probing: tokenize labels by hand, frozen base parameters, a probe that must succeed."""

import contextlib
import io
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest

from terraflax import probe
from terraflax.models import spec as spec_lib
from terraflax.train.trainer import train_and_evaluate
from tests.test_decoding_cli import tiny_transformer_config


def spec_of(name, **extra):
  config = ml_collections.ConfigDict({
      'model': dict(name=name, vocab_size=256, d_model=32, d_ff=64, n_layers=2, n_heads=2,
                    max_len=32, dropout=0.0, **extra),
      'data': {'name': 'bytes', 'seq_len': 32}})
  return spec_lib.ModelSpec.from_config(config)


def digits(labels):
  return ''.join(str(int(v)) for v in labels)


class LabelsTest(absltest.TestCase):

  def test_labels_of_a_hand_written_snippet(self):
    source = 'x = f(a, [1, "s#"])  # c\n'
    labels = probe.python_labels(source)
    self.assertEqual(digits(labels['string']), '0000000000000111100000000')
    self.assertEqual(digits(labels['comment']), '0000000000000000000001110')
    self.assertEqual(digits(labels['name']), '1000101000000000000000000')
    self.assertEqual(digits(labels['depth']), '0000001111222222221000000')

  def test_multiline_strings_deep_brackets_and_utf8_bytes(self):
    source = "s = '''é\n'''\nt = (((([0]))))\n"
    labels = probe.python_labels(source)
    self.assertLen(labels['string'], len(source.encode('utf-8')))  # 'é' is two bytes.
    self.assertEqual(digits(labels['string']), '0000' + '1' * 9 + '0' * 17)  # Quotes to quotes.
    # '\nt = ' at 0; '((((' at 0, 1, 2, 3; '[0])' capped at 3; '))' at 3, 2... then 1.
    self.assertEqual(digits(labels['depth'][13:]), '00000' + '0123' + '33333' + '21' + '0')
    self.assertEqual(digits(labels['name']), '1' + '0' * 13 + '1' + '0' * 15)  # s, t.


class ProbeTest(absltest.TestCase):

  def test_layers_of_both_models_and_capture_by_path(self):
    tokens = jnp.asarray(np.random.default_rng(0).integers(32, 127, (3, 32)), jnp.int32)
    for name, extra, width in (
        ('TransformerLM', {}, 32),
        ('ReformerLM', {'attention': {'kind': 'lsh', 'n_hashes': 1, 'n_buckets': 2,
                                      'chunk_len': 16}}, 64)):  # Two streams of 32.
      spec = spec_of(name, **extra)
      params = probe.random_params(spec, 32)
      layers = probe.depth_activations(spec.build('eval'), params, tokens)
      self.assertLen(layers, 3, name)  # The stack's input and its two layers.
      self.assertEqual({a.shape for _, a in layers}, {(3, 32, width)}, name)
      ff = probe.capture(spec.build('eval'), params, tokens, r'FeedForward_0$')
      self.assertEqual(ff.shape, (2, 3, 32, 32), name)  # Stacked over the 2 layers.
      with self.assertRaisesRegex(probe.ProbeError, 'matches .* modules'):
        probe.capture(spec.build('eval'), params, tokens, 'LayerNorm')  # Several.

  def test_probing_leaves_the_base_parameters_bit_identical(self):
    spec = spec_of('TransformerLM')
    params = probe.random_params(spec, 32)
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), params)
    files = [b'def f(x):\n    return [x, "y"]  # z\n' * 8]
    tokens, labels = probe.labelled_windows(files, n=8, seq_len=32)
    layers = probe.depth_activations(spec.build('eval'), params, jnp.asarray(tokens))
    probe.probe_layers(layers, labels, steps=20)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(params)):
      np.testing.assert_array_equal(a, np.asarray(b))
      self.assertEqual(a.tobytes(), np.asarray(b).tobytes())

  def test_a_probe_decodes_what_the_activations_trivially_hold(self):
    # Depth 0 of a TransformerLM at position i + 1 is the embedding of byte i (inputs are
    # shifted right): 'is byte i a letter' is linearly decodable, a shuffled label is not.
    spec = spec_of('TransformerLM')
    params = probe.random_params(spec, 32)
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b'abcdef012345', np.uint8)  # 12 points in 32 dims: separable.
    tokens = alphabet[rng.integers(len(alphabet), size=(64, 32))].astype(np.int32)
    letter = np.vectorize(lambda t: chr(t).isalpha())(tokens).astype(np.int32)
    shuffled = rng.permutation(letter.reshape(-1)).reshape(letter.shape)
    layers = probe.depth_activations(spec.build('eval'), params, jnp.asarray(tokens))[:1]
    results = probe.probe_layers(layers, {'letter': letter, 'shuffled': shuffled},
                                 properties=('letter', 'shuffled'), steps=300,
                                 n_classes={'letter': 2, 'shuffled': 2})
    got = {r.prop: r for r in results}
    self.assertGreater(got['letter'].accuracy, 0.97)
    self.assertLess(got['shuffled'].accuracy, got['shuffled'].majority + 0.05)


  def test_probe_workdir_reports_every_depth_for_the_model_and_its_control(self):
    with tempfile.TemporaryDirectory() as tmp:
      data = os.path.join(tmp, 'corpus.txt')
      pathlib.Path(data).write_text('def f(x):\n  return (x + 1) * [2, 3]\n' * 40)
      workdir = os.path.join(tmp, 'trained')
      with contextlib.redirect_stdout(io.StringIO()):
        train_and_evaluate(tiny_transformer_config(data), workdir)
      results = probe.probe_workdir(workdir, properties=('name', 'depth'), n_sequences=8,
                                    steps=10, max_files=3)
    for kind in ('trained', 'control'):
      self.assertEqual([(r.layer, r.prop) for r in results[kind]],
                       [(layer, prop) for layer in ('Repeat_3/input', 'Repeat_3/Serial_0[0]',
                                                    'Repeat_3/Serial_0[1]')
                        for prop in ('name', 'depth')])
    table = probe.format_table(results)
    self.assertIn('| Repeat_3/Serial_0[1] |', table)


if __name__ == '__main__':
  absltest.main()
