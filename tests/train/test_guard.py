"""DivergenceGuard against hand-made loss curves."""

import math

from absl.testing import absltest

from terraflax.train.guard import DivergenceGuard


class DivergenceGuardTest(absltest.TestCase):

  def test_healthy_curve_is_quiet(self):
    guard = DivergenceGuard(factor=10.0, window=3)
    for step, loss in enumerate([5.5, 4.0, 3.0, 3.2, 2.5, 20.0, 2.4], start=1):
      self.assertIsNone(guard.update(step * 10, loss), (step, loss))  # 20 < 10 x 2.5.

  def test_growth_over_best_of_window(self):
    guard = DivergenceGuard(factor=10.0, window=2)
    for step, loss in ((10, 1.0), (20, 5.0), (30, 6.0)):
      self.assertIsNone(guard.update(step, loss))
    # The best of the last 2 logs is 5.0 (1.0 left the window): 49 < 50 is quiet, 51 is not.
    self.assertIsNone(guard.update(40, 49.0))
    message = guard.update(50, 500.0)
    self.assertIn('step 50', message)
    self.assertIn('the best of the last 2 logs (6 at step 30)', message)

  def test_bound(self):
    guard = DivergenceGuard(factor=math.inf, window=5, bound=100.0)
    self.assertIsNone(guard.update(1, 99.0))
    self.assertIn('exceeds train.divergence_bound=100', guard.update(2, 101.0))

  def test_baseline_catches_the_first_log(self):
    self.assertIsNone(DivergenceGuard(factor=1e3).update(20, 1e13))  # Nothing to compare with.
    guard = DivergenceGuard(factor=1e3, baseline=math.log(256))
    self.assertIn('training is diverging', guard.update(20, 1e13))
    self.assertIsNone(DivergenceGuard(factor=1e3, baseline=math.log(256)).update(20, 5.0))

  def test_non_finite_diverges_and_is_not_remembered(self):
    guard = DivergenceGuard(factor=10.0, window=2)
    guard.update(1, 2.0)
    self.assertIn('nan', guard.update(2, float('nan')))
    self.assertIsNone(guard.update(3, 3.0))  # Best still 2.0.

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'factor must be > 1'):
      DivergenceGuard(factor=1.0)
    with self.assertRaisesRegex(ValueError, 'window must be a positive int'):
      DivergenceGuard(window=0)
    with self.assertRaisesRegex(ValueError, 'bound must be >= 0'):
      DivergenceGuard(bound=-1.0)


if __name__ == '__main__':
  absltest.main()
