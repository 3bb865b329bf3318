"""Bad input and faults across the CLIs, as a new user meets them (issue 25's table).

Each case runs one command line in a subprocess (train, decoding, export, convert, eval-only)
against a copy of a tiny trained workdir and sorts the outcome:

  clear      the error case ended with exit status != 0 and one line naming the problem
             (no Python traceback), or the fallback/warning case printed what it promised
  traceback  a Python traceback reached the user
  silent     an error case exited 0 (or a fallback case said nothing)
  lost       a file that existed before the command (config.json, metrics.jsonl, checkpoint
             files) is missing or changed afterwards. Where a case trains on (a permitted
             resume), metrics.jsonl may only grow (its old lines kept), and config.json (the
             new train.steps) and the checkpoints (train.keep_checkpoints' retention) may change

  python benchmarks/cli_faults.py                 # all cases, the table and one line per case
  python benchmarks/cli_faults.py --only decode   # cases whose name contains 'decode'

Takes ~10-15 minutes on 2 cores (each case starts a fresh interpreter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.train.steps=20', '--config.train.batch_size=4', '--config.data.seq_len=64',
        '--config.optimizer.warmup_steps=2', '--config.model.d_model=32',
        '--config.model.d_ff=64', '--config.model.n_layers=1', '--config.model.max_len=64',
        '--config.train.checkpoint_every=10', '--config.train.log_every=5',
        '--config.train.eval_every=10', '--config.train.eval_batches=1']
LM = 'configs/transformer_lm.py'


def python(*args):
  return [sys.executable, '-m', *args]


def train(workdir, *extra, config=LM):
  return python('terraflax.train', f'--config={config}', f'--workdir={workdir}', *TINY, *extra)


def tree_hashes(path):
  """{relative path: sha256} of every file under `path` (a file path hashes itself)."""
  out = {}
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      return {'': hashlib.sha256(f.read()).hexdigest()}
  for dirpath, _, files in os.walk(path):
    for name in files:
      full = os.path.join(dirpath, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def lost_files(before, path, appendable=(), contents=None, kept_to=None):
  """Files of `before` now missing or changed. Names in (or under a folder in) `appendable`
  may change; of those, the .jsonl files must keep their old content as a prefix (only the
  lines up to step `kept_to` when given: a run resumed from that step logs the later ones
  again)."""
  after = tree_hashes(path) if os.path.exists(path) else {}
  lost = []
  for name, digest in before.items():
    if any(name == a or name.startswith(a.rstrip('/') + '/') for a in appendable):
      if name.endswith('.jsonl') and contents and name in contents:
        old = contents[name]
        if kept_to is not None:
          old = b''.join(line for line in old.splitlines(keepends=True)
                         if json.loads(line).get('step', 0) <= kept_to)
        with open(os.path.join(path, name), 'rb') as f:
          if not f.read().startswith(old):
            lost.append(f'{name} (old lines changed)')
      continue
    if name not in after:
      lost.append(f'{name} (deleted)')
    elif after[name] != digest and name not in appendable:
      lost.append(f'{name} (changed)')
  return lost


class Case:
  """One command line and what a user should get from it."""

  def __init__(self, name, command, *, want='error', expect='', workdir=None, appendable=(),
               setup=None, timeout=300, kept_to=None):
    self.name, self.command, self.want, self.expect = name, command, want, expect
    self.kept_to = kept_to
    self.workdir, self.appendable, self.setup, self.timeout = workdir, appendable, setup, timeout


def damage_latest(workdir):
  """Truncates one file of the latest checkpoint's params (step 20)."""
  params = os.path.join(workdir, 'checkpoints', '20', 'params')
  for dirpath, _, files in os.walk(params):
    for name in sorted(files):
      full = os.path.join(dirpath, name)
      if os.path.getsize(full) > 64:
        with open(full, 'r+b') as f:
          f.truncate(os.path.getsize(full) // 2)
        return
  raise RuntimeError(f'nothing to damage under {params}')


def make_cases(base, scratch):
  """The cases; `base` is a trained tiny workdir (copied per case where named W)."""
  w = os.path.join(scratch, 'W')
  a_file = os.path.join(scratch, 'a_file')
  new = os.path.join(scratch, 'fresh')
  bad_syntax = os.path.join(scratch, 'bad_syntax.py')
  no_get_config = os.path.join(scratch, 'no_get_config.py')
  with open(a_file, 'w') as f:
    f.write('not a directory\n')
  with open(bad_syntax, 'w') as f:
    f.write('def get_config(:\n  pass\n')
  with open(no_get_config, 'w') as f:
    f.write('X = 1\n')
  cases = []

  def fresh_error(name, *extra, expect='', config=LM):
    cases.append(Case(f'train-{name}', train(new, *extra, config=config), expect=expect))

  # Config fields, before anything is written.
  fresh_error('unknown-model-field', '--config.model.n_hashs=3', expect='n_hashs')
  fresh_error('unknown-model-field-2', '--config.model.d_modle=64', expect='d_modle')
  fresh_error('unknown-train-field', '--config.train.step=10', expect='step')
  fresh_error('unknown-section', '--config.trian.steps=10', expect='trian')
  fresh_error('unknown-attention-field', '--config.model.attention.n_hashs=2',
              expect='n_hashs', config='configs/default.py')
  fresh_error('bad-attention-kind', '--config.model.attention.kind=bogus', expect='kind',
              config='configs/default.py')
  fresh_error('negative-batch', '--config.train.batch_size=-3', expect='batch_size')
  fresh_error('batch-not-int', '--config.train.batch_size=abc', expect='batch_size')
  fresh_error('zero-steps', '--config.train.steps=0', expect='steps')
  fresh_error('zero-log-every', '--config.train.log_every=0', expect='log_every')
  fresh_error('bad-optimizer', '--config.optimizer.name=adagrad', expect='optimizer.name')
  fresh_error('negative-lr', '--config.optimizer.learning_rate=-1', expect='learning_rate')
  fresh_error('bad-decay', '--config.optimizer.decay=linear', expect='decay')
  fresh_error('bad-dataset', '--config.data.name=nope', expect='data.name')
  fresh_error('zero-seq-len', '--config.data.seq_len=0', expect='seq_len')
  fresh_error('heads-do-not-divide', '--config.model.n_heads=3', expect='n_heads')
  fresh_error('max-len-short', '--config.model.max_len=32', expect='max_len')
  fresh_error('vocab-small', '--config.model.vocab_size=10', expect='vocab_size')
  fresh_error('unknown-model', '--config.model.name=NoSuchModel', expect='NoSuchModel')
  fresh_error('unimportable-model', '--config.model.name=no_such_pkg.mod:Model',
              expect='no_such_pkg')
  fresh_error('missing-data-path', '--config.data.path=/nonexistent/corpus', expect='data.path')
  fresh_error('init-from-missing', '--config.init_from=/nonexistent/run', expect='init_from')
  fresh_error('teacher-missing', '--config.distill.teacher_workdir=/nonexistent/run',
              expect='teacher_workdir')
  fresh_error('trainable-no-match', '--config.optimizer.trainable=no_such_param',
              expect='trainable')
  fresh_error('trainable-bad-regex', '--config.optimizer.trainable=(', expect='trainable')
  fresh_error('grad-accum-indivisible', '--config.train.grad_accum_steps=3',
              expect='grad_accum_steps')
  fresh_error('adam-weight-decay', '--config.optimizer.weight_decay=0.1', expect='weight_decay')
  fresh_error('cosine-warmup-long', '--config.optimizer.decay=cosine',
              '--config.optimizer.warmup_steps=100', expect='warmup_steps')
  fresh_error('model-parallel-indivisible', '--config.sharding.model_parallel=3',
              expect='model_parallel')
  fresh_error('fsdp-indivisible', '--config.sharding.fsdp=3', expect='sharding.fsdp=3')
  fresh_error('eval-fraction-big', '--config.data.eval_fraction=1.5', expect='eval_fraction')
  fresh_error('dropout-big', '--config.model.dropout=1.5', expect='dropout')
  fresh_error('bad-dtype', '--config.model.dtype=float12', expect='dtype')
  fresh_error('mode-set', '--config.model.mode=train', expect='mode')
  fresh_error('negative-sample', '--config.sample.max_new_tokens=-1', expect='max_new_tokens')
  fresh_error('bool-not-bool', '--config.train.async_checkpoints=maybe',
              expect='async_checkpoints')
  cases.append(Case('train-missing-config-file',
                    python('terraflax.train', '--config=configs/nonexistent.py',
                           f'--workdir={new}'), expect='nonexistent'))
  cases.append(Case('train-config-syntax-error',
                    python('terraflax.train', f'--config={bad_syntax}', f'--workdir={new}'),
                    expect='bad_syntax'))
  cases.append(Case('train-config-no-get-config',
                    python('terraflax.train', f'--config={no_get_config}', f'--workdir={new}'),
                    expect='get_config'))
  cases.append(Case('train-missing-workdir', python('terraflax.train', f'--config={LM}'),
                    expect='workdir'))
  cases.append(Case('train-missing-config', python('terraflax.train', f'--workdir={new}'),
                    expect='config'))
  cases.append(Case('train-extra-argument', train(new, 'extra'), expect='extra'))
  cases.append(Case('train-workdir-under-file', train(os.path.join(a_file, 'run')),
                    expect='a_file', workdir=a_file))
  cases.append(Case('train-workdir-is-file', train(a_file), expect='a_file', workdir=a_file))

  # Resuming a finished workdir W with other settings: refused, nothing written.
  def resume(name, *extra, want='error', expect='', appendable=(), setup=None, config=LM,
             kept_to=None):
    cases.append(Case(f'resume-{name}', train(w, *extra, config=config), want=want,
                      expect=expect, workdir=w, appendable=appendable, setup=setup,
                      kept_to=kept_to))

  resume('other-d-model', '--config.model.d_model=64', expect='d_model')
  resume('other-optimizer', '--config.optimizer.name=sgd', expect='optimizer.name')
  resume('other-learning-rate', '--config.optimizer.learning_rate=0.5', expect='learning_rate')
  resume('other-seq-len', '--config.data.seq_len=32', expect='seq_len')
  resume('other-layers', '--config.model.n_layers=2', expect='n_layers')
  resume('other-seed', '--config.seed=3', expect='seed')
  resume('same-command', want='ok', expect=r'(?i)already trained')
  trained_on = ('metrics.jsonl', 'config.json', 'checkpoints/')
  resume('more-steps', '--config.train.steps=30', want='ok', expect=r'(?i)resum',
         appendable=trained_on)
  resume('damaged-latest', '--config.train.steps=30', want='fallback',
         expect=r'(?i)(damaged|corrupt|cannot (be )?restore).*20', setup=damage_latest,
         appendable=trained_on, kept_to=10)
  resume('init-from-on-resume', f'--config.init_from={base}', expect='init_from')

  # Eval-only scoring.
  cases.append(Case('eval-only-no-lsh', train(w, '--config.eval.n_hashes=8'), expect='n_hashes',
                    workdir=w))
  cases.append(Case('eval-only-missing-step', train(w, '--config.eval.step=999'), expect='999',
                    workdir=w))
  cases.append(Case('eval-only-not-a-workdir', train(new, '--config.eval.only=true'),
                    expect='fresh'))
  cases.append(Case('eval-only-bad-attention', train(w, '--config.eval.attention=bogus'),
                    expect='attention', workdir=w))
  cases.append(Case('eval-only-damaged-latest', train(w, '--config.eval.only=true'),
                    want='fallback', expect=r'(?i)(damaged|corrupt|cannot (be )?restore).*20',
                    workdir=w, setup=damage_latest, appendable=('eval_results.jsonl',)))

  # Decoding.
  def decode(name, *args, want='error', expect='', setup=None):
    cases.append(Case(f'decode-{name}', python('terraflax.decoding', *args), want=want,
                      expect=expect, workdir=w, setup=setup))

  decode('zero-new-tokens', f'--workdir={w}', '--max_new_tokens=0', expect='max_new_tokens')
  decode('negative-temperature', f'--workdir={w}', '--temperature=-1', expect='temperature')
  decode('zero-top-k', f'--workdir={w}', '--top_k=0', expect='top_k')
  decode('top-p-two', f'--workdir={w}', '--top_p=2', expect='top_p')
  decode('top-p-zero', f'--workdir={w}', '--top_p=0', expect='top_p')
  decode('new-tokens-not-int', f'--workdir={w}', '--max_new_tokens=abc',
         expect='max_new_tokens')
  decode('prompt-too-long', f'--workdir={w}', '--prompt=' + 'x' * 100, '--max_new_tokens=5',
         expect='max_len')
  decode('prompt-plus-new-too-long', f'--workdir={w}', '--prompt=' + 'x' * 40,
         '--max_new_tokens=40', expect='max_len')
  decode('missing-workdir-flag', expect='workdir')
  decode('nonexistent-workdir', '--workdir=/nonexistent/run', expect='nonexistent')
  decode('not-a-workdir', f'--workdir={scratch}', expect='config.json')
  decode('missing-step', f'--workdir={w}', '--step=999', expect='999')
  decode('damaged-latest', f'--workdir={w}', '--max_new_tokens=3', want='fallback',
         expect=r'(?i)(damaged|corrupt|cannot (be )?restore).*20', setup=damage_latest)
  decode('truncated-config-json', f'--workdir={w}', expect='config.json',
         setup=lambda d: open(os.path.join(d, 'config.json'), 'r+b').truncate(100))

  # Export.
  out = os.path.join(scratch, 'exported')
  def export(name, *args, want='error', expect='', setup=None):
    cases.append(Case(f'export-{name}', python('terraflax.export', *args), want=want,
                      expect=expect, workdir=w, setup=setup))

  export('missing-out', f'--workdir={w}', expect='out')
  export('out-under-file', f'--workdir={w}', f'--out={os.path.join(a_file, "x")}',
         expect='a_file')
  export('nonexistent-workdir', '--workdir=/nonexistent/run', f'--out={out}',
         expect='nonexistent')
  export('zero-batch', f'--workdir={w}', f'--out={out}', '--batch_size=0', expect='batch_size')
  export('zero-forward-len', f'--workdir={w}', f'--out={out}', '--forward_len=0',
         expect='forward_len')
  export('damaged-latest', f'--workdir={w}', f'--out={out}', want='fallback',
         expect=r'(?i)(damaged|corrupt|cannot (be )?restore).*20', setup=damage_latest)

  # Conversion.
  def convert(name, *args, expect=''):
    cases.append(Case(f'convert-{name}', python('terraflax.models.convert', *args),
                      expect=expect, workdir=w))

  convert('missing-source', f'--from_hf={os.path.join(scratch, "no_model")}',
          f'--to={os.path.join(scratch, "conv")}', expect='no_model')
  convert('missing-to', f'--from_hf={scratch}', expect='to')
  convert('to-existing-workdir', f'--from_hf={os.path.join(ROOT, "tests/fixtures/hf_reformer_lsh")}',
          f'--to={w}', expect='checkpoints')
  convert('source-not-a-model', f'--from_hf={scratch}', f'--to={os.path.join(scratch, "conv")}',
          expect='config')

  # Divergence.
  cases.append(Case('train-diverging-lr', train(new, '--config.optimizer.learning_rate=1e6'),
                    want='warn', expect=r'(?i)diverg'))
  return cases, w, new


def classify(case, result, lost):
  text = result.stdout + result.stderr
  if lost:
    return 'lost'
  if 'Traceback (most recent call last)' in text:
    return 'traceback'
  if case.want == 'error':
    if result.returncode == 0:
      return 'silent'
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    message = lines[-1] if lines else ''
    clear = (message.startswith('terraflax.') or message.startswith('FATAL Flags parsing error')
             or 'Usage' in message)
    named = not case.expect or case.expect.lower() in text.lower()
    return 'clear' if clear and named and len(lines) <= 3 else 'unclear'
  if result.returncode != 0:
    return 'unclear'
  return 'clear' if re.search(case.expect, text) else 'silent'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', default='', help='run the cases whose name contains this')
  parser.add_argument('--keep', action='store_true', help='keep the scratch directory')
  args = parser.parse_args()
  scratch = tempfile.mkdtemp(prefix='cli_faults_')
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  base = os.path.join(scratch, 'base')
  started = time.time()
  made = subprocess.run(train(base), cwd=ROOT, env=env, capture_output=True, text=True)
  if made.returncode:
    sys.exit(f'could not train the base workdir:\n{made.stderr[-3000:]}')
  cases, w, new = make_cases(base, scratch)
  cases = [c for c in cases if args.only in c.name]
  counts = {k: 0 for k in ('clear', 'unclear', 'traceback', 'silent', 'lost')}
  rows = []
  for case in cases:
    for path in (w, new, os.path.join(scratch, 'conv'), os.path.join(scratch, 'exported')):
      shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, w)
    if case.setup is not None:
      case.setup(w)
    watched = case.workdir or w
    before = tree_hashes(watched)
    contents = {}
    for name in ('metrics.jsonl', 'eval_results.jsonl'):
      if os.path.isdir(watched) and os.path.exists(os.path.join(watched, name)):
        with open(os.path.join(watched, name), 'rb') as f:
          contents[name] = f.read()
    began = time.time()
    try:
      result = subprocess.run(case.command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=case.timeout)
    except subprocess.TimeoutExpired as e:
      result = subprocess.CompletedProcess(case.command, -9, e.stdout or '', 'timed out')
    lost = lost_files(before, watched, case.appendable, contents, case.kept_to)
    outcome = classify(case, result, lost)
    counts[outcome] += 1
    lines = [l for l in (result.stderr or '').splitlines() if l.strip()]
    said = (lines[-1] if lines else (result.stdout.strip().splitlines() or [''])[-1])[:150]
    rows.append((case.name, outcome, result.returncode, time.time() - began,
                 '; '.join(lost) if lost else said))
    print(f'{case.name:32s} {outcome:9s} rc={result.returncode:<3d} {rows[-1][3]:5.1f}s  '
          f'{rows[-1][4]}', flush=True)
  if not args.keep:
    shutil.rmtree(scratch, ignore_errors=True)
  print()
  print('| cases | clear or recovered | unclear | traceback | silent | data lost |')
  print('|---|---|---|---|---|---|')
  print(f'| {len(cases)} | {counts["clear"]} | {counts["unclear"]} | {counts["traceback"]} | '
        f'{counts["silent"]} | {counts["lost"]} |')
  print(f'\n({time.time() - started:.0f} s)')


if __name__ == '__main__':
  main()
