"""Does float rounding in the reversible backward pass flip SparseFF choices?

The reversible backward pass rebuilds each block's inputs as (x1 + f) - f,
exact only up to float32 rounding; a SparseFF controller's argmax over
nearly tied logits can then pick another unit when the block is recomputed.
This script builds the Terraformer's two-stream stack (causal attention +
SparseFF blocks, scanned) twice with the same parameters:

  no replay   ReversibleHalfResidual(SparseFF): choices recomputed from the
              rebuilt inputs;
  replay      the model's wiring (`terraflax.layers.sparse_reversible`): the
              forward pass records its choices and the backward pass reuses them;

and prints, over several parameter initialisations, for eval-style argmax
and train-style Gumbel choices, how many tokens `reverse` rebuilds with an
error above 1e-3 and the largest error, and the relative error (global
norm) of the reversible gradients against plain autodiff of the same stack
(`reversible=False`).

  python benchmarks/sparse_reversible.py [--d_model 64 --d_ff 2048 --n_layers 6 --seeds 8]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import terraflax.combinators as cb
from terraflax.models.attention import Full, SelfAttention
from terraflax.models.terraformer import (
    FeedForwardBranch, _attention_half, _feed_forward_half, _two_streams)


def build(args, mode, replay, reversible):
  """[x] -> [merged]: Dup (and the record), the scanned stack, MergeStreams('concat')."""
  attention = SelfAttention(Full(), n_heads=4, d_qk=None, d_v=None, causal=True, dropout=0.0,
                            max_len=args.length, mode=mode)
  ff = dict(d_model=args.d_model, d_ff=args.d_ff, dropout=0.0, mode=mode,
            ff_temperature=args.temperature, ff_quant_prob=args.quant_prob)
  if replay:
    ff_half = _feed_forward_half(args.n_elements_in_block, **ff)
  else:
    ff_half = [cb.ReversibleHalfResidual(
        FeedForwardBranch(ff_sparsity=args.n_elements_in_block, **ff)), cb.ReversibleSwap()]
  block = [_attention_half(attention, n_context=0, recording=replay, dropout=0.0, mode=mode),
           cb.ReversibleSwap(), ff_half]
  return cb.Serial(_two_streams(block, n_layers=args.n_layers, reversible=reversible,
                                merge_streams='concat', d_ff=args.d_ff,
                                ff_sparsity=args.n_elements_in_block if replay else None))


def measure(args, mode, replay):
  """(seeds with a badly rebuilt token, bad tokens, max rebuild error, max gradient error)."""
  x = jax.random.normal(jax.random.key(1), (args.batch, args.length, args.d_model))
  rngs = {'sparse': jax.random.key(5), 'dropout': jax.random.key(6)}
  model = build(args, mode, replay, True)
  stack = model.layers[-3 if replay else -2]  # the ReversibleSerial
  init = jax.jit(lambda key: model.init({'params': key, **rngs}, x)['params'])
  start = [x, x]
  if replay:
    start += [jnp.zeros((), jnp.int32),
              jnp.full((args.n_layers, args.batch, args.length,
                        args.d_ff // args.n_elements_in_block), -1, jnp.int8)]

  @jax.jit
  def rebuild_error(p):
    """Max error per token of the stack's inputs rebuilt from its outputs."""
    outputs = stack.apply({'params': p}, *start, rngs=rngs)
    rebuilt = stack.apply({'params': p}, *outputs, rngs=rngs, method='reverse')
    return jnp.maximum(jnp.abs(rebuilt[0] - x).max(-1), jnp.abs(rebuilt[1] - x).max(-1))

  def loss(p, reversible):
    y = build(args, mode, replay, reversible).apply({'params': p}, x, rngs=rngs)
    return jnp.sum(jnp.sin(y))

  grads = [jax.jit(jax.grad(lambda p, r=r: loss(p, r))) for r in (True, False)]
  bad_seeds = bad_tokens = 0
  worst = grad_error = 0.0
  for seed in range(args.seeds):
    params = init(jax.random.key(seed))
    err = rebuild_error(params[stack.name])
    g_rev, g_plain = (g(params) for g in grads)
    diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree_util.tree_leaves(g_rev),
                                                             jax.tree_util.tree_leaves(g_plain)))
    norm = sum(float(jnp.sum(b ** 2)) for b in jax.tree_util.tree_leaves(g_plain))
    n_bad = int((err > 1e-3).sum())
    bad_seeds += n_bad > 0
    bad_tokens += n_bad
    worst = max(worst, float(err.max()))
    grad_error = max(grad_error, (diff / norm) ** 0.5)
  return bad_seeds, bad_tokens, worst, grad_error


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--d_model', type=int, default=64)
  parser.add_argument('--d_ff', type=int, default=2048)
  parser.add_argument('--n_elements_in_block', type=int, default=32)
  parser.add_argument('--n_layers', type=int, default=6)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--temperature', type=float, default=1.0, help='Gumbel temperature (train)')
  parser.add_argument('--quant_prob', type=float, default=1.0,
                      help='probability of the hard mask per call in train mode (1: always)')
  parser.add_argument('--seeds', type=int, default=8, help='parameter initialisations to try')
  args = parser.parse_args()
  tokens = args.batch * args.length
  print(f'jax {jax.__version__}; {args.n_layers} blocks, d_model {args.d_model}, d_ff '
        f'{args.d_ff}, {args.n_elements_in_block} units per block, {tokens} tokens; train: '
        f'temperature {args.temperature}, quant_prob {args.quant_prob}')
  print(f'{args.seeds} parameter initialisations each; a token is badly rebuilt when its '
        'rebuilt stack input is off by more than 1e-3')
  print('| choices | replay | inits with a badly rebuilt token | badly rebuilt tokens (all inits) '
        '| max rebuild error | max gradient error vs plain autodiff (rel., global norm) |')
  print('|---|---|---|---|---|---|')
  for mode, what in (('eval', 'argmax (eval)'), ('train', 'Gumbel (train)')):
    for replay in (False, True):
      bad_seeds, bad, worst, grad = measure(args, mode, replay)
      print(f'| {what} | {"yes" if replay else "no"} | {bad_seeds} of {args.seeds} | {bad} of '
            f'{tokens * args.seeds} | {worst:.2e} | {grad:.2e} |', flush=True)


if __name__ == '__main__':
  np.set_printoptions(precision=3)
  main()
