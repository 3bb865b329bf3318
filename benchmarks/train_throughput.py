"""Training tokens/s of ReformerLM (issue 12), side by side with Trax and HF's Reformer.

One training step = forward + backward + Adam, through the trainer's own
`make_train_step` (jitted with the state donated and `terraflax.compiler`'s
options, as `train_and_evaluate` does). The configuration is issue 12's: float32, batch 1, byte vocabulary,
d_model 256, d_ff 1024, 2 layers, 4 heads of 64, axial positions (64, 192)
over the most balanced factorisation of the length, reversible layers,
FastGelu feed-forward, dropout 0, Adam at 1e-3, the same random batch every
step. LSH rows: 4 hashes, chunk 64, one chunk back, causal, `n_buckets=None`
(Trax's rule: 1K 32, 4K 128, 16K (32, 16), 64K (64, 32)). Full rows: exact
causal attention run in query chunks (memory linear in the length).

Each measurement runs in its own subprocess (a row's memory is returned to
the machine before the next starts, and a crash or out-of-memory shows as a
table cell). Per row: the Trax peer, the HF peer, then terraflax, one after
the other, never concurrently. terraflax: compile time (lower + compile) is
reported separately; after `--warmup` untimed steps, the median of `--steps`
timed steps (each timed to `block_until_ready`).

  python benchmarks/train_throughput.py                       # terraflax only
  python benchmarks/train_throughput.py \\
      --trax_python=/work/venvs/trax/bin/python --hf_python=/work/venvs/hf/bin/python \\
      --rows=lsh1k,lsh4k,lsh16k,full4k
  python benchmarks/train_throughput.py --rows=big64k          # 12 layers, d_model 512, 64K
  python benchmarks/train_throughput.py --kernels=xla          # without the native CPU kernels

Rows: lsh1k lsh4k lsh16k lsh64k full4k full16k big64k (default: all but big64k;
`--big_64k` adds it). Peers run only for the issue's rows (not big64k).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name: (attention, length, n_layers, d_model, d_ff, n_heads)
ROWS = {
    'lsh1k': ('lsh', 1024, 2, 256, 1024, 4),
    'lsh4k': ('lsh', 4096, 2, 256, 1024, 4),
    'lsh16k': ('lsh', 16384, 2, 256, 1024, 4),
    'lsh64k': ('lsh', 65536, 2, 256, 1024, 4),
    'full4k': ('full', 4096, 2, 256, 1024, 4),
    'full16k': ('full', 16384, 2, 256, 1024, 4),
    'big64k': ('lsh', 65536, 12, 512, 2048, 8),
}
DEFAULT_ROWS = 'lsh1k,lsh4k,lsh16k,lsh64k,full4k,full16k'
PEER_ROWS = {'lsh1k', 'lsh4k', 'lsh16k', 'lsh64k', 'full4k', 'full16k'}


def balanced_axial_shape(length: int) -> tuple[int, int]:
  """(a, b), a * b == length, a the largest divisor <= sqrt(length) (as the peers)."""
  a = int(math.isqrt(length))
  while length % a:
    a -= 1
  return a, length // a


def axial_d_embs(d_model: int) -> tuple[int, int]:
  """(64, 192) at d_model 256, as the peers; the same quarter split otherwise."""
  return d_model // 4, d_model - d_model // 4


# ----------------------------------------------------------------------------- worker


def build_model(attention, length, n_layers, d_model, d_ff, n_heads, mode='train'):
  import terraflax.models as tm  # pylint: disable=import-outside-toplevel
  from terraflax.models.attention import LSH, Full  # pylint: disable=import-outside-toplevel
  spec = (LSH(n_hashes=4, chunk_len=64, n_chunks_before=1, n_chunks_after=0)
          if attention == 'lsh' else Full(query_chunk_len=64))
  return tm.ReformerLM(
      vocab_size=256, d_model=d_model, d_ff=d_ff, n_layers=n_layers, n_heads=n_heads,
      dropout=0.0, max_len=length, mode=mode, attention=spec,
      positions={'kind': 'axial', 'shape': balanced_axial_shape(length),
                 'd_embs': axial_d_embs(d_model)},
      ff_activation='fast_gelu', reversible=True)


def training_setup(row: str, seed: int = 0):
  """(model, batch, optimizer, state, n_params) for one row: a random batch of bytes, Adam 1e-3."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from terraflax import rng as rng_lib  # pylint: disable=import-outside-toplevel
  from terraflax.train import trainer  # pylint: disable=import-outside-toplevel

  attention, length, n_layers, d_model, d_ff, n_heads = ROWS[row]
  model = build_model(attention, length, n_layers, d_model, d_ff, n_heads)
  tokens = np.random.RandomState(seed).randint(0, 256, (1, length)).astype(np.int32)
  batch = {'inputs': jnp.asarray(tokens), 'targets': jnp.asarray(tokens),
           'weights': jnp.ones((1, length), jnp.float32)}
  tx = optax.adam(1e-3)
  params = jax.jit(lambda key: model.init(rng_lib.stream_keys(key),
                                          batch['inputs'])['params'])(jax.random.key(seed))
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=jax.jit(tx.init)(params),
                             rng=jax.random.key_data(jax.random.key(seed + 1)))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  return model, batch, tx, state, n_params


def worker(args) -> dict:
  """Measures one row in this process; returns the result dict."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from terraflax import compiler, kernels  # pylint: disable=import-outside-toplevel
  from terraflax.layers import lsh_hashing  # pylint: disable=import-outside-toplevel
  from terraflax import rng as rng_lib  # pylint: disable=import-outside-toplevel
  from terraflax.train import trainer  # pylint: disable=import-outside-toplevel

  attention, length, n_layers, d_model = ROWS[args.worker][:4]
  model, batch, tx, state, n_params = training_setup(args.worker, args.seed)
  step_fn = jax.jit(trainer.make_train_step(model, tx), donate_argnums=(0,),
                    compiler_options=compiler.options())

  start = time.perf_counter()
  with kernels.xla_only() if args.kernels == 'xla' else contextlib.nullcontext():
    compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp_gib = None if memory is None else memory.temp_size_in_bytes / 2 ** 30

  losses, times = [], []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics['loss_sum'])
    elapsed = time.perf_counter() - start
    if i >= args.warmup:
      times.append(elapsed)
    losses.append(float(metrics['loss_sum']) / length)
  median = statistics.median(times)
  n_buckets = (lsh_hashing.default_n_buckets(length, 64) if attention == 'lsh' else None)
  return {
      'library': 'terraflax', 'row': args.worker, 'attention': attention, 'length': length,
      'n_layers': n_layers, 'd_model': d_model, 'n_params': n_params,
      'n_buckets': list(n_buckets) if isinstance(n_buckets, tuple) else n_buckets,
      'tokens_per_sec': length / median, 'median_step_seconds': median, 'step_seconds': times,
      'compile_seconds': compile_s, 'temp_gib': temp_gib, 'losses': losses,
      'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
      'error': None,
  }


# ----------------------------------------------------------------------------- driver


def last_json_line(text: str):
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def run_json(cmd, timeout, env=None) -> dict:
  """Runs cmd, returns its last JSON line, or {'error': ...} (timeout, crash, OOM kill)."""
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT, check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'timeout ({timeout:.0f} s)'}
  result = last_json_line(proc.stdout)
  if result is None:
    tail = (proc.stderr or '').strip().splitlines()[-3:]
    if proc.returncode in (-9, 137) or any('RESOURCE_EXHAUSTED' in l or 'MemoryError' in l
                                            for l in tail):
      return {'error': 'out of memory', 'detail': ' | '.join(tail)}
    return {'error': f'exit {proc.returncode}', 'detail': ' | '.join(tail)}
  return result


def ours(row, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', row, '--steps', str(args.steps),
         '--warmup', str(args.warmup), '--seed', str(args.seed), '--kernels', args.kernels]
  if args.max_memory_gib:  # Address-space limit: XLA fails to allocate instead of swapping.
    cmd = ['prlimit', f'--as={int(args.max_memory_gib * 2 ** 30)}', '--'] + cmd
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return run_json(cmd, args.timeout, env)


def peer(python, script, row, args, extra=()) -> dict:
  attention, length = ROWS[row][:2]
  cmd = [python, os.path.join(HERE, 'peers', script), '--mode', 'train', '--attention',
         attention, '--length', str(length), '--steps', str(args.peer_steps),
         '--warmup_steps', '2', '--seed', str(args.seed),
         '--max_memory_gib', str(args.peer_max_memory_gib), *extra]
  return run_json(cmd, args.timeout)


def cell(result) -> str:
  if result is None:
    return '-'
  if result.get('error'):
    return 'out of memory' if 'memory' in str(result['error']) else f"error: {result['error']}"
  return f"{result['tokens_per_sec']:.0f}"


def ratio(a, b) -> str:
  if not a or not b or a.get('error') or b.get('error'):
    return '-'
  return f"{a['tokens_per_sec'] / b['tokens_per_sec']:.2f}x"


def load_average() -> str:
  return ', '.join(f'{x:.2f}' for x in os.getloadavg())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', default=DEFAULT_ROWS,
                      help=f'comma-separated subset of {",".join(ROWS)}')
  parser.add_argument('--big_64k', action='store_true',
                      help='add the 12-layer, d_model 512, 64K-token row (big64k)')
  parser.add_argument('--trax_python', default='', help='python of a trax==1.4.1 venv')
  parser.add_argument('--hf_python', default='', help='python of a transformers+torch venv')
  parser.add_argument('--torch_threads', type=int, default=2,
                      help='HF peer threads (the cores JAX uses here)')
  parser.add_argument('--steps', type=int, default=5, help='timed terraflax steps (median)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--peer_steps', type=int, default=5)
  parser.add_argument('--timeout', type=float, default=1800, help='seconds per measurement')
  parser.add_argument('--max_memory_gib', type=float, default=20.0,
                      help='address-space limit of each terraflax measurement (0: none)')
  parser.add_argument('--peer_max_memory_gib', type=float, default=20.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--kernels', choices=('native', 'xla'), default='native',
                      help="'xla': trace the step inside terraflax.kernels.xla_only() (no native "
                           'CPU kernels), to compare')
  parser.add_argument('--json', default='', help='also write all results to this file')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    try:
      result = worker(args)
    except Exception as e:  # pylint: disable=broad-except
      text = f'{type(e).__name__}: {e}'
      oom = 'RESOURCE_EXHAUSTED' in text or isinstance(e, MemoryError) or 'allocat' in text
      result = {'library': 'terraflax', 'row': args.worker,
                'error': 'out of memory' if oom else text[:300]}
    print(json.dumps(result), flush=True)
    return

  rows = [r.strip() for r in args.rows.split(',') if r.strip()]
  if args.big_64k and 'big64k' not in rows:
    rows.append('big64k')
  bad = [r for r in rows if r not in ROWS]
  if bad:
    parser.error(f'--rows: unknown {bad}; valid: {",".join(ROWS)}')

  print(f'# train_throughput (kernels: {args.kernels}): load average before: {load_average()}', flush=True)
  results = []
  for row in rows:
    found = {'row': row}
    if row in PEER_ROWS and args.trax_python:
      found['trax'] = peer(args.trax_python, 'trax_reformer.py', row, args)
      print(f'# {row} trax: {cell(found["trax"])}', flush=True)
    if row in PEER_ROWS and args.hf_python:
      found['hf'] = peer(args.hf_python, 'hf_reformer.py', row, args,
                         ('--torch_threads', str(args.torch_threads)))
      print(f'# {row} hf: {cell(found["hf"])}', flush=True)
    found['terraflax'] = ours(row, args)
    found['load'] = load_average()
    print(f'# {row} terraflax: {cell(found["terraflax"])} (load {found["load"]})', flush=True)
    results.append(found)

  header = '| row | terraflax tok/s | compile s | step s | XLA temp GiB |'
  sep = '|---|---|---|---|---|'
  if args.trax_python:
    header += ' Trax tok/s | vs Trax |'
    sep += '---|---|'
  if args.hf_python:
    header += f' HF tok/s ({args.torch_threads} threads) | vs HF |'
    sep += '---|---|'
  header += ' load avg (1, 5, 15 min) |'
  sep += '---|'
  print()
  print(header)
  print(sep)
  for found in results:
    t = found['terraflax']
    ok = not t.get('error')
    line = (f"| {found['row']} | {cell(t)} | {t['compile_seconds']:.1f} | "
            f"{t['median_step_seconds']:.3f} | {t['temp_gib']:.2f} |" if ok else
            f"| {found['row']} | {cell(t)} | - | - | - |")
    if args.trax_python:
      line += f" {cell(found.get('trax'))} | {ratio(t, found.get('trax'))} |"
    if args.hf_python:
      line += f" {cell(found.get('hf'))} | {ratio(t, found.get('hf'))} |"
    line += f" {found['load']} |"
    print(line)
  print(f'\nload average after: {load_average()}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
