"""The int8/bfloat16-weight product (terraflax.kernels.lowp_cpu) against float64 references.

The reference is (x @ float64(q)) * scale, or x @ float64(w) with the
bfloat16 weights widened exactly, in NumPy float64: no code shared with the
kernel. Shapes cover rows 1..9 (one register block of 8 and one more),
widths with and without whole 32-column blocks, several 64-row depth blocks,
and a matrix big enough to be split between threads.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from terraflax import kernels
from terraflax import quantization as qz
from terraflax.kernels import lowp_cpu
from tests.contracts import assert_float32_near_float64 as close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_COMPILER = shutil.which(os.environ.get('CXX', 'c++').split()[0]) is not None
# (d_in, d_out): no whole column block; a tail after blocks; several depth blocks and a tail;
# threads (>= 2^16 weights) with a tail of 12 columns.
SHAPES = ((5, 7), (17, 45), (130, 96), (260, 300))


# Run with 8 forced CPU devices: rows split over 'data', the int8 matrix split over its
# columns (to be gathered); prints the error against float64 and the per-device call.
SHARDED = """
import json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from terraflax.kernels import lowp_cpu
assert lowp_cpu.available()
mesh = Mesh(np.array(jax.devices()), ('data',))
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 64)).astype(np.float32)
q = rng.integers(-127, 128, (64, 96)).astype(np.int8)
s = rng.random(96).astype(np.float32)
args = (jax.device_put(x, NamedSharding(mesh, P('data', None))),
        jax.device_put(q, NamedSharding(mesh, P(None, 'data'))), s)
f = jax.jit(lowp_cpu.matmul)
ref = (x.astype(np.float64) @ q) * s
hlo = f.lower(*args).compile().as_text()
print(json.dumps({'error': float(np.abs(np.asarray(f(*args)) - ref).max() / np.abs(ref).max()),
                  'calls': [l.split('custom-call(')[0].split('=')[-1].strip()
                            for l in hlo.splitlines() if lowp_cpu.INT8 in l]}))
"""


def operands(seed, rows, d_in, d_out):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, d_in)).astype(np.float32)
  q = rng.integers(-127, 128, (d_in, d_out)).astype(np.int8)
  scale = (rng.random(d_out) + 0.5).astype(np.float32) / 127
  w16 = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.bfloat16)
  return x, q, scale, w16


def reference(x, w, scale=None):
  w64 = np.asarray(jnp.asarray(w).astype(jnp.float32), np.float64)  # bf16 -> f32 is exact
  y = np.asarray(x, np.float64) @ w64
  return y if scale is None else y * np.asarray(scale, np.float64)


@absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernel')
class KernelTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.assertTrue(lowp_cpu.available(), 'the kernel failed to build (see the warning)')

  @parameterized.product(rows=(1, 2, 5, 8, 9), shape=SHAPES)
  def test_int8_and_bf16_match_float64(self, rows, shape):
    x, q, scale, w16 = operands(rows, rows, *shape)
    product = jax.jit(lowp_cpu.matmul)
    close(self, product(x, q, scale), reference(x, q, scale))
    close(self, product(x, w16), reference(x, w16))

  def test_leading_axes_and_scale_shape(self):
    x, q, scale, _ = operands(0, 6, 40, 48)
    y = lowp_cpu.matmul(x.reshape(2, 3, 40), q, scale.reshape(1, 48))
    self.assertEqual(y.shape, (2, 3, 48))
    close(self, y.reshape(6, 48), reference(x, q, scale))

  def test_vmap_folds_rows_into_one_call(self):
    x, q, scale, w16 = operands(1, 12, 64, 96)
    xs = x.reshape(4, 3, 64)
    mapped = jax.jit(jax.vmap(lambda x: lowp_cpu.matmul(x, q, scale)))
    close(self, mapped(xs).reshape(12, 96), reference(x, q, scale))
    text = mapped.lower(xs).as_text()
    self.assertEqual(text.count(lowp_cpu.INT8), 1)  # one product, not one per example
    twice = jax.jit(jax.vmap(jax.vmap(lambda x: lowp_cpu.matmul(x, w16))))
    close(self, twice(x.reshape(2, 2, 3, 64)).reshape(12, 96), reference(x, w16))

  def test_vmap_over_weights(self):
    x, q, scale, _ = operands(2, 3, 32, 40)
    qs = np.stack([q, -q])
    y = jax.jit(jax.vmap(lambda q: lowp_cpu.matmul(x, q, scale)))(qs)
    close(self, y[0], reference(x, q, scale))
    close(self, y[1], reference(x, -q, scale))

  def test_inside_scan_and_while_loop(self):
    x, q, scale, w16 = operands(3, 2, 48, 48)
    q = q // 8  # keep the repeated products bounded

    def scanned(x):
      step = lambda h, _: (jnp.tanh(lowp_cpu.matmul(h, q, scale)), None)  # noqa: E731
      return jax.lax.scan(step, x, None, length=3)[0]

    def looped(x):
      body = lambda c: (c[0] + 1, jnp.tanh(lowp_cpu.matmul(c[1], w16)))  # noqa: E731
      return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    want_q, want_w = np.asarray(x, np.float64), np.asarray(x, np.float64)
    for _ in range(3):
      want_q = np.tanh(reference(want_q, q, scale))
      want_w = np.tanh(reference(want_w, w16))
    np.testing.assert_allclose(jax.jit(scanned)(x), want_q, atol=1e-5)
    np.testing.assert_allclose(jax.jit(looped)(x), want_w, atol=1e-5)

  @parameterized.parameters((1, 200, 72), (9, 17, 45))
  def test_weight_matmul_xla_path_equals_kernel(self, rows, d_in, d_out):
    x, q, scale, w16 = operands(4, rows, d_in, d_out)
    for w, s in ((q, scale), (w16, None)):
      native = jax.jit(lambda x, w, s: qz.weight_matmul(x, w, s, kernel='cpu'))(x, w, s)
      xla = jax.jit(lambda x, w, s: qz.weight_matmul(x, w, s, kernel='xla'))(x, w, s)
      close(self, native, reference(x, w, s))
      close(self, xla, reference(x, w, s))
    with kernels.xla_only():
      text = jax.jit(qz.weight_matmul).lower(x, q, scale).as_text()
    self.assertNotIn(lowp_cpu.INT8, text)

  def test_rows_split_over_8_devices(self):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                          ' --xla_force_host_platform_device_count=8').strip())
    result = subprocess.run([sys.executable, '-c', SHARDED], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    self.assertLess(report['error'], 1e-5)
    self.assertEqual(report['calls'], ['f32[2,96]{1,0}'])  # 16 rows / 8 devices, every column

  def test_errors_name_what_prevents_the_kernel(self):
    x = np.ones((1, 4), np.float32)
    with self.assertRaisesRegex(ValueError, 'needs a float32 scale with 3 entries'):
      qz.weight_matmul(x, np.ones((4, 3), np.int8), kernel='cpu')
    with self.assertRaisesRegex(ValueError, "w must be int8 or bfloat16, got float16"):
      qz.weight_matmul(x, np.ones((4, 3), np.float16), kernel='cpu')
    with self.assertRaisesRegex(ValueError, 'kernel must be one of'):
      qz.weight_matmul(x, np.ones((4, 3), np.float32), kernel='gpu')


if __name__ == '__main__':
  absltest.main()
