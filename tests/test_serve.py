"""`terraflax.serve` over real HTTP on loopback: completions equal `terraflax.decoding`.

One tiny base TransformerLM workdir and two prefix workdirs (random weights,
written as a prefix-tuning run leaves them) are served by uvicorn in a thread;
an httpx client sends requests. The reference for every greedy or seeded
completion is `decoding.autoregressive_sample` on the same prompt with the
prefix's full parameter tree.
"""

import concurrent.futures
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from terraflax import decoding
from terraflax.layers import prefix as prefix_lib
from terraflax.serve import api
from terraflax.serve import engine as engine_lib
from terraflax.serve import model as model_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_LEN = 48
REF_WIDTH, REF_TOKENS = 32, 16  # The reference decoding's prompt width and length.
TINY = {'d_model': 16, 'd_ff': 32, 'n_heads': 2, 'n_layers': 2, 'max_len': MAX_LEN}


def _benchmark():
  spec = importlib.util.spec_from_file_location('serve_load', REPO / 'benchmarks' / 'serve_load.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


serve_load = _benchmark()


def events(response) -> list:
  """The JSON payloads of a server-sent-event stream, up to `[DONE]`."""
  out = []
  for line in response.iter_lines():
    if line.startswith('data: '):
      data = line[len('data: '):]
      if data == '[DONE]':
        break
      out.append(json.loads(data))
  return out


class ServeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    # scale 3: random weights with decisive logits (greedy ties would be noise).
    cls.base, cls.prefixes = serve_load.make_workdirs(cls.tmp.name, n_prefixes=2, n_prefix=2,
                                                      scale=3.0, **TINY)
    cls.served = model_lib.load(cls.base, cls.prefixes)
    cls.engine = engine_lib.Engine(cls.served, n_slots=4)
    cls.engine.start()
    cls.server = api.BackgroundServer(api.make_app(cls.engine)).__enter__()
    cls.client = httpx.Client(base_url=cls.server.url, timeout=120)

  @classmethod
  def tearDownClass(cls):
    cls.client.close()
    cls.server.__exit__(None, None, None)
    cls.engine.stop()
    cls.tmp.cleanup()
    super().tearDownClass()

  def reference(self, prompt: str, max_tokens: int, prefix=None, **sampling) -> list:
    """autoregressive_sample's tokens, up to and including an EOS (where the server stops).

    Every call decodes the same shapes (the prompt right-padded to REF_WIDTH, REF_TOKENS
    tokens, then cut): one compilation per model. A row's tokens do not depend on either.
    """
    served = self.served
    model, params = served.base_model, served.base_params
    if prefix is not None:
      model = served.prefix_model
      params = prefix_lib.merge_prefix(params, jax.tree_util.tree_map(
          lambda s: s[served.prefixes[prefix]], served.stacked))
    ids = list(prompt.encode())
    self.assertLessEqual(max_tokens, REF_TOKENS)
    padded = jnp.asarray([ids + [0] * (REF_WIDTH - len(ids))], jnp.int32)
    tokens = np.asarray(decoding.autoregressive_sample(
        model, params, padded, REF_TOKENS, eos_id=served.eos_id, prompt_lengths=[len(ids)],
        **sampling)).reshape(-1).tolist()[:max_tokens]
    return tokens[:tokens.index(served.eos_id) + 1] if served.eos_id in tokens else tokens

  def complete(self, **body) -> dict:
    response = self.client.post('/v1/completions', json=body)
    self.assertEqual(response.status_code, 200, response.text)
    return response.json()

  def metrics(self) -> dict:
    return self.client.get('/metrics').json()

  def wait_for_idle(self):
    deadline = time.monotonic() + 30
    while self.metrics()['active_slots'] or self.metrics()['queue_length']:
      self.assertLess(time.monotonic(), deadline, self.metrics())
      time.sleep(0.05)

  def test_greedy_alone_equals_decoding(self):
    for prefix in (None, 'p0', 'p1'):
      out = self.complete(prompt='def f(x):', max_tokens=8, temperature=0, prefix=prefix)
      self.assertEqual(out['tokens'], self.reference('def f(x):', 8, prefix, temperature=0.0),
                       prefix)
      self.assertEqual(out['usage'], {'prompt_tokens': 9, 'completion_tokens': len(out['tokens']),
                                      'total_tokens': 9 + len(out['tokens'])})
      self.assertEqual(out['finish_reason'],
                       'stop' if out['tokens'][-1] == self.served.eos_id else 'length')
    # The prefixes change what is generated (else the test above proves little).
    outs = {p: tuple(self.complete(prompt='abc', max_tokens=6, prefix=p)['tokens'])
            for p in (None, 'p0', 'p1')}
    self.assertLen(set(outs.values()), 3, outs)

  def test_greedy_among_concurrent_requests_equals_decoding(self):
    # More requests than slots, of different prefixes and lengths: they join as slots free.
    bodies = [{'prompt': 'import os' * (i % 3 + 1), 'max_tokens': 4 + 3 * (i % 4),
               'prefix': [None, 'p0', 'p1'][i % 3], 'temperature': 0} for i in range(10)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
      outs = list(pool.map(lambda body: self.complete(**body), bodies))
    for body, out in zip(bodies, outs):
      self.assertEqual(out['tokens'], self.reference(body['prompt'], body['max_tokens'],
                                                     body['prefix'], temperature=0.0), body)
    m = self.metrics()
    self.assertGreaterEqual(m['completed'], 10)
    self.assertEqual((m['active_slots'], m['queue_length']), (0, 0))

  def test_steps_per_call_do_not_change_the_tokens(self):
    # 1 step per call, and 3 (calls end mid-prompt and mid-completion; requests finish
    # inside a call and new ones join at the next): each equals decoding alone.
    bodies = [('import os', 5, None), ('def', 7, 'p0'), ('class A(B):', 4, 'p1'), ('x', 9, 'p0')]
    for steps in (1, 3):
      engine = engine_lib.Engine(self.served, n_slots=2, steps_per_call=steps)
      engine.start()
      try:
        done = [[] for _ in bodies]
        jobs = [engine_lib.Job(ids=list(prompt.encode()), max_tokens=n, prefix=prefix,
                               emit=lambda e, out=out: out.append(e) if e['type'] == 'done' else 0)
                for (prompt, n, prefix), out in zip(bodies, done)]
        for job in jobs:
          engine.submit(job)
        deadline = time.monotonic() + 120
        while not all(done):
          self.assertLess(time.monotonic(), deadline, engine.metrics())
          time.sleep(0.02)
        m = engine.metrics()
      finally:
        engine.stop()
      for (prompt, n, prefix), out in zip(bodies, done):
        self.assertEqual(out[0]['tokens'], self.reference(prompt, n, prefix, temperature=0.0),
                         (steps, prompt))
      self.assertEqual(m['steps'], steps * m['calls'])

  def test_seeded_sampling_equals_decoding(self):
    sampling = {'temperature': 0.9, 'top_k': 50, 'top_p': 0.95}
    out = self.complete(prompt='for i in', max_tokens=10, prefix='p1', seed=7, **sampling)
    self.assertEqual(out['tokens'], self.reference('for i in', 10, 'p1', rng=jax.random.key(7),
                                                   **sampling))

  def test_stream_equals_non_streamed(self):
    body = {'prompt': 'class A:', 'max_tokens': 12, 'prefix': 'p0'}
    whole = self.complete(**body)
    with self.client.stream('POST', '/v1/completions', json=dict(body, stream=True)) as response:
      self.assertEqual(response.status_code, 200)
      self.assertTrue(response.headers['content-type'].startswith('text/event-stream'))
      stream = events(response)
    *tokens, final = stream
    self.assertEqual([e['token'] for e in tokens], whole['tokens'])
    self.assertEqual(''.join(e['text'] for e in tokens), whole['text'])
    self.assertEqual(final['text'], whole['text'])
    self.assertEqual(final['finish_reason'], whole['finish_reason'])

  def test_stop_strings_and_streamed_pieces(self):
    # The engine's text handling with chosen tokens (bytes): 'héllo wörld' then more.
    emitted = []
    job = engine_lib.Job(ids=[], max_tokens=50, emit=emitted.append, stop=('o w', 'xyz'))
    engine = engine_lib.Engine(self.served, n_slots=1)
    tokens = list('héllo wörld'.encode())
    for token in tokens:
      engine._advance(0, job, token)  # pylint: disable=protected-access
      if emitted[-1]['type'] == 'done':
        break
    *pieces, done = emitted
    self.assertEqual(done['finish_reason'], 'stop')
    self.assertEqual(done['text'], 'héll')
    self.assertEqual(''.join(p['text'] for p in pieces), 'héll')
    self.assertEqual(done['tokens'], tokens[:len('héllo w'.encode())])
    # 'h' then 0xC3 (the first byte of 'é'): 'h' is sent, the half character is held back.
    self.assertEqual([p['text'] for p in pieces[:3]], ['h', '', 'é'])
    # 'o' and 'o ' could start 'o w': held until the stop string is complete.
    self.assertEqual([p['text'] for p in pieces[3:]], ['l', 'l', '', '', ''])

  def test_stop_string_over_http(self):
    out = self.complete(prompt='x', max_tokens=6, stop=['\u2603'])  # Never generated here.
    self.assertEqual(out['finish_reason'], 'length')
    self.assertEqual(out['tokens'], self.reference('x', 6, temperature=0.0))

  def test_bad_requests_get_4xx_and_the_server_goes_on(self):
    too_long = 'a' * (MAX_LEN - 3)
    cases = [
        (b'{"prompt": "x",', 400, 'malformed JSON'),
        (b'[1, 2]', 400, 'must be a JSON object'),
        ({'prompt': 'x', 'max_token': 3}, 400, "unknown field.*'max_token'.*valid fields"),
        ({'max_tokens': 3}, 400, '"prompt" .* is required'),
        ({'prompt': 'x', 'prefix': 'nope'}, 400, "unknown prefix 'nope'.*p0, p1"),
        ({'prompt': too_long, 'max_tokens': 4}, 400, r'\(45 tokens\) plus "max_tokens" \(4\) '
                                                     r'needs 49 positions.*max_len=48'),
        ({'prompt': 'x', 'temperature': -1}, 400, 'temperature must be >= 0'),
        ({'prompt': 'x', 'top_k': 0}, 400, 'top_k must be a positive int'),
        ({'prompt': 'x', 'top_k': 1.5}, 400, '"top_k" must be a positive integer'),
        ({'prompt': 'x', 'top_p': 1.5}, 400, r'top_p must be in \[0, 1\]'),
        ({'prompt': 'x', 'max_tokens': 0}, 400, '"max_tokens" must be a positive int'),
        ({'prompt': 'x', 'max_tokens': True}, 400, '"max_tokens" must be a positive integer'),
        ({'prompt': 'x', 'stop': ['']}, 400, '"stop" must be a non-empty string'),
        ({'prompt': 'x', 'seed': -1}, 400, r'"seed" must be an integer in \[0, 2\*\*32\)'),
    ]
    for body, status, message in cases:
      if isinstance(body, bytes):
        response = self.client.post('/v1/completions', content=body,
                                    headers={'content-type': 'application/json'})
      else:
        response = self.client.post('/v1/completions', json=body)
      self.assertEqual(response.status_code, status, (body, response.text))
      self.assertRegex(response.json()['error'], message)
    self.assertEqual(self.client.get('/v1/completions').status_code, 405)
    self.assertEqual(self.client.get('/health').json()['status'], 'ok')
    out = self.complete(prompt='a' * (MAX_LEN - 4), max_tokens=4)  # Exactly fits the cache.
    self.assertEqual(out['usage']['prompt_tokens'], MAX_LEN - 4)
    self.assertLen(out['tokens'], 4)

  def test_disconnecting_clients_free_their_slots(self):
    self.wait_for_idle()
    step = self.engine.step

    def slow_step(*args):
      time.sleep(0.3)  # Long requests take seconds (a call is several steps): the client leaves.
      return step(*args)

    self.engine.step = slow_step
    try:
      before = self.metrics()['cancelled']
      with self.client.stream('POST', '/v1/completions',
                              json={'prompt': 'x', 'max_tokens': 40, 'stream': True}) as response:
        for line in response.iter_lines():
          if line.startswith('data: '):
            break  # One token arrived; close the connection.
      with self.assertRaises(httpx.ReadTimeout):  # A non-streamed client that gives up.
        self.client.post('/v1/completions', json={'prompt': 'y', 'max_tokens': 40}, timeout=0.3)
      self.wait_for_idle()
      self.assertEqual(self.metrics()['cancelled'], before + 2)
    finally:
      self.engine.step = step
    self.complete(prompt='still serving', max_tokens=2)


  def test_a_failing_step_fails_its_requests_and_serving_goes_on(self):
    self.wait_for_idle()
    step = self.engine.step

    def broken(*args):
      raise RuntimeError('the device fell over')

    self.engine.step = broken
    try:
      response = self.client.post('/v1/completions', json={'prompt': 'x', 'max_tokens': 2})
    finally:
      self.engine.step = step
    self.assertEqual(response.status_code, 500)
    self.assertEqual(response.json()['error'],
                     'decoding failed: RuntimeError: the device fell over')
    self.assertEqual(self.complete(prompt='x', max_tokens=3)['tokens'],
                     self.reference('x', 3, temperature=0.0))

  def test_small_load_test_completes_every_request(self):
    bodies = serve_load.make_requests(12, [None, 'p0', 'p1'], prompt_lens=(4, 8),
                                      max_tokens=(4, 8))
    responses, latencies, _ = serve_load.run_concurrent(self.server.url, bodies, 120)
    self.assertEqual([r.status_code for r in responses], [200] * 12)
    self.assertLen(latencies, 12)
    for body, response in zip(bodies, responses):
      self.assertEqual(response.json()['tokens'],
                       self.reference(body['prompt'], body['max_tokens'], body['prefix'],
                                      temperature=0.0))

  def test_prefix_workdirs_must_fit_the_base(self):
    with self.assertRaisesRegex(model_lib.ServeError, 'has no prefix parameters'):
      model_lib.load(self.base, {'same': self.base})
    wider, _ = serve_load.make_workdirs(f'{self.tmp.name}/wider', n_prefixes=0, n_prefix=2,
                                        **dict(TINY, d_ff=48))
    with self.assertRaisesRegex(model_lib.ServeError, r'config.model differs .*model.d_ff'):
      model_lib.load(wider, self.prefixes)
    with self.assertRaisesRegex(model_lib.ServeError, 'the workdir .*does not exist'):
      model_lib.load(f'{self.tmp.name}/missing')


class CliTest(absltest.TestCase):

  def test_cli_errors_are_one_line(self):
    result = subprocess.run(
        [sys.executable, '-m', 'terraflax.serve', '--workdir=/nonexistent', '--prefix=x'],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
    self.assertEqual(result.returncode, 1, result.stderr)
    self.assertRegex(result.stderr.strip(), r'^terraflax.serve: --prefix=x: give NAME=WORKDIR.$')


if __name__ == '__main__':
  absltest.main()
