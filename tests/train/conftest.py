"""Makes 'tests.train.tiny_models' importable (the 'module:Factory' form needs it)."""

import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
