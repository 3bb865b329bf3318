"""Int8 and bfloat16 weights read as stored (issue 22): product bandwidth and decode ms/token.

1. The product alone: x (rows, K) @ w (K, M) for the feed-forward matrices of
   the largest TransformerLM (1024 x 16384 and 16384 x 1024), with float32
   weights (XLA), int8 and bfloat16 weights (`terraflax.kernels.lowp_cpu`)
   and int8 on the XLA fallback (`quantization.weight_matmul(kernel='xla')`).
   GB/s = weight bytes / seconds, beside the read bandwidth of a jitted sum
   over 256 MiB measured in the same run.
2. Decoding: `TransformerLM` (vocab 256, 8 heads, max_len 128), greedy
   `autoregressive_sample` at batch 1 from a 1-token prompt, 64 new tokens,
   with `quantization.prepare_for_decoding(weights=f32|bf16|int8)`:
   parameter bytes, ms/token (the fastest of `--repeats` timed calls after a
   compile call), and the speed-up over float32.

  python benchmarks/lowp_decoding.py [--sizes 512,1024] [--repeats 3] [--skip_product]

Sizes: 512 is d_model 512, d_ff 2048, 6 layers; 1024 is d_model 1024,
d_ff 16384, 6 layers (909 MB of float32 parameters).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import terraflax.models as tm  # noqa: E402
from terraflax import compiler  # noqa: E402
from terraflax import decoding  # noqa: E402
from terraflax import quantization as qz  # noqa: E402
from terraflax.kernels import lowp_cpu  # noqa: E402

SIZES = {512: dict(d_model=512, d_ff=2048, n_layers=6),
         1024: dict(d_model=1024, d_ff=16384, n_layers=6)}
COMMON = dict(vocab_size=256, n_heads=8, dropout=0.0, max_len=128)
NEW_TOKENS = 64


def fastest(f, *args, repeats: int) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def product_table(repeats: int):
  big = jnp.ones((64 * 2**20,), jnp.float32)
  seconds = fastest(jax.jit(jnp.sum), big, repeats=repeats)
  print(f'Read bandwidth (jitted sum over 256 MiB): {big.nbytes / seconds / 1e9:.1f} GB/s\n')
  del big
  print('| rows | K x M | f32 (XLA) | int8 (kernel) | bf16 (kernel) | int8 (XLA fallback) |')
  print('|---|---|---|---|---|---|')
  rng = np.random.default_rng(0)
  jit = lambda f: jax.jit(f, compiler_options=compiler.options())  # noqa: E731
  for rows in (1, 8):
    for k, m in ((1024, 16384), (16384, 1024)):
      x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
      w = jnp.asarray(rng.normal(size=(k, m)), jnp.float32)
      q, scale = qz.quantize(w, axis=0)
      w16 = w.astype(jnp.bfloat16)
      cells = []
      for f, args, nbytes in (
          (jit(jnp.matmul), (x, w), w.nbytes),
          (jit(lowp_cpu.matmul), (x, q, scale), q.nbytes),
          (jit(lowp_cpu.matmul), (x, w16), w16.nbytes),
          (jit(lambda x, q, s: qz.weight_matmul(x, q, s, kernel='xla')), (x, q, scale),
           q.nbytes)):
        seconds = fastest(f, *args, repeats=repeats)
        cells.append(f'{seconds * 1e3:.2f} ms, {nbytes / seconds / 1e9:.1f} GB/s')
      print(f'| {rows} | {k} x {m} | ' + ' | '.join(cells) + ' |')
  print()


def decode_table(sizes, repeats: int):
  print('| TransformerLM | weights | parameter bytes | ms / token | vs f32 |')
  print('|---|---|---|---|---|')
  for size in sizes:
    hyper = dict(SIZES[size], **COMMON)
    model = tm.TransformerLM(mode='predict', **hyper)
    prompt = jnp.ones((1, 1), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), prompt)['params']
    base = None
    for weights in qz.WEIGHTS:
      context, prepared = qz.prepare_for_decoding(model, params, weights=weights)
      with context:
        seconds = fastest(lambda p: decoding.autoregressive_sample(
            model, p, prompt, NEW_TOKENS, temperature=0.0), prepared, repeats=repeats)
      ms = seconds * 1e3 / NEW_TOKENS
      base = base or ms
      name = f'd_model {hyper["d_model"]}, d_ff {hyper["d_ff"]}, {hyper["n_layers"]} layers'
      print(f'| {name} | {weights} | {qz.nbytes(prepared) / 1e6:.0f} MB | {ms:.2f} | '
            f'{base / ms:.2f}x |', flush=True)
      del prepared
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='512', help='comma-separated: 512, 1024')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--skip_product', action='store_true')
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(',')]
  if unknown := [s for s in sizes if s not in SIZES]:
    parser.error(f'--sizes: unknown {unknown}; valid: {sorted(SIZES)}')
  if not lowp_cpu.available():
    sys.exit('the native kernel could not be built (see the warning)')
  print(f'{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average '
        f'{os.getloadavg()[0]:.1f}\n')
  if not args.skip_product:
    product_table(args.repeats)
  decode_table(sizes, args.repeats)


if __name__ == '__main__':
  main()
