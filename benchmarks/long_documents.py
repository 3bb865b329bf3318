"""Long documents: what a training step of the retrieval task and an LSH decode step cost.

Two markdown tables (issue 26: "usable, not only allocatable").

Table 1 (`--section train`): XLA's compiled temporary memory
(`memory_analysis()`, compiling allocates nothing) and FLOPs of one training
step (forward, backward, Adam) of configs/long_retrieval.py's model at
`--train_length` tokens (batch 1), and of the same model with its LSH layer
replaced by full attention (all queries at once, and 64 at a time). Full
attention's quadratic memory does not fit this 24 GiB machine at 64K; the
query-chunked one fits but costs the FLOPs shown.

Table 2 (`--section decode`): predict-mode `ReformerLM` (byte vocabulary,
d_model 256, d_ff 1024, 4 heads, 2 layers, LSH 4 hashes, chunk 64, axial
positions, float32, batch 1) with `predict_mem_len` m in `--mem_lens`: the
bytes of the decoding cache, the compiled temporary memory of one decode step
(cache donated, updated in place) and the median per-token time of
`--tokens` single-token calls. LSH decoding reads every slot of its ring
memory for each token (`layers/lsh_decoding.py`), so the per-token time is
that of a full memory from the first token on; the floor is the cache bytes
over the machine's ~30 GB/s.

  python benchmarks/long_documents.py [--section train,decode] [--train_length 65536]
      [--mem_lens 4096,65536,262144] [--tokens 16]

`--plot WORKDIR` instead draws a run's eval/accuracy against the step, with
its eval/chance line, into `--out` (docs/images/26_long_retrieval.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

import terraflax.models as tm  # noqa: E402
from terraflax import compiler  # noqa: E402
from terraflax import rng as rng_lib  # noqa: E402
from terraflax.models.attention import LSH, Full  # noqa: E402
from terraflax.train import config as config_lib  # noqa: E402
from terraflax.train import evaluation  # noqa: E402
from terraflax.train import steps as steps_lib  # noqa: E402
from terraflax.train import trainer  # noqa: E402

GIB = 2 ** 30
DECODE_SIZE = dict(vocab_size=256, d_model=256, d_ff=1024, n_layers=2, n_heads=4, dropout=0.0)


def task_model_kwargs(length: int, attention=None) -> dict:
  """configs/long_retrieval.py's model at `length` (its LSH attention replaced by `attention`)."""
  config = config_lib.load_sibling(os.path.join(ROOT, 'configs', 'x.py'), 'long_retrieval')
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
  kwargs['max_len'] = length
  if attention is not None:
    kwargs['attention'] = attention
  return kwargs


def abstract_train_step(model, length: int):
  """(compiled temp bytes, FLOPs) of one Adam step of `model` on (1, length) tokens, abstractly."""
  tx = optax.adam(1e-3)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens,
           'weights': jax.ShapeDtypeStruct((1, length), jnp.float32)}
  params = jax.eval_shape(lambda k, x: nn.meta.unbox(model.init(rng_lib.stream_keys(k), x))[
      'params'], jax.random.key(0), tokens)
  state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                             opt_state=jax.eval_shape(tx.init, params),
                             rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  step = jax.jit(trainer.make_train_step(model, tx), donate_argnums=(0,),
                 compiler_options=compiler.options())
  compiled = step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  return (None if memory is None else memory.temp_size_in_bytes), steps_lib.step_flops(compiled)


def abstract_eval_step(model, length: int, by_position: bool):
  """Compiled temp bytes of the trainer's eval step (`by_position`: eval/loss_by_position sums)."""
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens,
           'weights': jax.ShapeDtypeStruct((1, length), jnp.float32)}
  params = jax.eval_shape(lambda k, x: nn.meta.unbox(model.init(rng_lib.stream_keys(k), x))[
      'params'], jax.random.key(0), tokens)
  step = jax.jit(evaluation.make_eval_step(model, by_position=by_position),
                 compiler_options=compiler.options())
  memory = step.lower(params, batch, jax.ShapeDtypeStruct((), jnp.int32)).compile(
  ).memory_analysis()
  return None if memory is None else memory.temp_size_in_bytes


def train_table(length: int) -> None:
  rows = [('LSH (the task model)', None), ('full, all queries at once', Full()),
          ('full, 64 queries at a time', Full(query_chunk_len=64))]
  print(f'\n### One training step of configs/long_retrieval.py at {length:,} tokens (batch 1)\n')
  print('| attention | compiled temp | GFLOP per step (XLA; a loop body counted once) |')
  print('|---|---|---|')
  for name, spec in rows:
    model = tm.ReformerLM(mode='train', **task_model_kwargs(length, spec))
    try:
      temp, flops = abstract_train_step(model, length)
      cells = (f'{temp / GIB:,.2f} GiB' if temp is not None else '?',
               f'{flops / 1e9:,.0f}' if flops else '?')
    except Exception as e:  # pylint: disable=broad-except
      cells = (f'does not compile: {type(e).__name__}', '')
    print(f'| {name} | {cells[0]} | {cells[1]} |', flush=True)
  model = tm.ReformerLM(mode='eval', **task_model_kwargs(length))
  for by_position in (False, True):
    temp = abstract_eval_step(model, length, by_position)
    label = 'eval step, with eval/loss_by_position' if by_position else 'eval step'
    print(f'| LSH, {label} | {temp / GIB:,.2f} GiB | |', flush=True)


def decode_row(mem_len: int, n_tokens: int) -> dict:
  model = tm.ReformerLM(mode='predict', max_len=mem_len, **DECODE_SIZE,
                        attention=LSH(n_hashes=4, chunk_len=64, predict_mem_len=mem_len))
  token = jnp.zeros((1, 1), jnp.int32)
  variables = jax.jit(model.init)(rng_lib.stream_keys(jax.random.key(0)), token)
  params, cache = nn.meta.unbox(variables['params']), variables['cache']
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))

  def decode(cache, token):
    logits, state = model.apply({'params': params, 'cache': cache}, token, mutable=['cache'])
    return state['cache'], jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)

  compiled = jax.jit(decode, donate_argnums=(0,),
                     compiler_options=compiler.options()).lower(cache, token).compile()
  memory = compiled.memory_analysis()
  times = []
  for i in range(n_tokens + 2):  # Two warm-up calls.
    start = time.perf_counter()
    cache, token = compiled(cache, token)
    jax.block_until_ready(token)
    if i >= 2:
      times.append(time.perf_counter() - start)
  return {'mem_len': mem_len, 'cache_bytes': cache_bytes,
          'temp_bytes': None if memory is None else memory.temp_size_in_bytes,
          'seconds_per_token': statistics.median(times)}


def decode_table(mem_lens, n_tokens: int) -> None:
  print('\n### Predict-mode LSH decoding with a long memory (batch 1, 2 layers, d_model 256)\n')
  print('| predict_mem_len | cache | decode-step temp | ms / token | cache / 30 GB/s |')
  print('|---|---|---|---|---|')
  for m in mem_lens:
    r = decode_row(m, n_tokens)
    temp = f'{r["temp_bytes"] / 2**20:,.1f} MiB' if r['temp_bytes'] is not None else '?'
    print(f'| {m:,} | {r["cache_bytes"] / 2**20:,.0f} MiB | {temp} | '
          f'{r["seconds_per_token"] * 1e3:,.1f} | {r["cache_bytes"] / 30e9 * 1e3:,.1f} ms |',
          flush=True)


def plot_curve(workdir: str, out: str) -> None:
  """eval/accuracy (and train/accuracy) against the step of WORKDIR/metrics.jsonl, with chance."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  evals = [(r['step'], r['eval/accuracy']) for r in records if 'eval/accuracy' in r]
  trains = [(r['step'], r['train/accuracy']) for r in records if 'train/accuracy' in r]
  chance = next(r['eval/chance'] for r in records if 'eval/chance' in r)
  with open(os.path.join(workdir, 'config.json')) as f:
    length = json.load(f)['data']['seq_len']
  fig, ax = plt.subplots(figsize=(6, 3.6))
  if trains:
    ax.plot(*zip(*trains), color='0.7', label='train answer accuracy')
  ax.plot(*zip(*evals), 'o-', label='eval answer accuracy')
  ax.axhline(chance, color='k', linestyle='--', label=f'chance (1/{round(1 / chance)})')
  ax.set_xlabel('step (one sequence per step)')
  ax.set_ylabel('accuracy on the queried values')
  ax.set_ylim(0, 1)
  ax.set_title(f'Key-value retrieval at {length:,} tokens (1-layer ReformerLM, LSH)')
  ax.legend(loc='upper left', fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print(f'wrote {out}: {len(evals)} evaluations, last accuracy {evals[-1][1]:.3f} at step '
        f'{evals[-1][0]}, chance {chance:.4f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--section', default='train,decode')
  parser.add_argument('--train_length', type=int, default=65536)
  parser.add_argument('--mem_lens', default='4096,65536,262144')
  parser.add_argument('--tokens', type=int, default=16)
  parser.add_argument('--plot', default='', help='a workdir: plot its curve instead')
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'images',
                                                    '26_long_retrieval.png'))
  args = parser.parse_args()
  if args.plot:
    plot_curve(args.plot, args.out)
    return
  sections = args.section.split(',')
  print(f'jax {jax.__version__}, {jax.default_backend()}, load average '
        f'{os.getloadavg()[0]:.1f}')
  if 'train' in sections:
    train_table(args.train_length)
  if 'decode' in sections:
    decode_table([int(m) for m in args.mem_lens.split(',')], args.tokens)


if __name__ == '__main__':
  main()
