"""What parameter sharding buys on 8 forced CPU devices. Prints a markdown table.

For ReformerLM (configs/default.py) and TerraformerLM (configs/terraformer_lm.py)
at d_model 1024, d_ff 4096, 16 heads, 12 layers (flags shrink them), each mesh
-- replicated (data=8), fsdp=8, fsdp=4 x tensor_parallel=2, fsdp=2 x
tensor_parallel=4 -- trains `--steps` steps through `trainer.train_and_evaluate`
and the table quotes its `memory.json` (per-device parameter + optimizer bytes,
the compiled step's temp bytes) and the seconds per step after the first
(from `tokens_per_sec`). The device count is forced before jax starts.

  python benchmarks/sharding.py [--d_model 1024] [--d_ff 4096] [--n_heads 16]
      [--n_layers 12] [--seq_len 512] [--batch_size 8] [--steps 4]
      [--models ReformerLM,TerraformerLM] [--meshes replicated,fsdp8,fsdp4xtp2,fsdp2xtp4]

Smoke run (seconds): --d_model 32 --d_ff 64 --n_heads 2 --n_layers 2 --seq_len 32 --steps 3
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile

if 'jax' not in sys.modules:  # Before jax initialises its backends.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import contextlib  # pylint: disable=wrong-import-position
import io  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position

from terraflax.train import metrics as metrics_lib  # pylint: disable=wrong-import-position
from terraflax.train import trainer  # pylint: disable=wrong-import-position
from terraflax.train.config import load_sibling  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {'ReformerLM': 'default', 'TerraformerLM': 'terraformer_lm',
           'TransformerLM': 'transformer_lm'}
MESHES = {'replicated': (1, 1), 'fsdp8': (8, 1), 'fsdp4xtp2': (4, 2), 'fsdp2xtp4': (2, 4)}


def model_config(name: str, args) -> ml_collections.ConfigDict:
  """configs/<name's file> at the benchmark's sizes, on one stdlib file, no eval to speak of."""
  config = load_sibling(str(ROOT / 'configs' / f'{CONFIGS[name]}.py'), CONFIGS[name])
  m = config.model
  m.d_model, m.d_ff, m.n_heads, m.n_layers = args.d_model, args.d_ff, args.n_heads, args.n_layers
  m.max_len = args.seq_len
  if name == 'ReformerLM':
    m.attention.chunk_len = min(64, args.seq_len // 2)
    m.attention.n_buckets = 2 * args.seq_len // m.attention.chunk_len
  if name == 'TerraformerLM':
    m.ff_sparsity = min(m.ff_sparsity, args.d_ff // 8)
    m.attention.n_modules = args.n_heads
  config.data.path, config.data.seq_len, config.data.eval_fraction = os.__file__, args.seq_len, 0.2
  t = config.train
  t.steps, t.batch_size, t.log_every = args.steps, args.batch_size, args.steps
  t.eval_every, t.eval_batches, t.checkpoint_every = 10**6, 1, 10**6
  t.async_checkpoints = False
  config.optimizer.warmup_steps = 1
  config.sample.max_new_tokens = 0
  return config


def measure(config, fsdp: int, tp: int) -> dict:
  """memory.json of a short run with this mesh, plus its seconds per step."""
  config.sharding = ml_collections.ConfigDict({'fsdp': fsdp, 'tensor_parallel': tp})
  with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):
    trainer.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'memory.json'), encoding='utf-8') as f:
      memory = json.load(f)
    speed = [m['tokens_per_sec'] for m in metrics_lib.read_metrics(workdir)
             if 'tokens_per_sec' in m]
  tokens = config.train.batch_size * config.data.seq_len
  memory['seconds_per_step'] = tokens / speed[-1] if speed else float('nan')
  return memory


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--d_model', type=int, default=1024)
  parser.add_argument('--d_ff', type=int, default=4096)
  parser.add_argument('--n_heads', type=int, default=16)
  parser.add_argument('--n_layers', type=int, default=12)
  parser.add_argument('--seq_len', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--models', default='ReformerLM,TerraformerLM')
  parser.add_argument('--meshes', default=','.join(MESHES))
  args = parser.parse_args()
  if jax.device_count() != 8:
    sys.exit(f'benchmarks/sharding.py needs 8 devices, found {jax.device_count()} '
             '(was jax imported before XLA_FLAGS was set?).')
  mib = lambda n: f'{n / 2**20:,.1f}'  # pylint: disable=unnecessary-lambda-assignment
  print(f'8 {jax.devices()[0].platform} devices; d_model {args.d_model}, d_ff {args.d_ff}, '
        f'{args.n_heads} heads, {args.n_layers} layers, batch {args.batch_size} x '
        f'{args.seq_len}, Adam.\n')
  print('| model | mesh (data, fsdp, model) | params + optimizer MiB / device | '
        '(replicated) | step temp MiB / device | s / step |')
  print('|---|---|---|---|---|---|')
  for name in args.models.split(','):
    for mesh in args.meshes.split(','):
      fsdp, tp = MESHES[mesh]
      r = measure(model_config(name, args), fsdp, tp)
      held = r['params_bytes_per_device'] + r['opt_state_bytes_per_device']
      whole = r['params_bytes_replicated'] + r['opt_state_bytes_replicated']
      temp = r['temp_bytes_per_device']
      print(f'| {name} | {mesh} ({r["mesh"]["data"]}, {r["mesh"]["fsdp"]}, '
            f'{r["mesh"]["model"]}) | {mib(held)} | {mib(whole)} | '
            f'{mib(temp) if temp is not None else "?"} | {r["seconds_per_step"]:.3f} |',
            flush=True)


if __name__ == '__main__':
  main()
