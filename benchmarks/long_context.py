"""A million tokens on one machine (issue 26): memory and speed of one training step by length.

The model is the issue's: `ReformerLM`, d_model 256, d_ff 1024, 4 heads,
LSH attention with 4 hashes and chunk 64 (one chunk back, Trax's bucket
rule), batch 1, byte vocabulary, axial positions over the most balanced
factorisation of the length (d_embs 64 + 192), float32, reversible layers,
ReLU feed-forward, dropout 0, Adam at 1e-3. The step is the trainer's own
(`train.steps.make_train_step`, jitted with the state donated and
`terraflax.compiler`'s options) with `loss_chunk_len` (default 8192: the head
and loss in chunks; 0: the whole logits, the old path).

Per row (a length and a depth), in its own subprocess: XLA's compiled temp
memory (`memory_analysis()`, compile only, allocates little), temp bytes
per token and the native LSH kernels' scratch (`kernels.lsh_cpu.scratch_bytes`, XLA
sees none of it; one workspace per core); with a real step (see below), the peak RSS
(`getrusage` maxrss: the arrays, XLA's temp buffers and the native kernels'
scratch, which XLA does not see), the step time, tokens/s and whether the
loss and the gradients are finite.

Real steps: `--real` runs one for every row; otherwise only rows whose
compiled temp memory is below `--real_below_gib` (default 4 GiB: this
machine's 24 GiB are shared). Do not run `--real` at 1M beside other work.

  python benchmarks/long_context.py                        # 64K..1M x 2, 12 layers
  python benchmarks/long_context.py --lengths=1048576 --layers=2,12 --real
  python benchmarks/long_context.py --check                # 64K: new path == old path
  python benchmarks/long_context.py --loss_chunk_len=0     # the old path (whole logits)

`--check` compares, at `--check_length` (64K), the loss and the gradients
of the step with the head and loss in chunks against the whole logits (the
gradients are read from the step itself: its optimizer keeps them). It
prints the largest relative differences and fails above `--check_rtol`.

Writes `--out` (JSON, default benchmarks/long_context.json) and a plot of
temp bytes per token by length (`--plot`, default benchmarks/long_context.png;
skipped if matplotlib is missing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_LENGTHS = '65536,262144,524288,1048576'
KIB = 1024
GIB = 2 ** 30


def balanced_axial_shape(length: int) -> tuple[int, int]:
  """(a, b), a * b == length, a the largest divisor <= sqrt(length)."""
  a = int(math.isqrt(length))
  while length % a:
    a -= 1
  return a, length // a


# ----------------------------------------------------------------------------- worker


def build(length: int, n_layers: int, args):
  """(model, abstract batch, tx) of the issue's configuration at `length`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import terraflax.models as tm  # pylint: disable=import-outside-toplevel
  from terraflax.models.attention import LSH  # pylint: disable=import-outside-toplevel

  model = tm.ReformerLM(
      vocab_size=256, d_model=256, d_ff=1024, n_layers=n_layers, n_heads=4, dropout=args.dropout,
      max_len=length, attention=LSH(n_hashes=4, chunk_len=64),
      positions={'kind': 'axial', 'shape': balanced_axial_shape(length), 'd_embs': (64, 192)},
      ff_chunk_len=args.ff_chunk_len or None)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens,
           'weights': jax.ShapeDtypeStruct((1, length), jnp.float32)}
  return model, batch, optax.adam(1e-3)


def keep_gradients():
  """An optax transformation whose state is the last gradient and whose update is zero."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  def init(params):
    return jax.tree_util.tree_map(jax.numpy.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree_util.tree_map(jax.numpy.zeros_like, grads), grads

  return optax.GradientTransformation(init, update)


def initial_state(model, length, tx, seed=0):
  """Parameters (initialised on a short input: they do not depend on the length) and `tx`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from terraflax import rng as rng_lib  # pylint: disable=import-outside-toplevel
  from terraflax.train.state import TrainState  # pylint: disable=import-outside-toplevel

  init_len = min(length, 4096)
  params = jax.jit(lambda key: model.init(rng_lib.stream_keys(key),
                                          jnp.zeros((1, init_len), jnp.int32))['params'])(
                                              jax.random.key(seed))
  want = jax.eval_shape(lambda key: model.init(rng_lib.stream_keys(key),
                                               jnp.zeros((1, length), jnp.int32))['params'],
                        jax.random.key(seed))
  assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=jax.jit(tx.init)(params),
                    rng=jax.random.key_data(jax.random.key(seed + 1)))


def random_batch(length, seed=0):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  tokens = jnp.asarray(np.random.RandomState(seed).randint(0, 256, (1, length)), jnp.int32)
  return {'inputs': tokens, 'targets': tokens, 'weights': jnp.ones((1, length), jnp.float32)}


def compiled_step(model, tx, state, batch, loss_chunk_len):
  import jax  # pylint: disable=import-outside-toplevel
  from terraflax import compiler  # pylint: disable=import-outside-toplevel
  from terraflax.train import steps  # pylint: disable=import-outside-toplevel
  step = jax.jit(steps.make_train_step(model, tx, loss_chunk_len=loss_chunk_len),
                 donate_argnums=(0,), compiler_options=compiler.options())
  return step.lower(state, batch).compile()


def worker(args) -> dict:
  """One row (`--worker=LENGTH,LAYERS,REAL`) in this process."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from terraflax import rng as rng_lib  # pylint: disable=import-outside-toplevel
  from terraflax.kernels import lsh_cpu  # pylint: disable=import-outside-toplevel
  from terraflax.train.state import TrainState  # pylint: disable=import-outside-toplevel

  length, n_layers, real = (int(v) for v in args.worker.split(','))
  model, batch, tx = build(length, n_layers, args)
  abstract_params = jax.eval_shape(
      lambda key: model.init(rng_lib.stream_keys(key),
                             jnp.zeros((1, min(length, 4096)), jnp.int32))['params'],
      jax.random.key(0))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=jax.eval_shape(tx.init, abstract_params),
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  start = time.perf_counter()
  compiled = compiled_step(model, tx, abstract, batch, args.loss_chunk_len)
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  scratch = lsh_cpu.scratch_bytes(
      n_hashes=4, padded_length=length, chunk_len=64, d_qk=64, d_v=64, n_chunks_before=1,
      n_chunks_after=0, n_threads=os.cpu_count() or 1)
  row = {'length': length, 'n_layers': n_layers, 'loss_chunk_len': args.loss_chunk_len,
         'ff_chunk_len': args.ff_chunk_len, 'compile_seconds': compile_s,
         'temp_gib': temp / GIB, 'temp_kib_per_token': temp / length / KIB,
         'kernel_scratch_mib': scratch / 2 ** 20}
  if not real:
    return row
  state, data = initial_state(model, length, tx), random_batch(length)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = min(times)
  row.update(
      step_seconds=step_s, tokens_per_sec=length / step_s, step_seconds_all=times,
      loss=float(metrics['loss_sum']) / length,
      finite=bool(int(metrics['nonfinite']) == 0 and math.isfinite(float(metrics['grad_norm']))),
      grad_norm=float(metrics['grad_norm']),
      peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / GIB)
  return row


def check(args) -> dict:
  """Loss and gradients at `check_length`: head and loss in chunks vs the whole logits."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  length = args.check_length
  model, _, _ = build(length, args.check_layers, args)
  tx = keep_gradients()
  data = random_batch(length)
  out = {}
  for name, chunk in (('whole', 0), ('chunked', args.loss_chunk_len or 8192)):
    state = initial_state(model, length, tx)
    compiled = compiled_step(model, tx, state, data, chunk)
    state, metrics = compiled(state, data)
    out[name] = (float(metrics['loss_sum']), jax.device_get(state.opt_state))
  loss_whole, grads_whole = out['whole']
  loss_chunked, grads_chunked = out['chunked']
  worst, where = 0.0, ''
  for (path, g_new), g_old in zip(jax.tree_util.tree_flatten_with_path(grads_chunked)[0],
                                  jax.tree_util.tree_leaves(grads_whole)):
    scale = max(float(np.max(np.abs(g_old))), 1e-30)
    diff = float(np.max(np.abs(np.asarray(g_new) - np.asarray(g_old)))) / scale
    if diff > worst:
      worst, where = diff, jax.tree_util.keystr(path)
  return {'check_length': length, 'n_layers': args.check_layers,
          'loss_whole': loss_whole / length, 'loss_chunked': loss_chunked / length,
          'loss_rel_diff': abs(loss_chunked - loss_whole) / abs(loss_whole),
          'grad_max_rel_diff': worst, 'grad_worst_leaf': where}


# ----------------------------------------------------------------------------- driver


def run_worker(length, n_layers, real, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={length},{n_layers},{int(real)}',
         f'--loss_chunk_len={args.loss_chunk_len}', f'--ff_chunk_len={args.ff_chunk_len}',
         f'--dropout={args.dropout}', f'--steps={args.steps}']
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env,
                          cwd=ROOT, check=False)
  except subprocess.TimeoutExpired:
    return {'length': length, 'n_layers': n_layers, 'error': f'timeout ({args.timeout} s)'}
  for line in reversed(proc.stdout.strip().splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  tail = ' | '.join((proc.stderr or '').strip().splitlines()[-3:])
  error = 'out of memory' if proc.returncode in (-9, 137) else f'exit {proc.returncode}'
  return {'length': length, 'n_layers': n_layers, 'error': error, 'detail': tail}


def fmt(value, spec):
  return '' if value is None else format(value, spec)


def table(rows) -> str:
  lines = ['| tokens | layers | compiled temp GiB | temp KB/token | LSH kernel scratch MiB | '
           'peak RSS GiB | step s | tokens/s | finite |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|:---:|']
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['length']:,} | {r['n_layers']} | {r['error']} | | | | | | |")
      continue
    finite = '' if 'finite' not in r else ('yes' if r['finite'] else 'NO')
    lines.append(
        f"| {r['length']:,} | {r['n_layers']} | {r['temp_gib']:.2f} | "
        f"{r['temp_kib_per_token']:.2f} | {r['kernel_scratch_mib']:.0f} | "
        f"{fmt(r.get('peak_rss_gib'), '.2f')} | "
        f"{fmt(r.get('step_seconds'), '.1f')} | {fmt(r.get('tokens_per_sec'), ',.0f')} | "
        f'{finite} |')
  return '\n'.join(lines)


def plot(rows, path):
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print('matplotlib is not installed: no plot.')
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for n_layers in sorted({r['n_layers'] for r in rows}):
    points = [(r['length'], r['temp_kib_per_token']) for r in rows
              if r['n_layers'] == n_layers and 'error' not in r]
    if points:
      ax.plot(*zip(*sorted(points)), marker='o', label=f'{n_layers} layers')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('tokens per sequence')
  ax.set_ylabel('compiled temp memory, KB per token')
  ax.set_ylim(bottom=0)
  ax.set_title('ReformerLM train step (d_model 256, LSH 4 hashes)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f'wrote {path}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default=DEFAULT_LENGTHS)
  parser.add_argument('--layers', default='2,12')
  parser.add_argument('--real', action='store_true', help='a real step for every row')
  parser.add_argument('--real_below_gib', type=float, default=4.0,
                      help='without --real: real steps only below this compiled temp memory')
  parser.add_argument('--steps', type=int, default=1, help='real steps per row (the fastest)')
  parser.add_argument('--loss_chunk_len', type=int, default=8192, help='0: the whole logits')
  parser.add_argument('--ff_chunk_len', type=int, default=0)
  parser.add_argument('--dropout', type=float, default=0.0)
  parser.add_argument('--check', action='store_true')
  parser.add_argument('--check_length', type=int, default=65536)
  parser.add_argument('--check_layers', type=int, default=2)
  parser.add_argument('--check_rtol', type=float, default=1e-4)
  parser.add_argument('--timeout', type=int, default=3600)
  parser.add_argument('--out', default=os.path.join(HERE, 'long_context.json'))
  parser.add_argument('--plot', default=os.path.join(HERE, 'long_context.png'))
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    print(json.dumps(worker(args)))
    return 0
  if args.check:
    result = check(args)
    print(json.dumps(result, indent=1))
    ok = result['loss_rel_diff'] <= args.check_rtol and result['grad_max_rel_diff'] <= args.check_rtol
    print('check', 'passed' if ok else 'FAILED', f'(rtol {args.check_rtol:g})')
    return 0 if ok else 1
  rows = []
  for length in (int(v) for v in args.lengths.split(',')):
    for n_layers in (int(v) for v in args.layers.split(',')):
      row = run_worker(length, n_layers, False, args)
      if 'error' not in row and (args.real or row['temp_gib'] < args.real_below_gib):
        row = run_worker(length, n_layers, True, args)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(table(rows))
  with open(args.out, 'w') as f:
    json.dump({'rows': rows, 'loss_chunk_len': args.loss_chunk_len,
               'ff_chunk_len': args.ff_chunk_len, 'dropout': args.dropout}, f, indent=1)
  print(f'wrote {args.out}')
  if args.plot:
    plot(rows, args.plot)
  return 0


if __name__ == '__main__':
  sys.exit(main())
