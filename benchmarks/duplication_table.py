"""The Reformer paper's duplication table (Kitaev et al. 2020, Table 2) at a chosen scale.

Trains a 1-layer ReformerLM (configs/duplication.py) on `0 w 0 w` four times,
with full attention and with 4, 2 and 1 hash rounds, then scores every
model with full attention and with 8, 4, 2 and 1 rounds, and prints the
token accuracy on the second copy of w as a markdown table.

"Full attention" is full *shared-QK* attention, as in the paper, so that
the same parameters can also be scored with LSH: an LSH layer with one
bucket, one round and one chunk covering the sequence (n_buckets=1,
chunk_len=seq_len, n_chunks_before=0) is exactly that (`eval.attention=
'full'` in the trainer). LSH-k is k rounds with Trax's bucket rule
(2 * seq_len / chunk_len buckets) and chunks of `--chunk_len`, each also
attending to the previous chunk.

Everything goes through the trainer (`terraflax.train`), in this process;
the equivalent command lines are printed. Resumable: a row whose workdir
already holds the checkpoint at --steps is not trained again, and an
evaluation already in its eval_results.jsonl is not run again.

  python benchmarks/duplication_table.py --w=127 --steps=1500 --root=runs/duplication
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from terraflax import workdir as workdir_lib  # pylint: disable=wrong-import-position
from terraflax.train import eval_only  # pylint: disable=wrong-import-position
from terraflax.train import trainer  # pylint: disable=wrong-import-position

CONFIG_FILE = ROOT / 'configs' / 'duplication.py'
PAPER = {  # Table 2 of the paper: |w| = 511, trained rows x evaluated columns.
    'full': {'full': 100.0, 8: 94.8, 4: 92.5, 2: 76.9, 1: 52.5},
    4: {'full': 0.8, 8: 100.0, 4: 99.9, 2: 99.4, 1: 91.9},
    2: {'full': 0.8, 8: 100.0, 4: 99.9, 2: 98.1, 1: 86.8},
    1: {'full': 0.8, 8: 99.9, 4: 99.6, 2: 94.8, 1: 77.9},
}

_W = flags.DEFINE_integer('w', 127, '|w|: the sequences are 0 w 0 w, seq_len = 2 (|w| + 1).')
_STEPS = flags.DEFINE_integer('steps', 1500, 'Training steps of each row.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Training (and evaluation) batch size.')
_ROOT = flags.DEFINE_string('root', 'runs/duplication', 'One workdir per row under this.')
_CHUNK = flags.DEFINE_integer('chunk_len', 16, 'LSH chunk length (rows and columns).')
_LR = flags.DEFINE_float('learning_rate', 3e-3, 'Peak learning rate.')
_WARMUP = flags.DEFINE_integer('warmup', 100, 'Linear warm-up steps.')
_EVAL_EXAMPLES = flags.DEFINE_integer('eval_examples', 256, 'Evaluation sequences.')
_ROWS = flags.DEFINE_list('rows', ['full', '4', '2', '1'], "Trained rows: 'full' or rounds.")
_COLS = flags.DEFINE_list('cols', ['full', '8', '4', '2', '1'], "Columns: 'full' or rounds.")
_EXTRA = flags.DEFINE_multi_string('set', [], "More config overrides, 'a.b=value' (python "
                                   'literal), applied to every row.')


def _kind(name: str):
  return 'full' if name == 'full' else int(name)


def _label(kind) -> str:
  return 'full attention' if kind == 'full' else f'LSH-{kind}'


def base_config():
  spec = importlib.util.spec_from_file_location('_duplication_config', CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def attention_fields(kind, seq_len: int, chunk_len: int, prefix: str) -> dict:
  """Config overrides for full shared-QK (one bucket, one chunk) or k LSH rounds."""
  if kind == 'full':
    if prefix == 'eval':
      return {'eval.attention': 'full'}
    return {'model.attention.n_hashes': 1, 'model.attention.n_buckets': 1,
            'model.attention.chunk_len': seq_len, 'model.attention.n_chunks_before': 0}
  rule = -1 if prefix == 'eval' else None  # Trax's rule from the length.
  prefix = 'model.attention' if prefix == 'model' else prefix
  return {f'{prefix}.n_hashes': kind, f'{prefix}.n_buckets': rule,
          f'{prefix}.chunk_len': chunk_len, f'{prefix}.n_chunks_before': 1}


def row_overrides(kind, extra: dict) -> dict:
  seq_len = 2 * (_W.value + 1)
  out = {'data.seq_len': seq_len, 'data.eval_examples': _EVAL_EXAMPLES.value,
         'train.steps': _STEPS.value, 'train.batch_size': _BATCH.value,
         'train.eval_every': _STEPS.value, 'train.log_every': 50,
         'train.checkpoint_every': _STEPS.value, 'train.eval_batches': -1,
         'optimizer.learning_rate': _LR.value, 'optimizer.warmup_steps': _WARMUP.value}
  out.update(attention_fields(kind, seq_len, _CHUNK.value, 'model'))
  out.update(extra)
  return out


def make_config(overrides: dict):
  config = base_config()
  config.update_from_flattened_dict(overrides)  # {'model.attention.n_hashes': 4, ...}
  return config


def command(workdir: str, overrides: dict) -> str:
  parts = ['python -m terraflax.train --config=configs/duplication.py', f'--workdir={workdir}']
  for path, value in overrides.items():
    if value is not None:  # None is the config's default (and no flag can say None).
      parts.append(f'--config.{path}={value}')
  return ' '.join(parts)


def find_result(workdir: str, step: int, col, seq_len: int):
  """The record of eval_results.jsonl for column `col` at `step`, or None."""
  if col == 'full':
    label, model = 'full', {'n_hashes': 1, 'n_buckets': 1, 'chunk_len': seq_len,
                            'n_chunks_before': 0}
  else:
    label, model = f'lsh-{col}', {'n_hashes': col, 'n_buckets': None,
                                  'chunk_len': _CHUNK.value, 'n_chunks_before': 1}
  path = os.path.join(workdir, eval_only.RESULTS_FILE)
  if not os.path.exists(path):
    return None
  found = None
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if (record['step'], record['attention'], record['model']) == (step, label, model):
        found = record
  return found


def parse_extra(items) -> dict:
  import ast  # pylint: disable=import-outside-toplevel
  out = {}
  for item in items:
    path, _, value = item.partition('=')
    try:
      out[path] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[path] = value
  return out


def main(argv):
  del argv
  rows, cols = [_kind(r) for r in _ROWS.value], [_kind(c) for c in _COLS.value]
  extra = parse_extra(_EXTRA.value)
  seq_len = 2 * (_W.value + 1)
  table, minutes, commands = {}, {}, []
  for row in rows:
    workdir = os.path.join(_ROOT.value, 'full' if row == 'full' else f'lsh{row}')
    overrides = row_overrides(row, extra)
    commands.append(command(workdir, overrides))
    manager = workdir_lib.make_manager(workdir, read_only=True, async_save=False) if os.path.isdir(
        workdir_lib.checkpoint_dir(workdir)) else None
    done = manager is not None and _STEPS.value in manager.all_steps()
    if manager is not None:
      manager.close()
    began = time.time()
    if done:
      print(f'{_label(row)}: {workdir} already holds step {_STEPS.value}; not training.',
            flush=True)
    else:
      print(f'{_label(row)}: training in {workdir}', flush=True)
      trainer.train_and_evaluate(make_config(overrides), workdir)
      minutes[row] = (time.time() - began) / 60
    table[row] = {}
    for col in cols:
      request = attention_fields(col, seq_len, _CHUNK.value, 'eval')
      commands.append(command(workdir, {**overrides, **request}))
      record = find_result(workdir, _STEPS.value, col, seq_len)
      if record is None:
        trainer.train_and_evaluate(make_config({**overrides, **request}), workdir)
        record = find_result(workdir, _STEPS.value, col, seq_len)
      table[row][col] = 100.0 * record['eval/accuracy']

  w, steps = _W.value, _STEPS.value
  print()
  m = make_config(row_overrides(rows[0], extra))
  print(f'Scale: |w| = {w} (seq_len {seq_len}), symbols 1..{m.data.vocab_size - 1}, '
        f'{m.model.n_layers} layer(s), d_model {m.model.d_model}, d_ff {m.model.d_ff}, '
        f'{m.model.n_heads} heads, {m.model.positions} positions; {steps} steps of batch '
        f'{_BATCH.value} ({m.optimizer.name}, lr {_LR.value:g}, '
        f'{_WARMUP.value} warm-up steps, cosine decay); LSH chunks of {_CHUNK.value} with '
        f'{2 * seq_len // _CHUNK.value} buckets; {_EVAL_EXAMPLES.value} evaluation sequences. '
        'Token accuracy on the second copy of w.')
  if minutes:
    print('Training minutes: ' + ', '.join(f'{_label(r)} {m:.1f}' for r, m in minutes.items()))
  print()
  header = '| trained with \\ evaluated with | ' + ' | '.join(
      'full' if c == 'full' else f'LSH-{c}' for c in cols) + ' |'
  print(header)
  print('|---' * (len(cols) + 1) + '|')
  for row in rows:
    cells = []
    for col in cols:
      paper = PAPER.get(row, {}).get(col)
      cells.append(f'{table[row][col]:.1f}%' + (f' ({paper:g}%)' if paper is not None else ''))
    print(f'| {_label(row)} | ' + ' | '.join(cells) + ' |')
  print('\n(in parentheses: the paper, |w| = 511)')
  with open(os.path.join(_ROOT.value, 'table.json'), 'w', encoding='utf-8') as f:
    json.dump({'w': w, 'steps': steps, 'batch': _BATCH.value, 'chunk_len': _CHUNK.value,
               'learning_rate': _LR.value, 'table': {str(r): {str(c): v for c, v in t.items()}
                                                     for r, t in table.items()},
               'commands': commands}, f, indent=1)
  print('\nCommands (the same runs from the command line):')
  for line in commands:
    print('  ' + line)


if __name__ == '__main__':
  app.run(main)
