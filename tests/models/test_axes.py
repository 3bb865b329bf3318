"""Logical axis names (issue 20): every parameter of every layer and model is named.

References: hand-written names per layer; the model's own sizes (d_model,
d_ff, n_heads, vocab) per name; parameter shapes recorded from the code
before the names existed (tests/fixtures/axes_baseline.json); jax's own
divisibility check (`NamedSharding.shard_shape`) on a (fsdp=2, model=2)
abstract mesh; and, in a subprocess with 8 CPU devices, the single-device
outputs of the same parameters.
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import traverse_util
from jax.sharding import AbstractMesh, NamedSharding

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.layers.core import AXIS_NAMES
from tests.models import axes_zoo as zoo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINE = os.path.join(ROOT, 'tests', 'fixtures', 'axes_baseline.json')

# The default rules of issue 20 (the trainer's config maps the same names).
DEFAULT_RULES = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('vocab', 'model'),
                 ('heads', 'model'), ('mlp', 'model'), ('modules', 'model'))
MESH = AbstractMesh((1, 2, 2), ('data', 'fsdp', 'model'))


def boxed_leaves(variables) -> dict:
  """{'a/b/c': leaf} of a params tree, boxes kept whole."""
  flat = traverse_util.flatten_dict(variables, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  return {'/'.join(path): leaf for path, leaf in flat.items()}


def abstract_params(model, *inputs):
  return jax.eval_shape(model.init, zoo.rngs(0), *inputs)['params']


def names_of(layer, *inputs) -> dict:
  """{path: names} of a layer's parameters; fails on an unnamed leaf."""
  out = {}
  for path, leaf in boxed_leaves(abstract_params(layer, *inputs)).items():
    assert isinstance(leaf, nn.LogicallyPartitioned), f'{path} has no logical names'
    out[path] = tuple(leaf.names)
  return out


X = jnp.ones((2, 8, 16))
MASK = jnp.ones((2, 8), bool)
IDS = jnp.ones((2, 8), jnp.int32)
HEADS_IN, HEADS_OUT = ('embed', 'heads'), ('heads', 'embed')
ATTENTION = {'query/kernel': HEADS_IN, 'query/bias': ('heads',), 'key/kernel': HEADS_IN,
             'key/bias': ('heads',), 'value/kernel': HEADS_IN, 'value/bias': ('heads',),
             'output/kernel': HEADS_OUT, 'output/bias': ('embed',)}
PER_HEAD_IN, PER_HEAD_OUT = ('embed', 'heads', 'head_dim'), ('heads', 'head_dim', 'embed')
CONV = {'kernel': ('kernel', None, None, None), 'bias': (None,)}

# Public layer -> (instance, inputs, {parameter path: names}), the names written by hand.
LAYERS = {
    'Dense': (tl.Dense(6), (X,), {'kernel': (None, None), 'bias': (None,)}),
    'Embedding': (tl.Embedding(12, 16), (IDS,), {'embedding': ('vocab', 'embed')}),
    'LayerNorm': (tl.LayerNorm(), (X,), {'scale': ('embed',), 'bias': ('embed',)}),
    'RMSNorm': (tl.RMSNorm(), (X,), {'scale': ('embed',)}),
    'CausalAttention': (tl.CausalAttention(n_heads=2), (X,), ATTENTION),
    'Attention': (tl.Attention(n_heads=2), (X, MASK), ATTENTION),
    'EncDecAttention': (tl.EncDecAttention(n_heads=2), (X, X, MASK), ATTENTION),
    'PrefixCausalAttention': (tl.PrefixCausalAttention(n_heads=2, n_prefix=3), (X,), dict(
        ATTENTION, prefix_key=(None, 'heads', 'head_dim'),
        prefix_value=(None, 'heads', 'head_dim'))),
    'PrefixAttention': (tl.PrefixAttention(n_heads=2), (X, MASK), dict(
        ATTENTION, prefix_key=(None, 'heads', 'head_dim'),
        prefix_value=(None, 'heads', 'head_dim'))),
    'LocalSelfAttention': (tl.LocalSelfAttention(n_heads=2, d_qk=4, d_v=4, chunk_len=4), (X,), {
        'query': PER_HEAD_IN, 'key': PER_HEAD_IN, 'value': PER_HEAD_IN,
        'output': PER_HEAD_OUT}),
    'LSHSelfAttention': (tl.LSHSelfAttention(n_heads=2, d_qk=4, d_v=4, chunk_len=4), (X,), {
        'qk': PER_HEAD_IN, 'value': PER_HEAD_IN, 'output': PER_HEAD_OUT}),
    'MultiplicativeDense': (tl.MultiplicativeDense(n_modules=2), (X,), {
        'gating': ('embed', 'modules'), 'kernel': ('embed', None), 'bias': (None,)}),
    'ModularCausalConv': (tl.ModularCausalConv(n_modules=2), (X,), CONV),
    'MultiplicativeConvCausalAttention': (tl.MultiplicativeConvCausalAttention(n_heads=2), (X,), {
        'multiplicative/gating': ('embed', 'modules'), 'multiplicative/kernel': ('embed', None),
        'multiplicative/bias': (None,),
        **{f'{c}_conv/{p}': names for c in ('query', 'key', 'value')
           for p, names in CONV.items()},
        'output/kernel': HEADS_OUT, 'output/bias': ('embed',)}),
    'ConcatCausalAttention': (tl.ConcatCausalAttention(n_heads=2), (X, MASK), ATTENTION),
    'SparseFF': (tl.SparseFF(d_ff=32, n_elements_in_block=8, d_lowrank=4), (X,), {
        'kernel_in': ('mlp', 'embed'), 'bias_in': ('mlp',), 'kernel_out': ('mlp', 'embed'),
        'bias_out': ('embed',), 'controller_lowrank/kernel': ('embed', 'controller'),
        'controller_logits/kernel': ('controller', 'mlp'), 'controller_logits/bias': ('mlp',)}),
    'FeedForward': (tl.FeedForward(d_model=16, d_ff=32, kernel='xla'), (X,), {
        'LayerNorm_0/scale': ('embed',), 'LayerNorm_0/bias': ('embed',),
        'Dense_1/kernel': ('embed', 'mlp'), 'Dense_1/bias': ('mlp',),
        'Dense_4/kernel': ('mlp', 'embed'), 'Dense_4/bias': ('embed',)}),
    'FixedBasePositionalEncoding': (tl.FixedBasePositionalEncoding(mode='eval'), (X,),
                                    {'base_weights': (None, None, None), 'start_vec': (None,)}),
    'PositionalEncoding': (tl.PositionalEncoding(max_len=8, kind='learned'), (X,),
                           {'pos_embedding': (None, 'embed')}),
    'AxialPositionalEncoding': (tl.AxialPositionalEncoding(shape=(2, 4), d_embs=(6, 10)), (X,),
                                {'axial_0': (None, None), 'axial_1': (None, None)}),
    'PatchEmbedding': (tl.PatchEmbedding(patch_size=2, d_model=16), (jnp.ones((2, 4, 4, 3)),),
                       {'projection/kernel': (None, 'embed'), 'projection/bias': ('embed',)}),
    'ClassToken': (tl.ClassToken(), (X,), {'cls': ('embed',)}),
}
LAYERS['ConcatSparseQKVAttention'] = (tl.ConcatSparseQKVAttention(n_heads=2), (X, MASK),
                                      LAYERS['MultiplicativeConvCausalAttention'][2])
# Public layers without parameters of their own (ConcatDecoder: its encoder's and decoder's).
NO_PARAMETERS = {'Dropout', 'ShiftRight', 'FourierMixing', 'MaskedFourierMixing', 'Accuracy',
                 'CrossEntropyLoss', 'DistillationLoss', 'CacheOutputs', 'ConcatDecoder'}


def expected_sizes(name: str) -> dict:
  """{logical name: allowed sizes} of a zoo model, from its hyperparameters."""
  factory, kwargs, _ = zoo.ZOO[name]
  d, h = zoo.SIZES['d_model'], zoo.SIZES['n_heads']
  k = d // h
  embed = {d}
  if factory == 'ReformerLM' or (factory.startswith('Terraformer')
                                 and kwargs.get('merge_streams', 'concat') == 'concat'):
    embed.add(2 * d)  # After MergeStreams('concat'): the final norm, logits and cross keys.
  return {'embed': embed, 'mlp': {zoo.SIZES['d_ff']}, 'vocab': {zoo.VOCAB},
          'heads': {h, h * k},  # (d, h, k) or the stored (d, h * k) projections.
          'head_dim': {k}, 'modules': {h}, 'controller': {kwargs.get('ff_d_lowrank')},
          'kernel': {3}}


class LayerAxesTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in LAYERS)
  def test_parameters_carry_the_hand_written_names(self, name):
    layer, inputs, want = LAYERS[name]
    self.assertEqual(names_of(layer, *inputs), want)

  def test_every_public_layer_is_covered(self):
    public = {n for n, v in vars(tl).items()
              if inspect.isclass(v) and issubclass(v, nn.Module)} | {'FeedForward'}
    self.assertEqual(public - set(LAYERS) - NO_PARAMETERS, set())

  def test_callers_name_dense_and_norm_axes(self):
    self.assertEqual(names_of(tl.Dense(6, axes=('embed', 'mlp')), X),
                     {'kernel': ('embed', 'mlp'), 'bias': ('mlp',)})
    self.assertEqual(names_of(tl.Embedding(12, 4, axes=('vocab', None)), IDS),
                     {'embedding': ('vocab', None)})
    self.assertEqual(names_of(tl.LayerNorm(axes=(None,)), X), {'scale': (None,), 'bias': (None,)})

  def test_invalid_axes_are_clear_errors(self):
    with self.assertRaisesRegex(ValueError, r"Dense axes=\('embed',\) must be 2 logical"):
      tl.Dense(4, axes=('embed',))
    with self.assertRaisesRegex(ValueError, "LayerNorm axes=.*'norm'.* one of"):
      tl.LayerNorm(axes=('norm',))

  def test_stacked_parameters_lead_with_layers(self):
    dense = tl.Dense(16, axes=('embed', 'mlp'))
    self.assertEqual(names_of(cb.Repeat(dense, 3), X)['Dense_0/kernel'], ('layers', 'embed', 'mlp'))
    self.assertEqual(names_of(cb.Repeat(tl.Dense(16, axes=('embed', 'mlp')), 3, share_params=True),
                              X)['Dense_0/kernel'], ('embed', 'mlp'))
    rev = cb.ReversibleSerial(cb.ReversibleHalfResidual(tl.LayerNorm()), cb.ReversibleSwap(),
                              n_repeats=3)
    leaves = boxed_leaves(abstract_params(rev, X, X))
    self.assertEqual(leaves['ReversibleHalfResidual_0/LayerNorm_0/scale'].names,
                     ('layers', 'embed'))
    self.assertEqual(leaves['ReversibleHalfResidual_0/LayerNorm_0/scale'].value.shape, (3, 16))

  def test_boxed_and_plain_parameters_apply_alike(self):
    # The reversible stack's pure path and the native feed-forward read variables directly.
    model = zoo.build('ReformerLM', 'train')
    x = zoo.inputs('ReformerLM')
    boxed = model.init(zoo.rngs(0), *x)
    plain = nn.meta.unbox(boxed)
    self.assertFalse(any(isinstance(v, nn.Partitioned)
                         for v in boxed_leaves(plain['params']).values()))
    run = lambda v: model.apply(v, *x, rngs=zoo.rngs(1))
    np.testing.assert_array_equal(run(boxed), run(plain))
    ff = tl.FeedForward(d_model=16, d_ff=32)
    variables = ff.init(zoo.rngs(0), X)
    np.testing.assert_array_equal(ff.apply(variables, X), ff.apply(nn.meta.unbox(variables), X))


class ModelAxesTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in zoo.ZOO)
  def test_every_parameter_is_named_with_consistent_sizes(self, name):
    leaves = boxed_leaves(abstract_params(zoo.build(name), *zoo.inputs(name)))
    sizes = expected_sizes(name)
    layer_sizes = set()
    for path, leaf in leaves.items():
      self.assertIsInstance(leaf, nn.LogicallyPartitioned, path)
      names, shape = tuple(leaf.names), leaf.value.shape
      self.assertLen(names, len(shape), path)
      self.assertLessEqual(set(names) - {None}, set(AXIS_NAMES), path)
      real = [n for n in names if n is not None]
      self.assertEqual(len(real), len(set(real)), f'{path}: a name twice in {names}')
      self.assertNotIn('batch', names, path)
      self.assertNotIn('length', names, path)
      for axis, (n, size) in enumerate(zip(names, shape)):
        if n == 'layers':
          self.assertEqual(axis, 0, f'{path}: layers must lead, got {names}')
          layer_sizes.add(size)
        elif n is not None:
          self.assertIn(size, sizes[n], f'{path}: {n} has size {size}, shape {shape}')
    if layer_sizes:  # One stack depth per model, dividing n_layers.
      self.assertLen(layer_sizes, 1, name)
      self.assertEqual(zoo.SIZES['n_layers'] % layer_sizes.pop(), 0, name)

  @parameterized.named_parameters((name, name) for name in zoo.ZOO)
  def test_default_rules_shard_every_parameter_divisibly(self, name):
    leaves = boxed_leaves(abstract_params(zoo.build(name), *zoo.inputs(name)))
    sharded = 0
    for path, leaf in leaves.items():
      spec = nn.logical_to_mesh_axes(leaf.names, DEFAULT_RULES)
      # Raises IndivisibleError for a dimension the mesh axes do not divide.
      NamedSharding(MESH, spec).shard_shape(leaf.value.shape)
      for n, axis in zip(leaf.names, spec):
        want = dict(DEFAULT_RULES).get(n)
        self.assertEqual(axis, want, f'{path}: {n} -> {axis}')
      sharded += any(axis is not None for axis in spec)
    # Every model shards most of its weights: embeddings, projections, feed-forward.
    self.assertGreater(sharded, len(leaves) // 3, name)

  def test_parameter_shapes_match_the_code_before_names(self):
    with open(BASELINE) as f:
      baseline = json.load(f)
    self.assertEqual(set(baseline), set(zoo.ZOO) - zoo.AFTER_BASELINE)
    for name in baseline:
      params = nn.meta.unbox(abstract_params(zoo.build(name), *zoo.inputs(name)))
      got = {'/'.join(p): list(x.shape) for p, x in traverse_util.flatten_dict(params).items()}
      self.assertEqual(got, baseline[name], name)

  @parameterized.named_parameters(
      (name, name) for name in ('TransformerLM_sparse_qkv', 'ReformerLM', 'Terraformer'))
  def test_rules_without_a_mesh_change_nothing(self, name):
    model, x = zoo.build(name), zoo.inputs(name)
    params = nn.meta.unbox(model.init(zoo.rngs(0), *x)['params'])
    plain = jax.jit(lambda p: model.apply({'params': p}, *x, rngs=zoo.rngs(1)))(params)
    with nn.logical_axis_rules(DEFAULT_RULES):  # Traced anew under the rules.
      ruled = jax.jit(lambda p: model.apply({'params': p}, *x, rngs=zoo.rngs(1)))(params)
    np.testing.assert_array_equal(ruled, plain)

SHARDED_SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_force_host_platform_device_count=8')
    import jax, numpy as np
    import flax.linen as nn
    from jax.sharding import NamedSharding
    jax.config.update('jax_numpy_rank_promotion', 'raise')
    from tests.models import axes_zoo as zoo
    from tests.models.test_axes import DEFAULT_RULES
    assert jax.device_count() == 8
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ('data', 'fsdp', 'model'))
    for name in sys.argv[1:]:
      model, x = zoo.build(name), zoo.inputs(name)
      boxed = model.init(zoo.rngs(0), *x)['params']
      params = nn.meta.unbox(boxed)
      single = model.apply({'params': params}, *x, rngs=zoo.rngs(1))
      specs = nn.get_partition_spec(boxed)
      with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_RULES)
        placed = jax.device_put(params, shardings)
        out = jax.jit(lambda p: model.apply({'params': p}, *x, rngs=zoo.rngs(1)))(placed)
      n_split = sum(s.spec != jax.sharding.PartitionSpec(*([None] * len(s.spec)))
                    for s in jax.tree_util.tree_leaves(shardings))
      err = float(np.max(np.abs(np.asarray(out) - np.asarray(single))))
      print(name, 'sharded', n_split, 'max_abs_diff', err, flush=True)
      assert n_split > 0, name
      np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=2e-5, atol=2e-5)
    print('OK')
''')


class ShardedOutputsTest(absltest.TestCase):

  def test_sharded_parameters_give_the_single_device_outputs(self):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
               JAX_PLATFORMS='cpu')
    # TerraformerLM's sparse QKV needs the rules and jax.set_mesh while tracing: with its
    # parameters sharded and no constraints, XLA:CPU gets its scanned module convolution wrong.
    models = ['TransformerLM', 'ReformerLM', 'TerraformerLM', 'TerraformerLM_lsh_mean',
              'ConcatTerraformer']
    result = subprocess.run(
        [sys.executable, '-c', SHARDED_SCRIPT, *models],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(result.returncode, 0, result.stdout + result.stderr[-3000:])
    self.assertIn('OK', result.stdout)


if __name__ == '__main__':
  absltest.main()
