"""FNet: a Fourier block against a float64 numpy reference; no attention parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import terraflax.combinators as cb
import terraflax.models as tm
from terraflax.models.transformer import FourierEncoderBlock

KEY = jax.random.key(0)


def layer_norm(x, scale, bias):
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * scale + bias


class FNetTest(absltest.TestCase):

  def test_block_matches_numpy(self):
    x = jax.random.normal(KEY, (2, 6, 8))
    mask = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])
    block = cb.Serial(FourierEncoderBlock(d_model=8, d_ff=12, dropout=0.0, mode='eval'))
    variables = nn.meta.unbox(block.init(KEY, x, mask))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype),
                                    variables['params'])
    y, mask_out = block.apply({'params': params}, x, mask)
    self.assertIs(mask_out, mask)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    norm = p['Residual_0']['LayerNorm_0']
    h = layer_norm(x, norm['scale'], norm['bias']) * np.asarray(mask)[:, :, None]
    h = np.asarray(x, np.float64) + np.real(np.fft.fft2(h, axes=(1, 2)))
    ff = p['Residual_1']['FeedForward_0']
    hidden = np.maximum(layer_norm(h, ff['LayerNorm_0']['scale'], ff['LayerNorm_0']['bias'])
                        @ ff['Dense_1']['kernel'] + ff['Dense_1']['bias'], 0)
    expected = h + hidden @ ff['Dense_4']['kernel'] + ff['Dense_4']['bias']
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-3)

  def test_model_has_no_attention_parameters(self):
    x = jnp.asarray(np.random.default_rng(0).integers(1, 13, (2, 9)), jnp.int32)
    model = tm.FNet(vocab_size=13, n_classes=3, d_model=16, d_ff=24, n_layers=2, dropout=0.0,
                    max_len=16, mode='eval')
    shapes = nn.meta.unbox(jax.eval_shape(model.init, KEY, x)['params'])
    paths = ['/'.join(str(k.key) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    self.assertFalse([path for path in paths if 'Attention' in path])
    d, f, v = 16, 24, 13
    block = 2 * d + (2 * d + d * f + f + f * d + d)
    self.assertEqual(sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)),
                     v * d + 2 * block + 2 * d + (d * 3 + 3))
    logits = model.apply({'params': jax.tree_util.tree_map(
        lambda s: jnp.full(s.shape, 0.1, s.dtype), shapes)}, x)
    self.assertEqual((logits.shape, logits.dtype), ((2, 3), jnp.float32))


if __name__ == '__main__':
  absltest.main()
