"""Forward+backward time and compiled memory of one LSHSelfAttention layer.

Prints a markdown table: for each length, the seconds of one jitted
value-and-grad step (median of `--repeats` after a warm-up run) and the
compiled temporary memory (`memory_analysis().temp_size_in_bytes`).

With `--decode`, also times 'predict'-mode decoding: the milliseconds per
token of one layer after prompts of several lengths (the memory is a ring
buffer of `--predict_mem_len` positions, so this should not grow).

  python benchmarks/lsh_attention.py [--lengths 1024,4096,16384,65536] [--decode]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import terraflax.layers as tl
from terraflax.layers import lsh_hashing


def lsh_layer(args, mode='train'):
  return tl.LSHSelfAttention(
      n_heads=args.n_heads, d_qk=args.d_model // args.n_heads, d_v=args.d_model // args.n_heads,
      n_hashes=args.n_hashes, chunk_len=args.chunk_len, n_chunks_before=1, n_chunks_after=0,
      causal=args.causal, mode=mode)


def fwd_bwd(layer, length: int, d_model: int, batch: int = 1, repeats: int = 3):
  """(median seconds, temp bytes) of one jitted forward+backward pass of `layer`."""
  x = jax.random.normal(jax.random.key(0), (batch, length, d_model))
  params = layer.init({'params': jax.random.key(1), 'hash': jax.random.key(2)}, x[:, :8])

  def loss(params, x, rng):
    y = layer.apply(params, x, rngs={'hash': rng, 'dropout': rng})
    return jnp.mean(jnp.square(y))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x, jax.random.key(3)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(params, x, jax.random.key(3)))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x, jax.random.key(4 + i)))
    times.append(time.perf_counter() - start)
  return statistics.median(times), temp


def decode_ms_per_token(args, prompt_len: int, n_tokens: int = 64) -> float:
  """Milliseconds per decoded token of one predict-mode layer after `prompt_len` tokens."""
  layer = tl.LSHSelfAttention(
      n_heads=args.n_heads, d_qk=args.d_model // args.n_heads, d_v=args.d_model // args.n_heads,
      n_hashes=args.n_hashes, n_buckets=args.decode_n_buckets, chunk_len=args.chunk_len,
      causal=True, mode='predict', predict_mem_len=args.predict_mem_len)
  x = jax.random.normal(jax.random.key(0), (1, prompt_len + n_tokens, args.d_model))
  variables = jax.jit(layer.init)({'params': jax.random.key(1), 'hash': jax.random.key(2)},
                                  x[:, :1])
  step = jax.jit(lambda variables, x_t: layer.apply(variables, x_t, mutable=['cache']))
  _, state = step(variables, x[:, :prompt_len])  # The prompt, in one call.
  variables = {'params': variables['params'], 'cache': state['cache']}
  jax.block_until_ready(step(variables, x[:, prompt_len:prompt_len + 1]))  # Compile.
  start = time.perf_counter()
  for t in range(prompt_len, prompt_len + n_tokens):
    y, state = step(variables, x[:, t:t + 1])
    variables = {'params': variables['params'], 'cache': state['cache']}
  jax.block_until_ready(y)
  return (time.perf_counter() - start) / n_tokens * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--lengths', default='1024,4096,16384,65536')
  parser.add_argument('--d_model', type=int, default=512)
  parser.add_argument('--n_heads', type=int, default=8)
  parser.add_argument('--n_hashes', type=int, default=2)
  parser.add_argument('--chunk_len', type=int, default=128)
  parser.add_argument('--causal', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--decode', action='store_true')
  parser.add_argument('--prompt_lengths', default='128,1024,4096')
  parser.add_argument('--predict_mem_len', type=int, default=2048)
  parser.add_argument('--decode_n_buckets', type=int, default=32)
  args = parser.parse_args()
  if args.decode:
    print(f'predict mode: one layer, d_model {args.d_model}, {args.n_heads} heads, '
          f'n_hashes {args.n_hashes}, n_buckets {args.decode_n_buckets}, predict_mem_len '
          f'{args.predict_mem_len}')
    print('| prompt length | ms per decoded token |')
    print('|---|---|', flush=True)
    for prompt_len in [int(n) for n in args.prompt_lengths.split(',')]:
      print(f'| {prompt_len} | {decode_ms_per_token(args, prompt_len):.2f} |', flush=True)
    return
  print(f'jax {jax.__version__}, backend {jax.default_backend()}; one LSHSelfAttention layer, '
        f'batch 1, d_model {args.d_model}, {args.n_heads} heads, n_hashes {args.n_hashes}, '
        f'chunk_len {args.chunk_len}, n_chunks_before 1, causal {bool(args.causal)}; '
        'forward+backward (value_and_grad wrt params and input)')
  print('| length | n_buckets | fwd+bwd (s) | temp memory (MiB) |')
  print('|---|---|---|---|', flush=True)
  for length in [int(n) for n in args.lengths.split(',')]:
    seconds, temp = fwd_bwd(lsh_layer(args), length, args.d_model, repeats=args.repeats)
    n_buckets = lsh_hashing.default_n_buckets(length, args.chunk_len)
    print(f'| {length} | {n_buckets} | {seconds:.3f} | {temp / 2**20:.0f} |', flush=True)


if __name__ == '__main__':
  main()
