"""Load test of `terraflax.serve`: concurrent requests over several prefixes vs one at a time.

  python benchmarks/serve_load.py [--requests 64] [--prefixes 4] [--slots 16] [--steps_per_call 8]
      [--timeout_s 600] [--d_model 128 --d_ff 512 --n_layers 2]

Writes a base TransformerLM workdir (configs/transformer_lm.py shapes, random
weights: speed does not depend on them) and `--prefixes` prefix workdirs
(`attention.n_prefix=16`) into a temporary directory, serves them on loopback
(uvicorn in a thread), and sends all requests at once, each from its own
client thread, non-streamed and greedy, spread over the prefixes and the base.
Then decodes the same requests one at a time with
`terraflax.decoding.autoregressive_sample` (compiled first, outside the
timing). Prints a markdown table: wall and process CPU seconds (the CPU
figure is the fairer one on a machine shared with other work), requests/s,
generated tokens/s, and p50/p99 latency (from the moment all requests are
sent; for one at a time, also each request's own decoding time). Exits non-zero if a request fails or the run
exceeds --timeout_s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time

import flax.linen as nn
import httpx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from terraflax import decoding
from terraflax import workdir as workdir_lib
from terraflax.layers import prefix as prefix_lib
from terraflax.models import spec as spec_lib
from terraflax.serve import api
from terraflax.serve import engine as engine_lib
from terraflax.serve import model as model_lib
from terraflax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lm_config(n_prefix: int = 0, **model) -> ml_collections.ConfigDict:
  """configs/transformer_lm.py with `model` fields replaced, and a prefix if n_prefix > 0."""
  config = config_lib.load_sibling(os.path.join(ROOT, 'configs', 'x.py'), 'transformer_lm')
  for field, value in model.items():
    config.model[field] = value
  config.data.seq_len = min(config.data.seq_len, config.model.max_len)
  if n_prefix:
    config.model.attention = ml_collections.ConfigDict({'kind': 'full', 'n_prefix': n_prefix})
  return config


def _init(config, seed: int, scale: float = 1.0):
  """Random parameters for config.model, from numpy (no compiling): norm scales 1, biases 0,
  other leaves normal with std scale / sqrt(fan-in)."""
  spec = spec_lib.ModelSpec.from_config(config)
  abstract = nn.meta.unbox(spec.abstract_variables(1, 8, mode='eval'))['params']
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      return jnp.ones(x.shape, x.dtype)
    if name == 'bias':
      return jnp.zeros(x.shape, x.dtype)
    fan_in = x.shape[-2] if len(x.shape) >= 2 else 1
    return jnp.asarray(rng.normal(0.0, scale / np.sqrt(fan_in), x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _write(workdir: str, config, params) -> str:
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(workdir, config)
  workdir_lib.save_params(workdir, 1, params)
  return workdir


def make_workdirs(root: str, *, n_prefixes: int, n_prefix: int, scale: float = 1.0,
                  **model) -> tuple[str, dict[str, str]]:
  """(base workdir, {name: prefix workdir}) with random weights (`_init`), written as the
  trainer would leave them (a prefix run's base weights are the base's, frozen)."""
  base = _init(lm_config(**model), 0, scale)
  prefixes = {}
  if n_prefixes:
    config = lm_config(n_prefix, **model)
    for i in range(n_prefixes):
      _, prefix = prefix_lib.split_prefix(_init(config, 1000 + i, scale))
      name = f'p{i}'
      prefixes[name] = _write(os.path.join(root, name), config,
                              prefix_lib.merge_prefix(base, prefix))
  return _write(os.path.join(root, 'base'), lm_config(**model), base), prefixes


def make_requests(n: int, names: list, *, prompt_lens=(16, 32), max_tokens=(32, 64), seed=0):
  """n greedy request bodies cycling over `names` (None: the base), lengths drawn from the sets."""
  rng = np.random.default_rng(seed)
  words = ['def', 'class', 'return', 'import', 'self', 'for', 'in', 'if', 'else', 'None']
  bodies = []
  for i in range(n):
    length = int(rng.choice(prompt_lens))
    text = ' '.join(rng.choice(words, size=length)).encode()[:length].decode()
    bodies.append({'prompt': text, 'max_tokens': int(rng.choice(max_tokens)),
                   'temperature': 0.0, 'prefix': names[i % len(names)]})
  return bodies


def run_concurrent(url: str, bodies: list, timeout_s: float) -> tuple[list, list, float]:
  """(responses, latencies in s, wall s): every body POSTed at once, one thread each."""
  def one(body):
    with httpx.Client(timeout=timeout_s) as client:
      start = time.perf_counter()
      response = client.post(url + '/v1/completions', json=body)
      return response, time.perf_counter() - start

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    results = list(pool.map(one, bodies))
  return [r for r, _ in results], [t for _, t in results], time.perf_counter() - start


def run_one_at_a_time(served: model_lib.Served, bodies: list) -> tuple[list, list]:
  """(generated token lists, each request's decoding time in s, process CPU s), decoded with
  `autoregressive_sample` one request at a time (each shape compiled before timing)."""
  def decode(body):
    use_prefix, row = served.route(body['prefix'])
    model, params = served.base_model, served.base_params
    if use_prefix:
      model = served.prefix_model
      params = prefix_lib.merge_prefix(
          params, jax.tree_util.tree_map(lambda s, r=row: s[r], served.stacked))
    ids = decoding.prompt_ids(body['prompt'], served.tokenizer)
    tokens = decoding.autoregressive_sample(model, params, jnp.asarray([ids], jnp.int32),
                                            body['max_tokens'], temperature=0.0,
                                            eos_id=served.eos_id)
    return np.asarray(tokens).reshape(-1).tolist()

  seen = set()
  for body in bodies:  # Compile every (prefix or not, prompt length, max_tokens) once.
    key = (served.route(body['prefix'])[0], len(body['prompt']), body['max_tokens'])
    if key not in seen:
      seen.add(key)
      decode(body)
  outputs, times = [], []
  cpu = time.process_time()
  for body in bodies:
    start = time.perf_counter()
    outputs.append(decode(body))
    times.append(time.perf_counter() - start)
  return outputs, times, time.process_time() - cpu


def _generated(tokens: list, eos_id) -> int:
  """Tokens up to and including the first EOS (what the server returns)."""
  return tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)


def percentile(values, q) -> float:
  return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--requests', type=int, default=64)
  parser.add_argument('--prefixes', type=int, default=4)
  parser.add_argument('--slots', type=int, default=16)
  parser.add_argument('--steps_per_call', type=int, default=8)
  parser.add_argument('--timeout_s', type=float, default=600.0)
  parser.add_argument('--d_model', type=int, default=128)
  parser.add_argument('--d_ff', type=int, default=512)
  parser.add_argument('--n_layers', type=int, default=2)
  args = parser.parse_args(argv)
  began = time.perf_counter()
  with tempfile.TemporaryDirectory() as root:
    base, prefixes = make_workdirs(root, n_prefixes=args.prefixes, n_prefix=16,
                                   d_model=args.d_model, d_ff=args.d_ff, n_layers=args.n_layers)
    served = model_lib.load(base, prefixes)
    engine = engine_lib.Engine(served, n_slots=args.slots, max_queue=args.requests,
                               steps_per_call=args.steps_per_call)
    engine.warmup()
    engine.start()
    bodies = make_requests(args.requests, list(prefixes) or [None])
    cpu = time.process_time()
    try:
      with api.BackgroundServer(api.make_app(engine)) as server:
        responses, latencies, wall = run_concurrent(server.url, bodies, args.timeout_s)
        serve_cpu = time.process_time() - cpu
    finally:
      engine.stop()
    final = engine.metrics()
    steps, calls = final['steps'], final['calls']
    failed = [r for r in responses if r.status_code != 200]
    if failed:
      print(f'{len(failed)} of {len(bodies)} requests failed, e.g. {failed[0].status_code} '
            f'{failed[0].text[:200]}', file=sys.stderr)
      return 1
    served_tokens = sum(len(r.json()['tokens']) for r in responses)
    outputs, times, sequential_cpu = run_one_at_a_time(served, bodies)
  same = sum(r.json()['tokens'] == out[:_generated(out, served.eos_id)]
             for r, out in zip(responses, outputs))
  sequential_tokens = sum(_generated(out, served.eos_id) for out in outputs)
  finish = np.cumsum(times)  # Completion times when all requests arrive at once.
  print(f'\nterraflax.serve load test: {args.requests} concurrent greedy requests over '
        f'{args.prefixes} prefixes, {args.slots} slots, {args.steps_per_call} steps per call; '
        f'TransformerLM d_model {args.d_model}, '
        f'd_ff {args.d_ff}, {args.n_layers} layers, jax {jax.__version__}, '
        f'{jax.devices()[0].platform}\n')
  print('| decoding | wall s | CPU s | requests/s | tokens/s | p50 latency s | p99 latency s |')
  print('|---|---|---|---|---|---|---|')
  print(f'| terraflax.serve, {args.slots} slots (HTTP) | {wall:.2f} | {serve_cpu:.1f} | '
        f'{len(bodies) / wall:.2f} | {served_tokens / wall:.0f} | '
        f'{percentile(latencies, 50):.2f} | {percentile(latencies, 99):.2f} |')
  total = float(np.sum(times))
  print(f'| one at a time, autoregressive_sample | {total:.2f} | {sequential_cpu:.1f} | '
        f'{len(bodies) / total:.2f} | {sequential_tokens / total:.0f} | {percentile(finish, 50):.2f} '
        f'({percentile(times, 50):.3f} own) | {percentile(finish, 99):.2f} '
        f'({percentile(times, 99):.3f} own) |')
  print(f'\nThe server ran {steps} decode steps of {args.slots} slots in {calls} device calls: '
        f'{wall / steps * 1e3:.1f} ms per step (HTTP included), '
        f'{wall / served_tokens * 1e3:.2f} ms per generated token; one '
        f'at a time: {total / sequential_tokens * 1e3:.2f} ms per generated token (prompt tokens '
        'are fed one per step in both).')
  print(f'The decode thread spent {final["call_seconds"]:.2f} s in device calls (the jitted '
        f'steps and their one transfer) and {final["host_seconds"]:.2f} s in bookkeeping and '
        'events (batch preparation not included).')
  print(f'\n{same} of {len(bodies)} served completions equal the one-at-a-time tokens; '
        f'{time.perf_counter() - began:.0f} s in all.')
  if time.perf_counter() - began > args.timeout_s:
    print(f'the run took longer than --timeout_s={args.timeout_s}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
