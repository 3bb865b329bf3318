"""FNet (Lee-Thorp et al. 2021): an encoder whose token mixing is a Fourier transform.

  FNet   [tokens] -> [logits]: int (b, l) -> float32 (b, n_classes)

Each block is pre-norm `MaskedFourierMixing` (the real part of the 2-D FFT
over length and width, no parameters) and a feed-forward block; the head is
`TransformerEncoder`'s (masked mean pooling, Dense). To mix attention and
Fourier layers, use `TransformerEncoder(mixing=('fourier', ..., 'attention'))`.
"""

from __future__ import annotations

from terraflax.models.transformer import TransformerEncoder


def FNet(*, vocab_size: int, n_classes: int = 10, d_model: int = 512,  # pylint: disable=invalid-name
         d_ff: int = 2048, n_layers: int = 6, dropout: float = 0.1, max_len: int = 2048,
         mode: str = 'train', dtype=None, ff_chunk_len: int | None = None,
         pad_id: int | None = 0, share_layers: bool = False, d_embedding: int | None = None):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, n_classes); 1 -> 1.

  `TransformerEncoder(mixing='fourier')`: the same embedding, blocks with
  Fourier mixing instead of attention, and classification head. Padding
  (`pad_id`) is zeroed before each transform and left out of the pooling.
  Arguments are `TransformerEncoder`'s; there are no attention heads.
  """
  return TransformerEncoder(vocab_size=vocab_size, n_classes=n_classes, d_model=d_model,
                            d_ff=d_ff, n_layers=n_layers, n_heads=1, dropout=dropout,
                            max_len=max_len, mode=mode, dtype=dtype, ff_chunk_len=ff_chunk_len,
                            pad_id=pad_id, share_layers=share_layers, d_embedding=d_embedding,
                            mixing='fourier')
