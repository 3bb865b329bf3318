"""Trax 1.4.1 checkpoints -> terraflax model configs and parameters.

  model_config, params = from_trax('/path/to/loop_output_dir')
  model = TransformerLM(**{k: v for k, v in model_config.items() if k != 'name'}, mode='eval')

reads what Trax writes (`terraflax.models.trax_checkpoint`: Loop checkpoints,
`Layer.save_to_file` files, gin files; the optimizer slots are dropped). The
weights are a flat list in the order of Trax's layer tree, which the
checkpoint does not describe: the model's configuration does. The converter
builds the layer tree that the configuration describes and walks it, taking
one weight per parameter in Trax's order and checking its shape; a
checkpoint with fewer or more weights than the tree, or one of another
shape, is a `TraxConversionError` naming the layer and both shapes.

Models (Trax name -> terraflax factory):

  TransformerLM  -> TransformerLM(positions='learned'): Trax's positional
                    table is a weight (trained with the rest), so it is kept.
  ReformerLM     -> ReformerLM (reversible, axial or learned positions,
                    attention_type a list cycled over layers of
                    efficient_attention's SelfAttention, full (chunk_len=None)
                    or local, and LSHSelfAttention, as `LSH(convention='hf')`:
                    Hugging Face's layers reproduce Trax's arithmetic).
  ReformerLM(ff_sparsity=N)
                 -> TerraformerLM(ff_sparsity=N, positions='learned'): the
                    Terraformer's SparseFF (one active unit in each block of
                    N, a low-rank controller; eval picks the argmax in both)
                    in the same reversible layout, with full, LSH or sparse
                    QKV attention (MultiplicativeConvCausalAttention ->
                    SparseQKV(output_layer='none')) and Trax's
                    PositionalEncoding (pos_type None). Trax's SparseFF has
                    no first-layer bias: bias_in is zero.
  ConfigurableTransformerLM (trax.models.research.configurable_transformer,
                    the Terraformer paper's decoder-only LM)
                 -> TransformerLM(positions='learned'): one pre-norm residual
                    stream, not reversible (so not TerraformerLM's two
                    streams); attention_type CausalAttention -> Full(),
                    MultiplicativeConvCausalAttention -> SparseQKV(
                    output_layer='none'); ff_sparsity N -> TransformerLM(
                    ff_sparsity=N): Residual(LayerNorm, SparseFF).

  ConfigurableTerraformer (trax.models.research.terraformer, the Terraformer
                    paper's encoder-decoder)
                 -> ConcatTerraformer: a reversible encoder (full SelfAttention
                    over the inputs, padding masked), then one reversible
                    decoder over the encoder's real vectors and the shifted
                    targets concatenated per example (ConcatWithPadding), with
                    n_decoder_attention_layers causal self-attention halves
                    per block: SelfAttention / CausalAttention -> Full()
                    (Trax's SelfAttention has no biases: zero biases),
                    MultiplicativeConvCausalAttention -> SparseQKV(
                    output_layer='none'); ff_sparsity N -> ff_sparsity=N in
                    the encoder and decoder; pos_type 'fixed-base' (Trax's
                    default) -> positions='fixed_base', None -> 'learned' (a
                    table per side); output_vocab_size None: one embedding.
                    Decode with `python -m terraflax.decoding --inputs=...`.

Not converted (a clear error): Trax's Transformer (encoder-decoder
attention), ConfigurableTransformerLM's pos_types other than None,
ff_use_sru, loss_sparsity and ff_sparsity_type other than '1inN', the
sparse-QKV options share_qk / output_layer_type / v_concat_type,
SelfAttention's share_qk and bias options, other pos_types;
ConfigurableTerraformer's local/LSH attention, reversible_encoder,
n_layers_forget, half_before_layer / double_after_layer, center_layernorm
False, use_two_swaps_per_encoder_block False, attention_chunk_size and
input_vocab_size None (pre-embedded inputs).

Randomness: Trax's LSH layers draw their rotations per example and head from
a per-layer state; terraflax draws them from the 'hash' stream. To reproduce
one Trax forward pass, pass the rotations it drew (`lsh_rotations` of
`terraflax.models.convert`, batch 1). Dropout is off in eval mode in both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from terraflax.models import attention as attn
from terraflax.models.trax_checkpoint import (  # pylint: disable=unused-import
    ACTIVATIONS, FIXED_BASE_DIGITS, FIXED_BASES, NOT_CONVERTED, TRAX_DEFAULTS,
    TraxConversionError, checkpoint_file, read_gin, read_weights, trax_config)


# ----------------------------------------------------------------------------- the walk


class _Walk:
  """Takes Trax's flat weights in layer order, checking each one's shape."""

  def __init__(self, weights: list[np.ndarray], file: str, name: str):
    self.weights, self.file, self.name, self.next = weights, file, name, 0

  def take(self, what: str, *shapes: tuple[int, ...]) -> np.ndarray:
    """The next weight (`what` in the layer tree), which must have one of `shapes`."""
    if self.next >= len(self.weights):
      raise TraxConversionError(
          f'{self.file} has {len(self.weights)} weights, but the {self.name} configuration '
          f'needs more: {what} {shapes[0]} would be #{self.next} (does the configuration, e.g. '
          'n_layers, match the checkpoint?).')
    w = self.weights[self.next]
    if tuple(w.shape) not in [tuple(s) for s in shapes]:
      raise TraxConversionError(
          f'{self.file}: weight #{self.next} has shape {tuple(w.shape)}, but the {self.name} '
          f'configuration puts {what} {shapes[0]} there (does the configuration match the '
          'checkpoint?).')
    self.next += 1
    return w

  def finish(self):
    if self.next != len(self.weights):
      raise TraxConversionError(
          f'{self.file} has {len(self.weights)} weights, but the {self.name} configuration '
          f'describes {self.next} (does the configuration, e.g. n_layers, match the '
          'checkpoint?).')


def _norm(walk, what, d):
  return {'scale': walk.take(f'{what} LayerNorm scale', (d,)),
          'bias': walk.take(f'{what} LayerNorm bias', (d,))}


def _dense(walk, what, d_in, d_out):
  return {'kernel': walk.take(f'{what} Dense kernel', (d_in, d_out)),
          'bias': walk.take(f'{what} Dense bias', (d_out,))}


def _stack(trees):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)


def _child(tree: dict, prefix: str) -> str:
  names = [k for k in tree if k.startswith(prefix + '_')]
  if len(names) != 1:
    raise TraxConversionError(f'internal: expected one {prefix}_* in {sorted(tree)}.')
  return names[0]


def _abstract_params(model, n_inputs: int = 1) -> dict:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rngs = {s: jax.random.key(0) for s in ('params', 'hash', 'dropout')}
  inputs = [jnp.ones((1, 1), jnp.int32)] * n_inputs
  return nn.meta.unbox(jax.eval_shape(model.init, rngs, *inputs)['params'])


def _check_tree(params, abstract):
  import jax  # pylint: disable=import-outside-toplevel
  got, want = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(abstract)
  if got != want:
    raise TraxConversionError(f'internal: converted tree {got} differs from the model\'s {want}.')
  for (path, x), a in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree_util.tree_leaves(abstract)):
    if x.shape != a.shape:
      raise TraxConversionError(f'internal: {jax.tree_util.keystr(path)} has shape {x.shape}, '
                                f'the model wants {a.shape}.')


def _positive(kwargs, name, source, model):
  value = kwargs[name]
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise TraxConversionError(f'{source}: {model}.{name}={value!r} must be a positive int.')
  return value


# --- TransformerLM


def _transformer_lm(kwargs: dict, walk: _Walk):
  from terraflax.models.transformer import TransformerLM  # pylint: disable=import-outside-toplevel
  source = kwargs['_source']
  v, d, f, n, h, max_len = (_positive(kwargs, k, source, 'TransformerLM') for k in (
      'vocab_size', 'd_model', 'd_ff', 'n_layers', 'n_heads', 'max_len'))
  if kwargs['ff_activation'] != 'Relu':
    raise TraxConversionError(f'{source}: TransformerLM.ff_activation='
                              f'{kwargs["ff_activation"]!r} is not supported (only Relu, '
                              "Trax's default).")
  if d % h:
    raise TraxConversionError(f'{source}: TransformerLM.d_model={d} is not divisible by '
                              f'n_heads={h}.')
  tf_kwargs = dict(vocab_size=v, d_model=d, d_ff=f, n_layers=n, n_heads=h,
                   dropout=float(kwargs['dropout']), max_len=max_len, positions='learned')
  k = d // h
  # Trax: ShiftRight, Embedding, Dropout, PositionalEncoding, n x [Residual(LayerNorm,
  # CausalAttention(q, k, v: Dense; o: Dense), Dropout), Residual(LayerNorm, Dense(d_ff),
  # Relu, Dropout, Dense(d_model), Dropout)], LayerNorm, Dense(vocab).
  embedding = walk.take('Embedding', (v, d))
  table = walk.take('PositionalEncoding table', (max_len, d), (1, max_len, d)).reshape(max_len, d)
  blocks = []
  for i in range(n):
    b = f'block {i}'
    norm = _norm(walk, f'{b} attention', d)
    attention = {}
    for role in ('query', 'key', 'value'):
      p = _dense(walk, f'{b} attention {role}', d, d)
      attention[role] = {'kernel': p['kernel'], 'bias': p['bias']}
    attention['output'] = _dense(walk, f'{b} attention output', d, d)
    blocks.append((norm, attention, _ff_weights(walk, b, d, f, {})))
  final_norm = _norm(walk, 'final', d)
  head = _dense(walk, 'output', d, v)
  walk.finish()
  del k
  model = TransformerLM(**tf_kwargs, mode='eval')
  abstract = _abstract_params(model)
  repeat = _child(abstract, 'Repeat')
  attention_name = _child(abstract[repeat]['Serial_0']['Residual_0'], 'CausalAttention')
  params = {
      _child(abstract, 'Embedding'): {'embedding': embedding},
      _child(abstract, 'PositionalEncoding'): {'pos_embedding': table},
      repeat: {'Serial_0': {
          'Residual_0': {'LayerNorm_0': _stack([b[0] for b in blocks]),
                         attention_name: _stack([b[1] for b in blocks])},
          'Residual_1': {'FeedForward_0': _stack([b[2] for b in blocks])}}},
      _child(abstract, 'LayerNorm'): final_norm,
      _child(abstract, 'Dense'): head,
  }
  _check_tree(params, abstract)
  return 'TransformerLM', tf_kwargs, params


# --- ReformerLM


def _attention_spec(layer: dict, where: str, max_len: int):
  """A Trax efficient-attention layer config -> a terraflax attention spec."""
  if layer.get('bias'):
    raise TraxConversionError(f'{where}: {layer["type"]}(bias=True) is not supported.')
  if layer['type'] == 'CausalAttention':
    raise TraxConversionError(f'{where}: CausalAttention converts in ConfigurableTransformerLM '
                              'only (ReformerLM takes SelfAttention, LSHSelfAttention or '
                              'MultiplicativeConvCausalAttention).')
  if layer['type'] == 'MultiplicativeConvCausalAttention':
    for key, only in (('share_qk', False), ('output_layer_type', 'none'),
                      ('v_concat_type', 'none')):
      if layer[key] != only:
        raise TraxConversionError(f'{where}: MultiplicativeConvCausalAttention({key}='
                                  f'{layer[key]!r}) is not supported (only {only!r}).')
    return attn.SparseQKV(n_modules=layer['sparsity'], length_kernel_size=layer[
        'length_kernel_size'], module_kernel_size=3, output_layer='none')
  if layer['type'] == 'SelfAttention':
    if layer.get('share_qk'):
      raise TraxConversionError(f'{where}: SelfAttention(share_qk=True) is not supported.')
    if layer['chunk_len'] is None:
      return attn.Full()
    return attn.Local(chunk_len=layer['chunk_len'], n_chunks_before=layer['n_chunks_before'],
                      n_chunks_after=layer['n_chunks_after'])
  buckets = layer['n_buckets']
  if isinstance(buckets, (list, tuple)):
    buckets = buckets[0] if len(buckets) == 1 else tuple(buckets)
  return attn.LSH(n_hashes=layer['n_hashes'], chunk_len=layer['chunk_len'], n_buckets=buckets,
                  n_chunks_before=layer['n_chunks_before'],
                  n_chunks_after=layer['n_chunks_after'],
                  predict_mem_len=min(layer['predict_mem_len'] or max_len, max_len),
                  convention='hf')


def _sparse_ff(kwargs: dict, source: str, d_ff: int) -> dict:
  """TerraformerLM's SparseFF kwargs of ReformerLM's ff_sparsity (Trax's '1inN'), or {}.

  ff_sparsity: an int N (N units per block, controller rank d_ff // N), a list
  [N, d_lowrank] or [N, d_lowrank, temperature, quant_prob], or their string.
  """
  value = kwargs.get('ff_sparsity') or 0
  if not value:
    return {}
  if isinstance(value, str):
    value = [float(x) if '.' in x else int(x) for x in value.split()]
  temperature, quant_prob = 0.1, 0.3
  if isinstance(value, (list, tuple)) and len(value) == 2:
    n_elements, d_lowrank = value
  elif isinstance(value, (list, tuple)) and len(value) == 4:
    n_elements, d_lowrank, temperature, quant_prob = value
  elif isinstance(value, int) and not isinstance(value, bool):
    n_elements, d_lowrank = value, d_ff // value
  else:
    raise TraxConversionError(f'{source}: ff_sparsity={value!r} is not supported; expected an '
                              'int N or [N, d_lowrank(, temperature, quant_prob)].')
  if not isinstance(n_elements, int) or n_elements < 1 or d_ff % n_elements or d_lowrank < 1:
    raise TraxConversionError(f'{source}: ff_sparsity={value!r}: the block size must divide '
                              f'd_ff={d_ff} and the controller rank be positive.')
  return dict(ff_sparsity=n_elements, ff_d_lowrank=int(d_lowrank),
              ff_temperature=float(temperature), ff_quant_prob=float(quant_prob))


def _sparse_ff_weights(walk: _Walk, what: str, d: int, d_ff: int, sparse: dict) -> dict:
  """Trax SparseFF weights -> terraflax SparseFF parameters.

  Trax: controller (m1 (d, r), m2 (r, k, e), mb (k, e)), main (w1 (d, k, e),
  w2 (e, k, d), b2 (d,)); unit k * e_size + e in both. Trax's first layer
  has no bias (terraflax's bias_in is zero).
  """
  e = sparse['ff_sparsity']
  k, r = d_ff // e, sparse['ff_d_lowrank']
  m1 = walk.take(f'{what} controller m1', (d, r))
  m2 = walk.take(f'{what} controller m2', (r, k, e))
  mb = walk.take(f'{what} controller bias', (k, e))
  w1 = walk.take(f'{what} w1', (d, k, e))
  w2 = walk.take(f'{what} w2', (e, k, d))
  b2 = walk.take(f'{what} b2', (d,))
  return {'controller_lowrank': {'kernel': m1},
          'controller_logits': {'kernel': m2.reshape(r, d_ff), 'bias': mb.reshape(d_ff)},
          'kernel_in': w1.reshape(d, d_ff).T.copy(), 'bias_in': np.zeros((d_ff,), np.float32),
          'kernel_out': w2.transpose(1, 0, 2).reshape(d_ff, d), 'bias_out': b2}


def _sparse_ff_half(walk: _Walk, b: str, d: int, d_ff: int, sparse: dict) -> dict:
  return {'LayerNorm_0': _norm(walk, f'{b} feed-forward', d),
          'SparseFF_1': _sparse_ff_weights(walk, f'{b} SparseFF', d, d_ff, sparse)}


def _sparse_qkv_weights(walk: _Walk, what: str, d: int, n_heads: int, spec) -> dict:
  """Trax MultiplicativeConvCausalAttention weights -> terraflax's.

  Trax: FactoredDense (gating (S, d), projection (d, M), bias (d,)), then the
  query, key (kernel (lk, 3, M, M), bias (M,)) and value (kernel (lk, 1, M,
  M), bias) convolutions over (length, modules); no output layer.
  """
  s = spec.n_modules or n_heads
  m, lk = d // s, spec.length_kernel_size
  if d % s:
    raise TraxConversionError(f'{what}: sparsity={s} does not divide d_model={d}.')
  params = {'multiplicative': {'gating': walk.take(f'{what} gating', (s, d)).T.copy(),
                               'kernel': walk.take(f'{what} projection', (d, m)),
                               'bias': walk.take(f'{what} bias', (d,))}}
  for role, width in (('query', 3), ('key', 3), ('value', 1)):
    params[f'{role}_conv'] = {'kernel': walk.take(f'{what} {role} conv kernel', (lk, width, m, m)),
                              'bias': walk.take(f'{what} {role} conv bias', (m,))}
  return params


def _attention_weights(walk: _Walk, b: str, layer_type: str, spec, *, d: int, h: int, k: int,
                       dv: int, biases: bool = False) -> dict:
  """One Trax attention layer's weights -> the terraflax attention layer's parameters.

  SelfAttention / LSHSelfAttention (efficient_attention): per-head w_q, w_k
  (LSH: one shared w_qk) (h, d, k), w_v (h, d, dv), w_o (h, dv, d), no
  biases; as `Full` the CausalAttention's Dense kernels (d, h*k) / (h*dv, d),
  with zero biases when `biases` (the terraflax layer has them).
  CausalAttention (trax.layers): Dense q, k, v, o (d, d) with biases.
  MultiplicativeConvCausalAttention: `_sparse_qkv_weights`.
  """
  if isinstance(spec, attn.SparseQKV):
    return _sparse_qkv_weights(walk, f'{b} sparse QKV', d, h, spec)
  if layer_type == 'CausalAttention':
    return {role: _dense(walk, f'{b} CausalAttention {role}', d, d)
            for role in ('query', 'key', 'value', 'output')}
  if isinstance(spec, attn.LSH):
    attention = {'qk': walk.take(f'{b} LSHSelfAttention w_qk', (h, d, k)).transpose(1, 0, 2)}
  else:
    attention = {'query': walk.take(f'{b} SelfAttention w_q', (h, d, k)).transpose(1, 0, 2),
                 'key': walk.take(f'{b} SelfAttention w_k', (h, d, k)).transpose(1, 0, 2)}
  attention['value'] = walk.take(f'{b} {layer_type} w_v', (h, d, dv)).transpose(1, 0, 2)
  attention['output'] = walk.take(f'{b} {layer_type} w_o', (h, dv, d))
  if isinstance(spec, attn.Full):  # CausalAttention's Dense kernels: (d, h*k), (h*v, d).
    attention = {role: {'kernel': w.reshape(d, -1) if role != 'output' else w.reshape(-1, d)}
                 for role, w in attention.items()}
    if biases:
      for p in attention.values():
        p['bias'] = np.zeros(p['kernel'].shape[-1:], np.float32)
  return attention


def _ff_weights(walk: _Walk, b: str, d: int, d_ff: int, sparse: dict) -> dict:
  """A pre-norm feed-forward's weights: LayerNorm then SparseFF (`sparse`), or
  LayerNorm, Dense(d_ff), Dense(d) (terraflax's FeedForward children)."""
  if sparse:
    return _sparse_ff_half(walk, b, d, d_ff, sparse)
  return {'LayerNorm_0': _norm(walk, f'{b} feed-forward', d),
          'Dense_1': _dense(walk, f'{b} feed-forward first', d, d_ff),
          'Dense_4': _dense(walk, f'{b} feed-forward second', d_ff, d)}


def _reformer_lm(kwargs: dict, walk: _Walk):
  from terraflax.models.reformer import ReformerLM  # pylint: disable=import-outside-toplevel
  from terraflax.models.terraformer import TerraformerLM  # pylint: disable=import-outside-toplevel
  source, name = kwargs['_source'], 'ReformerLM'
  v, d, f, n, h, k, dv, max_len = (_positive(kwargs, key, source, name) for key in (
      'vocab_size', 'd_model', 'd_ff', 'n_layers', 'n_heads', 'd_attention_key',
      'd_attention_value', 'max_len'))
  activation = ACTIVATIONS.get(kwargs['ff_activation'])
  if activation is None:
    raise TraxConversionError(f'{source}: {name}.ff_activation={kwargs["ff_activation"]!r} is '
                              f'not supported; expected one of {", ".join(ACTIVATIONS)}.')
  types = kwargs['attention_type']
  if n % len(types):
    raise TraxConversionError(f'{source}: {name}.n_layers={n} is not a multiple of the '
                              f'{len(types)} attention types.')
  pos_type, axial_shape = kwargs['pos_type'], tuple(kwargs['pos_axial_shape'] or ())
  if not pos_type:
    positions = 'learned'
  elif pos_type in ('sin-cos', 'fixed-base', 'infinite', 'infinite-affine', 'time-bin', 'no'):
    raise TraxConversionError(f'{source}: {name}.pos_type={pos_type!r} is not supported; '
                              "expected None (Trax's PositionalEncoding) or axial.")
  else:
    dims = tuple(kwargs['pos_d_axial_embs'] or ())
    if not axial_shape or len(dims) != len(axial_shape) or sum(dims) != d:
      raise TraxConversionError(f'{source}: {name}.pos_axial_shape={axial_shape!r} and '
                                f'pos_d_axial_embs={dims!r} must be lists of the same length, '
                                f'the widths summing to d_model={d}.')
    max_len = math.prod(axial_shape)  # Trax's axial layer covers exactly these positions.
    positions = {'kind': 'axial', 'shape': list(axial_shape), 'd_embs': list(dims)}
  specs = [_attention_spec(t, f'{source}: attention_type[{i}]', max_len)
           for i, t in enumerate(types)]
  tf_kwargs = dict(vocab_size=v, d_model=d, d_ff=f, n_layers=n, n_heads=h, d_qk=k, d_v=dv,
                   dropout=float(kwargs['dropout']), max_len=max_len,
                   attention=attn.to_config(specs), positions=positions,
                   ff_activation=activation, ff_chunk_len=kwargs['ff_chunk_size'] or None)
  sparse = _sparse_ff(kwargs, source, f)
  if any(isinstance(spec, attn.SparseQKV) for spec in specs) and not sparse:
    raise TraxConversionError(f'{source}: {name} with MultiplicativeConvCausalAttention converts '
                              'with ff_sparsity only (to a TerraformerLM).')
  if sparse:  # The Terraformer's SparseFF: a TerraformerLM (same reversible layout).
    if positions != 'learned':
      raise TraxConversionError(f'{source}: {name}.ff_sparsity with pos_type={pos_type!r} is not '
                                "supported (TerraformerLM converts with Trax's PositionalEncoding, "
                                'pos_type None).')
    if any(isinstance(spec, attn.Local) for spec in specs):
      raise TraxConversionError(f'{source}: {name}.ff_sparsity with local attention is not '
                                'supported (full or LSH attention convert).')
    name = 'TerraformerLM'
    del tf_kwargs['ff_activation']  # Trax's SparseFF is a ReLU whatever ff_activation says.
    tf_kwargs.update(sparse)

  # Trax: ShiftRight, Embedding, Dropout, positions, Dup, ReversibleSerial(n x [
  # ReversibleHalfResidual(LayerNorm, attention), ReversibleSwap, ReversibleHalfResidual(
  # LayerNorm, Dense(d_ff), activation, Dropout, Dense(d_model), Dropout), ReversibleSwap]),
  # Concatenate, LayerNorm(2 d_model), Dropout, Dense(vocab).
  embedding = walk.take('Embedding', (v, d))
  if positions == 'learned':
    pos = {'pos_embedding': walk.take('PositionalEncoding table', (max_len, d),
                                      (1, max_len, d)).reshape(max_len, d)}
  else:
    pos = {}
    for i, (size, dim) in enumerate(zip(axial_shape, positions['d_embs'])):
      shape = [1] * (len(axial_shape) + 1) + [dim]
      shape[i + 1] = size
      pos[f'axial_{i}'] = walk.take(f'AxialPositionalEncoding axis {i}',
                                    tuple(shape)).reshape(size, dim)
  layers = []
  for i in range(n):
    b, spec = f'block {i}', specs[i % len(specs)]
    norm = _norm(walk, f'{b} attention', d)
    attention = _attention_weights(walk, b, types[i % len(types)]['type'], spec, d=d, h=h, k=k,
                                   dv=dv, biases=bool(sparse))
    layers.append((norm, attention, _ff_weights(walk, b, d, f, sparse)))
  final_norm = _norm(walk, 'final (2 d_model)', 2 * d)
  head = _dense(walk, 'output', 2 * d, v)
  walk.finish()

  model = (TerraformerLM if sparse else ReformerLM)(**tf_kwargs, mode='eval')
  abstract = _abstract_params(model)
  serial = _child(abstract, 'ReversibleSerial')
  period = len(specs)
  # The reversible serial's children with parameters, in order: attention half, ff half, ...
  halves = sorted(abstract[serial], key=lambda key: int(key.rsplit('_', 1)[1]))
  blocks = {}
  for j, spec in enumerate(specs):
    per_layer = layers[j::period]
    attn_key, ff_key = halves[2 * j], halves[2 * j + 1]
    attn_name = _child(abstract[serial][attn_key],
                       'LSHSelfAttention' if isinstance(spec, attn.LSH) else
                       'LocalSelfAttention' if isinstance(spec, attn.Local) else
                       'MultiplicativeConvCausalAttention' if isinstance(spec, attn.SparseQKV)
                       else 'CausalAttention')
    blocks[attn_key] = {'LayerNorm_0': _stack([x[0] for x in per_layer]),
                        attn_name: _stack([x[1] for x in per_layer])}
    blocks[ff_key] = {'SparseFeedForward_0' if sparse else 'FeedForward_0':
                      _stack([x[2] for x in per_layer])}
  params = {
      _child(abstract, 'Embedding'): {'embedding': embedding},
      _child(abstract, 'PositionalEncoding' if positions == 'learned'
             else 'AxialPositionalEncoding'): pos,
      serial: blocks,
      _child(abstract, 'LayerNorm'): final_norm,
      _child(abstract, 'Dense'): head,
  }
  _check_tree(params, abstract)
  return name, tf_kwargs, params


# --- ConfigurableTransformerLM


def _configurable_lm(kwargs: dict, walk: _Walk):
  """trax.models.research.ConfigurableTransformerLM -> TransformerLM (learned positions).

  One pre-norm residual stream (not reversible): CausalAttention -> Full(),
  MultiplicativeConvCausalAttention -> SparseQKV(output_layer='none');
  ff_sparsity N -> TransformerLM(ff_sparsity=N), Residual(LayerNorm, SparseFF).
  (TerraformerLM keeps two reversible streams, a different function.)
  """
  from terraflax.models.transformer import TransformerLM  # pylint: disable=import-outside-toplevel
  source, name = kwargs['_source'], 'ConfigurableTransformerLM'
  v, d, f, n, h, max_len = (_positive(kwargs, key, source, name) for key in (
      'vocab_size', 'd_model', 'd_ff', 'n_layers', 'n_heads', 'max_len'))
  if d % h:
    raise TraxConversionError(f'{source}: {name}.d_model={d} is not divisible by n_heads={h}.')
  types = kwargs['attention_type']
  if len(types) != 1:
    raise TraxConversionError(f'{source}: {name}.attention_type must be one attention layer '
                              f'(Trax builds every block with it), got {len(types)}.')
  layer = types[0]
  where = f'{source}: {name}.attention_type'
  if layer['type'] == 'CausalAttention':
    spec = attn.Full()
  elif layer['type'] == 'MultiplicativeConvCausalAttention':
    spec = _attention_spec(layer, where, max_len)
  else:
    raise TraxConversionError(f'{where}={layer["type"]!r} is not supported; expected '
                              'CausalAttention or MultiplicativeConvCausalAttention.')
  sparse = _sparse_ff(kwargs, source, f)
  if not sparse and kwargs['ff_activation'] != 'Relu':
    raise TraxConversionError(f'{source}: {name}.ff_activation={kwargs["ff_activation"]!r} is '
                              "not supported (only Relu, Trax's default).")
  tf_kwargs = dict(vocab_size=v, d_model=d, d_ff=f, n_layers=n, n_heads=h,
                   dropout=float(kwargs['dropout']), max_len=max_len, positions='learned',
                   attention=attn.to_config([spec]),
                   ff_chunk_len=kwargs['ff_chunk_size'] or None)
  if sparse:
    tf_kwargs.update(sparse)
  # Trax: ShiftRight, Embedding, Dropout, PositionalEncoding, n x [Residual(LayerNorm,
  # attention, Dropout), Residual(LayerNorm, Dense(d_ff), Dropout, activation, Dense(d_model),
  # Dropout | LayerNorm, SparseFF)], LayerNorm, Dense(vocab) (loss_sparsity 0).
  embedding = walk.take('Embedding', (v, d))
  table = walk.take('PositionalEncoding table', (max_len, d), (1, max_len, d)).reshape(max_len, d)
  blocks = []
  for i in range(n):
    b = f'block {i}'
    norm = _norm(walk, f'{b} attention', d)
    attention = _attention_weights(walk, b, layer['type'], spec, d=d, h=h, k=d // h, dv=d // h)
    ff = _ff_weights(walk, b, d, f, sparse)
    blocks.append((norm, attention, ff if sparse else {'FeedForward_0': ff}))
  final_norm = _norm(walk, 'final', d)
  head = _dense(walk, 'output', d, v)
  walk.finish()
  model = TransformerLM(**tf_kwargs, mode='eval')
  abstract = _abstract_params(model)
  repeat = _child(abstract, 'Repeat')
  attention_name = _child(abstract[repeat]['Serial_0']['Residual_0'],
                          'MultiplicativeConvCausalAttention'
                          if isinstance(spec, attn.SparseQKV) else 'CausalAttention')
  params = {
      _child(abstract, 'Embedding'): {'embedding': embedding},
      _child(abstract, 'PositionalEncoding'): {'pos_embedding': table},
      repeat: {'Serial_0': {
          'Residual_0': {'LayerNorm_0': _stack([x[0] for x in blocks]),
                         attention_name: _stack([x[1] for x in blocks])},
          'Residual_1': _stack([x[2] for x in blocks])}},
      _child(abstract, 'LayerNorm'): final_norm,
      _child(abstract, 'Dense'): head,
  }
  _check_tree(params, abstract)
  return 'TransformerLM', tf_kwargs, params


# --- ConfigurableTerraformer


def _terraformer_weights(kwargs: dict, walk: _Walk) -> tuple[dict, dict]:
  """(sizes, Trax's weights as a tree) of a ConfigurableTerraformer checkpoint.

  Trax's layer order (reversible_encoder False):
    Embedding(input_vocab), positions (encoder side),
    [Embedding(output_vocab) when output_vocab_size is set, else shared],
    positions (decoder side): pos_type None a PositionalEncoding table
      (max_len, d); 'fixed-base' per base (11, 13, 14, 15) per digit (8) a
      (1, d / 8) vector, then start_vec (1, 1, d),
    n_encoder_layers x [LayerNorm, attention (d_model // n_heads per head),
      feed-forward (LayerNorm, Dense, Dense | LayerNorm, SparseFF)],
    Dense(d_model), LayerNorm (after the encoder's two streams are averaged),
    n_decoder_layers x [n_decoder_attention_layers x [LayerNorm, causal
      attention over the concatenated sequence], feed-forward],
    LayerNorm, Dense(output_vocab).
  """
  source, name = kwargs['_source'], 'ConfigurableTerraformer'
  v, d, f, n_enc, n_dec, h, max_len, n_attn = (_positive(kwargs, key, source, name) for key in (
      'input_vocab_size', 'd_model', 'd_ff', 'n_encoder_layers', 'n_decoder_layers', 'n_heads',
      'max_len', 'n_decoder_attention_layers'))
  v_out = kwargs['output_vocab_size']
  if v_out is not None:
    v_out = _positive(kwargs, 'output_vocab_size', source, name)
  if d % (2 * h):
    raise TraxConversionError(f'{source}: {name}.n_heads={h} must divide d_model / 2 = {d / 2} '
                              '(as Trax requires).')
  k = kwargs['d_attention_key'] or d // h
  dv = kwargs['d_attention_value'] or d // h
  sparse = _sparse_ff(kwargs, source, f)
  if not sparse and kwargs['ff_activation'] != 'Relu':
    raise TraxConversionError(f'{source}: {name}.ff_activation={kwargs["ff_activation"]!r} is '
                              "not supported (only Relu, Trax's default).")
  where = f'{source}: {name}.encoder_attention_type'
  encoder_types = kwargs['encoder_attention_type']
  if len(encoder_types) != 1 or encoder_types[0]['type'] != 'SelfAttention' or (
      encoder_types[0]['chunk_len'] is not None):
    raise TraxConversionError(f'{where} must be one full SelfAttention (chunk_len None), got '
                              f'{[t["type"] for t in encoder_types]}.')
  encoder_spec = _attention_spec(encoder_types[0], where, max_len)
  types = kwargs['encoder_decoder_attention_type']
  if n_dec % len(types):
    raise TraxConversionError(f'{source}: {name}.n_decoder_layers={n_dec} is not a multiple of '
                              f'the {len(types)} encoder_decoder_attention_type layers.')
  specs = []
  for i, layer in enumerate(types):
    where = f'{source}: {name}.encoder_decoder_attention_type[{i}]'
    if layer['type'] == 'CausalAttention':
      if (k, dv) != (d // h, d // h):  # trax.layers.CausalAttention ignores them.
        raise TraxConversionError(f'{where}=CausalAttention with d_attention_key={k} / '
                                  f'd_attention_value={dv} is not supported (only d_model // '
                                  f'n_heads = {d // h}, the widths CausalAttention uses).')
      specs.append(attn.Full())
    elif layer['type'] in ('SelfAttention', 'MultiplicativeConvCausalAttention') and (
        layer.get('chunk_len') is None):
      specs.append(_attention_spec(layer, where, max_len))
    else:
      raise TraxConversionError(f'{where}={layer["type"]!r} is not supported; expected '
                                'CausalAttention, SelfAttention (chunk_len None) or '
                                'MultiplicativeConvCausalAttention.')
  sizes = dict(input_vocab_size=v, output_vocab_size=v_out, d_model=d, d_ff=f,
               n_encoder_layers=n_enc, n_decoder_layers=n_dec, n_heads=h, d_qk=k, d_v=dv,
               max_len=max_len, n_decoder_attention_layers=n_attn, sparse=sparse,
               specs=specs)

  pos_type = kwargs['pos_type']
  if pos_type not in (None, 'fixed-base'):
    raise TraxConversionError(f'{source}: {name}.pos_type={pos_type!r} is not supported; '
                              "expected 'fixed-base' (Trax's default) or None.")
  if pos_type == 'fixed-base' and d % FIXED_BASE_DIGITS:
    raise TraxConversionError(f"{source}: {name}.pos_type='fixed-base' needs d_model a multiple "
                              f'of {FIXED_BASE_DIGITS}, got {d}.')
  sizes['positions'] = 'learned' if pos_type is None else 'fixed_base'

  def table(what):
    if pos_type is None:
      return {'pos_embedding': walk.take(f'{what} PositionalEncoding table', (max_len, d),
                                         (1, max_len, d)).reshape(max_len, d)}
    # FixedBasePositionalEncoding: per base, per digit a (1, d / digits) vector; start_vec.
    w = d // FIXED_BASE_DIGITS
    digits = [[walk.take(f'{what} FixedBasePositionalEncoding base {base} digit {i}', (1, w))
               for i in range(FIXED_BASE_DIGITS)] for base in FIXED_BASES]
    return {'base_weights': np.asarray(digits, np.float32).reshape(
                len(FIXED_BASES), FIXED_BASE_DIGITS, w),
            'start_vec': walk.take(f'{what} FixedBasePositionalEncoding start_vec',
                                   (1, 1, d)).reshape(d)}

  tree = {'in_embedding': walk.take('input Embedding', (v, d)),
          'in_positions': table('encoder')}
  tree['out_embedding'] = None if v_out is None else walk.take('output Embedding', (v_out, d))
  tree['out_positions'] = table('decoder')
  tree['encoder'] = []
  for i in range(n_enc):
    b = f'encoder block {i}'
    tree['encoder'].append({
        'norm': _norm(walk, f'{b} attention', d),
        'attention': _attention_weights(walk, b, 'SelfAttention', encoder_spec, d=d, h=h,
                                        k=d // h, dv=d // h, biases=True),
        'ff': _ff_weights(walk, b, d, f, sparse)})
  tree['encoder_dense'] = _dense(walk, 'encoder output', d, d)
  tree['encoder_norm'] = _norm(walk, 'encoder output', d)
  tree['decoder'] = []
  for i in range(n_dec):
    b, j = f'decoder block {i}', i % len(specs)
    halves = []
    for a in range(n_attn):
      halves.append({'norm': _norm(walk, f'{b} attention {a}', d),
                     'attention': _attention_weights(walk, f'{b} attention {a}', types[j]['type'],
                                                     specs[j], d=d, h=h, k=k, dv=dv,
                                                     biases=True)})
    tree['decoder'].append({'attention': halves, 'ff': _ff_weights(walk, b, d, f, sparse)})
  tree['final_norm'] = _norm(walk, 'final', d)
  tree['head'] = _dense(walk, 'output', d, v if v_out is None else v_out)
  walk.finish()
  return sizes, tree


def _paths(tree: dict, prefix: str, path: tuple = ()) -> list[tuple]:
  """Paths (key tuples) of the subtrees named `prefix_N` in `tree`, depth first."""
  found = []
  for key, value in tree.items():
    if isinstance(value, dict):
      found += ([path + (key,)] if key.rsplit('_', 1)[0] == prefix
                else _paths(value, prefix, path + (key,)))
  return found


def _put(tree: dict, path: tuple, value: Any):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _halves(serial: dict) -> list[str]:
  """A ReversibleSerial's children with parameters, in the order they run."""
  return sorted(serial, key=lambda key: int(key.rsplit('_', 1)[1]))


def _configurable_terraformer(kwargs: dict, walk: _Walk):
  """trax.models.research.terraformer.ConfigurableTerraformer -> ConcatTerraformer.

  Trax's SelfAttention (no biases) -> Full() with zero biases; CausalAttention
  -> Full(); MultiplicativeConvCausalAttention -> SparseQKV(output_layer=
  'none'); ff_sparsity N -> ff_sparsity=N; pos_type None -> positions=
  'learned', 'fixed-base' -> 'fixed_base'.
  """
  # pylint: disable-next=import-outside-toplevel
  from terraflax.models.concat_terraformer import ConcatTerraformer
  sizes, tree = _terraformer_weights(kwargs, walk)
  sparse, specs = sizes['sparse'], sizes['specs']
  tf_kwargs = dict(vocab_size=sizes['input_vocab_size'], d_model=sizes['d_model'],
                   d_ff=sizes['d_ff'], n_encoder_layers=sizes['n_encoder_layers'],
                   n_decoder_layers=sizes['n_decoder_layers'], n_heads=sizes['n_heads'],
                   d_qk=sizes['d_qk'], d_v=sizes['d_v'], dropout=float(kwargs['dropout']),
                   max_len=sizes['max_len'], attention=attn.to_config(specs),
                   n_decoder_attention_layers=sizes['n_decoder_attention_layers'],
                   positions=sizes['positions'], ff_chunk_len=kwargs['ff_chunk_size'] or None)
  if sizes['output_vocab_size'] is not None:
    tf_kwargs['output_vocab_size'] = sizes['output_vocab_size']
  if sparse:
    tf_kwargs.update(sparse)
  model = ConcatTerraformer(**tf_kwargs, mode='eval')
  abstract = _abstract_params(model, n_inputs=2)

  params: dict = {}
  embeddings = _paths(abstract, 'Embedding')
  shared = sizes['output_vocab_size'] is None
  if len(embeddings) != (1 if shared else 2):
    raise TraxConversionError(f'internal: {len(embeddings)} embeddings in the ConcatTerraformer, '
                              f'expected {1 if shared else 2}.')
  concat = _child(abstract, 'ConcatDecoder')
  encoder = (concat, _child(abstract[concat], 'Encoder'))
  decoder = (concat, _child(abstract[concat], 'Decoder'))
  for path in embeddings:
    side = 'in' if shared or path[:2] == encoder else 'out'
    _put(params, path + ('embedding',), tree[f'{side}_embedding'])
  positional = ('PositionalEncoding' if sizes['positions'] == 'learned'
                else 'FixedBasePositionalEncoding')
  for path in _paths(abstract, positional):
    _put(params, path, tree['in_positions' if path[:2] == encoder else 'out_positions'])

  def halves(serial_path, blocks, period):
    """Each half of a scanned ReversibleSerial <- its blocks' weights, stacked per period."""
    serial = _get(abstract, serial_path)
    names = _halves(serial)
    per_block = len(names) // period
    for n, name in enumerate(names):
      j, part = divmod(n, per_block)
      layers = blocks[j::period]
      children = sorted(serial[name])
      if part < per_block - 1:  # An attention half: LayerNorm and the attention layer.
        norm = _child(serial[name], 'LayerNorm')
        (layer,) = [c for c in children if c != norm]
        _put(params, serial_path + (name, norm), _stack([x['halves'][part]['norm']
                                                         for x in layers]))
        _put(params, serial_path + (name, layer), _stack([x['halves'][part]['attention']
                                                          for x in layers]))
      else:  # The feed-forward half: one FeedForward / SparseFeedForward child.
        (layer,) = children
        _put(params, serial_path + (name, layer), _stack([x['ff'] for x in layers]))

  enc = _get(abstract, encoder)
  halves(encoder + (_child(enc, 'ReversibleSerial'),),
         [{'halves': [x], 'ff': x['ff']} for x in tree['encoder']], 1)
  _put(params, encoder + (_child(enc, 'Dense'),), tree['encoder_dense'])
  _put(params, encoder + (_child(enc, 'LayerNorm'),), tree['encoder_norm'])
  dec = _get(abstract, decoder)
  halves(decoder + (_child(dec, 'ReversibleSerial'),),
         [{'halves': x['attention'], 'ff': x['ff']} for x in tree['decoder']], len(specs))
  _put(params, decoder + (_child(dec, 'LayerNorm'),), tree['final_norm'])
  params[_child(abstract, 'Dense')] = tree['head']
  _check_tree(params, abstract)
  return 'ConcatTerraformer', tf_kwargs, params


_CONVERTERS = {'TransformerLM': _transformer_lm, 'ReformerLM': _reformer_lm,
               'ConfigurableTransformerLM': _configurable_lm,
               'ConfigurableTerraformer': _configurable_terraformer}


def from_trax(path: str, *, model: str | None = None, config: Any = None):
  """(terraflax model config {'name': factory, **kwargs}, params) of a Trax checkpoint.

  `path`: a training.Loop output dir (its model.pkl.gz) or a .pkl.gz file
  (Loop's or Layer.save_to_file's). `model`: the Trax factory's name
  ('TransformerLM', 'ReformerLM', 'ConfigurableTransformerLM',
  'ConfigurableTerraformer'), needed when `config` does not say.
  `config`: the Trax factory's keyword arguments (a dict or a JSON string) or
  a gin file; None reads config.gin next to the checkpoint. The optimizer
  slots are dropped. The model config is plain JSON (attention specs as dicts).
  """
  file = checkpoint_file(path)  # A missing checkpoint is reported before a missing config.
  name, kwargs = trax_config(path, model=model, config=config)
  weights = read_weights(path)
  name, tf_kwargs, params = _CONVERTERS[name](kwargs, _Walk(weights, file, name))
  return {'name': name, **tf_kwargs}, params
