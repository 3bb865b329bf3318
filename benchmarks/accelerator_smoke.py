"""A few bfloat16 training steps of each model family on a GPU or TPU: tokens/s, MFU, finite loss.

Runs only where jax sees a GPU or TPU (else prints one line and exits 0).
Each family (TransformerLM, ReformerLM, TerraformerLM) trains `--steps` steps
with model.dtype='bfloat16' through `trainer.train_and_evaluate`, with fsdp over
all local devices; the table quotes the last logged tokens/s and train/mfu
(peak FLOP/s from `--peak_flops`, else `PEAK_FLOPS` by device kind) and
asserts every logged loss is finite.

  python benchmarks/accelerator_smoke.py [--d_model 1024] [--n_layers 24] [--seq_len 2048]
      [--batch_size 8] [--steps 20] [--models TransformerLM,ReformerLM,TerraformerLM]
      [--peak_flops 0]
"""

import argparse
import contextlib
import io
import math
import os
import pathlib
import sys
import tempfile

import jax
import ml_collections

from terraflax.train import metrics as metrics_lib
from terraflax.train import trainer
from terraflax.train.config import load_sibling

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {'TransformerLM': 'transformer_lm', 'ReformerLM': 'default',
           'TerraformerLM': 'terraformer_lm'}
# Dense bfloat16 peak FLOP/s of one device, by a substring of `device_kind`.
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12,
              'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
              'TPU v6': 918e12}


def peak_flops(configured: float) -> float:
  """`--peak_flops`, else the table's entry for this device (0: unknown, no MFU)."""
  if configured:
    return configured
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), 0.0)


def model_config(name: str, args) -> ml_collections.ConfigDict:
  config = load_sibling(str(ROOT / 'configs' / f'{CONFIGS[name]}.py'), CONFIGS[name])
  m = config.model
  m.d_model, m.d_ff, m.n_heads, m.n_layers = args.d_model, 4 * args.d_model, args.d_model // 64, \
      args.n_layers
  m.max_len, m.dtype = args.seq_len, 'bfloat16'
  if name == 'ReformerLM':
    m.attention.chunk_len = 256
    m.attention.n_buckets = 2 * args.seq_len // 256
  if name == 'TerraformerLM':
    m.attention.n_modules = m.n_heads
  config.data.path, config.data.seq_len, config.data.eval_fraction = os.__file__, args.seq_len, 0.2
  t = config.train
  t.steps, t.batch_size, t.log_every = args.steps, args.batch_size, max(args.steps // 2, 1)
  t.eval_every, t.eval_batches, t.checkpoint_every = 10**6, 1, 10**6
  t.peak_flops = peak_flops(args.peak_flops)
  config.optimizer.warmup_steps = 1
  config.sample.max_new_tokens = 0
  config.sharding = ml_collections.ConfigDict({'fsdp': jax.local_device_count()})
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--d_model', type=int, default=1024)
  parser.add_argument('--n_layers', type=int, default=24)
  parser.add_argument('--seq_len', type=int, default=2048)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--models', default=','.join(CONFIGS))
  parser.add_argument('--peak_flops', type=float, default=0.0)
  args = parser.parse_args()
  if jax.default_backend() not in ('gpu', 'tpu'):
    print(f'accelerator_smoke: no GPU or TPU (jax backend {jax.default_backend()!r}); '
          'nothing to do.')
    return
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}; bfloat16, d_model '
        f'{args.d_model}, {args.n_layers} layers, batch {args.batch_size} x {args.seq_len}.\n')
  print('| model | parameters | tokens/s | MFU | last loss |')
  print('|---|---|---|---|---|')
  failed = []
  for name in args.models.split(','):
    config = model_config(name, args)
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()) as out:
      trainer.train_and_evaluate(config, workdir)
      logged = [m for m in metrics_lib.read_metrics(workdir) if 'train/loss' in m]
    params = next((line.split(' with ')[1].split(' parameters')[0]
                   for line in out.getvalue().splitlines() if ' parameters' in line), '?')
    last = logged[-1]
    mfu = last.get('train/mfu')
    print(f'| {name} | {params} | {last.get("tokens_per_sec", float("nan")):,.0f} | '
          f'{f"{100 * mfu:.1f}%" if mfu is not None else "?"} | {last["train/loss"]:.3f} |',
          flush=True)
    if not all(math.isfinite(m['train/loss']) for m in logged):
      failed.append(name)
  if failed:
    sys.exit(f'accelerator_smoke: non-finite loss for {", ".join(failed)}.')


if __name__ == '__main__':
  main()
