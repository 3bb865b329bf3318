"""Cached greedy decoding tokens/s (issue 12), side by side with HF's Reformer.

Models (issue 12's sizes: byte vocabulary, d_model 256, d_ff 1024, 2 layers,
4 heads, float32, max_len 512, dropout 0):
  transformer  `TransformerLM` (full attention, key/value cache)
  reformer     `ReformerLM`, LSH attention (4 hashes, chunk 64, n_buckets=None:
               16 buckets for the 512-position memory), axial positions,
               reversible, FastGelu
  terraformer  `TerraformerLM` with its defaults (sparse QKV, SparseFF 32)

Each decodes `--tokens` tokens (default 256) from an empty prompt at batch 1
and batch 8 with `terraflax.decoding.autoregressive_sample` at temperature 0
(one jitted while-loop over the tokens, the cache updated in place). The
first call (compile + run) is reported separately; then the median of
`--repeats` timed calls. tokens/s = batch * tokens / median seconds.

With `--hf_python=...` the HF peer (`benchmarks/peers/hf_reformer.py --mode
decode`) runs in a subprocess, one at a time, before terraflax's rows at
the same batch: LSH (against `reformer`) and full attention (against
`transformer`), and the ratio is printed.

  python benchmarks/decode_throughput.py [--hf_python=/work/venvs/hf/bin/python]
      [--models transformer,reformer,terraformer] [--batches 1,8] [--tokens 256]
      [--kernels xla]   # without terraflax's native CPU kernels
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

MAX_LEN = 512
SIZE = dict(vocab_size=256, d_model=256, d_ff=1024, n_layers=2, n_heads=4, dropout=0.0,
            max_len=MAX_LEN)
PEER_OF = {'transformer': 'full', 'reformer': 'lsh'}

from train_throughput import cell, load_average, ratio, run_json  # noqa: E402  (benchmarks/ is the script's dir)


def build(name: str, mode: str):
  import terraflax.models as tm  # pylint: disable=import-outside-toplevel
  from terraflax.models.attention import LSH  # pylint: disable=import-outside-toplevel
  if name == 'transformer':
    return tm.TransformerLM(**SIZE, mode=mode)
  if name == 'reformer':
    return tm.ReformerLM(**SIZE, mode=mode, attention=LSH(n_hashes=4, chunk_len=64),
                         positions={'kind': 'axial', 'shape': (16, 32), 'd_embs': (64, 192)},
                         ff_activation='fast_gelu', reversible=True)
  if name == 'terraformer':
    return tm.TerraformerLM(**SIZE, mode=mode)
  raise ValueError(f'--models: unknown model {name!r}; valid: transformer, reformer, terraformer')


def measure(name: str, batch: int, tokens: int, repeats: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from terraflax import decoding  # pylint: disable=import-outside-toplevel

  train = build(name, 'train')
  key = jax.random.key(0)
  params = jax.jit(lambda k: train.init({'params': k, 'hash': k, 'dropout': k, 'sparse': k},
                                        jnp.zeros((1, MAX_LEN), jnp.int32))['params'])(key)
  model = build(name, 'predict')

  def run():
    return decoding.autoregressive_sample(model, params, None, tokens, temperature=0.0,
                                          batch_size=batch, rng=jax.random.key(1))

  start = time.perf_counter()
  first = jax.block_until_ready(run())
  first_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {'library': 'terraflax', 'model': name, 'batch': batch, 'tokens': tokens,
          'tokens_per_sec': batch * tokens / median, 'median_seconds': median,
          'seconds': times, 'first_call_seconds': first_s,
          'same_tokens': bool((out == first).all()), 'error': None}


def hf(python: str, attention: str, batch: int, args) -> dict:
  cmd = [python, os.path.join(HERE, 'peers', 'hf_reformer.py'), '--mode', 'decode',
         '--attention', attention, '--batch', str(batch), '--decode_tokens', str(args.tokens),
         '--length', str(MAX_LEN), '--torch_threads', str(args.torch_threads),
         '--steps', str(args.peer_steps), '--warmup_steps', str(args.peer_warmup)]
  return run_json(cmd, args.timeout)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='transformer,reformer,terraformer')
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--tokens', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--hf_python', default='')
  parser.add_argument('--kernels', choices=('native', 'xla'), default='native',
                      help="'xla': trace decoding inside terraflax.kernels.xla_only() (no native "
                           'CPU kernels), to compare')
  parser.add_argument('--timeout', type=float, default=1200, help='seconds per HF run')
  parser.add_argument('--torch_threads', type=int, default=2, help='HF threads (JAX gets 2 cores)')
  parser.add_argument('--peer_steps', type=int, default=3, help='timed HF decodes (median)')
  parser.add_argument('--peer_warmup', type=int, default=1,
                      help='untimed HF decodes (>= 1: the peer compiles/warms up in the first)')
  args = parser.parse_args()
  models = [m for m in args.models.split(',') if m]
  for m in models:
    if m not in ('transformer', 'reformer', 'terraformer'):
      parser.error(f'--models: unknown {m!r}; valid: transformer, reformer, terraformer')
  batches = [int(b) for b in args.batches.split(',') if b]
  if args.peer_warmup < 1:
    parser.error(f'--peer_warmup must be >= 1, got {args.peer_warmup}.')

  rows = []
  for batch in batches:
    for name in models:
      peer = None
      if args.hf_python and name in PEER_OF:
        peer = hf(args.hf_python, PEER_OF[name], batch, args)
        print(f'# HF {PEER_OF[name]} batch {batch}: {cell(peer)}', flush=True)
      try:
        from terraflax import kernels  # pylint: disable=import-outside-toplevel
        with kernels.xla_only() if args.kernels == 'xla' else contextlib.nullcontext():
          ours = measure(name, batch, args.tokens, args.repeats)
      except Exception as e:  # pylint: disable=broad-except
        ours = {'error': f'{type(e).__name__}: {e}'[:200]}
      load = load_average()
      print(f'# {name} batch {batch}: {cell(ours)} (load {load})', flush=True)
      rows.append((name, batch, ours, peer, load))

  print()
  head = '| model | batch | terraflax tok/s | first call s |'
  sep = '|---|---|---|---|'
  if args.hf_python:
    head += f' HF tok/s ({args.torch_threads} threads, same attention) | ratio |'
    sep += '---|---|'
  print(head + ' load avg |')
  print(sep + '---|')
  for name, batch, ours, peer, load in rows:
    first = '-' if ours.get('error') else f"{ours['first_call_seconds']:.1f}"
    line = f'| {name} | {batch} | {cell(ours)} | {first} |'
    if args.hf_python:
      line += f' {cell(peer)} | {ratio(ours, peer)} |'
    print(line + f' {load} |')


if __name__ == '__main__':
  main()
