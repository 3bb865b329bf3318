"""BertMLM: per-token logits, the encoder body's parameter paths, padding."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import terraflax.models as tm
from terraflax.models.attention import LSH, Full
from tests import contracts

KEY = jax.random.key(0)
CONFIG = dict(vocab_size=13, d_model=16, d_ff=24, n_layers=2, n_heads=2, dropout=0.0, max_len=16)


def shapes(model, x):
  return jax.tree_util.tree_map(lambda s: (s.shape, s.dtype),
                                jax.eval_shape(model.init, KEY, x)['params'])


class BertMLMTest(absltest.TestCase):

  def test_body_paths_equal_the_classifiers(self):
    x = jnp.ones((2, 6), jnp.int32)
    for options in ({}, {'share_layers': True, 'd_embedding': 8}):
      mlm = shapes(tm.BertMLM(**CONFIG, **options), x)
      classifier = shapes(tm.TransformerEncoder(n_classes=3, **CONFIG, **options), x)
      at = 6 if not options else 7  # The factorised embedding adds a projection layer.
      body = lambda tree, head: {k: v for k, v in tree.items() if k != f'{head}_{at}'}
      self.assertEqual(body(mlm, 'MLMHead'), body(classifier, 'Dense'))
      self.assertIn(f'MLMHead_{at}', mlm)
      self.assertIn(f'Dense_{at}', classifier)

  def test_per_token_logits_ignore_padding(self):
    x = jnp.asarray(np.random.default_rng(0).integers(1, 13, (2, 6)), jnp.int32).at[1, 4:].set(0)
    model = tm.BertMLM(mode='eval', **CONFIG)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                                    jax.eval_shape(model.init, KEY, x)['params'])
    logits = model.apply({'params': params}, x)
    self.assertEqual((logits.shape, logits.dtype), ((2, 6, 13), jnp.float32))
    longer = model.apply({'params': params}, jnp.pad(x, ((0, 0), (0, 3))))
    np.testing.assert_allclose(longer[1, :4], logits[1, :4], rtol=1e-5, atol=1e-5)
    # Bidirectional: changing the last token changes the first position's logits.
    self.assertFalse(np.allclose(model.apply({'params': params}, x.at[0, 5].set(3))[0, 0],
                                 logits[0, 0]))


class PackedBertMLMTest(parameterized.TestCase):
  """BertMLM on a packed row == each document alone (bidirectional, within documents)."""

  @parameterized.parameters(dict(attention=Full()), dict(attention=Full(query_chunk_len=4)),
                            dict(attention=LSH(n_buckets=1, chunk_len=16, n_chunks_before=0)))
  def test_packed_equals_unpacked(self, attention):
    rng = np.random.default_rng(7)
    docs = [jnp.asarray(rng.integers(1, 11, size=(n,)), jnp.int32) for n in (5, 7, 3)]
    rngs = {'dropout': jax.random.key(3), 'hash': jax.random.key(4)}
    seen = []  # A mode whose programs repeat a checked mode's exactly is not compiled again.
    for mode in ('train', 'eval'):
      make = lambda packed, mode=mode: tm.BertMLM(
          vocab_size=11, d_model=16, d_ff=16, n_layers=2, n_heads=2, dropout=0.0, max_len=16,
          attention=attention, mode=mode, packed=packed)
      alone, packed = make(False), make(True)
      packed_fn = lambda p, x, seg, pos, packed=packed: packed.apply({'params': p}, x, seg, pos,
                                                                     rngs=rngs)
      alone_fn = lambda p, x, alone=alone: alone.apply({'params': p}, x, rngs=rngs)
      init = lambda alone=alone: alone.init({'params': jax.random.key(0), **rngs},
                                            docs[0][None])['params']
      if contracts.repeats_a_checked_mode(seen, init, packed_fn, alone_fn, docs, 16):
        continue
      contracts.assert_packed_equals_unpacked(packed_fn, alone_fn, jax.jit(init)(), docs, 16,
                                              atol=5e-5)

  def test_fourier_mixing_cannot_pack(self):
    with self.assertRaisesRegex(ValueError, "packed=True needs mixing='attention'"):
      tm.BertMLM(vocab_size=11, d_model=16, d_ff=16, n_layers=1, n_heads=2, mixing='fourier',
                 packed=True)


if __name__ == '__main__':
  absltest.main()
