"""How far 'predict'-mode LSH decoding is from the eval-mode forward pass.

Trains a tiny decoder-only LM (foundation layers + LSHSelfAttention) on the
Reformer duplication task (0 w 0 w over random symbols) with optax, then
compares, position by position, the next-token distributions of

  eval:    one forward pass over the whole sequence (fresh rotations), and
  predict: token-by-token decoding with the layer's ring-buffer cache,

as the mean KL(eval || predict) in nats. For scale it also prints the KL
between two eval passes with different hash rotations, and the accuracy of
eval and predict on the copied half.

  python benchmarks/lsh_predict_kl.py --steps 3000 --vocab 8 --length 32 \
      --chunk_len 4 --n_buckets 16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import terraflax.combinators as cb
import terraflax.layers as tl


def TinyLM(*, vocab: int, d_model: int, n_layers: int,  # pylint: disable=invalid-name
           n_heads: int, n_hashes: int, n_buckets, chunk_len: int, length: int, mode: str):
  """ids (b, l) -> logits (b, l, vocab): ShiftRight, embeddings, LSH blocks, Dense."""
  blocks = []
  for _ in range(n_layers):
    blocks += [
        cb.Residual(tl.LayerNorm(), tl.LSHSelfAttention(
            n_heads=n_heads, d_qk=d_model // n_heads, d_v=d_model // n_heads,
            n_hashes=n_hashes, n_buckets=n_buckets, chunk_len=chunk_len, n_chunks_before=1,
            causal=True, mode=mode, predict_mem_len=length)),
        cb.Residual(tl.FeedForward(d_model=d_model, d_ff=4 * d_model, mode=mode)),
    ]
  return cb.Serial(tl.ShiftRight(mode=mode), tl.Embedding(vocab, d_model),
                   tl.PositionalEncoding(max_len=length, mode=mode), blocks,
                   tl.LayerNorm(), tl.Dense(vocab))


def duplication_batch(rng: np.random.RandomState, batch: int, length: int, vocab: int):
  """0 w 0 w with w uniform over 1..vocab-1; length must be even."""
  w = rng.randint(1, vocab, size=(batch, length // 2 - 1))
  zero = np.zeros((batch, 1), np.int64)
  return np.concatenate([zero, w, zero, w], axis=1).astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--length', type=int, default=64)
  parser.add_argument('--vocab', type=int, default=16)
  parser.add_argument('--d_model', type=int, default=64)
  parser.add_argument('--n_layers', type=int, default=2)
  parser.add_argument('--n_heads', type=int, default=2)
  parser.add_argument('--n_hashes', type=int, default=2)
  parser.add_argument('--n_buckets', type=int, default=16)
  parser.add_argument('--chunk_len', type=int, default=8)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--eval_batch', type=int, default=32)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()

  def make(mode, n_buckets=args.n_buckets):
    return TinyLM(vocab=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                  n_heads=args.n_heads, n_hashes=args.n_hashes, n_buckets=n_buckets,
                  chunk_len=args.chunk_len, length=args.length, mode=mode)

  data = np.random.RandomState(args.seed)
  model = make('train')
  key = jax.random.key(args.seed)
  params = jax.jit(model.init)({'params': key, 'hash': key},
                               jnp.zeros((1, args.length), jnp.int32))['params']
  optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, args.steps))
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, ids, rng):
    def loss_fn(params):
      logits = model.apply({'params': params}, ids, rngs={'hash': rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  for step in range(args.steps):
    ids = jnp.asarray(duplication_batch(data, args.batch, args.length, args.vocab))
    params, opt_state, loss = train_step(params, opt_state, ids, jax.random.fold_in(key, step))
    if step % 100 == 0 or step == args.steps - 1:
      print(f'step {step}: loss {float(loss):.3f}', flush=True)
  print(f'trained {args.steps} steps in {time.perf_counter() - start:.0f}s')

  ids = jnp.asarray(duplication_batch(data, args.eval_batch, args.length, args.vocab))
  eval_model = make('eval')

  @jax.jit
  def eval_log_probs(rng):
    return jax.nn.log_softmax(eval_model.apply({'params': params}, ids, rngs={'hash': rng}))

  predict_model = make('predict')

  @jax.jit
  def predict_log_probs(rng):
    inputs = jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]  # The previous token at each step.
    cache = predict_model.init({'params': rng, 'hash': rng}, inputs[:, :1])['cache']

    def step(cache, token):
      logits, state = predict_model.apply(
          {'params': params, 'cache': cache}, token[:, None], mutable=['cache'])
      return state['cache'], logits[:, 0]

    _, logits = jax.lax.scan(step, cache, inputs.T)
    return jax.nn.log_softmax(jnp.moveaxis(logits, 0, 1))

  def kl(p_log, q_log):
    return float(jnp.mean(jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)))

  def copy_accuracy(log_probs):
    half = args.length // 2 + 1
    return float(jnp.mean(jnp.argmax(log_probs[:, half:], -1) == ids[:, half:]))

  eval_a, eval_b = eval_log_probs(jax.random.key(101)), eval_log_probs(jax.random.key(202))
  predict = predict_log_probs(jax.random.key(303))
  print(f'n_buckets {args.n_buckets}, n_hashes {args.n_hashes}, chunk_len {args.chunk_len}, '
        f'length {args.length}, predict_mem_len {args.length}')
  print(f'copy accuracy: eval {copy_accuracy(eval_a):.3f}, predict {copy_accuracy(predict):.3f}')
  print(f'KL(eval || predict), mean over positions: {kl(eval_a, predict):.4f} nats')
  print(f'KL(eval || eval with other rotations):    {kl(eval_a, eval_b):.4f} nats')
  half = args.length // 2 + 1
  print(f'on the copied half: KL(eval || predict) {kl(eval_a[:, half:], predict[:, half:]):.4f}, '
        f'KL(eval || eval with other rotations) {kl(eval_a[:, half:], eval_b[:, half:]):.4f} nats')


if __name__ == '__main__':
  main()
