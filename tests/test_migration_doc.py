"""docs/migrating_from_trax.md: its marked Python blocks run; every terraflax name it lists exists.

A Python block preceded by the line `<!-- executed -->` runs, in document order, in one
namespace (like tests/test_readme.py for the README). In every Markdown table, each
backticked span of a column whose header says 'terraflax' must resolve:

  python -m MODULE ...           MODULE importable
  --config.a.b=... / config.a.b  a config field (terraflax.train.config.SCHEMA; model.* fields
                                 are model keyword arguments, model.attention.* spec fields)
  tl.X / cb.X / tm.X / LSH(...)  the attribute exists; keyword arguments of a call are in its
                                 signature
  kw=value / bare lowercase kw   a keyword argument of a terraflax model, layer or spec
"""

import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import pathlib
import re
import shutil

import flax
import flax.linen  # noqa: F401
import jax
from absl.testing import absltest

import terraflax.combinators as cb
import terraflax.layers as tl
import terraflax.models as tm
from terraflax.models import attention as attention_lib
from terraflax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'migrating_from_trax.md'
MARKER = '<!-- executed -->'

NAMESPACE = {'cb': cb, 'tl': tl, 'tm': tm, 'jax': jax, 'flax': flax,
             'LSH': attention_lib.LSH, 'Full': attention_lib.Full,
             'Local': attention_lib.Local, 'SparseQKV': attention_lib.SparseQKV}
SPECS = (attention_lib.LSH, attention_lib.Full, attention_lib.Local, attention_lib.SparseQKV)
MODELS = [getattr(tm, name) for name in dir(tm) if name[:1].isupper()]


def executed_blocks(text):
  return re.findall(r'^' + re.escape(MARKER) + r'\n```python\n(.*?)```', text, flags=re.S | re.M)


def parameters(fn):
  try:
    return inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return {}


def keyword_names():
  """Keyword arguments of terraflax's models, layers, combinators and attention specs."""
  names = set()
  for module in (cb, tl, tm):
    for attribute in vars(module).values():
      if callable(attribute):
        names |= set(parameters(attribute))
  for spec in SPECS:
    names |= {f.name for f in dataclasses.fields(spec)}
  return names - {'self', 'args', 'kwargs', 'parent', 'name'}


MODEL_KWARGS = {'name'} | {p for model in MODELS for p in parameters(model)}
SPEC_FIELDS = {'kind'} | {f.name for spec in SPECS for f in dataclasses.fields(spec)}
KEYWORDS = keyword_names()


def table_cells(text, column_word='terraflax'):
  """(line number, cell text) of every table cell under a header naming `column_word`."""
  lines, cells = text.splitlines(), []
  for i in range(len(lines) - 1):
    if not (lines[i].startswith('|') and re.match(r'^\|(\s*:?-+:?\s*\|)+\s*$', lines[i + 1])):
      continue
    header = [c.strip() for c in lines[i].strip().strip('|').split('|')]
    columns = [k for k, h in enumerate(header) if h.lower().startswith(column_word)]
    j = i + 2
    while j < len(lines) and lines[j].startswith('|'):
      row = [c.strip() for c in lines[j].strip().strip('|').split('|')]
      cells.extend((j + 1, row[k]) for k in columns if k < len(row))
      j += 1
  return cells


def resolve(dotted):
  """The object a dotted name names, importing `terraflax.*` modules on the way."""
  parts = dotted.split('.')
  if parts[0] == 'terraflax':
    obj = importlib.import_module('terraflax')
    for k, part in enumerate(parts[1:], start=1):
      if not hasattr(obj, part):
        importlib.import_module('.'.join(parts[:k + 1]))
      obj = getattr(obj, part)
    return obj
  obj = NAMESPACE[parts[0]]
  for part in parts[1:]:
    obj = getattr(obj, part)
  return obj


def dotted_name(node):
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    inner = dotted_name(node.value)
    return None if inner is None else f'{inner}.{node.attr}'
  return None


class Checker:
  """Collects what in a table cell's code spans does not exist."""

  def __init__(self):
    self.problems = []

  def check_span(self, where, span):
    span = span.strip()
    if span.startswith('python -m '):
      module = span.split()[2]
      if importlib.util.find_spec(module) is None:
        self.problems.append(f'{where}: no module {module}')
      return
    if span.startswith(('--config.', 'config.')):
      self.check_config(where, re.split(r'[ =]', span.lstrip('-'), maxsplit=1)[0])
      return
    try:
      tree = ast.parse(span)
    except SyntaxError:
      return  # Prose or a picture of the stack, not a name.
    if len(tree.body) != 1:
      return
    statement = tree.body[0]
    if isinstance(statement, ast.Assign):
      target = statement.targets[0]
      if isinstance(target, ast.Name) and not re.search(r'\s=\s', span):  # kw=value
        self.check_keyword(where, target.id)
      self.check_expression(where, statement.value)
    elif isinstance(statement, ast.Expr):
      self.check_expression(where, statement.value)

  def check_keyword(self, where, name):
    if name not in KEYWORDS:
      self.problems.append(f'{where}: {name!r} is no keyword argument of a terraflax model, '
                           'layer or attention spec')

  def check_expression(self, where, node):
    call = node if isinstance(node, ast.Call) else None
    dotted = dotted_name(call.func if call else node)
    if dotted is None:
      return  # A literal, a subscript, ...
    root = dotted.split('.')[0]
    if root not in NAMESPACE and root != 'terraflax':
      if '.' not in dotted and call is None and dotted.islower():
        self.check_keyword(where, dotted)  # A bare keyword argument: `d_qk`.
      return  # A local variable of the example: `layer.apply(...)`.
    try:
      obj = resolve(dotted)
    except (AttributeError, KeyError, ImportError) as e:
      self.problems.append(f'{where}: {dotted} does not resolve ({e})')
      return
    if call is None:
      return
    params = parameters(obj)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
      return
    for keyword in call.keywords:
      if keyword.arg is not None and keyword.arg not in params:
        self.problems.append(f'{where}: {dotted} takes no keyword {keyword.arg!r}')
    for arg in call.args + [k.value for k in call.keywords]:
      if isinstance(arg, (ast.Call, ast.Attribute)):
        self.check_expression(where, arg)

  def check_config(self, where, path):
    parts = path.split('.')[1:]
    if not parts:
      return
    if parts[0] not in config_lib.SECTIONS:
      self.problems.append(f'{where}: config.{parts[0]} is not a config section')
    elif parts[0] == 'model' and len(parts) > 1:
      if parts[1] not in MODEL_KWARGS:
        self.problems.append(f'{where}: config.model.{parts[1]} is no model keyword argument')
      elif parts[1] == 'attention' and len(parts) > 2 and parts[2] not in SPEC_FIELDS:
        self.problems.append(f'{where}: config.model.attention.{parts[2]} is no spec field')
    elif parts[0] != 'model' and len(parts) > 1:
      field = '.'.join(parts)
      if not any(f == field or f.startswith(field + '.') for f in config_lib.SCHEMA):
        self.problems.append(f'{where}: config.{field} is not a config field')


def check_cells(cells):
  checker = Checker()
  for line, cell in cells:
    for span in re.findall(r'`([^`]+)`', cell):
      checker.check_span(f'line {line} `{span}`', span)
  return checker.problems


class MigrationDocTest(absltest.TestCase):

  def test_readme_links_the_guide(self):
    self.assertIn('](docs/migrating_from_trax.md)', (ROOT / 'README.md').read_text())

  def test_every_terraflax_name_in_the_tables_exists(self):
    cells = table_cells(DOC.read_text())
    self.assertGreater(len(cells), 80)
    self.assertEqual(check_cells(cells), [])

  def test_the_checker_catches_what_does_not_exist(self):
    bad = [(1, '`tl.DenseGeneral`'), (2, '`tm.ReformerLM(d_attention_key=64)`'),
           (3, '`--config.model.attention.n_hash=4`'), (4, '`--config.train.step=10`'),
           (5, '`python -m terraflax.trainer`'), (6, '`pos_axial_shape`'),
           (7, '`LSH(n_rounds=2)`'), (8, '`terraflax.decoding.sample`'),
           (9, '`config.model.attention_type`'), (10, '`attention_type=LSH()`')]
    problems = check_cells(bad)
    self.assertLen(problems, len(bad), problems)
    good = [(1, '`tm.ReformerLM(d_qk=64)`, `--config.model.attention.n_hashes=4`, `d_v`, '
                '`python -m terraflax.train --config=x`, `config.train.steps`, `LSH(n_hashes=2)`')]
    self.assertEqual(check_cells(good), [])

  def test_marked_blocks_run_in_order(self):
    text = DOC.read_text()
    blocks = executed_blocks(text)
    markers = re.findall(r'^' + re.escape(MARKER) + r'$', text, flags=re.M)
    self.assertLen(blocks, len(markers))  # Every marker line is followed by a python block.
    self.assertGreaterEqual(len(blocks), 2)
    namespace, printed = {}, io.StringIO()
    try:
      with contextlib.redirect_stdout(printed):
        for block in blocks:
          exec(compile(block, str(DOC), 'exec'), namespace)  # pylint: disable=exec-used
    finally:
      if isinstance(namespace.get('workdir'), str):
        shutil.rmtree(namespace['workdir'], ignore_errors=True)
    out = printed.getvalue()
    self.assertIn('Select indices must be >= 0, got (-1,).', out)
    self.assertIn('(1, 8)', out)  # The worked example's greedy continuation.
    self.assertIn('eval/loss', out)
    # The port has the same size as the Trax model (40,000 weights in Trax 1.4.1).
    params = namespace['params']
    self.assertEqual(sum(x.size for x in jax.tree_util.tree_leaves(params)), 40_000)


if __name__ == '__main__':
  absltest.main()
