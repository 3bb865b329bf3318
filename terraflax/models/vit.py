"""Vision Transformer (Dosovitskiy et al. 2021): image patches as tokens, a class token.

  ViT   [pixels] -> [logits]: (b, H * W * C) or (b, H, W, C) -> float32 (b, n_classes)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import check_mode
from terraflax.models import attention as attn
from terraflax.models.common import (
    Float32, check_hyperparameters, compute_dtype, deprecated_arguments, mixing_kinds)
from terraflax.models.transformer import EncoderStack, upgrade_full_attention


def _as_images(image_shape, scale):
  """[pixels] -> [images]: (b, H*W*C) or (b, H, W, C), any number type -> float32 (b, H, W, C)."""
  image_shape = tuple(image_shape)

  def images(pixels):
    if pixels.shape[1:] not in (image_shape, (image_shape[0] * image_shape[1] * image_shape[2],)):
      raise ValueError(f'ViT expects pixels of shape (b, *{image_shape}) or (b, '
                       f'{image_shape[0] * image_shape[1] * image_shape[2]}) (image_shape), got '
                       f'{tuple(pixels.shape)}.')
    x = pixels.astype(jnp.float32) * jnp.float32(scale)
    return x.reshape((pixels.shape[0],) + image_shape)

  return cb.Fn('Images', images)


@deprecated_arguments(
    {'attention_chunk_len': 'attention=Full(query_chunk_len=...)'}, upgrade_full_attention('ViT'))
def ViT(*, image_shape: Sequence[int] = (8, 8, 1), patch_size: int = 2,  # pylint: disable=invalid-name
        n_classes: int = 10, d_model: int = 64, d_ff: int = 128, n_layers: int = 4,
        n_heads: int = 4, dropout: float = 0.0, pixel_scale: float = 1.0,
        mode: str = 'train', dtype=None, attention: Any = attn.Full(),
        ff_chunk_len: int | None = None, share_layers: bool = False, mixing='attention'):
  """[pixels] -> [logits]: (b, H*W*C) or (b, H, W, C) -> float32 (b, n_classes); 1 -> 1.

  Pixels (ints or floats, times `pixel_scale`) are reshaped to `image_shape`
  (H, W, C) images, cut into `patch_size` x `patch_size` patches that a Dense
  embeds (`PatchEmbedding`), preceded by a trained class token (`ClassToken`)
  and given learned positions. Pre-norm encoder blocks (bidirectional
  attention of the `attention` spec(s), cycled over the layers as in
  `TransformerEncoder`, or Fourier mixing via `mixing`; `share_layers` as in ALBERT) run
  over the 1 + (H/p)(W/p) tokens; the final LayerNorm's output at the class
  token feeds `Dense(n_classes)`. `'predict'` behaves as `'eval'`.
  """
  check_mode(mode, 'ViT mode')
  image_shape = tuple(image_shape)
  if (len(image_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in image_shape)):
    raise ValueError(f'ViT image_shape must be (H, W, C) positive ints, got {image_shape!r}.')
  if not isinstance(patch_size, int) or patch_size < 1 or image_shape[0] % patch_size or \
      image_shape[1] % patch_size:
    raise ValueError(f'ViT patch_size must be a positive int dividing H and W of image_shape='
                     f'{image_shape}, got {patch_size!r}.')
  n_tokens = 1 + (image_shape[0] // patch_size) * (image_shape[1] // patch_size)
  check_hyperparameters('ViT', mode, n_classes=n_classes, d_model=d_model, d_ff=d_ff,
                        n_layers=n_layers, n_heads=n_heads, dropout=dropout,
                        ff_chunk_len=ff_chunk_len)
  kinds = mixing_kinds('ViT', mixing, n_layers)
  specs = attn.specs_from(attention, where='ViT attention')
  dtype = compute_dtype(dtype)
  mode = 'eval' if mode == 'predict' else mode

  return cb.Serial(
      _as_images(image_shape, pixel_scale),
      tl.PatchEmbedding(patch_size=patch_size, d_model=d_model, dtype=dtype),
      tl.ClassToken(),  # stack: x (b, n_tokens, d)
      tl.PositionalEncoding(max_len=n_tokens, kind='learned', dropout=dropout, mode=mode),
      cb.Branch(None, cb.Fn('AllTokens', lambda x: jnp.ones(x.shape[:2], jnp.bool_))),
      EncoderStack(kinds, specs, d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout,
                   mode=mode, dtype=dtype, ff_chunk_len=ff_chunk_len,
                   share_layers=share_layers, model='ViT'),  # stack: x, mask
      cb.Select([0], n_in=2),
      tl.LayerNorm(),
      cb.Fn('ClassOutput', lambda x: x[:, 0]),  # stack: (b, d)
      tl.Dense(n_classes, dtype=dtype, axes=('embed', None)),
      Float32(),
  )
