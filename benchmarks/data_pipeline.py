"""Input pipeline tokens/s (tokenize + pack + batch) against the model's training tokens/s.

The pipeline is configs/text_lm.py's data (Python's documentation as JSON
Lines, documents packed into rows) with each tokenizer: the 4K SentencePiece
model (trained once into a temporary directory) and 'bytes'; with 0 (in the
trainer's process) and `--workers` grain worker processes tokenizing. Its
figure is the tokens per second of batches drawn from the training iterator
(`Data.train_iterator`) after `--warmup` batches: what the trainer's `next()`
sees. The training figure is `tokens_per_sec` of a short run of
`train_and_evaluate` (the first, compiling step excluded; no eval, one
checkpoint at the end) for configs/default.py (the default ReformerLM, bytes)
and configs/text_lm.py (4K SentencePiece), at their own batch and length.
The issue's bar: the pipeline at least 5x the default ReformerLM's training.

  python benchmarks/data_pipeline.py                      # the table below
  python benchmarks/data_pipeline.py --batches=20 --train_steps=4 --workers=1   # smoke run

Each measurement runs in its own subprocess, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _config(name: str, overrides: dict):
  sys.path.insert(0, ROOT)
  from terraflax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_sibling(os.path.join(ROOT, 'configs', 'x.py'), name)
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config_lib.check_fields(config)


def measure_pipeline(args) -> dict:
  from terraflax.train import data as data_lib  # pylint: disable=import-outside-toplevel
  config = _config('text_lm', json.loads(args.overrides))
  data = data_lib.make_data(config.data, config.seed)
  iterator = data.train_iterator(batch_size=config.train.batch_size)
  for _ in range(args.warmup):
    next(iterator)
  began = time.perf_counter()
  for _ in range(args.batches):
    batch = next(iterator)
  seconds = time.perf_counter() - began
  return {'tokens_per_sec': args.batches * batch['inputs'].size / seconds,
          'real_fraction': float(batch['weights'].mean())}


def measure_training(args) -> dict:
  from terraflax.train import trainer  # pylint: disable=import-outside-toplevel
  overrides = json.loads(args.overrides)
  overrides.update({'train.steps': args.train_steps, 'train.log_every': args.train_steps,
                    'train.eval_every': 10**9, 'train.checkpoint_every': 10**9,
                    'train.eval_batches': 1, 'optimizer.warmup_steps': 1,
                    'sample.max_new_tokens': 0})
  config = _config(args.config, overrides)
  with tempfile.TemporaryDirectory() as workdir:
    last = trainer.train_and_evaluate(config, workdir)
  return {'tokens_per_sec': last['tokens_per_sec']}


def run(kind: str, config: str, overrides: dict, args) -> dict:
  command = [sys.executable, os.path.abspath(__file__), f'--measure={kind}', f'--config={config}',
             f'--overrides={json.dumps(overrides)}', f'--batches={args.batches}',
             f'--warmup={args.warmup}', f'--train_steps={args.train_steps}']
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  lines = [l for l in result.stdout.splitlines() if l.startswith('RESULT ')]
  if result.returncode or not lines:
    return {'error': (result.stderr.strip().splitlines() or ['failed'])[-1][:80]}
  return json.loads(lines[-1][len('RESULT '):])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batches', type=int, default=200, help='Timed pipeline batches.')
  parser.add_argument('--warmup', type=int, default=5, help='Untimed batches first.')
  parser.add_argument('--train_steps', type=int, default=30, help='Steps of each training run.')
  parser.add_argument('--workers', type=int, default=2, help='grain worker processes (a row '
                      'with 0 is always measured).')
  parser.add_argument('--measure', default='', help=argparse.SUPPRESS)
  parser.add_argument('--config', default='text_lm', help=argparse.SUPPRESS)
  parser.add_argument('--overrides', default='{}', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    result = (measure_pipeline if args.measure == 'pipeline' else measure_training)(args)
    print('RESULT ' + json.dumps(result), flush=True)
    return

  sys.path.insert(0, ROOT)
  from terraflax.data import corpora, corpus  # pylint: disable=import-outside-toplevel
  from terraflax import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  import json as json_lib  # pylint: disable=import-outside-toplevel,reimported
  tmp = tempfile.mkdtemp(prefix='terraflax_bench_')
  spm = os.path.join(tmp, 'tokenizer.model')
  with open(corpora.python_docs_path(), encoding='utf-8') as f:
    documents = [json_lib.loads(line)['text'] for line in f]
  corpus.train_tokenizer(documents, vocab_size=4096, out=spm)
  del tokenizer_lib

  train = {'default': run('train', 'default', {}, args),
           'text_lm': run('train', 'text_lm', {'data.tokenizer': spm}, args)}
  print(f'Training tokens/s ({args.train_steps} steps, first excluded): '
        f'configs/default.py (ReformerLM, bytes) {train["default"].get("tokens_per_sec", 0):,.0f}; '
        f'configs/text_lm.py (ReformerLM, 4K spm) {train["text_lm"].get("tokens_per_sec", 0):,.0f}'
        + ''.join(f' [{k}: {v["error"]}]' for k, v in train.items() if 'error' in v))
  print()
  print('| tokenizer | grain workers | pipeline tokens/s | real tokens | x default ReformerLM '
        'training | x text_lm training |')
  print('|---|---|---|---|---|---|')
  base = train['default'].get('tokens_per_sec')
  text = train['text_lm'].get('tokens_per_sec')
  for name, spec in (('spm 4K', spm), ('bytes', 'bytes')):
    for workers in sorted({0, args.workers}):
      row = run('pipeline', 'text_lm', {'data.tokenizer': spec, 'data.num_workers': workers,
                                        'model.vocab_size': 4096}, args)
      if 'error' in row:
        print(f'| {name} | {workers} | {row["error"]} | | | |')
        continue
      speed = row['tokens_per_sec']
      ratio = lambda t: f'{speed / t:.1f}x' if t else 'n/a'  # pylint: disable=cell-var-from-loop
      print(f'| {name} | {workers} | {speed:,.0f} | {100 * row["real_fraction"]:.0f}% | '
            f'{ratio(base)} | {ratio(text)} |', flush=True)


if __name__ == '__main__':
  main()
