"""The CPU compiler options: accepted by this jaxlib, and they do not change the numbers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from terraflax import compiler
from terraflax.train import trainer
from tests.train.tiny_models import TinyLM


class CompilerOptionsTest(absltest.TestCase):

  def test_cpu_gets_the_dot_only_ynn_fusion(self):
    self.assertEqual(compiler.options('cpu'), compiler.CPU_OPTIONS)
    self.assertEqual(compiler.options('gpu'), {})

  def test_decoding_options_keep_reductions_whole(self):
    self.assertEqual(compiler.options('cpu', decoding=True),
                     {**compiler.CPU_OPTIONS, **compiler.DECODING_CPU_OPTIONS})
    self.assertEqual(compiler.options('gpu', decoding=True), {})
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 4096)), jnp.float32)
    lowered = jax.jit(lambda x: jnp.sum(x, axis=-1)).lower(x)
    split = lowered.compile(compiler_options=compiler.options('cpu'))
    whole = lowered.compile(compiler_options=compiler.options('cpu', decoding=True))
    self.assertIn('reduce-window', split.as_text())  # The pass these options disable.
    self.assertNotIn('reduce-window', whole.as_text())
    want = np.sum(np.asarray(x, np.float64))
    np.testing.assert_allclose(whole(x), [want], rtol=1e-6)

  def test_an_unknown_option_is_dropped_not_fatal(self):
    good = dict(compiler.CPU_OPTIONS)
    compiler._accepted.cache_clear()  # pylint: disable=protected-access
    try:
      compiler.CPU_OPTIONS['xla_cpu_experimental_ynn_fusion_type'] = 'NOT_A_FUSION_TYPE'
      self.assertEqual(compiler.options('cpu'), {})
    finally:
      compiler.CPU_OPTIONS.clear()
      compiler.CPU_OPTIONS.update(good)
      compiler._accepted.cache_clear()  # pylint: disable=protected-access

  def test_train_step_with_options_matches_default_compilation(self):
    model = TinyLM(vocab_size=11, d_model=16, d_ff=32, n_layers=2)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 11)
    batch = {'inputs': tokens, 'targets': tokens, 'weights': jnp.ones((2, 12), jnp.float32)}
    tx = optax.adam(1e-2)
    params = nn.meta.unbox(model.init(jax.random.key(1), tokens)['params'])
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params),
                               rng=jax.random.key_data(jax.random.key(2)))
    step = trainer.make_train_step(model, tx)
    with_options = jax.jit(step, compiler_options=compiler.options())(state, batch)
    default = jax.jit(step)(state, batch)
    jax.tree_util.tree_map(
        lambda a, b: chex.assert_trees_all_close(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                 atol=1e-6), with_options, default)

  def test_lazy_jit_compiles_at_first_call_with_static_args(self):
    calls = []

    def power(x, *, n):
      calls.append(n)  # Runs once per trace.
      return x ** n

    jitted = compiler.jit(power, static_argnames=('n',))
    self.assertEqual(calls, [])
    x = jnp.arange(4.0)
    chex.assert_trees_all_close(jitted(x, n=3), x ** 3)
    chex.assert_trees_all_close(jitted(x + 1, n=3), (x + 1) ** 3)
    self.assertEqual(calls, [3])  # Traced once: the jitted function is kept.


if __name__ == '__main__':
  absltest.main()
