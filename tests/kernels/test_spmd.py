"""The native kernels under an 8-device mesh: per-device shards, single-device results.

tests/kernels/spmd_worker.py runs in a subprocess with 8 forced CPU devices
and reports, for the feed-forward and LSH layers (kernel='cpu') and a tiny
ReformerLM (both kernels inside its scanned reversible stack, over the batch
alone and with heads and d_ff over a 'model' axis): the largest relative
difference between the sharded and the single-device outputs and gradients,
each native custom call's operand shapes in the compiled HLO, and every
all-gather's shape. The reference is the same computation on one device
(the kernels themselves are checked against float64 in the other files
here)."""

import functools
import json
import os
import shutil
import subprocess
import sys

from absl.testing import absltest

from terraflax.kernels import spmd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_COMPILER = shutil.which(os.environ.get('CXX', 'c++').split()[0]) is not None
TOLERANCE = 1e-5  # float32, summed in another order over the shards


@functools.cache
def worker_report() -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                        ' --xla_force_host_platform_device_count=8').strip())
  result = subprocess.run([sys.executable, '-m', 'tests.kernels.spmd_worker'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  if result.returncode:
    raise AssertionError(f'spmd_worker failed:\n{result.stderr[-4000:]}')
  return json.loads(result.stdout)


@absltest.skipUnless(HAS_COMPILER, 'no C++ compiler to build the kernels')
class ShardedKernelTest(absltest.TestCase):

  def check(self, name, *, leading: dict, full: set):
    """Results equal; each call's first operand starts with `leading[target]` (per device).

    `full`: sizes of the whole batch (or rows) that no all-gather may have.
    """
    case = worker_report()[name]
    self.assertLess(case['error'], TOLERANCE, name)
    targets = {call['target'] for call in case['calls']}
    self.assertEqual(targets, set(leading), f'{name}: native calls in the compiled HLO')
    for call in case['calls']:
      first = call['operands'][0]
      want = leading[call['target']]
      self.assertEqual(first[:len(want)], list(want), f'{name}: {call}')
    for gathered in case['all_gathers']:
      for shape in gathered:
        self.assertFalse(set(shape) & full, f'{name}: all-gather of the batch {gathered}')
    return case

  def test_feed_forward_over_8_devices(self):
    # 16 x 6 = 96 rows: 12 per device; the weights are replicated, nothing is gathered.
    case = self.check('ff_data8', leading={'TerraflaxFfForwardHidden': (12, 16),
                                           'TerraflaxFfBackward': (12, 16)}, full={96, 16 * 6})
    self.assertEqual(case['all_gathers'], [])

  def test_feed_forward_fsdp_and_tensor_parallel(self):
    # batch over ('data', 'fsdp') = 4 ways: 24 rows per device; the hidden width over 'model'
    # (d_ff 32: 16 per device, the output summed over 'model'); the weights' embed axis,
    # over 'fsdp', is gathered before the call, never the rows.
    case = self.check('ff_fsdp_tp', leading={'TerraflaxFfForwardHidden': (24, 16),
                                             'TerraflaxFfBackward': (24, 16)}, full={96, 48})
    for call in case['calls']:
      w1, b1, w2 = call['operands'][-4:-1] if 'Backward' in call['target'] else (
          call['operands'][1:4])
      self.assertEqual((w1, b1, w2), ([16, 16], [16], [16, 16]), call)
    self.assertNotEqual(case['all_gathers'], [])  # the embed axis of the weights

  def test_feed_forward_recomputing_hidden_tensor_parallel(self):
    # chunk_len: the backward pass gets a (1, 1) placeholder and recomputes the hidden shard.
    case = self.check('ff_recompute_tp', leading={'TerraflaxFfForward': (24, 16),
                                                  'TerraflaxFfBackward': (24, 16)}, full={96})
    for call in case['calls']:
      self.assertIn([16, 16], call['operands'], call)  # w1 (d, d_ff / 2)
    self.assertEqual(case['all_gathers'], [])

  def test_feed_forward_hidden_too_narrow_to_split(self):
    # d_ff 48 over 'model' = 2 would give shards of 24, no multiple of kernels.LANES: the
    # weights are gathered and the hidden width stays whole; the rows are still split.
    case = self.check('ff_tp_gathered', leading={'TerraflaxFfForwardHidden': (24, 16),
                                                 'TerraflaxFfBackward': (24, 16)}, full={96})
    for call in case['calls']:
      self.assertIn([16, 48], call['operands'], call)

  def test_lsh_over_8_devices(self):
    case = self.check('lsh_data8', leading={'TerraflaxLshForward': (1, 64, 2),
                                            'TerraflaxLshBackward': (1, 64, 2)}, full={8})
    self.assertEqual(case['all_gathers'], [])

  def test_lsh_over_batch_and_heads(self):
    # A (4, 2) mesh: batch over 'data', heads (from the projections) over 'model'.
    case = self.check('lsh_heads', leading={'TerraflaxLshForward': (2, 64, 1),
                                            'TerraflaxLshBackward': (2, 64, 1)}, full={8})
    for call in case['calls']:
      self.assertEqual(call['operands'][1][:2], [2, 1], call)  # perm (b, h, n, L) too
    self.assertEqual(case['all_gathers'], [])

  def test_reformer_lm_scanned_reversible_stack(self):
    case = self.check('reformer_data8', leading={
        'TerraflaxLshForward': (1, 64), 'TerraflaxLshBackward': (1, 64),
        'TerraflaxFfForward': (64, 32), 'TerraflaxFfForwardHidden': (64, 32),
        'TerraflaxFfBackward': (64, 32)}, full={8, 512})
    self.assertEqual(case['all_gathers'], [])

  def test_reformer_lm_tensor_parallel(self):
    # A (4, 2) mesh, the stacked heads and d_ff over 'model': 2 examples, 1 of the 2 heads and
    # 16 of the 32 hidden units per device, inside the scan; nothing is gathered.
    case = self.check('reformer_tp', leading={
        'TerraflaxLshForward': (2, 64, 1), 'TerraflaxLshBackward': (2, 64, 1),
        'TerraflaxFfForward': (128, 32), 'TerraflaxFfForwardHidden': (128, 32),
        'TerraflaxFfBackward': (128, 32)}, full={8, 512})
    for call in case['calls']:
      if call['target'].startswith('TerraflaxFf'):
        self.assertIn([32, 16], call['operands'], call)  # w1's hidden shard
    self.assertEqual(case['all_gathers'], [])


  def test_unlisted_operand_is_split_by_batch(self):
    # What a new per-example operand (segment ids) gets without a new rule.
    case = worker_report()['extra_operand']
    self.assertEqual(case['error'], 0.0)
    self.assertTrue(case['per_device'], 'the call runs on (1, 16) per device')
    self.assertEqual(case['all_gathers'], [])


class LayoutTest(absltest.TestCase):
  """The layouts `Partitioned` turns into Shardy rules and partition specs (one device)."""

  def test_sharding_rule_keeps_batch_and_heads_and_replicates_the_rest(self):
    rule, replicated = spmd._sharding_rule(('b.h.', 'bh..'), ('b.h.',))
    self.assertEqual(rule, 'b x0 h x1, b h x2 x3 -> b x4 h x5')
    self.assertEqual(replicated, ('x0', 'x1', 'x2', 'x3', 'x4', 'x5'))

  def test_extra_operands_are_batch_leading(self):
    self.assertEqual(spmd._full('b', 3), 'b..')
    with self.assertRaisesRegex(ValueError, "layout 'b.h.' does not fit an operand of rank 3"):
      spmd._full('b.h.', 3)


if __name__ == '__main__':
  absltest.main()
