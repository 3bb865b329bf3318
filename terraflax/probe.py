"""Linear probes: what a trained LM's activations hold, layer by layer, against a control.

  python -m terraflax.probe --workdir=DIR [--properties=string,comment,name,depth] \\
      [--path=REGEX] [--sequences=64] [--steps=300]

1. Capture activations (`capture`): any module's `__call__` output by its
   path (a regex searched in paths like 'Repeat_3/Serial_0'), with flax's
   `capture_intermediates`; the outputs of a scanned stack come stacked on a
   leading layer axis. `depth_activations` picks the residual stream at every
   depth: the input to the block stack (depth 0) and the output of each
   scanned layer (TransformerLM: 'Repeat_*/Serial_0'; ReformerLM: the last
   block of 'ReversibleSerial_*', both streams concatenated).
2. Label every byte of Python source with the `tokenize` module
   (`python_labels`): inside a string literal, inside a comment, inside an
   identifier (a NAME token), bracket depth (0, 1, 2, 3+).
3. Train a linear probe (softmax regression, optax adam, full batch) per
   depth on the activations of the first part of the bytes and report its
   accuracy on the rest. The base model's parameters are only read: they are
   an argument of a forward pass, never of a gradient.

An LM at position i has read bytes 0..i-1 (inputs are shifted right), so the
label of byte i is probed from the activations at position i + 1: what the
model knows after reading the byte. The control is the same probe on a
randomly initialised model of the same config (`random_params`); the
majority class's frequency is reported too.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import re
import tokenize
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from terraflax import errors
from terraflax import rng as rng_lib
from terraflax.models import spec as spec_lib

PROPERTIES = ('string', 'comment', 'name', 'depth')
N_CLASSES = {'string': 2, 'comment': 2, 'name': 2, 'depth': 4}
_OPEN, _CLOSE = '([{', ')]}'


class ProbeError(errors.UserError, ValueError):
  """A probe path, property or corpus that cannot be probed."""


# ----------------------------------------------------------------------------- labels


def python_labels(source: str) -> dict[str, np.ndarray]:
  """{property: int8 (n_bytes,)} for the UTF-8 bytes of `source` (Python code).

  string: 1 inside a string literal (prefix and quotes included; an f-string
  from its start to its end); comment: 1 inside a comment ('#' to the end of
  the line); name: 1 inside a NAME token (identifiers and keywords); depth:
  brackets opened before the byte and not closed before it, capped at 3
  (an opening bracket is at the outer depth, its closing one inside).
  Raises `tokenize.TokenError` / `SyntaxError` for source that does not tokenize.
  """
  lines = source.splitlines(keepends=True)
  starts = np.cumsum([0] + [len(line) for line in lines])
  labels = {name: np.zeros(len(source), np.int8) for name in PROPERTIES}
  depth = np.zeros(len(source) + 1, np.int32)  # +1 at an opener's next char, -1 at a closer.
  fstring_start = []

  def offset(row_col):
    row, col = row_col
    return int(starts[row - 1]) + col

  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    begin, end = offset(token.start), offset(token.end)
    kind = tokenize.tok_name[token.type]
    if kind == 'STRING':
      labels['string'][begin:end] = 1
    elif kind == 'FSTRING_START':  # Python >= 3.12 splits f-strings into tokens.
      fstring_start.append(begin)
    elif kind == 'FSTRING_END':
      labels['string'][fstring_start.pop():end] = 1
    elif kind == 'COMMENT':
      labels['comment'][begin:end] = 1
    elif kind == 'NAME':
      labels['name'][begin:end] = 1
    elif kind == 'OP' and token.string in _OPEN:
      depth[end] += 1
    elif kind == 'OP' and token.string in _CLOSE:
      depth[end] -= 1
  labels['depth'] = np.minimum(np.cumsum(depth)[:len(source)], 3).astype(np.int8)
  widths = np.array([len(c.encode('utf-8')) for c in source], np.int64)
  return {name: np.repeat(values, widths) for name, values in labels.items()}


def python_corpus(directory: str | None = None, *, max_files: int = 0) -> list[bytes]:
  """The top-level `*.py` files of `directory` (default: the standard library) that tokenize."""
  directory = directory or os.path.dirname(os.__file__)
  out = []
  for path in sorted(glob.glob(os.path.join(directory, '*.py'))):
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
      python_labels(text)
    except (UnicodeDecodeError, SyntaxError, tokenize.TokenError):
      continue
    out.append(text.encode('utf-8'))
    if max_files and len(out) >= max_files:
      break
  return out


def labelled_windows(files: Sequence[bytes], *, n: int, seq_len: int, seed: int = 0):
  """(tokens int32 (n, seq_len), {property: int8 (n, seq_len)}): random windows of the files.

  Token ids are the bytes (a byte-level LM's ids).
  """
  rng = np.random.default_rng(seed)
  labels = [python_labels(f.decode('utf-8')) for f in files]
  usable = [i for i, f in enumerate(files) if len(f) > seq_len]
  if not usable:
    raise ProbeError(f'python_corpus has no file longer than seq_len={seq_len} bytes.')
  tokens = np.zeros((n, seq_len), np.int32)
  out = {name: np.zeros((n, seq_len), np.int8) for name in PROPERTIES}
  for row in range(n):
    i = usable[rng.integers(len(usable))]
    start = int(rng.integers(len(files[i]) - seq_len))
    tokens[row] = np.frombuffer(files[i][start:start + seq_len], np.uint8)
    for name in PROPERTIES:
      out[name][row] = labels[i][name][start:start + seq_len]
  return tokens, out


# ----------------------------------------------------------------------------- activations


def captured(model, params, tokens, *, rng=None) -> dict[str, jax.Array]:
  """{'Repeat_3/Serial_0': output, ...}: every module's `__call__` output, with flax's
  `capture_intermediates` (its first call's; a tuple of outputs concatenated on the last
  axis). An eval-mode model is expected."""
  rngs = rng_lib.noise_keys(rng if rng is not None else jax.random.key(0))
  _, state = model.apply({'params': params}, tokens, capture_intermediates=True,
                         mutable=['intermediates'], rngs=rngs)
  out = {}

  def visit(tree, prefix):
    for key, value in tree.items():
      if key == '__call__':
        first = value[0]  # One entry per call.
        out[prefix] = (jnp.concatenate(first, axis=-1) if isinstance(first, (tuple, list))
                       else first)
      elif isinstance(value, dict) or hasattr(value, 'items'):
        visit(value, f'{prefix}/{key}' if prefix else key)

  visit(state['intermediates'], '')
  return out


def capture(model, params, tokens, path: str, *, rng=None) -> jax.Array:
  """The output of the one module whose path matches the regex `path` (searched)."""
  found = {k: v for k, v in captured(model, params, tokens, rng=rng).items()
           if k and re.search(path, k)}
  if len(found) != 1:
    raise ProbeError(f'probe path {path!r} matches {len(found)} modules '
                     f'({", ".join(sorted(found)[:6]) or "none"}); make it match exactly one.')
  return next(iter(found.values()))


def depth_activations(model, params, tokens, *, rng=None) -> list[tuple[str, jax.Array]]:
  """[(name, (b, l, d'))]: the stack's input (depth 0) and every scanned layer's output.

  The stack is the top-level module whose children's outputs carry a leading
  layer axis (rank 4); a layer's output is its last child's.
  """
  outputs = captured(model, params, tokens, rng=rng)
  b, l = tokens.shape
  stacked = sorted({k.split('/')[0] for k, v in outputs.items()
                    if k.count('/') == 1 and v.ndim == 4 and v.shape[1:3] == (b, l)},
                   key=_index)
  if not stacked:
    raise ProbeError('depth_activations found no scanned stack of layers in this model; '
                     'use capture(model, params, tokens, path) with a module path.')
  stack = stacked[0]
  children = sorted((k for k in outputs if k.startswith(stack + '/') and k.count('/') == 1),
                    key=_index)
  last = outputs[children[-1]]
  before = [k for k in outputs if '/' not in k and k and _index(k) < _index(stack)
            and outputs[k].ndim == 3 and outputs[k].shape[:2] == (b, l)]
  layers = [(f'{stack}/input', outputs[max(before, key=_index)])] if before else []
  layers += [(f'{children[-1]}[{i}]', last[i]) for i in range(last.shape[0])]
  return layers


def _index(name: str) -> int:
  tail = name.split('/')[-1].rsplit('_', 1)[-1]
  return int(tail) if tail.isdigit() else -1


def random_params(spec: spec_lib.ModelSpec, seq_len: int, seed: int = 1):
  """A fresh initialisation of the model `spec` describes: the control."""
  model = spec.build('eval')
  tokens = spec.example_inputs(1, seq_len)
  variables = model.init(rng_lib.stream_keys(jax.random.key(seed)), *tokens)
  return nn.meta.unbox(variables['params'])


# ----------------------------------------------------------------------------- probes


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Held-out accuracy of one probe, and the majority class's frequency there."""

  layer: str
  prop: str
  accuracy: float
  majority: float


def train_probe(features, labels, n_classes: int, *, steps: int = 300,
                learning_rate: float = 1e-2, train_fraction: float = 0.75):
  """(held-out accuracy, majority frequency, probe params) of softmax regression.

  features float (n, d), labels int (n,): the first `train_fraction` of the
  rows train the probe (full batch, adam, features standardised with the
  training rows' statistics), the rest test it.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  n_train = int(len(labels) * train_fraction)
  mean = features[:n_train].mean(axis=0)
  std = features[:n_train].std(axis=0) + 1e-6
  x = (features - mean) / std
  accuracy, probe = _fit(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:],
                         n_classes=n_classes, steps=steps, learning_rate=learning_rate)
  test = labels[n_train:]
  majority = float(np.bincount(test, minlength=n_classes).max() / max(len(test), 1))
  return float(accuracy), majority, probe


@jax.jit(static_argnames=('n_classes', 'steps'))
def _fit(x, y, x_test, y_test, *, n_classes, steps, learning_rate):
  """Softmax regression on (x, y) by `steps` full-batch adam steps; (test accuracy, probe)."""
  probe = {'w': jnp.zeros((x.shape[1], n_classes), jnp.float32),
           'b': jnp.zeros((n_classes,), jnp.float32)}
  tx = optax.adam(learning_rate)

  def loss(p):
    logits = x @ p['w'] + p['b'][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, _):
    p, state = carry
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return (optax.apply_updates(p, updates), state), None

  (probe, _), _ = jax.lax.scan(step, (probe, tx.init(probe)), None, length=steps)
  predicted = jnp.argmax(x_test @ probe['w'] + probe['b'][None, :], axis=-1)
  return jnp.mean(predicted == y_test), probe


def probe_layers(layers, labels: dict[str, np.ndarray], *, properties=PROPERTIES,
                 steps: int = 300, n_classes: dict[str, int] | None = None
                 ) -> list[ProbeResult]:
  """ProbeResults for every (layer, property): byte i's label from position i + 1.

  layers: [(name, float (b, l, d))]; labels: {property: int (b, l)};
  n_classes: classes per property (default `N_CLASSES`).
  """
  n_classes = dict(N_CLASSES, **(n_classes or {}))
  results = []
  for name, acts in layers:
    acts = np.asarray(acts)
    feats = acts[:, 1:].reshape(-1, acts.shape[-1])  # After reading byte i: position i + 1.
    for prop in properties:
      y = np.asarray(labels[prop])[:, :-1].reshape(-1)
      accuracy, majority, _ = train_probe(feats, y, n_classes[prop], steps=steps)
      results.append(ProbeResult(name, prop, accuracy, majority))
  return results


def probe_workdir(workdir: str, *, properties=PROPERTIES, n_sequences: int = 64,
                  seq_len: int | None = None, steps: int = 300, path: str = '',
                  corpus: str | None = None, max_files: int = 0, seed: int = 0):
  """{'trained': [ProbeResult], 'control': [ProbeResult]} for a byte-level LM workdir."""
  config, spec, params = spec_lib.load_workdir(workdir)
  seq_len = seq_len or int(config.data.seq_len)
  files = python_corpus(corpus, max_files=max_files)
  tokens, labels = labelled_windows(files, n=n_sequences, seq_len=seq_len, seed=seed)
  model = spec.build('eval')
  out = {}
  for kind, p in (('trained', params), ('control', random_params(spec, seq_len))):
    if path:
      layers = [(path, capture(model, p, jnp.asarray(tokens), path))]
    else:
      layers = depth_activations(model, p, jnp.asarray(tokens))
    out[kind] = probe_layers(layers, labels, properties=properties, steps=steps)
  return out


def format_table(results: dict[str, list[ProbeResult]]) -> str:
  """A markdown table: layer x property, trained / control accuracy (majority in the header)."""
  trained, control = results['trained'], results['control']
  props = list(dict.fromkeys(r.prop for r in trained))
  layers = list(dict.fromkeys(r.layer for r in trained))
  get = lambda rs, layer, prop: next(r for r in rs if r.layer == layer and r.prop == prop)  # pylint: disable=unnecessary-lambda-assignment
  header = '| layer | ' + ' | '.join(
      f'{p} (majority {get(trained, layers[0], p).majority:.3f})' for p in props) + ' |'
  lines = [header, '|' + '---|' * (len(props) + 1)]
  for layer in layers:
    cells = [f'{get(trained, layer, p).accuracy:.3f} / {get(control, layer, p).accuracy:.3f}'
             for p in props]
    lines.append(f'| {layer} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n\n(accuracy: trained model / random-init control)'


def main(argv):
  """`python -m terraflax.probe --workdir=DIR`: prints the table."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  properties = tuple(p.strip() for p in f.properties.split(',') if p.strip())
  bad = [p for p in properties if p not in PROPERTIES]
  if bad:
    raise ProbeError(f'--properties: unknown {", ".join(bad)}; valid: {", ".join(PROPERTIES)}.')
  results = probe_workdir(f.workdir, properties=properties, n_sequences=f.sequences,
                          steps=f.steps, path=f.path, max_files=f.max_files)
  print(format_table(results), flush=True)


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('workdir', None, 'A byte-level LM training workdir.')
  flags.DEFINE_string('properties', ','.join(PROPERTIES),
                      f'Comma-separated properties to probe: {", ".join(PROPERTIES)}.')
  flags.DEFINE_string('path', '', 'Probe this module (a regex of its path) instead of every '
                      'depth.')
  flags.DEFINE_integer('sequences', 64, 'Windows of the corpus to probe on.', lower_bound=4)
  flags.DEFINE_integer('steps', 300, 'Adam steps of each probe.', lower_bound=1)
  flags.DEFINE_integer('max_files', 0, 'Standard-library files to read (0: all).', lower_bound=0)
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from terraflax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, name='terraflax.probe')
