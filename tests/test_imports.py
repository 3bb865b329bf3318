"""Imports run one way: no cycle among terraflax modules, function-local imports included.

Reads every module under terraflax/ with `ast` (nothing is imported), so an
import hidden inside a function counts like one at the top. Also checks that
decoding, export and the models never reach terraflax.train, and that no
function in terraflax/train/ is longer than 80 lines (the loop reads in short
functions). Runs under pytest or as `python tests/test_imports.py`.
"""

import ast
import pathlib
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = 'terraflax'
MAX_TRAIN_FUNCTION_LINES = 80


def module_files() -> dict[str, pathlib.Path]:
  """{'terraflax.train.trainer': path, 'terraflax.train': .../__init__.py, ...}."""
  files = {}
  for path in sorted((ROOT / PACKAGE).rglob('*.py')):
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    files['.'.join(parts)] = path
  return files


def _absolute(module: str, is_package: bool, name: str | None, level: int) -> str:
  """The absolute module name of `from <level dots><name> import ...` inside `module`."""
  if not level:
    return name or ''
  base = module.split('.')
  if not is_package:
    base = base[:-1]
  base = base[:len(base) - (level - 1)]
  return '.'.join(base + ([name] if name else []))


def import_graph(files: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """{module: the terraflax modules it imports anywhere in its body}.

  `from a.b import c` imports `a.b` and, when it is a module, `a.b.c`; a
  package's own submodules and its parents are not edges (they are loaded
  with it anyway).
  """
  graph = {}
  for module, path in files.items():
    is_package = path.name == '__init__.py'
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = _absolute(module, is_package, node.module, node.level)
        names = [base] + [f'{base}.{alias.name}' for alias in node.names]
      else:
        continue
      for name in names:
        while name and name not in files:  # `a.b.Name` -> the module `a.b`.
          name = name.rpartition('.')[0]
        related = name == module or module.startswith(name + '.') or name.startswith(module + '.')
        if name and not related:
          targets.add(name)
    graph[module] = targets
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []
  counter = 0
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          found.append(sorted(component))
  return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for target in graph[todo.pop()]:
      if target not in seen:
        seen.add(target)
        todo.append(target)
  return seen


def long_functions(files: dict[str, pathlib.Path], prefix: str, limit: int) -> list[str]:
  """'path:name (n lines)' of every function in modules under `prefix` longer than `limit`."""
  out = []
  for module, path in files.items():
    if module != prefix and not module.startswith(prefix + '.'):
      continue
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > limit:
          out.append(f'{path.relative_to(ROOT)}:{node.name} ({lines} lines)')
  return out


class ImportsTest(unittest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.files = module_files()
    cls.graph = import_graph(cls.files)

  def test_the_graph_sees_function_local_imports(self):
    # export.py imports terraflax only inside functions (its loader runs without terraflax).
    self.assertIn('terraflax.rng', self.graph['terraflax.export'])

  def test_no_import_cycle(self):
    found = cycles(self.graph)
    self.assertEqual(found, [], 'import cycles: ' + '; '.join(' <-> '.join(c) for c in found))

  def test_decoding_export_serve_and_models_do_not_reach_the_training_package(self):
    for module in sorted(self.files):
      if module in ('terraflax.decoding', 'terraflax.export') or module.startswith(
          ('terraflax.models', 'terraflax.serve')):
        train = sorted(m for m in reachable(self.graph, module)
                       if m == 'terraflax.train' or m.startswith('terraflax.train.'))
        self.assertEqual(train, [], f'{module} imports {train}')

  def test_no_train_function_is_longer_than_80_lines(self):
    self.assertEqual(long_functions(self.files, 'terraflax.train', MAX_TRAIN_FUNCTION_LINES), [])

  def test_cycles_of_a_toy_graph(self):
    self.assertEqual(cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}), [['a', 'b', 'c']])
    self.assertEqual(cycles({'a': {'b'}, 'b': set()}), [])


if __name__ == '__main__':
  unittest.main()
