"""The README's Python examples run as written."""

import contextlib
import io
import pathlib
import re

from absl.testing import absltest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks():
  return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


class ReadmeTest(absltest.TestCase):

  def test_ten_line_example_runs_and_prints_what_it_says(self):
    blocks = python_blocks()
    self.assertNotEmpty(blocks)
    example = blocks[0]
    self.assertLessEqual(len(example.strip().splitlines()), 12)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      exec(compile(example, str(README), 'exec'), {})  # pylint: disable=exec-used
    self.assertEqual(printed.getvalue().strip(), '(2, 16, 256) 1 1')

  def test_every_python_block_runs(self):
    for block in python_blocks()[1:]:
      with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, str(README), 'exec'), {})  # pylint: disable=exec-used


if __name__ == '__main__':
  absltest.main()
