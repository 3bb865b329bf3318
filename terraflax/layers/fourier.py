"""Fourier token mixing (FNet, Lee-Thorp et al. 2021): attention replaced by a 2-D FFT.

  FourierMixing         [x] -> [Re(FFT2(x))]                       1 -> 1
  MaskedFourierMixing   [x, mask] -> [Re(FFT2(x * mask)), mask]     2 -> 2

The discrete Fourier transform runs over the length and the width axes of
(b, l, d) activations and only the real part is kept:

  y[b, m, k] = sum_{n, j} x[b, n, j] * cos(2 pi (m n / l + k j / d))

There are no parameters; the cost is O(l d log(l d)) instead of attention's
O(l^2 d). The transform is computed in float32 (complex64) whatever the input
dtype and cast back to it. Every position mixes with every other one, so these
layers are for encoders (bidirectional), not for causal language models.
"""

from __future__ import annotations

import jax.numpy as jnp

from terraflax.combinators.base import Layer


def fourier_mix(x):
  """Re(FFT2(x)) over the last two axes (length, width), computed in float32."""
  if x.ndim != 3:
    raise ValueError(f'Fourier mixing needs x of shape (b, l, d), got {tuple(x.shape)}.')
  y = jnp.fft.fft2(x.astype(jnp.float32), axes=(1, 2))
  return jnp.real(y).astype(x.dtype)


class FourierMixing(Layer):
  """[x] -> [Re(FFT2(x))]: (b, l, d) -> (b, l, d); n_in = n_out = 1; no parameters.

  FNet's token mixing: the real part of the 2-D discrete Fourier transform
  over the length and the width axes.
  """

  def __call__(self, x):
    return fourier_mix(x)


class MaskedFourierMixing(Layer):
  """[x, mask] -> [Re(FFT2(x * mask)), mask]: (b, l, d), (b, l) -> same; n_in = n_out = 2.

  `FourierMixing` for an encoder block's stack: positions whose `mask` is
  False (padding) are zeroed before the transform, so padding tokens' values
  do not leak into real ones (the output still depends on the padded length l,
  the size of the transform). The mask passes through.
  """

  n_in = 2
  n_out = 2

  def __call__(self, x, mask):
    if mask.shape != x.shape[:2]:
      raise ValueError(f'MaskedFourierMixing needs mask of shape (b, l) = {tuple(x.shape[:2])} '
                       f'(True = real token), got {tuple(mask.shape)}.')
    return fourier_mix(jnp.where(mask[:, :, None], x, jnp.zeros((), x.dtype))), mask
