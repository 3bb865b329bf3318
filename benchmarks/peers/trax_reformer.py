"""Trax 1.4.1 ReformerLM throughput, the Trax column of issue 12's tables.

Run with the Trax virtualenv's python (never terraflax's); it prints exactly
one JSON line on stdout (everything else goes to stderr):

  /work/venvs/trax/bin/python benchmarks/peers/trax_reformer.py \
      --mode train --attention lsh --length 4096 [--warmup_steps 2 --steps 5]
  ... --mode forward --attention lsh --length 16384
  ... --mode decode --attention lsh --batch 8 --decode_tokens 256 [--length 512]

The virtualenv (Python 3.11; exact `pip freeze` in benchmarks/peers/README.md):
  python3 -m venv trax && trax/bin/pip install trax==1.4.1
which pulls in jax/jaxlib 0.10.2 and TensorFlow 2.21.

Model (the issue's configuration): `trax.models.ReformerLM(vocab_size=256,
d_model=256, d_ff=1024, d_attention_key=64, d_attention_value=64, n_layers=2,
n_heads=4, dropout=0.0, ff_activation=FastGelu (Trax's default), pos_type='axial',
pos_axial_shape=axial_shape(length), pos_d_axial_embs=(64, 192))`, float32.
ReformerLM is reversible (ReversibleSerial of ReversibleHalfResidual blocks, whose
custom backward recomputes activations instead of storing them).
  --attention lsh:  tl.LSHSelfAttention(chunk_len=64, n_hashes=4, n_buckets=None),
      causal, n_chunks_before=1, n_chunks_after=0, Trax's other defaults
      (n_parallel_heads=1: one (example, head) slice at a time); in predict
      mode predict_mem_len = --length (Trax's default would be 2048) and
      predict_drop_len = min(256, --length).
      n_buckets=None makes Trax derive the count from the hashed length l at each
      call: 2 * max(1, l // chunk_len) buckets, kept flat up to 128 and factorised
      above that into [2**ceil(log2(sqrt(n))), 2 * (n // (2 * that))]:
      1K -> 32, 4K -> 128, 16K -> [32, 16] (512), 64K -> [64, 32] (2048).
      The JSON's n_buckets is measured by calling the layer's own hash_vectors on
      random vectors of the run's length (total count = largest bucket id + 1,
      divided by n_hashes).
  --attention full: tl.SelfAttention(chunk_len=None): exact causal attention
      over the whole sequence, all heads at once (Trax's default), separate
      query/key projections; in predict mode predict_mem_len =
      predict_drop_len = --length.

Modes:
  train    One step of Trax's own trainer, `trax.optimizers.Trainer` (the
           single-device update Trax's supervised.training.Loop uses: one jitted
           function doing forward, backward and the optimizer update) with
           `trax.optimizers.Adam(learning_rate=1e-3, weight_decay_rate=0.0)` on
           `tl.Serial(ReformerLM(mode='train'), tl.WeightedCategoryCrossEntropy())`,
           batch (tokens, tokens, ones) of random bytes. tokens/s = batch * length /
           median step time; the first step (trace + compile + run) is reported
           as first_step_seconds.
  forward  `tl.Accelerate(ReformerLM(mode='eval'))(tokens)` (jitted forward,
           logits), timed to `block_until_ready`.
  decode   Cached greedy decoding in Trax's predict mode, `ReformerLM(mode=
           'predict')` initialised for (batch, 1) inputs and run through one
           `tl.Accelerate`, one token per call starting from token 0, next token =
           argmax of the logits on the host (what trax.supervised.decoding.
           autoregressive_sample_stream does at temperature 0; the stream itself
           is not used because it builds a new Accelerate, hence a new
           compilation, every time it is called). The cache state is reset to the
           freshly initialised one before each decode. tokens/s = batch *
           decode_tokens / median decode time. --length (default 512) sizes the
           caches: Trax caches each attention layer's inputs, not keys and
           values, so every step full attention re-projects the whole cache
           and LSH sorts the cache by bucket and re-projects the
           n_hashes * chunk_len * 2 = 512 positions it attends to; decode time
           grows with --length (a cache of 512 instead of Trax's LSH default of
           2048 makes Trax faster, not slower). Trax's LSH layer in predict
           mode derives n_buckets from the hashed length of each call: 2
           buckets for one-token steps.

Trax 1.4.1's predict mode does not run on current JAX as installed. Two
runtime monkeypatches of Trax's JAX backend table (`trax.fastmath.jax.
JAX_BACKEND`), applied only in --mode decode and never written to the venv:
  1. 'cond': Trax calls `fastmath.cond(pred=, true_operand=, true_fun=,
     false_operand=, false_fun=)`, a keyword form `jax.lax.cond` no longer
     accepts; the wrapper forwards it as `lax.cond(pred, true_fun, false_fun,
     operand)` (both operands are the same object at every Trax call site, but
     the wrapper keeps them separate anyway).
  2. 'stop_gradient': Trax passes the Python int `seqlen` through
     `fastmath.stop_gradient` and then branches on it (`if q_len > 1:`); old
     JAX returned non-float inputs unchanged, current JAX turns them into
     arrays (tracers under jit). The wrapper leaves Python ints unchanged and
     calls `lax.stop_gradient` on everything else.
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peer_common as common  # pylint: disable=g-import-not-at-top


def apply_predict_mode_patches():
  """The two runtime fixes predict mode needs on current JAX (see module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from trax.fastmath import jax as trax_jax_backend  # pylint: disable=g-import-not-at-top

  table = trax_jax_backend.JAX_BACKEND
  lax_cond, lax_stop_gradient = table['cond'], table['stop_gradient']

  def cond(*args, **kwargs):
    if 'true_operand' not in kwargs:
      return lax_cond(*args, **kwargs)
    true_operand, false_operand = kwargs['true_operand'], kwargs['false_operand']
    true_fun, false_fun = kwargs['true_fun'], kwargs['false_fun']
    return lax_cond(kwargs['pred'], lambda ops: true_fun(ops[0]), lambda ops: false_fun(ops[1]),
                    (true_operand, false_operand))

  def stop_gradient(x):
    return jax.tree_util.tree_map(
        lambda leaf: leaf if isinstance(leaf, int) else lax_stop_gradient(leaf), x)

  table['cond'] = cond
  table['stop_gradient'] = stop_gradient


def attention_type(args):
  """The attention factory ReformerLM calls (with n_heads, d_qk, d_v, causal, ...)."""
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  mem_len = args.predict_mem_len or args.length  # Only used in predict mode.
  if args.attention == 'lsh':
    return functools.partial(tl.LSHSelfAttention, chunk_len=common.CHUNK_LEN,
                             n_hashes=common.N_HASHES, n_buckets=None,
                             predict_mem_len=mem_len, predict_drop_len=min(256, mem_len))
  return functools.partial(tl.SelfAttention, chunk_len=None, predict_mem_len=mem_len,
                           predict_drop_len=mem_len)


def reformer_lm(args, mode):
  import trax  # pylint: disable=g-import-not-at-top
  return trax.models.ReformerLM(
      vocab_size=common.VOCAB_SIZE, d_model=common.D_MODEL, d_ff=common.D_FF,
      d_attention_key=common.D_HEAD, d_attention_value=common.D_HEAD,
      n_layers=common.N_LAYERS, n_heads=common.N_HEADS, dropout=0.0, max_len=args.length,
      attention_type=attention_type(args), pos_type='axial',
      pos_axial_shape=common.axial_shape(args.length, args.axial_shape),
      pos_d_axial_embs=common.AXIAL_D_EMBS, mode=mode)


def measured_n_buckets(length, seed):
  """Total bucket count Trax's LSHSelfAttention(n_buckets=None) uses at `length`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  layer = tl.LSHSelfAttention(n_heads=common.N_HEADS, d_qk=common.D_HEAD, d_v=common.D_HEAD,
                              causal=True, chunk_len=common.CHUNK_LEN, n_hashes=common.N_HASHES,
                              n_buckets=None, mode='train')
  vecs = jax.random.normal(jax.random.PRNGKey(seed), (length, common.D_HEAD))
  buckets = np.asarray(layer.hash_vectors(vecs, jax.random.PRNGKey(seed + 1)))
  total = int(buckets.max()) + 1
  return total // common.N_HASHES if total % common.N_HASHES == 0 else None


def timed_loop(n, body):
  """Seconds of each of `n` calls of body(i) (body blocks until its work is done)."""
  seconds = []
  for i in range(n):
    start = time.perf_counter()
    body(i)
    seconds.append(time.perf_counter() - start)
  return seconds


def measure_train(args, reporter):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import trax  # pylint: disable=g-import-not-at-top
  from trax import fastmath, shapes  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top

  tokens = np.random.RandomState(args.seed).randint(
      0, common.VOCAB_SIZE, (args.batch, args.length)).astype(np.int32)
  batch = (tokens, tokens, np.ones(tokens.shape, np.float32))
  model_with_loss = tl.Serial(reformer_lm(args, 'train'), tl.WeightedCategoryCrossEntropy())
  model_with_loss.init(shapes.signature(batch), rng=fastmath.random.get_prng(args.seed))
  optimizer = trax.optimizers.Adam(learning_rate=common.LEARNING_RATE, weight_decay_rate=0.0)
  optimizer.tree_init(model_with_loss.weights)
  trainer = trax.optimizers.Trainer(model_with_loss, optimizer)
  n = args.warmup_steps + args.steps
  rngs = fastmath.random.split(fastmath.random.get_prng(args.seed + 1), n)
  losses = []

  def step(i):
    loss, _ = trainer.one_step(batch, rngs[i], step=i)
    jax.block_until_ready((loss, trainer.accelerated_model_with_loss.weights))
    losses.append(float(loss))

  seconds = timed_loop(n, step)
  reporter.update(first_step_seconds=seconds[0], warmup_step_seconds=seconds[:args.warmup_steps],
                  losses=[round(l, 4) for l in losses],
                  **common.summarise_steps(seconds[args.warmup_steps:], args.batch * args.length))


def measure_forward(args, reporter):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import fastmath, shapes  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top

  tokens = np.random.RandomState(args.seed).randint(
      0, common.VOCAB_SIZE, (args.batch, args.length)).astype(np.int32)
  model = reformer_lm(args, 'eval')
  model.init(shapes.signature(tokens), rng=fastmath.random.get_prng(args.seed))
  fast = tl.Accelerate(model)

  def step(_):
    jax.block_until_ready(fast(tokens))

  seconds = timed_loop(args.warmup_steps + args.steps, step)
  reporter.update(first_step_seconds=seconds[0], warmup_step_seconds=seconds[:args.warmup_steps],
                  **common.summarise_steps(seconds[args.warmup_steps:], args.batch * args.length))


def measure_decode(args, reporter):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import fastmath, shapes  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top

  apply_predict_mode_patches()
  model = reformer_lm(args, 'predict')
  model.init(shapes.ShapeDtype((args.batch, 1), np.int32), rng=fastmath.random.get_prng(args.seed))
  fast = tl.Accelerate(model)
  initial_state = fast.state
  first_token_seconds = []
  samples = []

  def decode(_):
    fast.state = initial_state
    symbols = np.zeros((args.batch, 1), np.int32)
    out = []
    start = time.perf_counter()
    for i in range(args.decode_tokens):
      logits = fast(symbols)
      symbols = np.argmax(np.asarray(logits[:, -1, :]), axis=-1).astype(np.int32)[:, None]
      out.append(int(symbols[0, 0]))
      if i == 0:
        first_token_seconds.append(time.perf_counter() - start)
    samples.append(out[:16])

  seconds = timed_loop(args.warmup_steps + args.steps, decode)
  reporter.update(first_step_seconds=first_token_seconds[0],
                  warmup_step_seconds=seconds[:args.warmup_steps],
                  # Same weights, cache reset each time: every decode gives the same tokens.
                  same_tokens_every_decode=all(s == samples[0] for s in samples),
                  sample_tokens=samples[0],
                  **common.summarise_steps(seconds[args.warmup_steps:],
                                           args.batch * args.decode_tokens))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_common_flags(parser)
  parser.add_argument('--predict_mem_len', type=int, default=0,
                      help='decode: cache length of the attention layers (Trax caches layer '
                           'inputs and re-projects the whole cache every step, so decode time '
                           'grows with it); 0 (default) = --length.')
  args = parser.parse_args()
  common.check_common_flags(args)

  reporter = common.start_report('trax', args)

  def measure():
    import jax  # pylint: disable=g-import-not-at-top
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    import trax  # pylint: disable=g-import-not-at-top,unused-import
    reporter.update(library_version=metadata.version('trax'), jax_version=jax.__version__,
                    backend=jax.default_backend(), cpu_count=os.cpu_count())
    if args.attention == 'lsh':
      if args.mode == 'decode':
        reporter.update(n_buckets=2, n_buckets_note='predict mode hashes one-token steps: '
                        '2 * max(1, 2 // chunk_len) = 2 buckets')
      else:
        reporter.update(n_buckets=measured_n_buckets(args.length, args.seed))
    {'train': measure_train, 'forward': measure_forward,
     'decode': measure_decode}[args.mode](args, reporter)

  common.run_guarded(reporter, measure)


if __name__ == '__main__':
  main()
