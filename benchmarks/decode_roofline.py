"""Decoding against the memory-bandwidth floor (issue 22).

Batch-1 decoding of a dense model reads every weight once per token, so its
floor is (parameter bytes) / (memory read bandwidth). The bandwidth of this
shared machine swings (a jitted `x.sum()` over 256 MiB reads 23-40 GB/s from
one minute to the next), so it is measured in the same run, paired with each
timed call: every round takes the best of 3 `x.sum()` and then one decoding
call, and a round's share is its floor at that bandwidth / its time. Decoding
is
`terraflax.decoding.autoregressive_sample` (greedy, prompt of 1 token,
`--tokens` new tokens, `max_len` 128, dropout 0), on weights prepared once
before the timed calls: quantized (`--weights`) and split per layer
(`decoding.split_weights`, as a caller decoding many times would; without
it every call copies the stacked weights and its loop reads the copies
slower: `--no-split` measures that):

  GB/s       median bandwidth of the `--repeats` rounds (after a first,
             compiling call)
  ms/token   median wall time of the rounds' calls / new tokens
  floor      parameter bytes / GB/s; share: the median of the rounds'
             shares (each round's floor / its ms per token)
  read       the parameter bytes a decoding step actually reads: all of
             them for dense models; a Terraformer's SparseFF reads only
             the chosen unit of each block (at most batch / block of its
             `kernel_in`, `kernel_out`, `bias_in` rows), so it has a second
             floor, read / bandwidth, and its share of it. Caches (keys and
             values, at most max_len positions) are not counted.

Models (vocabulary 256, 8 heads): `transformer-DxFxL` (TransformerLM with
d_model D, d_ff F, L layers; the issue's three sizes by default),
`reformer-DxFxL` (ReformerLM: LSH attention, 4 hashes, chunk 64, reversible)
and `terraformer-DxFxL` (TerraformerLM with its defaults: sparse QKV,
SparseFF with blocks of 32). Weights: `f32`, and `bf16` / `int8` through
`terraflax.quantization.prepare_for_decoding` (rows are skipped with a note
when this checkout has no such function).

  python benchmarks/decode_roofline.py [--models transformer-512x2048x6,...]
      [--weights f32,bf16,int8] [--batches 1,8] [--tokens 64] [--repeats 5]
      [--json benchmarks/decode_roofline.json]
  # quick: --models transformer-512x2048x6 --batches 1 --weights f32

Prints a markdown table and writes the rows as JSON (default: next to this
file). Timings on a machine shared with other work are indicative only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import terraflax.models as tm  # noqa: E402
from terraflax import decoding  # noqa: E402
from terraflax.models.attention import LSH  # noqa: E402

DEFAULT_MODELS = ('transformer-1024x16384x6', 'transformer-1024x4096x12', 'transformer-512x2048x6',
                  'reformer-512x2048x6', 'terraformer-512x2048x6', 'terraformer-1024x16384x6')
KINDS = ('transformer', 'reformer', 'terraformer')
MAX_LEN = 128
VOCAB = 256
BANDWIDTH_BYTES = 256 * 2**20
SPARSE_ROWS = ('kernel_in', 'kernel_out', 'bias_in')  # SparseFF's per-unit rows


def parse_model(name: str):
  """'transformer-1024x4096x12' -> ('transformer', 1024, 4096, 12), with a clear error."""
  kind, _, size = name.partition('-')
  try:
    d_model, d_ff, n_layers = (int(v) for v in size.split('x'))
  except ValueError:
    d_model = None
  if kind not in KINDS or d_model is None:
    raise SystemExit(f'--models: {name!r} is not KIND-DxFxL with KIND one of {KINDS} '
                     '(e.g. transformer-512x2048x6).')
  return kind, d_model, d_ff, n_layers


def build(kind: str, d_model: int, d_ff: int, n_layers: int, mode: str):
  size = dict(vocab_size=VOCAB, d_model=d_model, d_ff=d_ff, n_layers=n_layers, n_heads=8,
              dropout=0.0, max_len=MAX_LEN, mode=mode)
  if kind == 'transformer':
    return tm.TransformerLM(**size)
  if kind == 'reformer':
    return tm.ReformerLM(**size, attention=LSH(n_hashes=4, chunk_len=64), reversible=True)
  return tm.TerraformerLM(**size)


def bandwidth_probe():
  """A function returning the bytes/s of the best of `n` jitted sums over 256 MiB of float32."""
  x = jnp.ones((BANDWIDTH_BYTES // 4,), jnp.float32)
  total = jax.jit(lambda x: x.sum())
  total(x).block_until_ready()

  def measure(n: int = 3) -> float:
    best = float('inf')
    for _ in range(n):
      start = time.perf_counter()
      total(x).block_until_ready()
      best = min(best, time.perf_counter() - start)
    return BANDWIDTH_BYTES / best
  return measure


def nbytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(tree)))


def bytes_read(params, batch: int, block: int | None) -> int:
  """Parameter bytes one decoding step reads (SparseFF: the chosen rows only)."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    size = np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape))
    names = [str(getattr(k, 'key', k)) for k in path]
    if block and any(name.startswith(SPARSE_ROWS) for name in names[-2:]):
      size = int(size * min(1.0, batch / block))
    total += size
  return total


def low_precision(model, params, weights: str):
  """(context, params) for the weights kind, or None with the reason."""
  if weights == 'f32':
    return contextlib.nullcontext(), params, None
  try:
    from terraflax import quantization  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, None, f'no terraflax.quantization ({e})'
  prepare = getattr(quantization, 'prepare_for_decoding', None)
  if prepare is None:
    return None, None, 'terraflax.quantization has no prepare_for_decoding'
  context, params = prepare(model, params, weights=weights)
  return context, params, None


def split(model, params):
  """`decoding.split_weights(model, params)`, or params unchanged where this checkout lacks it."""
  split_weights = getattr(decoding, 'split_weights', None)
  return params if split_weights is None else split_weights(model, params)


def time_decoding(model, params, context, batch: int, tokens: int, repeats: int,
                  measure_bandwidth):
  """(first call s, [(bandwidth B/s, call s)] per round) of greedy decoding `tokens` tokens.

  Each round measures the bandwidth just before its call, so both see the same load.
  """
  prompt = jnp.ones((batch, 1), jnp.int32)

  def run():
    with context:
      out = decoding.autoregressive_sample(model, params, prompt, tokens, temperature=0.0)
    return jax.block_until_ready(out)

  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  rounds = []
  for _ in range(repeats):
    bandwidth = measure_bandwidth()
    start = time.perf_counter()
    run()
    rounds.append((bandwidth, time.perf_counter() - start))
  return first, rounds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(DEFAULT_MODELS))
  parser.add_argument('--weights', default='f32,bf16,int8')
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--tokens', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json', default=os.path.join(HERE, 'decode_roofline.json'))
  parser.add_argument('--no-split', dest='split', action='store_false',
                      help='pass the parameters as they are (split inside every call)')
  args = parser.parse_args()
  models = [parse_model(m) for m in args.models.split(',') if m]
  weights_kinds = [w for w in args.weights.split(',') if w]
  for w in weights_kinds:
    if w not in ('f32', 'bf16', 'int8'):
      raise SystemExit(f'--weights: {w!r} is not one of f32, bf16, int8.')
  batches = [int(b) for b in args.batches.split(',') if b]
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs; greedy, '
        f'prompt 1, {args.tokens} new tokens, max_len {MAX_LEN}, median of {args.repeats} rounds '
        '(bandwidth, then a call)',
        flush=True)
  print('| model | weights | batch | param MB | read MB | GB/s | ms/token | floor ms | share '
        '| read floor ms | share of read floor | first call s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|', flush=True)
  rows = []
  measure_bandwidth = bandwidth_probe()
  for kind, d_model, d_ff, n_layers in models:
    name = f'{kind}-{d_model}x{d_ff}x{n_layers}'
    model = build(kind, d_model, d_ff, n_layers, 'predict')
    params32 = nn.meta.unbox(build(kind, d_model, d_ff, n_layers, 'eval').init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
    block = 32 if kind == 'terraformer' else None
    for weights in weights_kinds:
      context, params, why_not = low_precision(model, params32, weights)
      if why_not:
        print(f'| {name} | {weights} | - | skipped: {why_not} |', flush=True)
        continue
      decode_params = split(model, params) if args.split else params
      for batch in batches:
        first, rounds = time_decoding(model, decode_params, context, batch, args.tokens,
                                      args.repeats, measure_bandwidth)
        param_bytes, read = nbytes(params), bytes_read(params, batch, block)
        bandwidth = statistics.median(bw for bw, _ in rounds)
        ms = statistics.median(t for _, t in rounds) / args.tokens * 1e3
        floor, read_floor = param_bytes / bandwidth * 1e3, read / bandwidth * 1e3
        share = statistics.median(param_bytes / bw / (t / args.tokens) for bw, t in rounds)
        read_share = statistics.median(read / bw / (t / args.tokens) for bw, t in rounds)
        row = dict(model=name, weights=weights, batch=batch, param_bytes=param_bytes,
                   bytes_read=read, bandwidth_gb_s=bandwidth / 1e9, ms_per_token=ms,
                   floor_ms=floor, share=share, read_floor_ms=read_floor,
                   read_share=read_share, first_call_s=first, tokens=args.tokens,
                   split_weights=args.split,
                   rounds=[dict(bandwidth_gb_s=bw / 1e9, ms_per_token=t / args.tokens * 1e3)
                           for bw, t in rounds])
        rows.append(row)
        print(f'| {name} | {weights} | {batch} | {param_bytes / 1e6:.1f} | {read / 1e6:.1f} | '
              f'{bandwidth / 1e9:.1f} | {ms:.2f} | {floor:.2f} | {share:.0%} | '
              f'{read_floor:.2f} | {read_share:.0%} | {first:.1f} |', flush=True)
      del params, decode_params
  with open(args.json, 'w') as f:
    json.dump(dict(jax=jax.__version__, cpus=os.cpu_count(), max_len=MAX_LEN, vocab=VOCAB,
                   rows=rows), f, indent=1)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
