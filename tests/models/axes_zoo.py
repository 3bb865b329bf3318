"""Tiny instances of every model factory, for the logical-axis tests (tests/models/test_axes.py).

Each entry: name -> (factory name in `terraflax.models`, keyword arguments,
input kind). Sizes are tiny and every sharded width is even, so a
(fsdp=2, model=2) mesh divides them. Only the public factory API is used,
so the same table runs on any revision of the package (the fixture
`axes_baseline.json` was made from the code before parameters carried names).
"""

import jax
import jax.numpy as jnp
import numpy as np

from terraflax import models
from terraflax.models import attention as attn

SIZES = dict(d_model=16, d_ff=32, n_layers=2, n_heads=2, dropout=0.0)
VOCAB = 12
LENGTH = 8

ZOO = {
    'TransformerLM': ('TransformerLM', dict(vocab_size=VOCAB, max_len=16), 'lm'),
    'TransformerLM_local': ('TransformerLM', dict(
        vocab_size=VOCAB, max_len=16, attention=attn.Local(chunk_len=4)), 'lm'),
    'TransformerLM_lsh': ('TransformerLM', dict(
        vocab_size=VOCAB, max_len=16, attention=attn.LSH(chunk_len=4, n_hashes=2)), 'lm'),
    'TransformerLM_prefix': ('TransformerLM', dict(
        vocab_size=VOCAB, max_len=16, attention=attn.Full(n_prefix=2)), 'lm'),
    'TransformerLM_sparse_qkv': ('TransformerLM', dict(
        vocab_size=VOCAB, max_len=16, attention=attn.SparseQKV()), 'lm'),
    'TransformerLM_shared_factorised': ('TransformerLM', dict(
        vocab_size=VOCAB, max_len=16, share_layers=True, d_embedding=8), 'lm'),
    'Transformer': ('Transformer', dict(vocab_size=VOCAB, max_len=16), 'seq2seq'),
    'TransformerEncoder': ('TransformerEncoder', dict(
        vocab_size=VOCAB, n_classes=10, max_len=16, mixing=('attention', 'fourier')), 'lm'),
    'BertMLM': ('BertMLM', dict(vocab_size=VOCAB, max_len=16), 'lm'),
    'BertMLM_factorised': ('BertMLM', dict(vocab_size=VOCAB, max_len=16, d_embedding=8), 'lm'),
    'ViT': ('ViT', dict(image_shape=(8, 8, 1), patch_size=2, n_classes=10), 'image'),
    'FNet': ('FNet', dict(vocab_size=VOCAB, n_classes=10, max_len=16), 'lm'),
    'ReformerLM': ('ReformerLM', dict(
        vocab_size=VOCAB, max_len=16, attention=attn.LSH(chunk_len=4, n_hashes=2)), 'lm'),
    'ReformerLM_mixed': ('ReformerLM', dict(
        vocab_size=VOCAB, max_len=16, positions='learned',
        attention=[attn.Local(chunk_len=4), attn.LSH(chunk_len=4)]), 'lm'),
    'Reformer': ('Reformer', dict(vocab_size=VOCAB, max_len=16), 'seq2seq'),
    'TerraformerLM': ('TerraformerLM', dict(
        vocab_size=VOCAB, max_len=16, ff_sparsity=8, ff_d_lowrank=4), 'lm'),
    'TerraformerLM_lsh_mean': ('TerraformerLM', dict(
        vocab_size=VOCAB, max_len=16, ff_sparsity=8, ff_d_lowrank=4, merge_streams='mean',
        attention=attn.LSH(chunk_len=4)), 'lm'),
    'Terraformer': ('Terraformer', dict(
        vocab_size=VOCAB, max_len=16, ff_sparsity=8, ff_d_lowrank=4), 'seq2seq'),
    'ConcatTerraformer': ('ConcatTerraformer', dict(
        vocab_size=VOCAB, max_len=16, ff_sparsity=8, ff_d_lowrank=4,
        attention=attn.SparseQKV()), 'seq2seq'),
}
# Added after tests/fixtures/axes_baseline.json was made (it has no shapes of theirs).
AFTER_BASELINE = {'ConcatTerraformer'}


def build(name: str, mode: str = 'eval'):
  """The zoo's model `name` in `mode`."""
  factory, kwargs, _ = ZOO[name]
  sizes = {k: v for k, v in SIZES.items() if not (factory == 'FNet' and k == 'n_heads')}
  if factory == 'ConcatTerraformer':  # n_layers blocks in each of its encoder and decoder.
    n_layers = sizes.pop('n_layers')
    sizes.update(n_encoder_layers=n_layers, n_decoder_layers=n_layers)
  return getattr(models, factory)(mode=mode, **sizes, **kwargs)


def inputs(name: str) -> tuple:
  """Deterministic inputs of the model's task: ids (2, 8), (ids, targets) or images."""
  kind = ZOO[name][2]
  ids = jnp.asarray(np.arange(2 * LENGTH).reshape(2, LENGTH) % (VOCAB - 1) + 1, jnp.int32)
  if kind == 'image':
    return (jnp.asarray(np.linspace(0, 1, 2 * 64).reshape(2, 8, 8, 1), jnp.float32),)
  if kind == 'seq2seq':
    return ids, ids[:, ::-1]
  return (ids,)


def rngs(seed: int = 0):
  """The rng streams of one init/apply call."""
  key = jax.random.key(seed)
  return {s: jax.random.fold_in(key, i) for i, s in enumerate(('params', 'dropout', 'hash',
                                                                 'sparse'))}
