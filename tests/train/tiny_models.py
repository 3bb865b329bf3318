"""Test-only model factories, built from the foundation layers.

Referenced from configs as 'tests.train.tiny_models:TinyLM' (the trainer's
'package.module:Factory' form), so the training tests do not depend on
`terraflax.models`.
"""

import flax.linen as nn
import jax.numpy as jnp

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import check_mode


def _check_length(chunk_len):
  def check(x):
    if chunk_len and x.shape[1] % chunk_len:
      raise ValueError(f'length {x.shape[1]} is not a multiple of chunk_len={chunk_len}')
    return x
  return cb.Fn('CheckLength', check)


def TinyLM(*, vocab_size, d_model, d_ff, n_layers=1, n_heads=1,  # pylint: disable=invalid-name
           dropout=0.0, max_len=2048, chunk_len=None, mode='train', dtype=None):
  """[ids] -> [logits]: int (b, l) -> (b, l, vocab_size); a bigram-style LM (no attention).

  ShiftRight, Embedding, n_layers residual feed-forward blocks, Dense. n_heads
  and max_len are accepted like a Transformer's; chunk_len makes lengths that
  are not a multiple of it an error (as chunked attention would).
  """
  check_mode(mode, 'TinyLM mode')
  del n_heads, max_len
  return cb.Serial(
      _check_length(chunk_len),
      tl.ShiftRight(mode=mode),
      tl.Embedding(vocab_size, d_model, dtype=dtype),
      [cb.Residual(tl.FeedForward(d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode,
                                  dtype=dtype)) for _ in range(n_layers)],
      tl.LayerNorm(),
      tl.Dense(vocab_size, dtype=dtype),
  )


def NGramLM(*, vocab_size, d_model, d_ff, context=8, mode='train',  # pylint: disable=invalid-name
            dtype=None):
  """[ids] -> [logits]: int (b, l) -> (b, l, vocab_size); sees the previous `context` tokens.

  Each of the last `context` tokens is embedded and projected; the sum goes
  through a residual feed-forward block and a Dense to logits.
  """
  check_mode(mode, 'NGramLM mode')
  branches = [cb.Serial(tl.ShiftRight(n_positions=k, mode='train'),
                        tl.Embedding(vocab_size, d_model, dtype=dtype),
                        tl.Dense(d_model, dtype=dtype)) for k in range(1, context + 1)]
  return cb.Serial(
      cb.Branch(*branches),
      [cb.Add() for _ in range(context - 1)],
      cb.Residual(tl.FeedForward(d_model=d_model, d_ff=d_ff, mode=mode, dtype=dtype)),
      tl.LayerNorm(),
      tl.Dense(vocab_size, dtype=dtype),
  )


def TinyClassifier(*, vocab_size, d_model, n_classes, mode='train',  # pylint: disable=invalid-name
                   dtype=None):
  """[ids] -> [logits]: int (b, l) -> (b, n_classes); embeddings averaged over non-pad ids."""
  check_mode(mode, 'TinyClassifier mode')

  def pool(x, ids):
    mask = (ids > 0).astype(x.dtype)[..., None]
    return jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

  return cb.Serial(
      cb.Dup(),  # stack: ids, ids
      tl.Embedding(vocab_size, d_model, dtype=dtype),  # stack: x, ids
      cb.Fn('MaskedMean', pool),
      tl.Dense(d_model, dtype=dtype), tl.Relu(),
      tl.Dense(n_classes, dtype=dtype),
  )


class _ShardedBlock(nn.Module):
  """[x] -> [x + ff(norm(x))]: one scanned block whose parameters carry logical axis names."""

  d_ff: int
  dtype: object = None

  @nn.compact
  def __call__(self, x, _):
    dtype = self.dtype or x.dtype
    d = x.shape[-1]
    named = nn.with_logical_partitioning
    scale = self.param('scale', named(nn.initializers.ones, ('embed',)), (d,))
    w_in = self.param('w_in', named(nn.initializers.lecun_normal(), ('embed', 'mlp')),
                      (d, self.d_ff))
    w_out = self.param('w_out', named(nn.initializers.lecun_normal(), ('mlp', 'embed')),
                       (self.d_ff, d))
    h = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)) * scale[None, None, :]
    h = nn.relu(jnp.dot(h.astype(dtype), w_in.astype(dtype)))
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    return x + jnp.dot(h, w_out.astype(dtype)).astype(x.dtype), None


class _ShardedLM(nn.Module):
  vocab_size: int
  d_model: int
  d_ff: int
  n_layers: int
  dtype: object = None

  @nn.compact
  def __call__(self, ids):
    named = nn.with_logical_partitioning
    embed = self.param('embed', named(nn.initializers.normal(1.0), ('vocab', 'embed')),
                       (self.vocab_size, self.d_model))
    ids = jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]  # Shift right: predict the next token.
    x = nn.with_logical_constraint(jnp.take(embed, ids, axis=0), ('batch', 'length', 'embed'))
    stack = nn.scan(_ShardedBlock, variable_axes={'params': 0}, split_rngs={'params': True},
                    length=self.n_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = stack(self.d_ff, self.dtype, name='blocks')(x, None)
    w_out = self.param('w_out', named(nn.initializers.lecun_normal(), ('embed', 'vocab')),
                       (self.d_model, self.vocab_size))
    dtype = self.dtype or x.dtype
    return jnp.dot(x.astype(dtype), w_out.astype(dtype)).astype(jnp.float32)


def ShardedLM(*, vocab_size, d_model, d_ff, n_layers=2, mode='train',  # pylint: disable=invalid-name
              dtype=None):
  """[ids] -> [logits]: int (b, l) -> (b, l, vocab_size); scanned residual MLP blocks whose
  parameters carry logical axis names (vocab, embed, mlp, layers): a sharding test model."""
  check_mode(mode, 'ShardedLM mode')
  return _ShardedLM(vocab_size, d_model, d_ff, n_layers, dtype)


def sharded_lm_config(**overrides):
  """`tiny_lm_config` with ShardedLM (d_model 16, d_ff 32, 2 scanned blocks)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = tiny_lm_config()
  config.model = ml_collections.ConfigDict({
      'name': 'tests.train.tiny_models:ShardedLM', 'vocab_size': 16, 'd_model': 16,
      'd_ff': 32, 'n_layers': 2, 'dtype': 'float32'})
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_lm_config(**overrides):
  """A complete config for a few-step TinyLM run on the duplication task.

  `overrides` are dotted paths: tiny_lm_config(**{'train.steps': 8}).
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({
      'seed': 0,
      'model': {'name': 'tests.train.tiny_models:TinyLM', 'vocab_size': 16, 'd_model': 16,
                'd_ff': 32, 'n_layers': 1, 'n_heads': 2, 'dropout': 0.1, 'dtype': 'float32'},
      'data': {'name': 'duplication', 'seq_len': 16, 'vocab_size': 16, 'eval_examples': 16},
      'train': {'steps': 12, 'batch_size': 8, 'log_every': 2, 'eval_every': 4,
                'eval_batches': 2, 'checkpoint_every': 4, 'keep_checkpoints': 10},
      'optimizer': {'name': 'adam', 'learning_rate': 1e-2, 'warmup_steps': 2,
                    'decay': 'cosine', 'grad_clip': 1.0},
  })
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def TinySeq2Seq(*, vocab_size, d_model, mode='train', dtype=None):  # pylint: disable=invalid-name
  """[inputs, targets] -> [logits]: int (b, l_in), (b, l) -> (b, l, vocab_size).

  The decoder sees the shifted targets plus the mean of the embedded inputs.
  """
  check_mode(mode, 'TinySeq2Seq mode')
  return cb.Serial(
      cb.Parallel(
          [tl.Embedding(vocab_size, d_model, dtype=dtype),
           cb.Fn('Mean', lambda x: jnp.mean(x, axis=1, keepdims=True))],
          [tl.ShiftRight(mode=mode), tl.Embedding(vocab_size, d_model, dtype=dtype)]),
      cb.Fn('AddContext', lambda context, y: y + context),  # stack: y
      tl.Dense(vocab_size, dtype=dtype),
  )


def family_config(config_file, **overrides):
  """configs/`config_file` (ReformerLM, TransformerLM, TerraformerLM...) at tiny sizes on one
  stdlib file: d_model 32, d_ff 64, 2 heads, 2 layers, length 32, batch 8; log every step,
  evaluate and checkpoint only at the end, no sample. Widths divide fsdp=4 x tensor_parallel=2.
  """
  import os  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  from terraflax.train.config import load_sibling  # pylint: disable=import-outside-toplevel
  configs = pathlib.Path(__file__).resolve().parents[2] / 'configs'
  config = load_sibling(str(configs / config_file), config_file.removesuffix('.py'))
  m = config.model
  m.d_model, m.d_ff, m.n_heads, m.n_layers, m.max_len = 32, 64, 2, 2, 32
  if m.name == 'ReformerLM':
    m.attention.chunk_len, m.attention.n_buckets = 8, 4
  if m.name == 'TerraformerLM':
    m.ff_sparsity, m.ff_d_lowrank, m.attention.n_modules = 4, 8, 2
  config.data.path, config.data.seq_len, config.data.eval_fraction = os.__file__, 32, 0.1
  t = config.train
  t.steps, t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = 20, 1, 1000, 1, 1000
  config.optimizer.warmup_steps = 5
  config.sample.max_new_tokens = 0
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
