"""ViT: patches against a numpy loop, class-token output, input forms, clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import terraflax.layers as tl
import terraflax.models as tm
from terraflax.layers.patches import to_patches

KEY = jax.random.key(0)


class PatchesTest(absltest.TestCase):

  def test_patches_match_a_numpy_loop(self):
    images = np.random.default_rng(0).normal(size=(2, 6, 4, 3))
    patches = np.asarray(to_patches(jnp.asarray(images), 2))
    self.assertEqual(patches.shape, (2, 6, 12))
    for b in range(2):
      for row in range(3):
        for col in range(2):
          expected = images[b, 2 * row:2 * row + 2, 2 * col:2 * col + 2, :].reshape(-1)
          np.testing.assert_allclose(patches[b, 2 * row + col], expected, rtol=1e-6)

  def test_embedding_and_class_token(self):
    images = jax.random.normal(KEY, (2, 4, 4, 1))
    embed = tl.PatchEmbedding(patch_size=2, d_model=5)
    variables = nn.meta.unbox(embed.init(KEY, images))
    kernel = np.asarray(variables['params']['projection']['kernel'])
    y = embed.apply(variables, images)
    np.testing.assert_allclose(y, np.asarray(to_patches(images, 2)) @ kernel, rtol=1e-5, atol=1e-6)
    token = tl.ClassToken()
    params = {'params': {'cls': jnp.arange(5.0)}}
    out = token.apply(params, y)
    self.assertEqual(out.shape, (2, 5, 5))
    np.testing.assert_array_equal(out[:, 0], np.broadcast_to(np.arange(5.0), (2, 5)))
    np.testing.assert_array_equal(out[:, 1:], y)
    with self.assertRaisesRegex(ValueError, 'patch_size=3 must divide'):
      to_patches(images, 3)


class ViTTest(absltest.TestCase):

  def test_flat_and_image_inputs_agree_and_class_token_is_read(self):
    model = tm.ViT(image_shape=(4, 4, 1), patch_size=2, n_classes=3, d_model=8, d_ff=16,
                   n_layers=2, n_heads=2, pixel_scale=0.5, mode='eval')
    pixels = jnp.asarray(np.random.default_rng(0).integers(0, 17, (2, 16)), jnp.int32)
    variables = nn.meta.unbox(model.init(KEY, pixels))
    self.assertEqual(variables['params']['ClassToken_2']['cls'].shape, (8,))
    self.assertEqual(variables['params']['PositionalEncoding_3']['pos_embedding'].shape, (5, 8))
    logits = model.apply(variables, pixels)
    self.assertEqual((logits.shape, logits.dtype), ((2, 3), jnp.float32))
    images = pixels.reshape(2, 4, 4, 1).astype(jnp.float32)
    np.testing.assert_allclose(model.apply(variables, images), logits, rtol=1e-6)

  def test_clear_errors(self):
    with self.assertRaisesRegex(ValueError, 'patch_size must be a positive int dividing'):
      tm.ViT(image_shape=(8, 8, 1), patch_size=3)
    with self.assertRaisesRegex(ValueError, 'image_shape must be'):
      tm.ViT(image_shape=(8, 8))
    model = tm.ViT(image_shape=(4, 4, 1), patch_size=2, d_model=8, d_ff=8, n_layers=1,
                   n_heads=2, mode='eval')
    with self.assertRaisesRegex(Exception, r'ViT expects pixels of shape'):
      nn.meta.unbox(model.init(KEY, jnp.zeros((2, 15))))


if __name__ == '__main__':
  absltest.main()
