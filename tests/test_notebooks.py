"""The notebooks in notebooks/ run headless, in FAST mode, and are stored without outputs.

Each notebook is executed by nbclient in a fresh Jupyter kernel with
TERRAFLAX_FAST=1 (tiny sizes), the Agg matplotlib backend, and
TERRAFLAX_NOTEBOOK_OUT set, so that every `finish(fig, name)` plot must also
appear as a PNG. A cell that raises fails the test.
"""

import os
import pathlib
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / 'notebooks'
EXPECTED = ('01_combinators', '02_reformer_long_sequences', '03_terraformer_decoding',
            '04_train_finetune_decode', '05_probing')
CELL_TIMEOUT_S = 300  # Generous: the machine running the suite may be shared.


def read(name):
  return nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)


def plot_names(nb):
  """The PNG names that the notebook's `finish(fig, '0N_name')` calls write."""
  names = []
  for cell in nb.cells:
    if cell.cell_type == 'code' and 'finish(' in cell.source:
      names += re.findall(r"'(\d\d_\w+)'\)", cell.source)
  return names


def kernel_env(out_dir):
  env = dict(os.environ)
  env.update(TERRAFLAX_FAST='1', TERRAFLAX_NOTEBOOK_OUT=str(out_dir), MPLBACKEND='Agg',
             JAX_PLATFORMS='cpu', JAX_NUMPY_RANK_PROMOTION='raise')
  # This checkout's terraflax wins over any installed copy, as it does for the tests.
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


class StoredNotebooksTest(absltest.TestCase):

  def test_the_notebooks_exist(self):
    found = sorted(p.stem for p in NOTEBOOKS.glob('*.ipynb'))
    self.assertEqual(found, sorted(EXPECTED))

  def test_stored_without_outputs(self):
    for name in EXPECTED:
      nb = read(name)
      nbformat.validate(nb)
      for i, cell in enumerate(nb.cells):
        if cell.cell_type != 'code':
          continue
        with self.subTest(notebook=name, cell=i):
          self.assertEqual(cell.outputs, [], f'{name} cell {i} has stored outputs')
          self.assertIsNone(cell.execution_count, f'{name} cell {i} has an execution count')
          self.assertNotIn('execution', cell.metadata, f'{name} cell {i} has execution times')

  def test_first_code_cell_installs_only_when_missing(self):
    for name in EXPECTED:
      first = next(c for c in read(name).cells if c.cell_type == 'code')
      with self.subTest(notebook=name):
        self.assertIn("find_spec('terraflax') is None", first.source)
        self.assertIn('%pip install', first.source)
        self.assertIn('git+https://', first.source)

  def test_every_notebook_saves_plots(self):
    for name in EXPECTED:
      with self.subTest(notebook=name):
        self.assertNotEmpty(plot_names(read(name)))


class ExecuteNotebooksTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in EXPECTED)
  def test_runs_headless_in_fast_mode(self, name):
    nb = read(name)
    with tempfile.TemporaryDirectory() as out_dir:
      client = NotebookClient(
          nb, timeout=CELL_TIMEOUT_S, kernel_name='python3', allow_errors=False,
          resources={'metadata': {'path': str(ROOT)}})
      client.execute(env=kernel_env(out_dir))  # Raises CellExecutionError if a cell raises.
      errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
                if o.output_type == 'error']
      self.assertEmpty(errors)
      written = sorted(p.name for p in pathlib.Path(out_dir).glob('*.png'))
      self.assertEqual(written, sorted(f'{n}.png' for n in plot_names(nb)))
      for png in pathlib.Path(out_dir).glob('*.png'):
        self.assertEqual(png.read_bytes()[:8], b'\x89PNG\r\n\x1a\n')


if __name__ == '__main__':
  absltest.main()
