"""Where a batch-1 float32 decoding step's time goes, as shares of the read bandwidth (issue 22).

For TransformerLM sizes `DxFxL` (vocabulary 256, 8 heads, max_len 128, as
`decode_roofline.py`), each timed piece reads some of the model's weights;
its GB/s is those bytes / its best time, beside the best jitted `x.sum()`
over 256 MiB of the same run (every piece is timed in turn, round after
round, so all see the same load):

  stream all     every weight matrix of the model (per layer query/key/value
                 in one call, output, W1, W2; the LM head) through the
                 native streaming product `kernels.matvec_cpu`, chained: the
                 ceiling of the native path (no attention, no sampling)
  ff kernel      the L feed-forward blocks through `kernels.ff_cpu` alone
  attention xla  the 4 L (d, d) projections as XLA dots, chained
  attention      the same through `matvec_cpu` (q/k/v in one call per layer)
  decode         `autoregressive_sample` marginal cost per token:
                 (T(--long) - T(--short)) / (--long - --short) new tokens,
                 so the per-call work (splitting the stacked weights) drops out;
                 with plain parameters and with `decoding.split_weights`

  python benchmarks/decode_breakdown.py [--models 512x2048x6,1024x16384x6] [--rounds 20]

Timings on a machine shared with other work swing; compare shares of the
same run, not milliseconds across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import terraflax.models as tm  # noqa: E402
from terraflax import compiler  # noqa: E402
from terraflax import decoding  # noqa: E402
from terraflax.kernels import ff_cpu, matvec_cpu  # noqa: E402

VOCAB, MAX_LEN, HEADS = 256, 128, 8
BANDWIDTH_BYTES = 256 * 2**20


def layers_of(params, n_layers):
  """Per layer (wq, wk, wv, wo, w1, b1, w2, b2) and the head kernel, from the eval params."""
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

  def find(*parts):
    hits = [v for k, v in flat.items() if all(p in k for p in parts)]
    if len(hits) != 1:
      raise SystemExit(f'expected one parameter matching {parts}, got {len(hits)}')
    return hits[0]

  named = [find('CausalAttention', f'{n}/kernel') for n in ('query', 'key', 'value', 'output')]
  named += [find('FeedForward', 'Dense_1/kernel'), find('FeedForward', 'Dense_1/bias'),
            find('FeedForward', 'Dense_4/kernel'), find('FeedForward', 'Dense_4/bias')]
  head = [v for k, v in flat.items() if k.endswith('kernel') and v.shape[-1] == VOCAB][0]
  return [tuple(a[i] for a in named) for i in range(n_layers)], head


def pieces(layers, head):
  """{name: (function, args, bytes read)} of the timed pieces."""
  x0 = jnp.ones((1, layers[0][0].shape[0]), jnp.float32)

  def stream_all(x, layers, head):
    for wq, wk, wv, wo, w1, _, w2, _ in layers:
      q, k, v = matvec_cpu.matmul(x, wq, wk, wv)
      x = x + 1e-3 * matvec_cpu.matmul(jnp.tanh(q + k + v), wo)[0]
      h = jnp.maximum(matvec_cpu.matmul(x, w1)[0], 0)
      x = x + 1e-3 * matvec_cpu.matmul(h, w2)[0]
    return matvec_cpu.matmul(x, head)[0]

  def ff(x, layers):
    for *_, w1, b1, w2, b2 in layers:
      x = x + 1e-3 * ff_cpu.feed_forward(x, w1, b1, w2, b2, activation='relu')
    return x

  def attention_xla(x, layers):
    for wq, wk, wv, wo, *_ in layers:
      x = x + 1e-3 * (jnp.tanh(x @ wq + x @ wk + x @ wv) @ wo)
    return x

  def attention(x, layers):
    for wq, wk, wv, wo, *_ in layers:
      q, k, v = matvec_cpu.matmul(x, wq, wk, wv)
      x = x + 1e-3 * matvec_cpu.matmul(jnp.tanh(q + k + v), wo)[0]
    return x

  def nbytes(arrays):
    return sum(a.nbytes for a in arrays)

  attn = nbytes(w for layer in layers for w in layer[:4])
  ffb = nbytes(w for layer in layers for w in (layer[4], layer[6]))
  return {'stream all': (compiler.jit(stream_all), (x0, layers, head), attn + ffb + head.nbytes),
          'ff kernel': (compiler.jit(ff), (x0, layers), ffb),
          'attention xla': (compiler.jit(attention_xla), (x0, layers), attn),
          'attention': (compiler.jit(attention), (x0, layers), attn)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='512x2048x6,1024x16384x6')
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--short', type=int, default=4)
  parser.add_argument('--long', type=int, default=36)
  args = parser.parse_args()
  if not (matvec_cpu.available() and ff_cpu.available()):
    raise SystemExit('the native kernels could not be built (see the warning logged)')
  big = jnp.ones((BANDWIDTH_BYTES // 4,), jnp.float32)
  total = jax.jit(lambda x: x.sum())
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs; best of {args.rounds} rounds')
  print('| model | piece | MB read | best ms | GB/s | share of x.sum() |')
  print('|---|---|---|---|---|---|', flush=True)
  for name in args.models.split(','):
    d, f, n_layers = (int(v) for v in name.split('x'))
    size = dict(vocab_size=VOCAB, d_model=d, d_ff=f, n_layers=n_layers, n_heads=HEADS,
                dropout=0.0, max_len=MAX_LEN)
    params = nn.meta.unbox(tm.TransformerLM(**size, mode='eval').init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
    model = tm.TransformerLM(**size, mode='predict')
    layers, head = layers_of(params, n_layers)
    timed = pieces(layers, head)
    prompt = jnp.ones((1, 1), jnp.int32)
    calls = {'x.sum()': lambda: total(big)}
    calls.update({k: (lambda fn=fn, a=a: fn(*a)) for k, (fn, a, _) in timed.items()})
    split = decoding.split_weights(model, params)
    for kind, weights in (('plain', params), ('split', split)):
      calls.update({f'decode {kind} {n}': (lambda n=n, w=weights: decoding.autoregressive_sample(
          model, w, prompt, n, temperature=0.0)) for n in (args.short, args.long)})
    best = {}
    for _ in range(args.rounds + 1):  # the first round compiles
      for key, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        best[key] = min(best.get(key, float('inf')), time.perf_counter() - start)
    bandwidth = BANDWIDTH_BYTES / best['x.sum()']
    weights = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    rows = [(k, nb, best[k]) for k, (_, _, nb) in timed.items()]
    for kind in ('plain', 'split'):
      rows.append((f'decode per token, {kind} params', weights,
                   (best[f'decode {kind} {args.long}'] - best[f'decode {kind} {args.short}'])
                   / (args.long - args.short)))
    print(f'| {name} | x.sum() | {BANDWIDTH_BYTES / 1e6:.1f} | {best["x.sum()"] * 1e3:.2f} | '
          f'{bandwidth / 1e9:.1f} | 100% |')
    for key, nb, seconds in rows:
      print(f'| {name} | {key} | {nb / 1e6:.1f} | {seconds * 1e3:.2f} | {nb / seconds / 1e9:.1f} | '
            f'{nb / seconds / bandwidth:.0%} |', flush=True)


if __name__ == '__main__':
  main()
