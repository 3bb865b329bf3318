"""Runs the native kernels sharded over 8 forced CPU devices; prints one JSON report.

Run by tests/kernels/test_spmd.py in a subprocess (XLA_FLAGS must force 8
host devices before JAX starts). For every case: the largest relative
difference between the sharded and the single-device outputs and gradients,
each native custom call's operand shapes in the compiled HLO, and the shapes
of every all-gather in it.
"""

import json
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import terraflax.models as tm
from terraflax.kernels import spmd
from terraflax.layers.feedforward import FeedForward
from terraflax.layers.lsh_attention import LSHSelfAttention
from terraflax.models.attention import LSH

TARGETS = ('TerraflaxLshForward', 'TerraflaxLshBackward', 'TerraflaxFfForward',
           'TerraflaxFfForwardHidden', 'TerraflaxFfBackward')
SHAPE = re.compile(r'\b[a-z]+\d*\[([\d,]*)\]')


def shapes_in(text):
  return [[int(n) for n in dims.split(',') if n] for dims in SHAPE.findall(text)]


def hlo_report(hlo: str) -> dict:
  """Operand shapes of each native custom call, and the result shapes of all-gathers."""
  calls, gathers = [], []
  for line in hlo.splitlines():
    target = re.search(r'custom_call_target="(\w+)"', line)
    if target and target.group(1) in TARGETS:
      operands = re.search(r'operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}', line)
      calls.append({'target': target.group(1), 'operands': shapes_in(operands.group(1))})
    gather = re.match(r'\s*(?:ROOT )?%\S+ = (.*?) all-gather(?:-start)?\(', line)
    if gather:
      gathers.append(shapes_in(gather.group(1)))
  return {'calls': calls, 'all_gathers': gathers}


def relative_error(got, want) -> float:
  """The largest max |got - want| / max |want| over the leaves of (outputs, gradients).

  `got`, `want`: ((loss, outputs), gradients); the loss itself, a sum with
  cancellation, is left out: its rounding depends on the order of the sum.
  """
  (_, got_out), got_grads = got
  (_, want_out), want_grads = want
  got, want = (got_out, got_grads), (want_out, want_grads)
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
  return worst


def compare(name, loss, params, x, mesh, x_spec, param_specs) -> dict:
  """`value_and_grad(loss)` on one device and with x and params sharded over `mesh`."""
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  single = step(params, x)
  sharded_x = jax.device_put(x, NamedSharding(mesh, x_spec))
  sharded_params = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)),
                                params, param_specs)
  compiled = step.lower(sharded_params, sharded_x).compile()
  got = compiled(sharded_params, sharded_x)
  return dict(name=name, error=relative_error(got, single), **hlo_report(compiled.as_text()))


def noisy(params, scale=0.3):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(12), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def mesh_of(shape, names):
  return Mesh(np.array(jax.devices()).reshape(shape), names)


def feed_forward_case(name, mesh, x_spec, *, d_ff, weight_specs, chunk_len=None):
  b, l, d = 16, 6, 16  # 96 rows: 12 per device over 8, 24 over 4
  layer = FeedForward(d_model=d, d_ff=d_ff, kernel='cpu', mode='eval', chunk_len=chunk_len)
  x = jax.random.normal(jax.random.key(0), (b, l, d))
  params = noisy(nn.meta.unbox(layer.init(jax.random.key(1), x)))  # nonzero biases: b2 must be added once
  cotangent = jax.random.normal(jax.random.key(2), (b, l, d))

  def loss(params, x):
    y = layer.apply(params, x)
    return jnp.sum(y * cotangent), y

  first, second, norm = weight_specs
  specs = {'params': {'Dense_1': {'kernel': first, 'bias': P(first[1])},
                      'Dense_4': {'kernel': second, 'bias': P(second[1])},
                      'LayerNorm_0': {'scale': norm, 'bias': norm}}}
  return compare(name, loss, params, x, mesh, x_spec, specs)


def feed_forward_cases():
  yield feed_forward_case('ff_data8', mesh_of((8,), ('data',)), P('data'), d_ff=32,
                          weight_specs=(P(None, None), P(None, None), P()))
  # fsdp x tensor parallel: embed over 'fsdp', the hidden (mlp) width over 'model'.
  yield feed_forward_case('ff_fsdp_tp', mesh_of((2, 2, 2), ('data', 'fsdp', 'model')),
                          P(('data', 'fsdp')), d_ff=32,
                          weight_specs=(P('fsdp', 'model'), P('model', 'fsdp'), P('fsdp')))
  # chunk_len: the kernel keeps no hidden activations and recomputes them from w1's shard.
  yield feed_forward_case('ff_recompute_tp', mesh_of((4, 2), ('data', 'model')), P('data'),
                          d_ff=32, weight_specs=(P(None, 'model'), P('model', None), P()),
                          chunk_len=3)
  # d_ff 48 over 2: shards of 24 are no multiple of 16, so the weights are gathered.
  yield feed_forward_case('ff_tp_gathered', mesh_of((4, 2), ('data', 'model')), P('data'),
                          d_ff=48, weight_specs=(P(None, 'model'), P('model', None), P()))


def lsh_cases():
  b, l, d, h = 8, 64, 32, 2
  layer = LSHSelfAttention(n_heads=h, d_qk=16, d_v=16, n_hashes=2, n_buckets=4, chunk_len=16,
                           causal=True, kernel='cpu', mode='eval')
  x = jax.random.normal(jax.random.key(3), (b, l, d))
  params = nn.meta.unbox(layer.init({'params': jax.random.key(4), 'hash': jax.random.key(5)}, x))
  cotangent = jax.random.normal(jax.random.key(6), (b, l, d))

  def loss(params, x):
    y = layer.apply(params, x, rngs={'hash': jax.random.key(7)})
    return jnp.sum(y * cotangent), y

  replicated = jax.tree.map(lambda _: P(), params)
  yield compare('lsh_data8', loss, params, x, mesh_of((8,), ('data',)), P('data'), replicated)
  by_heads = {'params': {'qk': P(None, 'model'), 'value': P(None, 'model'),
                         'output': P('model')}}
  yield compare('lsh_heads', loss, params, x, mesh_of((4, 2), ('data', 'model')), P('data'),
                by_heads)


def tensor_parallel_spec(path, leaf) -> P:
  """A stacked ReformerLM parameter's sharding: heads and the feed-forward hidden over 'model'."""
  names = [getattr(k, 'key', '') for k in path]
  if 'LSHSelfAttention_1' in names:  # (layers, d, h, k) and (layers, h, dv, d)
    return P(None, 'model') if names[-1] == 'output' else P(None, None, 'model')
  if 'Dense_1' in names:  # (layers, d, d_ff), (layers, d_ff)
    return P(None, None, 'model') if leaf.ndim == 3 else P(None, 'model')
  if 'Dense_4' in names and leaf.ndim == 3:  # (layers, d_ff, d)
    return P(None, 'model')
  return P()


def reformer_cases():
  """A tiny ReformerLM: both kernels traced inside the scanned reversible stack."""
  model = tm.ReformerLM(vocab_size=32, d_model=32, d_ff=32, n_layers=2, n_heads=2, d_qk=16,
                        d_v=16, max_len=64, dropout=0.0, mode='train',
                        attention=LSH(n_hashes=2, chunk_len=16, n_buckets=4))
  tokens = jax.random.randint(jax.random.key(8), (8, 64), 1, 32)
  rngs = {'dropout': jax.random.key(9), 'hash': jax.random.key(10)}
  params = noisy(nn.meta.unbox(model.init({'params': jax.random.key(11), **rngs}, tokens)), 0.1)
  step = jax.jit(jax.value_and_grad(
      lambda params, tokens: (lambda logits: (jnp.mean(jax.nn.log_softmax(logits)[..., 0]),
                                              logits))(model.apply(params, tokens, rngs=rngs)),
      has_aux=True))
  single = step(params, tokens)
  for name, mesh, specs in [
      ('reformer_data8', mesh_of((8,), ('data',)), jax.tree.map(lambda _: P(), params)),
      ('reformer_tp', mesh_of((4, 2), ('data', 'model')),
       jax.tree_util.tree_map_with_path(tensor_parallel_spec, params))]:
    sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, P('data')))
    sharded_params = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)),
                                  params, specs)
    compiled = step.lower(sharded_params, sharded_tokens).compile()
    got = compiled(sharded_params, sharded_tokens)
    yield dict(name=name, error=relative_error(got, single), **hlo_report(compiled.as_text()))


def extra_operand_case():
  """An operand that the layouts do not list (as segment ids would be) is split by batch."""
  x = jax.random.normal(jax.random.key(13), (8, 16))
  segments = jax.random.randint(jax.random.key(14), (8, 16), 0, 3)
  scaled = spmd.partitioned(lambda x, segments: x * segments.astype(x.dtype),
                            operands=('b.',), results=('b.',))
  run = jax.jit(lambda x, segments: (jnp.sum(scaled(x, segments)), scaled(x, segments)))
  mesh = mesh_of((8,), ('data',))
  args = [jax.device_put(a, NamedSharding(mesh, P('data'))) for a in (x, segments)]
  compiled = run.lower(*args).compile()
  got, want, hlo = compiled(*args), run(x, segments), compiled.as_text()
  return dict(name='extra_operand', error=relative_error((got, ()), (want, ())),
              per_device=bool(re.search(r'f32\[1,16\]\S* multiply\(', hlo)),
              **hlo_report(hlo))


def main():
  assert jax.device_count() == 8, jax.devices()
  cases = [*feed_forward_cases(), *lsh_cases(), *reformer_cases(), extra_operand_case()]
  json.dump({case['name']: case for case in cases}, sys.stdout)


if __name__ == '__main__':
  main()
