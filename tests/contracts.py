"""Shared contract helpers for the tests (STYLE.md: eval == predict, ...)."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -m module args...` on the CPU from the repository root (text output, no check)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def assert_float32_near_float64(test, got, want):
  """A float32 kernel's output `got` against a NumPy float64 reference `want`: float32 sums of
  K terms, so within 1e-5 of the largest |want|."""
  test.assertEqual(got.dtype, jnp.float32)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=1e-5 * float(np.abs(want).max()))


def relative_error(got, want) -> float:
  """max |got - want| / max |want|: a parity figure for logits against a peer library's."""
  return float(np.abs(got - want).max() / np.abs(want).max())


def predict_one_at_a_time(model, params, xs, key=None):
  """A predict-mode `model` fed xs[:, t:t + 1] for every t, cache threaded: outputs on axis 1.

  The cache starts from `model.init(key, xs[:, :1])`; compare the result with
  the eval-mode forward pass of the same params (decoding == the full pass).
  """
  key = jax.random.key(0) if key is None else key
  cache = model.init(key, xs[:, :1])['cache']
  step = jax.jit(lambda cache, x_t: model.apply({'params': params, 'cache': cache}, x_t,
                                                mutable=['cache']))
  outputs = []
  for t in range(xs.shape[1]):
    out, state = step(cache, xs[:, t:t + 1])
    cache = state['cache']
    outputs.append(out)
  return jnp.concatenate(outputs, axis=1)


def assert_lm_decoding_equals_eval(eval_model, predict_model, params, tokens, *, rngs=None,
                                   atol=1e-4):
  """An LM decoded one token per call ('predict') gives the eval forward pass's logits.

  `tokens` int (b, l): the eval model reads them whole; the predict model is
  fed the previous token at each step (0 first, as the LM's ShiftRight),
  its cache from `predict_model.init`. `rngs` (e.g. {'hash': key}) go to the
  eval call. Returns the decoded logits (b, l, v).
  """
  full = jax.jit(lambda x: eval_model.apply({'params': params}, x, rngs=rngs or {}))(tokens)
  shifted = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
  decoded = predict_one_at_a_time(predict_model, params, shifted)
  np.testing.assert_allclose(decoded, full, rtol=atol, atol=atol)
  return decoded


def pack_documents(documents, length):
  """Documents (l_i, ...) -> one packed row: (x (1, length, ...), segment_ids, positions).

  Documents go one after another, ids 1, 2, ...; the rest of the row is
  padding (zeros, segment id 0, position 0). Both int32 (1, length).
  """
  used = sum(d.shape[0] for d in documents)
  if used > length:
    raise ValueError(f'pack_documents: {used} tokens do not fit a row of {length}.')
  pad = jnp.zeros((length - used,) + documents[0].shape[1:], documents[0].dtype)
  x = jnp.concatenate(list(documents) + [pad], axis=0)[None]
  segment_ids = jnp.concatenate(
      [jnp.full((d.shape[0],), i + 1, jnp.int32) for i, d in enumerate(documents)]
      + [jnp.zeros((length - used,), jnp.int32)])[None]
  positions = jnp.concatenate(
      [jnp.arange(d.shape[0], dtype=jnp.int32) for d in documents]
      + [jnp.zeros((length - used,), jnp.int32)])[None]
  return x, segment_ids, positions


def assert_packed_equals_unpacked(packed_fn, alone_fn, params, documents, length, *, atol=2e-5,
                                  grads=True, seed=0):
  """Packed == unpacked: a packed row's outputs and gradients equal each document's alone.

  packed_fn(params, x, segment_ids, positions) -> (1, length, ...) per-token
  outputs of the packed row (`pack_documents`); alone_fn(params, x) ->
  (1, l_i, ...) for one document x (1, l_i, ...). The outputs must agree at
  every real token. With `grads`, so must the gradients, wrt the parameters
  and (for float documents) the inputs, of a loss over the real tokens only:
  sum(w * out) with fixed random weights w, against the sum of the
  documents' losses.
  """
  x, segment_ids, positions = pack_documents(documents, length)
  out_shape = jax.eval_shape(packed_fn, params, x, segment_ids, positions).shape
  weights = jax.random.normal(jax.random.key(seed), out_shape[1:], jnp.float32)
  spans, start = [], 0
  for doc in documents:
    spans.append((start, doc.shape[0]))
    start += doc.shape[0]
  real = segment_ids[0] > 0
  float_inputs = jnp.issubdtype(x.dtype, jnp.floating)

  def packed_loss(p, x):
    out = packed_fn(p, x, segment_ids, positions)
    mask = real.reshape(real.shape + (1,) * (out.ndim - 2))
    return jnp.sum(jnp.where(mask, out.astype(jnp.float32)[0] * weights, 0.0)), out

  def alone_loss(p, docs):
    outs = [alone_fn(p, doc[None]) for doc in docs]
    total = 0.0
    for (s, n), out in zip(spans, outs):
      total = total + jnp.sum(out.astype(jnp.float32)[0] * weights[s:s + n])
    return total, outs

  # With `grads`, the outputs come out of the same compiled programs as the gradients (one
  # compilation each for the packed row and the documents, not one more per shape).
  argnums = (0, 1) if float_inputs else 0
  if grads:
    (_, packed), got = jax.jit(jax.value_and_grad(packed_loss, argnums, has_aux=True))(params, x)
    (_, alones), want = jax.jit(jax.value_and_grad(alone_loss, argnums, has_aux=True))(
        params, list(documents))
  else:
    packed = jax.jit(packed_fn)(params, x, segment_ids, positions)
    alones = [jax.jit(alone_fn)(params, doc[None]) for doc in documents]
  for (s, n), alone in zip(spans, alones):
    got_out = packed[:, s:s + n]
    if alone.shape != got_out.shape:
      raise AssertionError(f'alone output {alone.shape} vs packed slice {got_out.shape}')
    error = float(jnp.max(jnp.abs(alone.astype(jnp.float32) - got_out.astype(jnp.float32))))
    assert error <= atol, (f'document at {s}..{s + n}: packed differs from '
                           f'alone by {error} > {atol}')
  if not grads:
    return
  got_p, want_p = (got[0], want[0]) if float_inputs else (got, want)
  flat_got, tree = jax.tree_util.tree_flatten(got_p)
  flat_want = jax.tree_util.tree_leaves(want_p)
  assert len(flat_got) == len(flat_want), tree
  for path_got, w in zip(jax.tree_util.tree_leaves_with_path(got_p), flat_want):
    path, g = path_got
    scale = max(1.0, float(jnp.max(jnp.abs(w))))
    error = float(jnp.max(jnp.abs(g - w)))
    assert error <= atol * 10 * scale, (f'parameter gradient {jax.tree_util.keystr(path)} '
                                        f'differs by {error}')
  if float_inputs:
    for (s, n), w in zip(spans, want[1]):
      error = float(jnp.max(jnp.abs(got[1][0, s:s + n] - w)))
      assert error <= atol * 10, f'input gradient at {s}..{s + n} differs by {error}'
    pad_grad = got[1][0, sum(n for _, n in spans):]
    assert float(jnp.max(jnp.abs(pad_grad), initial=0.0)) == 0.0, 'padding got a gradient'


def traced(f, *args):
  """(jaxpr text, constants as numpy) of f(*args): two functions with equal `traced` compute
  the same (`same_traced`). Tracing only, no compile; args may be ShapeDtypeStructs."""
  closed = jax.make_jaxpr(f)(*args)
  consts = [jax.random.key_data(c) if jnp.issubdtype(getattr(c, 'dtype', None),
                                                       jax.dtypes.prng_key) else c
            for c in closed.consts]
  return str(closed.jaxpr), [np.asarray(c) for c in consts]


def same_traced(a, b):
  """Whether two lists of `traced` programs are equal, jaxpr text and constants."""
  return len(a) == len(b) and all(
      ta == tb and len(ca) == len(cb) and all(
          u.shape == v.shape and u.dtype == v.dtype and np.array_equal(u, v)
          for u, v in zip(ca, cb)) for (ta, ca), (tb, cb) in zip(a, b))


def assert_seq2seq_packed_equals_unpacked(make, length, rngs, *, atol=5e-5):
  """An encoder-decoder `make(packed, mode)` on packed rows == each (input, target) pair alone.

  Two pairs (inputs of 6 and 3 tokens, targets of 4 and 7) packed into rows of `length`; target
  document i reads input document i. Loss and gradients (`assert_packed_equals_unpacked`) in
  'train' and 'eval' (a mode whose programs repeat a checked one's is not compiled again).
  """
  rng = np.random.default_rng(9)
  inputs = [jnp.asarray(rng.integers(1, 11, size=(n,)), jnp.int32) for n in (6, 3)]
  targets = [jnp.asarray(rng.integers(1, 11, size=(n,)), jnp.int32) for n in (4, 7)]
  x, x_seg, x_pos = pack_documents(inputs, length)
  seen = []
  for mode in ('train', 'eval'):
    alone, packed = make(False, mode), make(True, mode)

    def alone_fn(p, y, alone=alone):
      source = inputs[0] if y.shape[1] == targets[0].shape[0] else inputs[1]
      return alone.apply({'params': p}, source[None], y, rngs=rngs)

    packed_fn = lambda p, y, seg, pos, packed=packed: packed.apply(
        {'params': p}, x, x_seg, x_pos, y, seg, pos, rngs=rngs)
    init = lambda alone=alone: alone.init({'params': jax.random.key(0), **rngs},
                                          inputs[0][None], targets[0][None])['params']
    if repeats_a_checked_mode(seen, init, packed_fn, alone_fn, targets, length):
      continue
    assert_packed_equals_unpacked(packed_fn, alone_fn, jax.jit(init)(), targets, length,
                                  atol=atol)


def repeats_a_checked_mode(seen, init, packed_fn, alone_fn, documents, length):
  """Whether this mode's programs (init, the packed row, each document alone) are exactly,
  constants included, those of a mode already checked: then its check would repeat that one's
  (e.g. 'train' with every dropout rate 0 is 'eval'), so it need not compile again. Tracing
  only; appends this mode's programs to `seen` otherwise."""
  params = jax.eval_shape(init)
  x, segment_ids, positions = pack_documents(documents, length)
  programs = [traced(init), traced(packed_fn, params, x, segment_ids, positions)]
  programs += [traced(alone_fn, params, doc[None]) for doc in documents]
  if any(same_traced(programs, other) for other in seen):
    return True
  seen.append(programs)
  return False


def assert_layer_packed_equals_unpacked(make_layer, documents, length, *, modes=('train', 'eval'),
                                        collections=None, rngs=None, atol=2e-5):
  """`assert_packed_equals_unpacked` for a layer [x, segment_ids] -> [y, segment_ids].

  make_layer(mode=..., packed=...) builds the layer; the unpacked one is
  [x] -> [y] with the same parameters. `collections` (e.g. given LSH
  rotations) are passed to both; `rngs` to apply (the same keys for the
  packed row and every document).
  """
  collections = dict(collections or {})
  rngs = dict(rngs or {})
  seen = []
  for mode in modes:
    alone = make_layer(mode=mode, packed=False)
    packed = make_layer(mode=mode, packed=True)

    def packed_fn(p, x, segment_ids, positions, packed=packed):
      del positions
      y, seg = packed.apply({'params': p, **collections}, x, segment_ids, rngs=rngs)
      assert seg is segment_ids or seg.shape == segment_ids.shape
      return y

    def alone_fn(p, x, alone=alone):
      return alone.apply({'params': p, **collections}, x, rngs=rngs)

    init = lambda alone=alone: alone.init(jax.random.key(1), documents[0][None])['params']
    if repeats_a_checked_mode(seen, init, packed_fn, alone_fn, documents, length):
      continue
    params = jax.jit(init)()
    assert_packed_equals_unpacked(packed_fn, alone_fn, params, documents, length, atol=atol)


def assert_lm_packed_equals_unpacked(make_model, modes=('train', 'eval'), lengths=(5, 7, 3),
                                     row=16):
  """Packed == unpacked for an LM factory make_model(mode=..., packed=...): logits and grads."""
  rng = np.random.default_rng(7)
  docs = [jnp.asarray(rng.integers(1, 11, size=(n,)), jnp.int32) for n in lengths]
  rngs = {'dropout': jax.random.key(3), 'hash': jax.random.key(4), 'sparse': jax.random.key(5)}
  seen = []
  for mode in modes:
    alone, packed = make_model(mode=mode, packed=False), make_model(mode=mode, packed=True)
    packed_fn = lambda p, x, seg, pos, packed=packed: packed.apply({'params': p}, x, seg, pos,
                                                                   rngs=rngs)
    alone_fn = lambda p, x, alone=alone: alone.apply({'params': p}, x, rngs=rngs)
    init = lambda alone=alone: alone.init({'params': jax.random.key(0), **rngs},
                                          docs[0][None])['params']
    if repeats_a_checked_mode(seen, init, packed_fn, alone_fn, docs, row):
      continue
    params = jax.jit(init)()
    assert_packed_equals_unpacked(packed_fn, alone_fn, params, docs, row, atol=5e-5)
