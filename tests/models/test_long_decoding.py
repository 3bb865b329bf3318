"""LSH decoding with a memory far longer than the text: the same logits as the eval pass."""

import flax.linen as nn
import jax
import numpy as np
from absl.testing import absltest

import terraflax.models as tm
from terraflax.models.attention import LSH
from tests import contracts

LONG_MEMORY = 2 ** 18  # 262,144 remembered positions, as the long-document benchmark decodes.


class LongMemoryDecodingTest(absltest.TestCase):

  def test_decoding_with_a_262k_memory_equals_eval(self):
    # One bucket and one chunk of the whole text: LSH attends to every earlier position in
    # eval, as the predict-mode memory does (its unused slots must stay invisible).
    def make(mode, mem_len):
      return tm.ReformerLM(vocab_size=13, d_model=16, d_ff=16, n_layers=1, n_heads=2, max_len=8,
                           dropout=0.0, mode=mode, positions='learned',
                           attention=LSH(n_buckets=1, chunk_len=8, n_chunks_before=0,
                                         predict_mem_len=mem_len))

    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(1, 13, (1, 8)), jax.numpy.int32)
    eval_model = make('eval', None)
    params = nn.meta.unbox(jax.jit(eval_model.init)(
        {'params': jax.random.key(0), 'hash': jax.random.key(1)}, tokens)['params'])
    long_model = make('predict', LONG_MEMORY)
    cache = jax.eval_shape(long_model.init, {'params': jax.random.key(0)}, tokens[:, :1])['cache']
    slots = {leaf.shape[-1] for leaf in jax.tree_util.tree_leaves(cache) if leaf.ndim >= 1}
    self.assertIn(LONG_MEMORY, slots)  # The memory really is that long.
    decoded = contracts.assert_lm_decoding_equals_eval(
        eval_model, long_model, params, tokens, rngs={'hash': jax.random.key(2)})
    # And equals decoding with a memory that just holds the text.
    short = contracts.predict_one_at_a_time(make('predict', 8), params,
                                            jax.numpy.pad(tokens, ((0, 0), (1, 0)))[:, :-1])
    np.testing.assert_allclose(decoded, short, rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
  absltest.main()
