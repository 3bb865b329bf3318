"""Vision Transformer input layers: image patches to tokens, and a class token.

  PatchEmbedding  [images] -> [patch vectors]: (b, H, W, C) -> (b, n, d)     1 -> 1
  ClassToken      [x] -> [cls; x]: (b, n, d) -> (b, 1 + n, d)                1 -> 1

n = (H / p) * (W / p) patches of p x p pixels, in row-major order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from terraflax.combinators.base import Layer
from terraflax.layers.core import Dense, param_with_axes


def to_patches(images, patch_size: int):
  """(b, H, W, C) -> (b, (H/p) * (W/p), p * p * C): non-overlapping p x p patches, row-major."""
  if images.ndim != 4:
    raise ValueError(f'Patches need images of shape (b, H, W, C), got {tuple(images.shape)}.')
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'patch_size={p} must divide the image height and width, got images '
                     f'{tuple(images.shape)}.')
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # b, rows, cols, p, p, c
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class PatchEmbedding(Layer):
  """[images] -> [patch vectors]: (b, H, W, C) -> (b, (H/p) * (W/p), d_model); 1 -> 1.

  Cuts each image into non-overlapping `patch_size` x `patch_size` patches
  (row-major) and projects each flattened patch with one `Dense(d_model)`
  (parameter path `PatchEmbedding_<i>/projection`): a strided convolution.
  """

  patch_size: int = 4
  d_model: int = 64
  dtype: Any = None

  def __post_init__(self):
    for field in ('patch_size', 'd_model'):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'PatchEmbedding {field} must be a positive int, got {value!r}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, images):
    patches = to_patches(images, self.patch_size)
    return Dense(self.d_model, dtype=self.dtype, axes=(None, 'embed'), name='projection')(patches)


class ClassToken(Layer):
  """[x] -> [concatenate(cls, x)]: (b, n, d) -> (b, 1 + n, d); n_in = n_out = 1.

  Prepends one trained vector `cls` (d,) to every sequence; a classifier reads
  the encoder's output at position 0.
  """

  @nn.compact
  def __call__(self, x):
    if x.ndim != 3:
      raise ValueError(f'ClassToken needs x of shape (b, n, d), got {tuple(x.shape)}.')
    cls = param_with_axes(self, 'cls', ('embed',), nn.initializers.zeros, (x.shape[-1],))
    cls = jnp.broadcast_to(cls.astype(x.dtype)[None, None, :], (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1)
