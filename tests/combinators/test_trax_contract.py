"""Trax's combinator tests as a contract: the same cases, run on terraflax.

The cases are those of Trax 1.4.1's `trax/layers/combinators_test.py` that use
parameter-free layers (inputs -> expected outputs, n_in / n_out), rewritten for
terraflax's calling convention: Trax calls `layer(xs)` with a tuple, terraflax
`layer.apply(variables, *xs)`. Each test names the Trax case it ports
(`SerialTest.test_dup_dup`): 39 of the file's 68 cases, which all pass in a
Trax 1.4.1 venv (`python trax/layers/combinators_test.py`). Not ported (29):
Scan, Cond, SerialWithSideOutputs, BatchLeadingAxes and Bidirectional (no
terraflax counterpart), the cases about Trax's weight/state tuples, and those
comparing Trax's printed layer names (`Branch_in2_out2[...]`).

Where terraflax deliberately differs, the test asserts the difference, with
Trax's behaviour in a comment (read off Trax 1.4.1): see `DifferencesTest`.
The n_in / n_out and values of the extra nesting and Residual cases
(`NestingTest`) were also read off Trax 1.4.1.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import label_of

KEY = jax.random.key(0)


def run(layer, *xs):
  """Trax's `layer(xs)`: init + apply on the stack `xs` (top first)."""
  variables = nn.meta.unbox(layer.init(KEY, *xs))
  return layer.apply(variables, *xs)


def as_list(outputs):
  """Outputs as nested Python lists (one array, or a tuple of them)."""
  if isinstance(outputs, (list, tuple)):
    return [as_list(y) for y in outputs]
  return np.asarray(outputs).tolist()


def arr(*values):
  return jnp.array(values)


# The toy layers of Trax's test file, as terraflax Fn layers.
def DivideBy(val):  # 1 -> 1
  return cb.Fn('DivideBy', lambda x: x / val)


def ReturnConst(val):  # 0 -> 1
  return cb.Fn('ReturnConst', lambda: val)


class SerialTest(parameterized.TestCase):

  def test_one_in_one_out(self):  # SerialTest.test_one_in_one_out
    layer = cb.Serial(DivideBy(3))
    self.assertEqual((layer.n_in, layer.n_out), (1, 1))
    self.assertEqual(as_list(run(layer, arr(3, 6, 9, 12))), [1, 2, 3, 4])

  def test_zero_in_one_out(self):  # SerialTest.test_zero_in_one_out
    layer = cb.Serial(ReturnConst(arr(3, 4, 5, 6)))
    self.assertEqual((layer.n_in, layer.n_out), (0, 1))
    self.assertEqual(as_list(run(layer)), [3, 4, 5, 6])

  def test_one_in_two_out(self):  # SerialTest.test_one_in_two_out
    layer = cb.Serial(DivideBy(3), ReturnConst(arr(3, 4, 5, 6)))
    self.assertEqual((layer.n_in, layer.n_out), (1, 2))
    self.assertEqual(as_list(run(layer, arr(3, 6, 9, 12))), [[3, 4, 5, 6], [1, 2, 3, 4]])

  def test_const_div(self):  # SerialTest.test_const_div
    layer = cb.Serial(ReturnConst(arr(3, 6, 9, 12)), DivideBy(3))
    self.assertEqual((layer.n_in, layer.n_out), (0, 1))
    self.assertEqual(as_list(run(layer)), [1, 2, 3, 4])

  def test_div_div(self):  # SerialTest.test_div_div
    layer = cb.Serial(DivideBy(2.0), DivideBy(5.0))
    self.assertEqual(as_list(run(layer, arr(10, 20, 30))), [1, 2, 3])

  def test_dup_dup(self):  # SerialTest.test_dup_dup
    layer = cb.Serial(cb.Dup(), cb.Dup())
    self.assertEqual((layer.n_in, layer.n_out), (1, 3))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3))), [[1, 2, 3]] * 3)

  def test_default_name(self):  # SerialTest.test_default_name
    layer = cb.Serial(cb.Dup(), cb.Dup())
    self.assertEqual(label_of(layer), 'Serial')
    self.assertIn('Serial', repr(layer))

  def test_custom_name(self):  # SerialTest.test_custom_name: Trax's name= is label=
    layer = cb.Serial(cb.Dup(), cb.Dup(), label='Branch')
    self.assertEqual(label_of(layer), 'Branch')
    self.assertIn("'Branch'", repr(layer))
    # The label also names the layer's parameters inside a parent: Branch_0/...
    model = cb.Serial(cb.Serial(tl.Dense(2), label='Encoder'))
    params = nn.meta.unbox(model.init(KEY, jnp.ones((1, 3))))['params']
    self.assertEqual(list(params), ['Encoder_0'])

  def test_shared_weights(self):  # SerialTest.test_shared_weights{,_nested,_double_nested}
    for make in (lambda d: cb.Serial(d, d),
                 lambda d: cb.Serial(d, cb.Serial(d)),
                 lambda d: cb.Serial(cb.Serial(d), cb.Serial(d))):
      dense = tl.Dense(5)
      model = make(dense)
      x = jnp.ones((1, 5))
      params = nn.meta.unbox(model.init(KEY, x))['params']
      # Trax stores a GET_WEIGHTS_FROM_CACHE marker for the second use; Linen stores the
      # parameters once, under the first use's path.
      self.assertLen(jax.tree_util.tree_leaves(params), 2)

  def test_shared_weights_for_shared_serial(self):
    # SerialTest.test_shared_weights_for_shared_serial
    block = cb.Serial(tl.Dense(5), tl.Dense(5))
    model = cb.Serial(block, block)
    x = jnp.arange(5.0)[None]
    params = nn.meta.unbox(model.init(KEY, x))['params']
    self.assertLen(jax.tree_util.tree_leaves(params), 4)
    self.assertEqual(model.apply({'params': params}, x).shape, (1, 5))


class ParallelTest(absltest.TestCase):

  def test_dup_dup(self):  # ParallelTest.test_dup_dup
    layer = cb.Parallel(cb.Dup(), cb.Dup())
    self.assertEqual((layer.n_in, layer.n_out), (2, 4))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3), arr(10, 20))),
                     [[1, 2, 3], [1, 2, 3], [10, 20], [10, 20]])

  def test_div_div(self):  # ParallelTest.test_div_div
    layer = cb.Parallel(DivideBy(0.5), DivideBy(3.0))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3), arr(30, 60))), [[2, 4, 6], [10, 20]])

  def test_two_no_ops(self):  # ParallelTest.test_two_no_ops
    layer = cb.Parallel([], None)
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3), arr(10, 20))), [[1, 2, 3], [10, 20]])

  def test_default_and_custom_name(self):  # ParallelTest.test_{default,custom}_name
    self.assertEqual(label_of(cb.Parallel(cb.Dup(), cb.Dup())), 'Parallel')
    self.assertEqual(label_of(cb.Parallel(cb.Dup(), cb.Dup(), label='DupDup')), 'DupDup')

  def test_shared_weights(self):  # ParallelTest.test_shared_weights{,_nested}
    x = jnp.ones((1, 5))
    for make, n_dense in ((lambda d: cb.Parallel(d, d), 1),
                          (lambda d: cb.Parallel([d, tl.Dense(2)], [d, tl.Dense(2)]), 3)):
      model = make(tl.Dense(5))
      params = nn.meta.unbox(model.init(KEY, x, x))['params']
      self.assertLen(jax.tree_util.tree_leaves(params), 2 * n_dense)  # kernel + bias each

  def test_shared_weights_for_shared_parallel(self):
    # ParallelTest.test_shared_weights_for_shared_parallel
    block = cb.Parallel(tl.Dense(5), tl.Dense(7))
    model = cb.Parallel(block, block)
    xs = [arr(1., 2, 3), arr(10., 20, 30), arr(100., 200, 300), arr(1000., 2000, 3000)]
    xs = [x[None] for x in xs]
    variables = nn.meta.unbox(model.init(KEY, *xs))
    self.assertLen(jax.tree_util.tree_leaves(variables), 4)
    shapes = [y.shape for y in model.apply(variables, *xs)]
    self.assertEqual(shapes, [(1, 5), (1, 7), (1, 5), (1, 7)])


class ConcatenateTest(parameterized.TestCase):

  XS = ([[1, 2, 3], [4, 5, 6]], [[10, 20, 30], [40, 50, 60]], [[100, 200, 300], [400, 500, 600]])

  def test_n_in_n_out(self):  # ConcatenateTest.test_n_in_n_out
    layer = cb.Concatenate()
    self.assertEqual((layer.n_in, layer.n_out), (2, 1))

  @parameterized.named_parameters(  # ConcatenateTest.test_{with_defaults,axis_0,axis_1}
      ('with_defaults', {}, [[1, 2, 3, 10, 20, 30], [4, 5, 6, 40, 50, 60]]),
      ('axis_0', {'axis': 0}, [[1, 2, 3], [4, 5, 6], [10, 20, 30], [40, 50, 60]]),
      ('axis_1', {'axis': 1}, [[1, 2, 3, 10, 20, 30], [4, 5, 6, 40, 50, 60]]),
  )
  def test_axis(self, kwargs, expected):
    layer = cb.Concatenate(**kwargs)
    self.assertEqual(as_list(run(layer, *map(jnp.array, self.XS[:2]))), expected)

  def test_n_items_is_not_default(self):  # ConcatenateTest.test_n_items_is_not_default
    layer = cb.Concatenate(n_items=3)
    self.assertEqual((layer.n_in, layer.n_out), (3, 1))
    y = run(layer, *map(jnp.array, self.XS))
    self.assertEqual(y.shape, (2, 9))
    self.assertEqual(as_list(y), [[1, 2, 3, 10, 20, 30, 100, 200, 300],
                                  [4, 5, 6, 40, 50, 60, 400, 500, 600]])


class BranchTest(absltest.TestCase):

  def test_noop_dup(self):  # BranchTest.test_noop_dup
    layer = cb.Branch([], cb.Dup())
    self.assertEqual((layer.n_in, layer.n_out), (1, 3))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3))), [[1, 2, 3]] * 3)

  def test_add_div(self):  # BranchTest.test_add_div
    layer = cb.Branch(cb.Add(), DivideBy(0.5))
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3), arr(10, 20, 30))), [[11, 22, 33], [2, 4, 6]])

  def test_one_sublayer(self):  # BranchTest.test_one_sublayer
    layer = cb.Branch(DivideBy(0.5))
    self.assertEqual((layer.n_in, layer.n_out), (1, 1))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3))), [2, 4, 6])

  def test_default_name(self):  # BranchTest.test_default_name
    self.assertEqual(label_of(cb.Branch(cb.Add(), DivideBy(0.5))), 'Branch')


class SelectDropSwapTest(parameterized.TestCase):

  @parameterized.parameters(  # SelectTest.test_computes_n_in
      ([0, 0], 1), ([1, 0], 2), ([2], 3))
  def test_computes_n_in(self, indices, n_in):
    self.assertEqual(cb.Select(indices).n_in, n_in)

  @parameterized.parameters(2, 3)  # SelectTest.test_given_n_in
  def test_given_n_in(self, n_in):
    self.assertEqual(cb.Select([0], n_in=n_in).n_in, n_in)

  @parameterized.parameters(  # SelectTest.test_{first,second}_of_3
      (0, [1, 2, 3]), (1, [10, 20]))
  def test_one_of_3(self, index, expected):
    layer = cb.Select([index], n_in=3)
    self.assertEqual((layer.n_in, layer.n_out), (3, 1))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3), arr(10, 20), arr(100))), expected)

  def test_drop(self):  # DropTest.test_drop
    layer = cb.Drop()
    self.assertEqual((layer.n_in, layer.n_out), (1, 0))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3))), [])

  def test_swap(self):  # SwapTest.test_swap
    layer = cb.Swap()
    self.assertEqual((layer.n_in, layer.n_out), (2, 2))
    self.assertEqual(as_list(run(layer, arr(1, 2, 3), arr(10, 20, 30))), [[10, 20, 30], [1, 2, 3]])


class ChunkTest(absltest.TestCase):
  """ChunkTest: Trax chunks the batch axis, terraflax's `Chunk` the length axis (axis=1).

  The cases run a parameter-free layer on axis 0, as Trax does; chunked == whole.
  """

  X = jnp.array([[1., 2, 3], [4, 5, 6]])

  def test_chunk(self):  # ChunkTest.test_chunk
    whole = run(DivideBy(4.0), self.X)
    np.testing.assert_allclose(run(cb.Chunk(DivideBy(4.0), chunk_len=1, axis=0), self.X), whole)

  def test_chunk_uneven_numbers(self):  # ChunkTest.test_chunk_uneven_numbers
    # Trax runs a batch that the chunk does not divide whole (or raises with
    # pass_unchunkable=False); terraflax pads it to whole chunks and cuts the padding off.
    x = jnp.arange(15.0).reshape(5, 3)
    np.testing.assert_allclose(
        run(cb.Chunk(DivideBy(4.0), chunk_len=3, axis=0), x), np.arange(15.0).reshape(5, 3) / 4)
    np.testing.assert_allclose(run(cb.Chunk(DivideBy(4.0), chunk_len=3, axis=0), self.X),
                               np.asarray(self.X) / 4)


class NestingTest(parameterized.TestCase):
  """Stack semantics of nested and Residual combinators; values read off Trax 1.4.1."""

  A = (1.0, 2.0, 3.0)
  B = (10.0, 20.0, 30.0)

  @parameterized.named_parameters(
      # (make, inputs, n_in, n_out, expected outputs)
      ('serial_add_add', lambda: cb.Serial(cb.Add(), cb.Add()), 'a b 100a', 3, 1,
       [[111, 222, 333]]),
      ('serial_drop_add', lambda: cb.Serial(cb.Drop(), cb.Add()), 'a b 100a', 3, 1,
       [[110, 220, 330]]),
      ('branch_swap_dup', lambda: cb.Serial(cb.Branch(cb.Swap(), cb.Dup())), 'a b', 2, 4,
       [[10, 20, 30], [1, 2, 3], [1, 2, 3], [1, 2, 3]]),
      ('branch_parallel_select', lambda: cb.Serial(
          cb.Branch(DivideBy(2.0), cb.Serial(cb.Dup(), cb.Add())),  # [a/2, 2a]
          cb.Parallel(cb.Dup(), None),  # [a/2, a/2, 2a]
          cb.Select([2, 0, 1])), 'a', 1, 3,  # [2a, a/2, a/2]
       [[2, 4, 6], [0.5, 1, 1.5], [0.5, 1, 1.5]]),
      ('residual_div', lambda: cb.Residual(DivideBy(0.5)), 'a', 1, 1, [[3, 6, 9]]),
      ('residual_dup', lambda: cb.Residual(cb.Dup()), 'a', 1, 2, [[2, 4, 6], [1, 2, 3]]),
      ('residual_add', lambda: cb.Residual(cb.Add()), 'a b', 2, 1, [[12, 24, 36]]),
      ('residual_shortcut', lambda: cb.Residual(DivideBy(0.5), shortcut=DivideBy(2.0)), 'a', 1, 1,
       [[2.5, 5, 7.5]]),
      ('residual_add_shortcut_add', lambda: cb.Residual(cb.Add(), shortcut=cb.Add()), 'a b', 2, 1,
       [[22, 44, 66]]),
      ('residual_two_out', lambda: cb.Residual(
          cb.Fn('F', lambda x: (2 * x, 3 * x), n_out=2)), 'a', 1, 2, [[3, 6, 9], [3, 6, 9]]),
  )
  def test_case(self, make, inputs, n_in, n_out, expected):
    a, b = jnp.array(self.A), jnp.array(self.B)
    stack = {'a': a, 'b': b, '100a': 100 * a}
    layer = make()
    self.assertEqual((layer.n_in, layer.n_out), (n_in, n_out))
    out = run(layer, *[stack[name] for name in inputs.split()])
    self.assertEqual(as_list(out), expected[0] if n_out == 1 else expected)


class DifferencesTest(absltest.TestCase):
  """Where terraflax deliberately differs from Trax 1.4.1; Trax's behaviour in comments."""

  a = jnp.array([1.0, 2.0, 3.0])
  b = jnp.array([10.0, 20.0, 30.0])

  def test_empty_serial_is_zero_to_zero(self):
    # Trax: tl.Serial() is 1 -> 1 and returns whatever it is given
    # (SerialTest.test_none_is_no_op, test_empty_list_is_no_op: Serial(None) and Serial([])
    # on [a, b] give [a, b]). terraflax: an empty Serial takes and gives nothing.
    for layer in (cb.Serial(), cb.Serial(None), cb.Serial([])):
      self.assertEqual((layer.n_in, layer.n_out), (0, 0))
      self.assertEqual(run(layer), ())
      with self.assertRaisesRegex(cb.LayerError, r'takes n_in=0 inputs but was called with 2'):
        run(layer, self.a, self.b)

  def test_extra_inputs_raise(self):
    # Trax: a Serial or Branch (or a 1-input Fn) called with more inputs than n_in returns the
    # extra ones untouched (Serial(Dup()) on [a, b] gives [a, a, b]); Parallel(Relu(), Relu())
    # on [a, b, c] drops c. terraflax: exactly n_in inputs.
    cases = [(cb.Serial(cb.Dup()), 2, 1), (tl.Relu(), 2, 1),
             (cb.Branch(tl.Relu(), tl.Relu()), 2, 1), (cb.Parallel(tl.Relu(), tl.Relu()), 3, 2)]
    for layer, given, n_in in cases:
      with self.assertRaisesRegex(
          cb.LayerError, rf'takes n_in={n_in} inputs but was called with {given}'):
        run(layer, *[self.a] * given)

  def test_negative_select_indices_raise(self):
    # Trax: Select([-1], n_in=2) on [a, b] gives b (Python indexing), and Select([-1]) has
    # n_in=0. terraflax: indices count from the top of the stack, >= 0.
    with self.assertRaisesRegex(cb.LayerError, r'Select indices must be >= 0, got \(-1,\)'):
      cb.Select([-1], n_in=2)
    self.assertEqual(as_list(run(cb.Select([1], n_in=2), self.a, self.b)), [10, 20, 30])

  def test_select_index_beyond_n_in_raises(self):
    # Trax: Select([2], n_in=1) builds (n_in=1) and fails only when run.
    with self.assertRaisesRegex(cb.LayerError, r'need n_in > 2, got n_in=1'):
      cb.Select([2], n_in=1)

  def test_add_and_multiply_do_not_broadcast(self):
    # Trax: Add()/Multiply() on shapes (2, 3) and (3,) broadcast to (2, 3).
    ones = jnp.ones((2, 3))
    for layer, what in ((cb.Add(), 'Add'), (cb.Multiply(), 'Multiply')):
      with self.assertRaisesRegex(
          ValueError, rf'{what} needs two arrays of the same shape, got \(2, 3\) and \(3,\)'):
        run(layer, ones, self.a)
    # The explicit broadcast is a one-line Fn.
    layer = cb.Fn('AddBroadcast', lambda x, y: x + y[None])
    self.assertEqual(as_list(run(layer, ones, self.a)), [[2, 3, 4], [2, 3, 4]])

  def test_empty_branch_and_parallel_are_zero_to_zero(self):
    # Trax: Branch() and Parallel() raise ('must be a list with at least two elements').
    for layer in (cb.Branch(), cb.Parallel()):
      self.assertEqual((layer.n_in, layer.n_out), (0, 0))

  def test_branch_of_one_layer_is_a_branch(self):
    # Trax: Branch(F) returns F itself. terraflax keeps the Branch (same n_in, n_out, outputs).
    layer = cb.Branch(cb.Dup())
    self.assertIsInstance(layer, cb.Branch)
    self.assertEqual((layer.n_in, layer.n_out), (1, 2))

  def test_residual_is_checked_at_construction(self):
    # Trax: Residual(Drop()) builds and fails when run; Residual(Relu(), shortcut=Dup()) on a
    # gives [a + a, relu(a)] (the shortcut's second output is added, Relu's left on top).
    with self.assertRaisesRegex(cb.LayerError, r'Residual needs layers with n_out >= 1'):
      cb.Residual(cb.Drop())
    with self.assertRaisesRegex(cb.LayerError, r'shortcut with n_out=1, got Dup with n_out=2'):
      cb.Residual(tl.Relu(), shortcut=cb.Dup())

  def test_fn_output_count_is_checked(self):
    # Trax: Fn('X', lambda x: (x, x)) (n_out=1) returns the tuple, and an n_out=2 Fn that
    # returns one array returns it, both silently. terraflax raises naming the layer.
    with self.assertRaisesRegex(cb.LayerError, r'X\) declares n_out=1 but returned a tuple of 2'):
      run(cb.Fn('X', lambda x: (x, x)), self.a)
    with self.assertRaisesRegex(cb.LayerError, r'Y\) declares n_out=2 but returned one array'):
      run(cb.Fn('Y', lambda x: x, n_out=2), self.a)

  def test_fn_arity(self):
    # Trax: Fn refuses f with default arguments or *args. terraflax counts the positional
    # arguments without defaults, and takes *args with an explicit n_in.
    self.assertEqual(cb.Fn('X', lambda x, scale=2.0: x * scale).n_in, 1)
    with self.assertRaisesRegex(cb.LayerError, r"Fn 'X': f takes \*args/\*\*kwargs; pass n_in="):
      cb.Fn('X', lambda *xs: xs[0])
    self.assertEqual(cb.Fn('X', lambda *xs: sum(xs), n_in=3).n_in, 3)

  def test_underflow_raises_naming_counts(self):
    # Both raise; terraflax names the layer and the counts.
    with self.assertRaisesRegex(cb.LayerError, r'Serial \(Serial\) takes n_in=2 inputs but was '
                                r'called with 1'):
      run(cb.Serial(cb.Add()), self.a)


if __name__ == '__main__':
  absltest.main()
