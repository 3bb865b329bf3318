"""terraflax.export: an exported, reloaded decode step gives the live model's logits."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from terraflax import export
from terraflax.models.attention import LSH, Local
from terraflax.models.reformer import ReformerLM

REPO = pathlib.Path(__file__).resolve().parents[1]
LM = dict(vocab_size=11, d_model=8, d_ff=16, n_layers=2, n_heads=2, max_len=16,
          attention=(Local(chunk_len=4), LSH(chunk_len=4, n_buckets=2)), dropout=0.0)

# Loads terraflax/export.py by path with terraflax, flax and orbax unimportable,
# runs the artifact and prints its logits: serving needs jax and the artifact only.
STANDALONE = r'''
import importlib.util, sys
import numpy as np
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('terraflax', 'flax', 'orbax', 'optax'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location('standalone_export', sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
served = module.Exported(sys.argv[2])
cache = served.initial_cache()
rows = []
for token in [0, 3, 5, 7]:
  logits, cache = served.step(cache, np.full((2, 1), token, np.int32))
  rows.append(np.asarray(logits))
np.save(sys.argv[3], np.stack(rows))
print(served.greedy([[3, 5], [4, 6]], 3).tolist())
'''


class ExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tokens = jnp.zeros((2, 8), jnp.int32)
    eval_model = ReformerLM(**LM, mode='eval')
    cls.params = jax.jit(eval_model.init)(
        {'params': jax.random.key(0), 'hash': jax.random.key(1)}, tokens)['params']
    cls.model = ReformerLM(**LM, mode='predict')
    cls.tmp = tempfile.mkdtemp()
    cls.decode_dir = export.export_decode_step(cls.model, cls.params,
                                               os.path.join(cls.tmp, 'decode'), batch_size=2)
    # The live model, stepped by hand with the same rngs (the LSH rotations are drawn at init).
    rngs = export.rngs_of(jax.random.key_data(jax.random.key(0)))
    cls.cache = jax.jit(cls.model.init)(rngs, jnp.zeros((2, 1), jnp.int32))['cache']
    cls.step = jax.jit(lambda cache, tokens: cls.model.apply(
        {'params': cls.params, 'cache': cache}, tokens, rngs=rngs, mutable=['cache']))
    cls.live = cls.live_logits([[0, 0], [3, 3], [5, 5], [7, 7]])

  @classmethod
  def live_logits(cls, tokens):
    """The live model's logits (steps, b, 1, v) for tokens (steps, b)."""
    cache, rows = cls.cache, []
    for step_tokens in tokens:
      logits, state = cls.step(cache, jnp.asarray(step_tokens, jnp.int32)[:, None])
      cache = state['cache']
      rows.append(np.asarray(logits))
    return np.stack(rows)

  @classmethod
  def live_greedy(cls, prompt, n):
    """Greedy decoding with the live step: pad 0, then the prompt, then argmaxes."""
    prompt = np.asarray(prompt)
    cache, token, out = cls.cache, np.zeros((2, 1), np.int32), []
    for t in range(prompt.shape[1] + n):
      logits, state = cls.step(cache, jnp.asarray(token))
      cache = state['cache']
      token = (prompt[:, t:t + 1] if t < prompt.shape[1]
               else np.asarray(jnp.argmax(logits[:, -1], -1), np.int32)[:, None])
      if t >= prompt.shape[1]:
        out.append(token)
    return np.concatenate(out, axis=1)

  def test_reloaded_decode_step_matches_the_live_model(self):
    served = export.Exported(self.decode_dir)
    cache = served.initial_cache()
    rows = []
    for token in [0, 3, 5, 7]:
      logits, cache = served.step(cache, np.full((2, 1), token, np.int32))
      self.assertEqual(logits.shape, (2, 1, 11))
      rows.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(rows), self.live, rtol=1e-5, atol=1e-5)

  def test_standalone_loader_needs_no_terraflax(self):
    out = os.path.join(self.tmp, 'standalone.npy')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    result = subprocess.run(
        [sys.executable, '-c', STANDALONE, str(REPO / 'terraflax' / 'export.py'),
         self.decode_dir, out], cwd=self.tmp, env=env, capture_output=True, text=True,
        timeout=300, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    np.testing.assert_allclose(np.load(out), self.live, rtol=1e-5, atol=1e-5)
    want = self.live_greedy([[3, 5], [4, 6]], 3)
    self.assertEqual(result.stdout.strip().splitlines()[-1], str(want.tolist()))

  def test_forward_export(self):
    eval_model = ReformerLM(**LM, mode='eval')
    path = export.export_forward(eval_model, self.params, os.path.join(self.tmp, 'forward'),
                                 length=8, seed=3)
    tokens = np.arange(8, dtype=np.int32)[None] % 11
    served = export.Exported(path)
    rngs = export.rngs_of(jax.random.key_data(jax.random.key(3)))
    want = jax.jit(eval_model.apply)({'params': self.params}, tokens, rngs=rngs)
    np.testing.assert_allclose(np.asarray(served.forward(tokens)), np.asarray(want), rtol=1e-5,
                               atol=1e-5)
    with self.assertRaisesRegex(ValueError, 'forward pass'):
      served.step(None, tokens[:, :1])

  def test_text_methods_follow_the_recorded_tokenizer(self):
    served = export.Exported(self.decode_dir)  # Exported from a model, not a workdir: ids.
    self.assertEqual(served.tokenizer, 'ids')
    with self.assertRaisesRegex(ValueError, 'reads token ids'):
      served.encode('x')
    # As `export_workdir` records a byte-level workdir (tokenizer 'bytes').
    path = os.path.join(self.tmp, 'bytes_meta')
    shutil.copytree(self.decode_dir, path)
    with open(os.path.join(path, export.META_FILE)) as f:
      meta = json.load(f)
    meta.update(tokenizer='bytes', tokenizer_vocab_size=256, special_ids=[0, 255])
    with open(os.path.join(path, export.META_FILE), 'w') as f:
      json.dump(meta, f)
    served = export.Exported(path)
    self.assertEqual(served.encode('\x03\x05'), [3, 5])
    generated = self.live_greedy([[3, 5], [3, 5]], 3)[0].tolist()
    want = bytes([3, 5] + [t for t in generated if t != 0]).decode('utf-8')
    self.assertEqual(served.greedy_text('\x03\x05', 3), want)

  def test_errors(self):
    with self.assertRaisesRegex(FileNotFoundError, 'meta.json is missing'):
      export.Exported(self.tmp)
    with self.assertRaisesRegex(ValueError, "mode='predict'"):
      export.export_decode_step(ReformerLM(**LM, mode='eval'), self.params,
                                os.path.join(self.tmp, 'bad'))


if __name__ == '__main__':
  absltest.main()
