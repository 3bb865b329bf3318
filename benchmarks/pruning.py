"""Pruning configs/transformer_lm.py: eval loss / bits per byte against sparsity, decode speed.

  python benchmarks/pruning.py [--quick] [--root runs/pruning] [--json out.json] [--plot x.png]
                               [--wide 1024x4096x6] [--decode_only]

1. Trains the dense model (configs/transformer_lm.py) once, then fine-tunes
   from it for the same number of steps:
   - dense (sparsity 0; the fair baseline: as many extra steps),
   - unstructured: global magnitude pruning (configs/pruning.py) to 50, 75, 90%
     of the attention and feed-forward kernels on a cubic schedule over the
     first 80% of the fine-tuning (over the first half: +2.2% eval loss at
     50%; 80% leaves the surviving weights time to take over on the way),
   - structured: `terraflax.prune` removes 50, 75, 90% of the same kernels
     as hidden units and heads (`prune.keep_for_sparsity`), then fine-tunes the
     smaller model.
2. Evaluates each on the same evaluation batches (eval/loss, eval/bits_per_byte).
3. Times batch-1 greedy decoding of the dense and the structurally pruned
   models (`decoding.autoregressive_sample` on `decoding.split_weights`,
   compiled once, best of 10 rounds that interleave the models) and compares the speed-up with the parameter
   ratio.
4. Weight-bound decoding (--wide, default 1024x4096x6): the same model widened
   until its batch-1 decoding reads weights rather than paying fixed per-token
   costs, initialised, pruned structurally to the same sparsities (units a
   multiple of 16) and timed the same way; --decode_only runs just this part.

--quick: a short dense run and fine-tuning (minutes on 2 CPU cores; the
figures are indicative). Prints a markdown table; --json and --plot write the
rows and a PNG (loss against sparsity).
"""

import argparse
import contextlib
import io
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax.linen import meta as nn_meta

from terraflax import decoding
from terraflax import prune
from terraflax import workdir as workdir_lib
from terraflax.models import spec as spec_lib
from terraflax.train import config as config_lib
from terraflax.train import metrics as metrics_lib
from terraflax.train import pruning
from terraflax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSITIES = (0.5, 0.75, 0.9)


def base_config(args):
  config = config_lib.load_sibling(os.path.join(ROOT, 'configs', 'x.py'), 'transformer_lm')
  config.train.steps = args.dense_steps
  config.train.log_every = config.train.eval_every = config.train.checkpoint_every = max(
      args.dense_steps // 2, 1)
  config.train.eval_batches = args.eval_batches
  config.sample.max_new_tokens = 0
  return config


def finetune_config(args, init_from, model=None, sparsity=0.0):
  config = base_config(args)
  config.init_from = init_from
  if model is not None:
    config.model = model
  config.train.steps = args.finetune_steps
  config.train.log_every = config.train.eval_every = config.train.checkpoint_every = (
      args.finetune_steps)
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = min(20, args.finetune_steps // 4)
  if sparsity:
    config.pruning = ml_collections.ConfigDict({
        'method': 'magnitude', 'scope': 'global', 'sparsity': sparsity, 'start_step': 1,
        'end_step': max(args.finetune_steps * 4 // 5, 1),
        'frequency': max(args.finetune_steps // 20, 1)})
  return config


def train(config, workdir):
  """Trains (or finds already trained) `workdir`; its last eval metrics."""
  done = os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and any(
      m['step'] == config.train.steps and 'eval/loss' in m
      for m in metrics_lib.read_metrics(workdir))
  if not done:
    with contextlib.redirect_stdout(io.StringIO()):
      trainer.train_and_evaluate(config, workdir)
  records = [m for m in metrics_lib.read_metrics(workdir) if 'eval/loss' in m]
  return records[-1]


def decoder(workdir, n_tokens):
  """A function running greedy batch-1 decoding of `n_tokens` with a workdir's model."""
  _, spec, params = spec_lib.load_workdir(workdir)
  model = spec.build('predict')
  # Split once, as a caller decoding many times would (benchmarks/decode_roofline.py too).
  params = decoding.split_weights(model, params)
  prompt = jnp.array([[ord('d'), ord('e'), ord('f')]], jnp.int32)

  def run():
    return jax.block_until_ready(decoding.autoregressive_sample(
        model, params, prompt, max_new_tokens=n_tokens, temperature=0.0))

  run()  # Compiles.
  return run


def decode_speeds(workdirs, n_tokens, rounds):
  """{workdir: tokens/s}: the best of `rounds` timings, the models interleaved in each round
  (so a busy machine's slow spells hit all of them)."""
  runs = {w: decoder(w, n_tokens) for w in workdirs}
  best = {w: float('inf') for w in workdirs}
  for _ in range(rounds):
    for w, run in runs.items():
      began = time.perf_counter()
      run()
      best[w] = min(best[w], time.perf_counter() - began)
  return {w: n_tokens / t for w, t in best.items()}


def count(workdir):
  """(all parameters, those of the pruned kinds: attention and feed-forward kernels)."""
  _, _, params = spec_lib.load_workdir(workdir)
  chosen = jax.tree_util.tree_leaves(pruning.selected(params, pruning.DEFAULT_PARAMS))
  leaves = jax.tree_util.tree_leaves(params)
  return (int(sum(x.size for x in leaves)),
          int(sum(x.size for x, on in zip(leaves, chosen) if on)))


def trained_rows(args, root, n_tokens):
  """The table's rows: eval loss after fine-tuning and decode speed of configs/transformer_lm.py."""
  dense_dir = os.path.join(root, 'dense')
  train(base_config(args), dense_dir)
  rows = []
  tuned = os.path.join(root, 'dense_finetuned')
  m = train(finetune_config(args, dense_dir), tuned)
  dense_params, prunable = count(tuned)
  rows.append({'kind': 'dense', 'sparsity': 0.0, 'loss': m['eval/loss'],
               'bpb': m['eval/bits_per_byte'], 'params': dense_params, 'workdir': tuned})
  for s in SPARSITIES:
    workdir = os.path.join(root, f'unstructured_{int(s * 100)}')
    m = train(finetune_config(args, dense_dir, sparsity=s), workdir)
    rows.append({'kind': 'unstructured', 'sparsity': s, 'loss': m['eval/loss'],
                 'bpb': m['eval/bits_per_byte'], 'params': dense_params,
                 'sparsity_reached': m.get('train/sparsity')})
  for s in SPARSITIES:
    small = os.path.join(root, f'structured_{int(s * 100)}_pruned')
    if not os.path.exists(os.path.join(small, prune.PRUNING_FILE)):
      prune.prune_workdir(dense_dir, small, sparsity=s)
    with open(os.path.join(small, prune.PRUNING_FILE), encoding='utf-8') as f:
      report = json.load(f)
    small_model = workdir_lib.read_config(small).model
    workdir = os.path.join(root, f'structured_{int(s * 100)}')
    m = train(finetune_config(args, small, model=small_model), workdir)
    params, _ = count(workdir)
    rows.append({'kind': 'structured', 'sparsity': (dense_params - params) / prunable,
                 'loss': m['eval/loss'], 'bpb': m['eval/bits_per_byte'], 'params': params,
                 'workdir': workdir, 'd_ff': report['d_ff'][1], 'n_heads': report['n_heads'][1]})
  speeds = decode_speeds([r['workdir'] for r in rows if 'workdir' in r], n_tokens, rounds=10)
  for r in rows:
    if 'workdir' in r:
      r['tokens_per_sec'] = speeds[r['workdir']]
  return rows


def print_table(rows, *, with_loss: bool):
  """A markdown table of `rows` (the first is the dense model)."""
  dense = rows[0]
  head = ['pruning', 'sparsity'] + (['eval loss', 'vs dense', 'bits/byte'] if with_loss else [])
  head += ['parameters', 'decode tok/s', 'speed-up', 'params ratio', 'speed-up / params ratio']
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for r in rows:
    speed = r.get('tokens_per_sec')
    ratio = dense['params'] / r['params']
    cells = [r['kind'] + (f" (d_ff {r['d_ff']}, {r['n_heads']} heads)" if 'd_ff' in r else ''),
             f"{r['sparsity']:.1%}"]
    if with_loss:
      cells += [f"{r['loss']:.4f}", f"{r['loss'] / dense['loss'] - 1:+.1%}", f"{r['bpb']:.3f}"]
    speed_up = speed / dense['tokens_per_sec'] if speed else None
    structured = r['kind'] != 'unstructured'
    cells += [f"{r['params']:,}", f'{speed:,.0f}' if speed else '-',
              f'{speed_up:.2f}x' if speed else '-', f'{ratio:.2f}x' if structured else '-',
              f'{speed_up / ratio:.2f}' if speed and structured else '-']
    print('| ' + ' | '.join(cells) + ' |')


def weight_bound_decoding(args, root, n_tokens):
  """Rows of decode speed against size for a wide model whose decoding reads its weights.

  configs/transformer_lm.py's model is 1.85 MB of weights: its per-token time
  is mostly fixed costs (the loop, sampling, the cache), which pruning does not
  remove. This widens it to `--wide` (d_model x d_ff x layers, 64-wide heads),
  initialises it (decode speed does not depend on training), prunes it
  structurally like the table above and times batch-1 decoding.
  """
  d_model, d_ff, n_layers = (int(v) for v in args.wide.split('x'))
  config = base_config(args)
  config.model.update(d_model=d_model, d_ff=d_ff, n_layers=n_layers, n_heads=d_model // 64)
  dense = os.path.join(root, f'wide_{args.wide}', 'dense')
  if not workdir_lib.has_checkpoints(dense):
    spec = spec_lib.ModelSpec.from_config(config)
    inputs = spec.example_inputs(1, 8, mode='eval')
    params = nn_meta.unbox(spec.build('eval').init(jax.random.key(0), *inputs))['params']
    os.makedirs(dense, exist_ok=True)
    workdir_lib.write_config(dense, config)
    workdir_lib.save_params(dense, 0, params)
  rows = [{'kind': 'dense', 'sparsity': 0.0, 'workdir': dense, 'd_ff': d_ff,
           'n_heads': int(config.model.n_heads)}]
  _, prunable = count(dense)
  for s in SPARSITIES:
    small = os.path.join(root, f'wide_{args.wide}', f'structured_{int(s * 100)}')
    if not os.path.exists(os.path.join(small, prune.PRUNING_FILE)):
      prune.prune_workdir(dense, small, sparsity=s, ff_multiple=16)
    model = workdir_lib.read_config(small).model
    rows.append({'kind': 'structured', 'workdir': small, 'd_ff': int(model.d_ff),
                 'n_heads': int(model.n_heads)})
  for r in rows:
    r['params'], kept = count(r['workdir'])
    r['sparsity'] = 1 - kept / prunable
  speeds = decode_speeds([r['workdir'] for r in rows], n_tokens, rounds=10)
  for r in rows:
    r['tokens_per_sec'] = speeds.pop(r['workdir'])
    del r['workdir']
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='short runs (indicative figures)')
  parser.add_argument('--root', default=os.path.join(ROOT, 'runs', 'pruning'),
                      help='where the workdirs go (reused when present)')
  parser.add_argument('--json', default='',
                      help='write the rows here (benchmarks/pruning.json: the full run)')
  parser.add_argument('--plot', default='', help='write a PNG of loss against sparsity here')
  parser.add_argument('--wide', default='1024x4096x6',
                      help='d_model x d_ff x layers of the weight-bound decoding rows ("" skips)')
  parser.add_argument('--decode_only', action='store_true',
                      help='only the weight-bound decoding rows (no training)')
  args = parser.parse_args()
  args.dense_steps = 200 if args.quick else 1000
  args.finetune_steps = 100 if args.quick else 500
  args.eval_batches = 8 if args.quick else 32
  n_tokens = 64 if args.quick else 200
  root = os.path.join(args.root, 'quick' if args.quick else 'full')

  rows = [] if args.decode_only else trained_rows(args, root, n_tokens)
  wide = weight_bound_decoding(args, root, n_tokens) if args.wide else []
  if rows:
    print(f'\nconfigs/transformer_lm.py: dense {args.dense_steps} steps, then '
          f'{args.finetune_steps} fine-tuning steps each; eval on {args.eval_batches} batches; '
          f'decode: batch 1, {n_tokens} greedy tokens, best of 10 interleaved rounds, '
          f'{jax.devices()[0].device_kind}.\n')
    print_table(rows, with_loss=True)
  if wide:
    print(f'\nWeight-bound decoding: configs/transformer_lm.py widened to {args.wide} '
          f'(d_model x d_ff x layers, 64-wide heads, initialised), pruned the same way (kept '
          f'units a multiple of 16); batch 1, {n_tokens} greedy tokens, best of 10 interleaved '
          'rounds.\n')
    print_table(wide, with_loss=False)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'trained': [{k: v for k, v in r.items() if k != 'workdir'} for r in rows],
                 'weight_bound_decoding': wide}, f, indent=1)
  if args.plot and rows:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (('unstructured', 'o'), ('structured', 's')):
      pts = [rows[0]] + [r for r in rows if r['kind'] == kind]
      ax.plot([100 * r['sparsity'] for r in pts], [r['bpb'] for r in pts], marker=marker,
              label=kind)
    ax.set_xlabel('weights removed from attention + feed-forward (%)')
    ax.set_ylabel('eval bits per byte')
    ax.set_title('Pruning configs/transformer_lm.py (after fine-tuning)')
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == '__main__':
  main()
