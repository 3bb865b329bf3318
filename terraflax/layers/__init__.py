"""Leaf layers.

Axis letters, used in docstrings and einsum strings throughout:
b batch, l length, d model width, f feed-forward width, v vocabulary,
h heads, k per-head width, n hash rounds, c chunk.
"""

from terraflax.layers.attention import Attention as Attention
from terraflax.layers.attention import CacheOutputs as CacheOutputs
from terraflax.layers.attention import CausalAttention as CausalAttention
from terraflax.layers.attention import EncDecAttention as EncDecAttention
from terraflax.layers.attention_core import AttentionOutput as AttentionOutput
from terraflax.layers.attention_core import causal_mask as causal_mask
from terraflax.layers.attention_core import dot_product_attention as dot_product_attention
from terraflax.layers.attention_core import padding_mask as padding_mask
from terraflax.layers.concat import ConcatCausalAttention as ConcatCausalAttention
from terraflax.layers.concat import ConcatDecoder as ConcatDecoder
from terraflax.layers.concat import ConcatSparseQKVAttention as ConcatSparseQKVAttention
from terraflax.layers.concat import ConcatWithPadding as ConcatWithPadding
from terraflax.layers.concat import (
    StripFromConcatenateWithPadding as StripFromConcatenateWithPadding)
from terraflax.layers.core import Dense as Dense
from terraflax.layers.distillation import DistillationLoss as DistillationLoss
from terraflax.layers.distillation import distillation_sum as distillation_sum
from terraflax.layers.core import Dropout as Dropout
from terraflax.layers.core import Embedding as Embedding
from terraflax.layers.core import FastGelu as FastGelu
from terraflax.layers.core import Gelu as Gelu
from terraflax.layers.core import LayerNorm as LayerNorm
from terraflax.layers.core import LogSoftmax as LogSoftmax
from terraflax.layers.core import Relu as Relu
from terraflax.layers.core import RMSNorm as RMSNorm
from terraflax.layers.core import ShiftRight as ShiftRight
from terraflax.layers.core import Sigmoid as Sigmoid
from terraflax.layers.core import Softmax as Softmax
from terraflax.layers.core import Tanh as Tanh
from terraflax.layers.feedforward import FeedForward as FeedForward
from terraflax.layers.fourier import FourierMixing as FourierMixing
from terraflax.layers.fourier import MaskedFourierMixing as MaskedFourierMixing
from terraflax.layers.local_attention import LocalSelfAttention as LocalSelfAttention
from terraflax.layers.lsh_attention import LSHSelfAttention as LSHSelfAttention
from terraflax.layers.metrics import Accuracy as Accuracy
from terraflax.layers.metrics import CrossEntropyLoss as CrossEntropyLoss
from terraflax.layers.metrics import accuracy_sum as accuracy_sum
from terraflax.layers.metrics import chunked_lm_sums as chunked_lm_sums
from terraflax.layers.metrics import cross_entropy_sum as cross_entropy_sum
from terraflax.layers.patches import ClassToken as ClassToken
from terraflax.layers.patches import PatchEmbedding as PatchEmbedding
from terraflax.layers.positional import AxialPositionalEncoding as AxialPositionalEncoding
from terraflax.layers.positional import (
    FixedBasePositionalEncoding as FixedBasePositionalEncoding)
from terraflax.layers.positional import PositionalEncoding as PositionalEncoding
from terraflax.layers.prefix import PrefixAttention as PrefixAttention
from terraflax.layers.prefix import PrefixCausalAttention as PrefixCausalAttention
from terraflax.layers.sparse_ff import SparseFF as SparseFF
from terraflax.layers.sparse_qkv import ModularCausalConv as ModularCausalConv
from terraflax.layers.sparse_qkv import (
    MultiplicativeConvCausalAttention as MultiplicativeConvCausalAttention)
from terraflax.layers.sparse_qkv import MultiplicativeDense as MultiplicativeDense
