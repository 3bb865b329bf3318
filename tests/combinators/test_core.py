"""Stack semantics of the combinators, pinned down with toy Fn layers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl

KEY = jax.random.key(0)


def run(layer, *inputs):
  """init + apply of a parameter-free or parametric layer; returns outputs."""
  variables = nn.meta.unbox(layer.init(KEY, *inputs))
  return layer.apply(variables, *inputs)


def scalar(v):
  return jnp.array(float(v))


# Toy layers whose outputs show which inputs they saw.
def AddOne():
  return cb.Fn('AddOne', lambda x: x + 1)


def Digits2():  # 2 -> 1: 10a + b
  return cb.Fn('Digits2', lambda a, b: 10 * a + b)


def Digits3():  # 3 -> 1: 100a + 10b + c
  return cb.Fn('Digits3', lambda a, b, c: 100 * a + 10 * b + c)


def SplitTwo():  # 1 -> 2: [x, 2x]
  return cb.Fn('SplitTwo', lambda x: (x, 2 * x), n_out=2)


def Seven():  # 0 -> 1
  return cb.Fn('Seven', lambda: jnp.array(7.0))


def values(out):
  out = out if isinstance(out, tuple) else (out,)
  return [float(x) for x in out]


class SerialTest(parameterized.TestCase):

  def test_composes_in_order(self):
    layer = cb.Serial(AddOne(), Digits2())  # [a, b] -> [10(a+1) + b]
    self.assertEqual((layer.n_in, layer.n_out), (2, 1))
    self.assertEqual(values(run(layer, scalar(1), scalar(5))), [25.0])

  @parameterized.named_parameters(
      ('empty', [], (0, 0)),
      ('one_to_one', [AddOne], (1, 1)),
      ('fan_out_then_in', [SplitTwo, Digits2], (1, 1)),
      ('fan_in_then_out', [Digits2, SplitTwo], (2, 2)),
      ('zero_in', [Seven], (0, 1)),
      ('zero_out', [cb.Drop], (1, 0)),
      ('underflow_grows_n_in', [Digits2, Digits2], (3, 1)),
      ('drop_then_three', [cb.Drop, Digits3], (4, 1)),
  )
  def test_derived_n_in_n_out(self, factories, expected):
    layer = cb.Serial(*[f() for f in factories])
    self.assertEqual((layer.n_in, layer.n_out), expected)

  def test_deep_stack_and_leftovers(self):
    # [a, b, c] -> Digits2 -> [10a + b, c] -> Digits2 -> [10(10a+b) + c]
    layer = cb.Serial(Digits2(), Digits2())
    self.assertEqual(values(run(layer, scalar(1), scalar(2), scalar(3))), [123.0])

  def test_zero_in_and_zero_out(self):
    # [a] -> Seven -> [7, a] -> Digits2 -> [70 + a] -> SplitTwo -> Drop -> [2(70 + a)]
    layer = cb.Serial(Seven(), Digits2(), SplitTwo(), cb.Drop())
    self.assertEqual((layer.n_in, layer.n_out), (1, 1))
    self.assertEqual(values(run(layer, scalar(3))), [146.0])
    layer = cb.Serial(SplitTwo(), cb.Drop())  # [x] -> [x, 2x] -> drop top -> [2x]
    self.assertEqual(values(run(layer, scalar(3))), [6.0])

  def test_nested_lists_are_flattened_and_none_skipped(self):
    layer = cb.Serial([AddOne(), [AddOne(), None]], None, [[AddOne()]])
    self.assertLen(layer.layers, 3)
    self.assertEqual(values(run(layer, scalar(0))), [3.0])

  def test_empty_serial_is_identity_on_nothing(self):
    layer = cb.Serial()
    self.assertEqual(layer.apply({}), ())

  def test_many_outputs_returned_as_tuple(self):
    out = run(cb.Serial(SplitTwo(), SplitTwo()), scalar(1))  # [1, 2] -> [1, 2, 2]
    self.assertIsInstance(out, tuple)
    self.assertEqual(values(out), [1.0, 2.0, 2.0])


class ParallelBranchTest(parameterized.TestCase):

  def test_parallel_gives_each_its_slice(self):
    layer = cb.Parallel(AddOne(), Digits3())  # [a, b, c, d] -> [a+1, 100b+10c+d]
    self.assertEqual((layer.n_in, layer.n_out), (4, 2))
    self.assertEqual(values(run(layer, *map(scalar, [1, 2, 3, 4]))), [2.0, 234.0])

  def test_parallel_none_and_lists(self):
    layer = cb.Parallel(None, [AddOne(), AddOne()], SplitTwo())
    self.assertEqual((layer.n_in, layer.n_out), (3, 4))
    self.assertEqual(values(run(layer, *map(scalar, [1, 2, 3]))), [1.0, 4.0, 3.0, 6.0])

  def test_parallel_empty_list_is_identity_on_one_item(self):
    layer = cb.Parallel([], AddOne())  # [a, b] -> [a, b+1], as with None
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    self.assertEqual(values(run(layer, scalar(1), scalar(5))), [1.0, 6.0])
    layer = cb.Parallel(AddOne(), [None], Digits2())  # [a, b, c, d] -> [a+1, b, 10c+d]
    self.assertEqual((layer.n_in, layer.n_out), (4, 3))
    self.assertEqual(values(run(layer, *map(scalar, [1, 2, 3, 4]))), [2.0, 2.0, 34.0])

  def test_branch_empty_list_is_identity_on_top_item(self):
    layer = cb.Branch([], cb.Dup())  # [a] -> [a, a, a]
    self.assertEqual((layer.n_in, layer.n_out), (1, 3))
    self.assertEqual(values(run(layer, scalar(3))), [3.0, 3.0, 3.0])
    layer = cb.Branch(Digits2(), [])  # [a, b] -> [10a+b, a]
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    self.assertEqual(values(run(layer, scalar(1), scalar(2))), [12.0, 1.0])

  def test_branch_copies_inputs(self):
    layer = cb.Branch(AddOne(), Digits2())  # [a, b] -> [a+1, 10a+b]
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    self.assertEqual(values(run(layer, scalar(1), scalar(2))), [2.0, 12.0])

  def test_branch_with_identity_and_zero_in(self):
    layer = cb.Branch(None, Seven(), cb.Serial(SplitTwo()))
    self.assertEqual((layer.n_in, layer.n_out), (1, 4))
    self.assertEqual(values(run(layer, scalar(3))), [3.0, 7.0, 3.0, 6.0])

  def test_branch_inside_serial_leaves_rest_of_stack(self):
    layer = cb.Serial(cb.Branch(AddOne(), None), Digits3())  # [a, b] -> [a+1, a, b]
    self.assertEqual((layer.n_in, layer.n_out), (2, 1))
    self.assertEqual(values(run(layer, scalar(1), scalar(5))), [215.0])


class ResidualSelectTest(parameterized.TestCase):

  def test_residual_adds_input(self):
    layer = cb.Residual(AddOne(), AddOne())
    self.assertEqual(values(run(layer, scalar(5))), [12.0])

  def test_residual_passes_extra_outputs(self):
    layer = cb.Residual(Digits2(), SplitTwo())  # [x, m] -> [x + (10x+m), 2(10x+m)]
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    self.assertEqual(values(run(layer, scalar(1), scalar(2))), [13.0, 24.0])

  def test_residual_shortcut(self):
    layer = cb.Residual(AddOne(), shortcut=cb.Fn('Neg', lambda x: -x))
    self.assertEqual(values(run(layer, scalar(5))), [1.0])

  def test_residual_empty_list_shortcut_is_identity(self):
    layer = cb.Residual(AddOne(), shortcut=[])  # [x] -> [x + (x+1)], as with None
    self.assertEqual(values(run(layer, scalar(5))), [11.0])
    layer = cb.Residual(AddOne(), shortcut=[AddOne(), AddOne()])  # [x] -> [(x+2) + (x+1)]
    self.assertEqual(values(run(layer, scalar(5))), [13.0])

  def test_empty_lists_in_serial_and_residual_layers_change_nothing(self):
    self.assertEqual(values(run(cb.Serial([], Digits2(), []), scalar(1), scalar(2))), [12.0])
    layer = cb.Residual([], AddOne(), [])
    self.assertEqual((layer.n_in, layer.n_out), (1, 1))
    self.assertEqual(values(run(layer, scalar(5))), [11.0])

  @parameterized.named_parameters(
      ('copy', [0, 0, 1], None, [1, 1, 2]),
      ('swap', [1, 0], None, [2, 1]),
      ('consume_extra', [2, 0], 3, [3, 1]),
      ('drop_all', [], 2, []),
  )
  def test_select(self, indices, n_in, expected):
    layer = cb.Select(indices, n_in=n_in)
    inputs = [scalar(v) for v in [1, 2, 3][:layer.n_in]]
    self.assertEqual(values(run(layer, *inputs)) if expected else list(run(layer, *inputs)),
                     expected)

  def test_stack_moves(self):
    self.assertEqual(values(run(cb.Dup(), scalar(4))), [4.0, 4.0])
    self.assertEqual(values(run(cb.Swap(), scalar(1), scalar(2))), [2.0, 1.0])
    self.assertEqual(run(cb.Drop(), scalar(1)), ())
    self.assertEqual(values(run(cb.Add(), scalar(1), scalar(2))), [3.0])
    self.assertEqual(values(run(cb.Multiply(), scalar(3), scalar(2))), [6.0])
    x, y = jnp.ones((2, 3)), jnp.zeros((2, 1))
    self.assertEqual(run(cb.Concatenate(), x, y).shape, (2, 4))
    self.assertEqual(run(cb.Concatenate(3, axis=0), x, x, x).shape, (6, 3))


class ErrorTest(absltest.TestCase):

  def test_underflow_names_layer_and_counts(self):
    layer = cb.Serial(Digits2())
    with self.assertRaisesRegex(cb.LayerError, r'Serial.*n_in=2.*called with 1'):
      nn.meta.unbox(layer.init(KEY, scalar(1)))

  def test_wrong_output_count_names_path(self):
    liar = cb.Fn('Liar', lambda x: x, n_out=2)
    model = cb.Serial(AddOne(), cb.Serial(AddOne(), liar))
    with self.assertRaisesRegex(cb.LayerError, r'Serial_1/Liar_1 .*n_out=2 but returned one array'):
      nn.meta.unbox(model.init(KEY, scalar(1)))

  def test_shape_mismatch_names_path_and_shapes(self):
    model = cb.Serial(tl.Dense(3), cb.Serial(tl.Dense(4), cb.Branch(None, tl.Dense(5)), cb.Add()))
    with self.assertRaisesRegex(cb.LayerError, r'Serial_1/Add_2 .*float32\(2, 4\), float32\(2, 5\)'):
      nn.meta.unbox(model.init(KEY, jnp.ones((2, 3))))

  def test_residual_mismatch_names_residual(self):
    model = cb.Serial(cb.Residual(tl.Dense(7)))
    with self.assertRaisesRegex(cb.LayerError, r'Residual_0.*\(2, 3\) and \(2, 7\)'):
      nn.meta.unbox(model.init(KEY, jnp.ones((2, 3))))

  def test_error_inside_leaf_layer_names_it(self):
    model = cb.Serial(tl.Dense(3), tl.Embedding(4, 2))
    with self.assertRaisesRegex(cb.LayerError, r'Embedding_1.*integer token ids.*float32'):
      nn.meta.unbox(model.init(KEY, jnp.ones((2, 3))))

  def test_bad_construction(self):
    with self.assertRaisesRegex(cb.LayerError, 'indices'):
      cb.Select([0, 3], n_in=2)
    with self.assertRaisesRegex(cb.LayerError, r'\*args'):
      cb.Fn('Var', lambda *xs: xs[0])
    with self.assertRaisesRegex(cb.LayerError, 'flax Module'):
      cb.Serial(lambda x: x)
    with self.assertRaisesRegex(cb.LayerError, "both named 'same'"):
      cb.Serial(tl.Dense(2, name='same'), tl.Dense(2, name='same'))
    with self.assertRaisesRegex(ValueError, 'mode must be one of'):
      tl.Dropout(0.1, mode='training')


class SharingAndJitTest(absltest.TestCase):

  def test_reused_instance_shares_parameters(self):
    shared = tl.Dense(4)
    model = cb.Serial(shared, tl.Relu(), shared)
    x = jnp.arange(8.0).reshape(2, 4)
    variables = nn.meta.unbox(model.init(KEY, x))
    self.assertEqual(list(variables['params']), ['Dense_0'])
    kernel = variables['params']['Dense_0']['kernel']
    bias = variables['params']['Dense_0']['bias']
    expected = jax.nn.relu(x @ kernel + bias[None]) @ kernel + bias[None]
    chex.assert_trees_all_close(model.apply(variables, x), expected, rtol=1e-6)

  def test_sharing_across_nested_combinators(self):
    shared = tl.Dense(4)
    model = cb.Serial(shared, cb.Residual(shared), cb.Branch(shared, None), cb.Add())
    variables = nn.meta.unbox(model.init(KEY, jnp.ones((1, 4))))
    leaves = jax.tree_util.tree_leaves(variables)
    self.assertLen(leaves, 2)  # one kernel, one bias

  def test_parameter_paths_name_layers(self):
    model = cb.Serial(tl.Embedding(16, 8), cb.Residual(tl.LayerNorm(), tl.Dense(8)), tl.Dense(16))
    variables = nn.meta.unbox(model.init(KEY, jnp.zeros((1, 3), jnp.int32)))
    paths = {'/'.join(k.key for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(variables['params'])[0]}
    self.assertEqual(paths, {
        'Embedding_0/embedding', 'Residual_1/LayerNorm_0/scale', 'Residual_1/LayerNorm_0/bias',
        'Residual_1/Dense_1/kernel', 'Residual_1/Dense_1/bias', 'Dense_2/kernel', 'Dense_2/bias'})

  def test_jit_equals_eager(self):
    model = cb.Serial(tl.Dense(8), cb.Branch(tl.Relu(), tl.Tanh()), cb.Multiply(),
                      cb.Residual(tl.LayerNorm(), tl.Dense(8)))
    x = jax.random.normal(KEY, (3, 5))
    variables = nn.meta.unbox(model.init(KEY, x))
    chex.assert_trees_all_close(jax.jit(model.apply)(variables, x), model.apply(variables, x),
                                rtol=1e-6, atol=1e-6)

  def test_every_layer_call_runs_in_a_named_scope_of_its_path(self):
    model = cb.Serial(tl.Dense(8), cb.Residual(tl.LayerNorm(), tl.Dense(8)), tl.Relu())
    x = jax.random.normal(KEY, (3, 5))
    variables = nn.meta.unbox(model.init(KEY, x))
    text = jax.jit(model.apply).lower(variables, x).as_text(debug_info=True)
    for scope in ('Dense_0/', 'Residual_1/LayerNorm_0/', 'Residual_1/Dense_1/', 'Relu_2/'):
      self.assertIn(scope, text)

  def test_clone_keeps_structure(self):
    model = cb.Serial(tl.Dense(2), cb.Select([0, 0]), cb.Add(), cb.Residual(tl.Dense(2)))
    clone = model.clone()
    x = jnp.ones((1, 2))
    variables = nn.meta.unbox(model.init(KEY, x))
    np.testing.assert_allclose(clone.apply(variables, x), model.apply(variables, x))


if __name__ == '__main__':
  absltest.main()
