"""LSH attention benchmarks: 'predict'-mode decoding time per token; fwd+bwd via attention.py.

The forward+backward table of LSH attention (with full and chunked attention
beside it) lives in `benchmarks/attention.py`; without `--decode` this script
prints that table for the LSH kind only.

With `--decode`, times 'predict'-mode decoding: the milliseconds per token of
one layer after prompts of several lengths (the memory is a ring buffer of
`--predict_mem_len` positions, so this should not grow).

  python benchmarks/lsh_attention.py --decode [--prompt_lengths 128,1024,4096]
  python benchmarks/lsh_attention.py [--lengths 1024,4096,16384,65536]
"""

from __future__ import annotations

import argparse
import time

import jax

import attention  # benchmarks/attention.py, beside this script
import terraflax.layers as tl


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
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--lengths', default='1024,4096,16384,65536')
  parser.add_argument('--max_run_gib', type=float, default=4.0)
  parser.add_argument('--decode', action='store_true')
  parser.add_argument('--d_model', type=int, default=512)
  parser.add_argument('--n_heads', type=int, default=8)
  parser.add_argument('--n_hashes', type=int, default=2)
  parser.add_argument('--chunk_len', type=int, default=128)
  parser.add_argument('--prompt_lengths', default='128,1024,4096')
  parser.add_argument('--predict_mem_len', type=int, default=2048)
  parser.add_argument('--decode_n_buckets', type=int, default=32)
  args = parser.parse_args()
  if not args.decode:
    lsh = [name for name in attention.KINDS if name.startswith('lsh')]
    attention.attention_table([int(n) for n in args.lengths.split(',')], args.max_run_gib, lsh)
    return
  print(f'predict mode: one layer, d_model {args.d_model}, {args.n_heads} heads, '
        f'n_hashes {args.n_hashes}, n_buckets {args.decode_n_buckets}, predict_mem_len '
        f'{args.predict_mem_len}')
  print('| prompt length | ms per decoded token |')
  print('|---|---|', flush=True)
  for prompt_len in [int(n) for n in args.prompt_lengths.split(',')]:
    print(f'| {prompt_len} | {decode_ms_per_token(args, prompt_len):.2f} |', flush=True)


if __name__ == '__main__':
  main()
