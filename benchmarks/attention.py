"""Attention speed and memory, and cached vs uncached decoding. Prints markdown tables.

Table 1: forward+backward time and compiled temporary memory of one causal
self-attention layer (batch 1, 8 heads, d_model 512) per attention kind --
full, query-chunked and LSH (Reformer: 2 hash rounds, chunks of 128, Trax's
bucket rule) -- over lengths 1K..64K, then each kind's growth from 4K to 16K.
Memory is `jax.jit(f).lower(...).compile().memory_analysis()
.temp_size_in_bytes` (compiling allocates nothing); a kind whose compiled
memory exceeds --max_run_gib is compiled but not run: the table says 'out of
memory (skipped)'. Kinds whose time is quadratic in the length (full and
chunked) are also not run where their time extrapolated from the previous
length exceeds --max_run_seconds.
Add a kind with one entry in `KINDS`.

Table 2: per-token time of greedy decoding with `TransformerLM` (2 layers,
d_model 256, batch 1): the predict-mode cache (`terraflax.decoding`) vs
re-running the model on the whole prefix for every token.

  python benchmarks/attention.py [--lengths 1024,4096,16384,65536] [--kinds full,lsh]
      [--max_run_gib 4] [--max_run_seconds 300] [--decode_tokens 256] [--skip_attention]
      [--skip_decode]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import terraflax.layers as tl
import terraflax.models as tm
from terraflax import decoding

D_MODEL, N_HEADS, BATCH = 512, 8, 1

# name -> factory of a (b, l, d) -> (b, l, d) causal attention layer.
KINDS = {
    'full': lambda: tl.CausalAttention(n_heads=N_HEADS, mode='train'),
    'chunked (512)': lambda: tl.CausalAttention(n_heads=N_HEADS, chunk_len=512, mode='train'),
    'lsh (2 hashes, chunk 128)': lambda: tl.LSHSelfAttention(
        n_heads=N_HEADS, d_qk=D_MODEL // N_HEADS, d_v=D_MODEL // N_HEADS, n_hashes=2,
        chunk_len=128, n_chunks_before=1, causal=True, mode='train'),
}
QUADRATIC_TIME = ('full', 'chunked (512)')


def timed(f, *args, repeats: int, warm_up: bool = True) -> float:
  """Median seconds of `f(*args)` (after one warm-up call)."""
  if warm_up:
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def attention_row(make_layer, length: int, max_run_bytes: float, run: bool = True):
  """(temp bytes, seconds or None) of value_and_grad of one layer at `length`."""
  layer = make_layer()
  x = jax.random.normal(jax.random.key(0), (BATCH, length, D_MODEL))
  rngs = {'params': jax.random.key(1), 'dropout': jax.random.key(2), 'hash': jax.random.key(3)}
  variables = jax.jit(layer.init)(rngs, x[:, :16])  # Parameters do not depend on the length.

  def loss(variables, x):
    return jnp.mean(jnp.square(layer.apply(variables, x, rngs=rngs)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(variables, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  if temp > max_run_bytes or not run:
    return temp, None
  short = length <= 4096  # Long runs: one timed call of the already compiled step.
  return temp, timed(compiled, variables, x, repeats=3 if short else 1, warm_up=short)


def attention_table(lengths, max_run_gib: float, kinds, max_run_seconds: float = 300.0):
  print(f'jax {jax.__version__}, backend {jax.default_backend()}; causal self-attention layer, '
        f'batch {BATCH}, {N_HEADS} heads, d_model {D_MODEL}; forward+backward (value_and_grad).')
  print('| kind | length | fwd+bwd time (s) | compiled temp memory (MiB) |')
  print('|---|---|---|---|')
  results = {}
  for name in kinds:
    last = None  # (length, seconds) of the last run
    for length in lengths:
      estimate = None
      if name in QUADRATIC_TIME and last is not None:
        estimate = last[1] * (length / last[0]) ** 2
      run = estimate is None or estimate <= max_run_seconds
      temp, seconds = attention_row(KINDS[name], length, max_run_gib * 2**30, run)
      results[name, length] = temp, seconds
      if seconds is not None:
        shown, last = f'{seconds:.3f}', (length, seconds)
      elif temp > max_run_gib * 2**30:
        shown = f'out of memory (skipped, > {max_run_gib:g} GiB)'
      else:
        shown = f'skipped (~{estimate:.0f} s extrapolated)'
      print(f'| {name} | {length} | {shown} | {temp / 2**20:.0f} |', flush=True)
  if 4096 in lengths and 16384 in lengths:
    print('\nGrowth from 4K to 16K tokens (4x the length):')
    for name in kinds:
      (m4, t4), (m16, t16) = results[name, 4096], results[name, 16384]
      time_growth = f'{t16 / t4:.1f}x' if t4 and t16 else 'n/a (not run)'
      print(f'- {name}: time {time_growth}, memory {m16 / m4:.1f}x')


def decode_table(n_tokens: int):
  config = dict(vocab_size=256, d_model=256, d_ff=1024, n_layers=2, n_heads=4, dropout=0.0,
                max_len=n_tokens)
  eval_model = tm.TransformerLM(mode='eval', **config)
  predict_model = tm.TransformerLM(mode='predict', **config)
  params = jax.jit(eval_model.init)(jax.random.key(0), jnp.zeros((1, n_tokens), jnp.int32))
  params = params['params']

  def cached():
    return decoding.autoregressive_sample(predict_model, params, None, n_tokens, temperature=0.0,
                                          batch_size=1)

  # Prefix lengths are rounded up to a power of two (static shapes; causal, so the
  # padding after the prefix changes nothing): at most 2x the work of the exact prefix.
  buckets = [2 ** i for i in range(max(n_tokens - 1, 1).bit_length())] + [n_tokens]
  buckets = sorted({min(size, n_tokens) for size in buckets})

  @jax.jit
  def recompute(params):
    """Greedy decoding that re-runs the model on the whole prefix for every token."""
    def logits_at(size, tokens, position):
      logits = eval_model.apply({'params': params}, tokens[:, :size])
      return jax.lax.dynamic_index_in_dim(logits[0], position, keepdims=False)

    def body(position, tokens):
      bucket = jnp.searchsorted(jnp.array(buckets), position + 1)
      logits = jax.lax.switch(bucket, [lambda t, p, size=size: logits_at(size, t, p)
                                       for size in buckets], tokens, position)
      return tokens.at[0, position].set(jnp.argmax(logits).astype(jnp.int32))
    return jax.lax.fori_loop(0, n_tokens, body, jnp.zeros((1, n_tokens), jnp.int32))

  with_cache = timed(cached, repeats=5)
  without = timed(recompute, params, repeats=2)
  same = bool(np.array_equal(np.asarray(cached()), np.asarray(recompute(params))))
  print(f'\nTransformerLM ({config}), batch 1, greedy, {n_tokens} tokens; the uncached baseline '
        f're-runs the eval-mode model on the prefix (rounded up to a power of two) for every '
        f'token. Same tokens: {same}.')
  print('| decoding | per-token time (ms) | tokens/s | speed-up |')
  print('|---|---|---|---|')
  print(f'| KV cache (predict mode) | {1e3 * with_cache / n_tokens:.3f} | '
        f'{n_tokens / with_cache:.0f} | {without / with_cache:.1f}x |')
  print(f'| re-run prefix (eval mode) | {1e3 * without / n_tokens:.3f} | '
        f'{n_tokens / without:.0f} | 1.0x |')


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--lengths', default='1024,4096,16384,65536')
  parser.add_argument('--kinds', default='full,chunked,lsh',
                      help='comma-separated prefixes of the KINDS names')
  parser.add_argument('--max_run_gib', type=float, default=4.0,
                      help='compile but do not run a kind that needs more temp memory')
  parser.add_argument('--max_run_seconds', type=float, default=300.0,
                      help='do not run a quadratic kind whose extrapolated time is longer')
  parser.add_argument('--decode_tokens', type=int, default=256)
  parser.add_argument('--skip_attention', action='store_true')
  parser.add_argument('--skip_decode', action='store_true')
  args = parser.parse_args()
  if not args.skip_attention:
    kinds = [name for prefix in args.kinds.split(',') for name in KINDS
             if name.startswith(prefix)]
    attention_table([int(n) for n in args.lengths.split(',')], args.max_run_gib, kinds,
                    args.max_run_seconds)
  if not args.skip_decode:
    decode_table(args.decode_tokens)


if __name__ == '__main__':
  main()
