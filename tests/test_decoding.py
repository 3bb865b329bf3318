"""Decoding with the predict-mode cache against full eval-mode forward passes."""

import itertools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import terraflax.models as tm
from terraflax import decoding

KEY = jax.random.key(0)
LM = dict(vocab_size=7, d_model=16, d_ff=24, n_layers=2, n_heads=2, dropout=0.0, max_len=16)
EOS = 3


def fake_params(model, *inputs, seed=0, scale=0.6):
  """Random parameters of the shapes `model.init` gives (large enough for peaked logits)."""
  shapes = jax.eval_shape(model.init, KEY, *inputs)['params']
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), shapes)


class Setup:
  """One small LM shared by the tests (its eval pass jitted once)."""

  eval_model = tm.TransformerLM(mode='eval', **LM)
  predict_model = tm.TransformerLM(mode='predict', **LM)
  params = fake_params(eval_model, jnp.zeros((1, 16), jnp.int32))
  forward = jax.jit(lambda params, x: tm.TransformerLM(mode='eval', **LM).apply(
      {'params': params}, x))
  prompt = jnp.array([[5, 1, 6, 2, 0], [4, 4, 0, 0, 0], [0, 0, 0, 0, 0]], jnp.int32)
  lengths = jnp.array([5, 2, 0], jnp.int32)


def reference_greedy(prompt, n, eos_id=None):
  """Greedy decoding by re-running the eval model on the whole prefix (pad 0 after)."""
  sequence, generated = list(prompt), []
  for _ in range(n):
    buffer = np.zeros((1, 16), np.int32)
    buffer[0, :len(sequence)] = sequence
    token = int(jnp.argmax(Setup.forward(Setup.params, jnp.asarray(buffer))[0, len(sequence)]))
    sequence.append(token)
    generated.append(token)
    if token == eos_id:
      break
  return generated + [0] * (n - len(generated))


class SamplingTest(absltest.TestCase):

  def test_greedy_equals_full_forward_and_each_prompt_alone(self):
    s = Setup
    out = decoding.autoregressive_sample(s.predict_model, s.params, s.prompt, 6, temperature=0.0,
                                         prompt_lengths=s.lengths, eos_id=EOS)
    self.assertEqual((out.shape, out.dtype), ((3, 6), jnp.int32))
    for row in range(3):
      length = int(s.lengths[row])
      expected = reference_greedy(np.asarray(s.prompt[row, :length]), 6, EOS)
      np.testing.assert_array_equal(out[row], expected)
      alone = decoding.autoregressive_sample(
          s.predict_model, s.params, s.prompt[row:row + 1, :max(length, 1)], 6, temperature=0.0,
          prompt_lengths=jnp.array([length]), eos_id=EOS)
      np.testing.assert_array_equal(alone[0], out[row])
    self.assertIn(EOS, np.asarray(out).ravel().tolist())  # The EOS path is exercised.

  def test_top_k_and_nucleus_filters_equal_sorting(self):
    """keep_top_k / keep_top_p (bisection over the float order) keep exactly what a sort of
    each row keeps: ties at the edge, -inf entries, p = 0 (the top token), per-row k and p."""
    def by_sorting(row, k, p):
      ordered = np.sort(row)[::-1]
      row = np.where(row < ordered[k - 1], -np.inf, row)
      ordered = np.sort(row)[::-1]
      probs = np.exp(ordered - ordered[0]) / np.sum(np.exp(ordered - ordered[0]))
      kept = np.sum(np.cumsum(probs) - probs < p)
      return np.where(row < ordered[max(kept, 1) - 1], -np.inf, row)

    rng = np.random.default_rng(3)
    filters = jax.jit(lambda x, k, p: decoding.keep_top_p(decoding.keep_top_k(x, k), p))
    for trial in range(40):
      v = int(rng.integers(2, 40))
      logits = (rng.normal(size=(4, v)) * rng.choice([0.1, 1.0, 5.0])).astype(np.float32)
      if trial % 2:
        logits = np.round(logits)  # Ties.
      logits[0, :v // 2] = -np.inf
      k = rng.integers(1, v + 1, size=4).astype(np.int32)
      p = np.array([0.0, 0.3, 0.9, rng.uniform()], np.float32)
      got = filters(jnp.asarray(logits), jnp.asarray(k), jnp.asarray(p))
      want = [by_sorting(logits[i], k[i], p[i]) for i in range(4)]
      np.testing.assert_array_equal(got, np.stack(want), err_msg=f'trial {trial}')

  def test_categorical_tokens_draw_what_jax_random_categorical_draws(self):
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 50)) * 3, jnp.float32)
    draw = jax.jit(jax.vmap(decoding.categorical_tokens, in_axes=(0, None)))
    want = jax.jit(jax.vmap(lambda k, l: jax.random.categorical(k, l, axis=-1),
                            in_axes=(0, None)))
    keys = jax.random.split(jax.random.key(2), 64)
    got = draw(keys, logits)
    self.assertEqual((got.shape, got.dtype), ((64, 3), jnp.int32))
    np.testing.assert_array_equal(got, want(keys, logits))
    self.assertGreater(len(np.unique(np.asarray(got))), 3)  # Draws, not one argmax.

  def test_small_query_key_value_products_are_one_dot(self):
    """A step's float32 q/k/v projections of one row run as one dot on the joined kernels,
    with the values of three."""
    s = Setup
    cache = decoding.init_cache(s.predict_model, 1)
    tokens = jnp.array([5], jnp.int32)

    def step():
      """(dots, dots giving q, k and v side by side (1, 1, 3 * d_model), outputs)."""
      fn = jax.jit(lambda p, c, t: decoding.decode_step(s.predict_model, p, c, t))
      dots = [line for line in fn.lower(s.params, cache, tokens).as_text().splitlines()
              if 'dot_general' in line]
      wide = f'-> tensor<1x1x{3 * LM["d_model"]}xf32>'
      return len(dots), sum(wide in line for line in dots), fn(s.params, cache, tokens)

    joined, n_joined, (logits, new_cache) = step()
    with mock.patch.object(decoding, '_one_dot', lambda *args: None):
      apart, n_apart, (want_logits, want_cache) = step()
    self.assertGreaterEqual(n_joined, 1)  # One per attention layer traced.
    self.assertEqual((n_apart, apart - joined), (0, 2 * n_joined))
    np.testing.assert_allclose(logits, want_logits, rtol=1e-6, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                           new_cache, want_cache)

  def test_top_k_one_and_tiny_top_p_are_greedy(self):
    s = Setup
    greedy = decoding.autoregressive_sample(s.predict_model, s.params, s.prompt, 5,
                                            temperature=0.0, prompt_lengths=s.lengths)
    for kwargs in (dict(top_k=1), dict(top_p=0.0)):
      sampled = decoding.autoregressive_sample(s.predict_model, s.params, s.prompt, 5,
                                               temperature=0.7, rng=KEY,
                                               prompt_lengths=s.lengths, **kwargs)
      np.testing.assert_array_equal(sampled, greedy)

  def test_sampling_distribution(self):
    """The first token's empirical distribution matches the (filtered) softmax."""
    s, n = Setup, 6000
    prompt = jnp.tile(jnp.array([[2, 5]], jnp.int32), (n, 1))
    logits = np.asarray(s.forward(s.params, jnp.array([[2, 5, 0]], jnp.int32))[0, 2], np.float64)
    order = np.argsort(-logits)

    def expected(temperature, top_k=None, top_p=None):
      z = logits / temperature
      p = np.exp(z - z.max())
      p /= p.sum()
      keep = np.ones_like(p, bool)
      if top_k is not None:
        keep[order[top_k:]] = False
      if top_p is not None:
        before = np.cumsum(p[order]) - p[order]
        keep[order[before >= top_p]] = False
      p = np.where(keep, p, 0)
      return p / p.sum()

    for i, (temperature, top_k, top_p) in enumerate([(1.0, None, None), (2.0, 3, None),
                                                     (1.0, None, 0.8)]):
      tokens = decoding.autoregressive_sample(s.predict_model, s.params, prompt, 1,
                                              temperature=temperature, top_k=top_k, top_p=top_p,
                                              rng=jax.random.key(i))
      frequencies = np.bincount(np.asarray(tokens[:, 0]), minlength=LM['vocab_size']) / n
      p = expected(temperature, top_k, top_p)
      np.testing.assert_array_equal(frequencies[p == 0], 0)
      np.testing.assert_allclose(frequencies, p, atol=4 * np.sqrt(0.25 / n) + 1e-3)

  def test_clear_errors(self):
    s = Setup
    with self.assertRaisesRegex(ValueError, 'temperature > 0 needs rng='):
      decoding.autoregressive_sample(s.predict_model, s.params, s.prompt, 2)
    with self.assertRaisesRegex(ValueError, r'prompt_lengths must lie in \[0, 5\]'):
      decoding.autoregressive_sample(s.predict_model, s.params, s.prompt, 2, temperature=0.0,
                                     prompt_lengths=jnp.array([6, 1, 1]))
    with self.assertRaisesRegex(ValueError, "build it with mode='predict'"):
      decoding.autoregressive_sample(s.eval_model, s.params, s.prompt, 2, temperature=0.0)
    with self.assertRaisesRegex(ValueError, 'max_new_tokens must be a positive int'):
      decoding.autoregressive_sample(s.predict_model, s.params, s.prompt, 0, temperature=0.0)


class LoopLayoutTest(absltest.TestCase):
  """The decoding loop's per-layer buffers (decoding.layer_depths, split_layers, join_layers)."""

  def depths(self, model):
    cache, stacks = decoding._init(model, 2, None, KEY)  # pylint: disable=protected-access
    params = nn.meta.unbox(fake_params(model, jnp.zeros((1, 1), jnp.int32)))
    return (params, cache, decoding.layer_depths(params, stacks, 'params'),
            decoding.layer_depths(cache, stacks, 'cache'))

  def test_stacked_leaves_found_and_split_join_is_identity(self):
    params, cache, param_depths, cache_depths = self.depths(Setup.predict_model)
    blocks = param_depths['Repeat_3']['Serial_0']
    self.assertEqual(blocks['Residual_0']['CausalAttention_1']['query']['kernel'], 2)
    self.assertEqual(blocks['Residual_1']['FeedForward_0']['Dense_4']['kernel'], 2)
    self.assertEqual(param_depths['Embedding_1']['embedding'], 0)  # not stacked
    attention = cache_depths['Repeat_3']['Serial_0']['Residual_0']['CausalAttention_1']
    self.assertEqual(attention, {'cached_key': 2, 'cached_value': 2, 'position': 2})
    self.assertEqual(cache_depths['PositionalEncoding_2']['position'], 0)
    for tree, depths in ((params, param_depths), (cache, cache_depths)):
      pieces = decoding.split_layers(tree, depths)
      kernel = pieces['Repeat_3']['Serial_0']['Residual_0']['CausalAttention_1']
      self.assertLen(jax.tree_util.tree_leaves(kernel), 2 * len(jax.tree_util.tree_leaves(
          tree['Repeat_3']['Serial_0']['Residual_0']['CausalAttention_1'])))
      joined = decoding.join_layers(pieces, depths)
      jax.tree_util.tree_map(np.testing.assert_array_equal, joined, tree)

  def test_stacked_depths_outside_the_loop(self):
    params, _, param_depths, cache_depths = self.depths(Setup.predict_model)
    self.assertEqual(decoding.stacked_depths(Setup.predict_model, params, batch_size=2),
                     (param_depths, cache_depths))

  def test_split_weights_decode_like_the_parameters(self):
    s = Setup
    split = decoding.split_weights(s.predict_model, s.params)
    self.assertIsInstance(split, decoding.SplitWeights)
    kernel = split.pieces['Repeat_3']['Serial_0']['Residual_0']['CausalAttention_1']['query']
    self.assertLen(kernel['kernel'], 2)  # one buffer per layer
    np.testing.assert_array_equal(kernel['kernel'][1], nn.meta.unbox(s.params)['Repeat_3'][
        'Serial_0']['Residual_0']['CausalAttention_1']['query']['kernel'][1])
    for params in (s.params, split):
      out = decoding.autoregressive_sample(s.predict_model, params, s.prompt, 6,
                                           temperature=0.0, prompt_lengths=s.lengths)
      for row in range(3):
        length = int(s.lengths[row])
        np.testing.assert_array_equal(
            out[row], reference_greedy(np.asarray(s.prompt[row, :length]), 6))
    beams = [decoding.beam_search(s.predict_model, params, s.prompt[:1], 3, beam_size=2)
             for params in (s.params, split)]
    np.testing.assert_array_equal(beams[0][0], beams[1][0])
    np.testing.assert_allclose(beams[0][1], beams[1][1], rtol=1e-6)

  def test_shared_parameters_are_not_split(self):
    model = tm.TransformerLM(mode='predict', share_layers=True, **LM)
    _, _, param_depths, cache_depths = self.depths(model)
    self.assertEqual(set(jax.tree_util.tree_leaves(param_depths)), {0})
    self.assertIn(2, jax.tree_util.tree_leaves(cache_depths))

  def test_shared_parameters_decode_like_eval(self):
    model = tm.TransformerLM(mode='predict', share_layers=True, **LM)
    eval_model = tm.TransformerLM(mode='eval', share_layers=True, **LM)
    params = fake_params(eval_model, jnp.zeros((1, 16), jnp.int32))
    prompt = jnp.array([[5, 1, 6]], jnp.int32)
    tokens = decoding.autoregressive_sample(model, params, prompt, 4, temperature=0.0)
    sequence = list(np.asarray(prompt[0]))
    evaluate = jax.jit(lambda x: eval_model.apply({'params': params}, x))  # One compile:
    for _ in range(4):  # the row is right-padded to 7, which a causal LM's position n - 1 ignores.
      n = len(sequence)
      logits = evaluate(jnp.asarray([sequence + [0] * (7 - n)], jnp.int32))
      sequence.append(int(jnp.argmax(logits[0, n - 1])))
    self.assertEqual(np.asarray(tokens[0]).tolist(), sequence[3:])


class BeamSearchTest(absltest.TestCase):

  def test_cache_batch_axes(self):
    axes = decoding.cache_batch_axes(Setup.predict_model, 3)
    attention = axes['Repeat_3']['Serial_0']['Residual_0']['CausalAttention_1']
    self.assertEqual(attention, {'cached_key': 1, 'cached_value': 1, 'position': None})
    self.assertIsNone(axes['PositionalEncoding_2']['position'])

  def test_beam_one_equals_greedy(self):
    s = Setup
    greedy = decoding.autoregressive_sample(s.predict_model, s.params, s.prompt, 6,
                                            temperature=0.0, prompt_lengths=s.lengths, eos_id=EOS)
    tokens, scores = decoding.beam_search(s.predict_model, s.params, s.prompt, 6, beam_size=1,
                                          prompt_lengths=s.lengths, eos_id=EOS)
    self.assertEqual(tokens.shape, (3, 1, 6))
    np.testing.assert_array_equal(tokens[:, 0], greedy)
    self.assertTrue(bool(jnp.all(jnp.isfinite(scores))))

  def test_wide_beam_is_exhaustive_search(self):
    """Beam 7 * 7 keeps every prefix, so it finds the best of all 7 ** 3 continuations."""
    s, steps, beam = Setup, 3, 49
    prompt = np.array([6, 2])
    tokens, scores = decoding.beam_search(s.predict_model, s.params, jnp.asarray(prompt[None]),
                                          steps, beam_size=beam)
    candidates = np.array(list(itertools.product(range(7), repeat=steps)))
    sequences = np.concatenate([np.tile(prompt, (len(candidates), 1)), candidates], axis=1)
    padded = np.zeros((len(candidates), 16), np.int32)
    padded[:, :sequences.shape[1]] = sequences
    log_probs = np.asarray(jax.nn.log_softmax(s.forward(s.params, jnp.asarray(padded))),
                           np.float64)
    rows = np.arange(len(candidates))
    total = sum(log_probs[rows, len(prompt) + t, candidates[:, t]] for t in range(steps))
    best = np.argsort(-total, kind='stable')[:beam]
    np.testing.assert_allclose(scores[0], total[best], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(tokens[0, 0], candidates[best[0]])

  def test_batched_prompts_equal_each_alone(self):
    s = Setup
    tokens, scores = decoding.beam_search(s.predict_model, s.params, s.prompt, 5, beam_size=3,
                                          prompt_lengths=s.lengths, eos_id=EOS, alpha=0.6)
    for row in range(3):
      length = int(s.lengths[row])
      alone_tokens, alone_scores = decoding.beam_search(
          s.predict_model, s.params, s.prompt[row:row + 1, :max(length, 1)], 5, beam_size=3,
          prompt_lengths=jnp.array([length]), eos_id=EOS, alpha=0.6)
      np.testing.assert_array_equal(alone_tokens[0], tokens[row])
      np.testing.assert_allclose(alone_scores[0], scores[row], rtol=1e-5)
    self.assertTrue(bool(jnp.all(scores[:, :-1] >= scores[:, 1:])))  # Best first.


class Seq2SeqTest(absltest.TestCase):

  def test_greedy_with_encoder_inputs(self):
    config = dict(LM, output_vocab_size=6)
    eval_model = tm.Transformer(mode='eval', **config)
    inputs = jnp.array([[3, 4, 5, 1], [2, 6, 0, 0]], jnp.int32)
    params = fake_params(eval_model, inputs, jnp.zeros((2, 5), jnp.int32))
    out = decoding.autoregressive_sample(tm.Transformer(mode='predict', **config), params, None,
                                         5, temperature=0.0, inputs=inputs)
    forward = jax.jit(lambda t: eval_model.apply({'params': params}, inputs, t))
    targets = np.zeros((2, 5), np.int32)
    for t in range(5):
      targets[:, t] = np.argmax(forward(jnp.asarray(targets))[:, t], axis=-1)
    np.testing.assert_array_equal(out, targets)
    beams, _ = decoding.beam_search(tm.Transformer(mode='predict', **config), params, None, 5,
                                    beam_size=1, inputs=inputs)
    np.testing.assert_array_equal(beams[:, 0], targets)


if __name__ == '__main__':
  absltest.main()
