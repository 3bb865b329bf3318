"""How far 'predict'-mode LSH decoding is from the eval-mode forward pass, on a trained model.

Trains a small `ReformerLM` with the trainer (`terraflax.train`) on bytes of
the Python standard library (`--task bytes`, configs/default.py with a
shorter sequence and more, smaller chunks) or on the Reformer duplication
task (`--task duplication`, configs/duplication.py with smaller sizes; it
needs thousands of steps before the copy is learnt), loads the checkpoint
and compares, position by position, the next-token distributions of

  eval:    one forward pass over the whole sequence (fresh rotations), and
  predict: token-by-token decoding with the LSH layers' ring-buffer caches,

as the mean KL(eval || predict) in nats, over all positions and over the
positions the task scores (all for bytes, the copied half for duplication).
For scale it also prints the KL between two eval passes with different
rotations, and the accuracy of each on the scored positions. With n_buckets=1 (and chunk_len >= length) predict equals
eval exactly (tests/models/test_reformer.py); with many buckets the two
attend to different key sets: a predict-mode query sees the keys that share
its bucket in any round plus its recent positions, an eval-mode query the
chunks its sorted bucket order puts it next to.

  python benchmarks/lsh_predict_kl.py [--task bytes] [--steps 500] [--seq_len 128]
      [--chunk_len 16] [--n_buckets 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from terraflax.train import checkpoint as ckpt
from terraflax.train import config as config_lib
from terraflax.train.trainer import train_and_evaluate


def make_config(args):
  name = 'default' if args.task == 'bytes' else 'duplication'
  config = config_lib.load_sibling(__file__.replace('benchmarks', 'configs'), name)
  config.seed = args.seed
  config.data.seq_len = args.seq_len
  if args.task == 'duplication':
    config.data.vocab_size = args.vocab
    config.data.eval_examples = args.eval_batch * 2
    config.model.vocab_size = args.vocab
  else:
    config.model.max_len = args.seq_len  # predict_mem_len = max_len = the training length
    config.sample.max_new_tokens = 0
  config.model.attention.kind = 'lsh'
  config.model.d_model = args.d_model
  config.model.d_ff = 2 * args.d_model
  config.model.n_layers = args.n_layers
  config.model.n_heads = args.n_heads
  config.model.attention.n_hashes = args.n_hashes
  if 'n_buckets' in config.model.attention:
    del config.model.attention['n_buckets']  # An int or a placeholder in the base configs.
  config.model.attention.n_buckets = args.n_buckets
  config.model.attention.chunk_len = args.chunk_len
  config.train.steps = args.steps
  config.train.batch_size = args.batch
  config.train.log_every = 100
  config.train.eval_every = args.steps
  config.train.eval_batches = 4
  config.train.checkpoint_every = args.steps
  config.train.async_checkpoints = False
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 50
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--task', default='bytes', choices=('bytes', 'duplication'))
  parser.add_argument('--steps', type=int, default=500)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--vocab', type=int, default=16, help='duplication: symbols + 1')
  parser.add_argument('--d_model', type=int, default=128)
  parser.add_argument('--n_layers', type=int, default=2)
  parser.add_argument('--n_heads', type=int, default=4)
  parser.add_argument('--n_hashes', type=int, default=2)
  parser.add_argument('--n_buckets', type=int, default=16)
  parser.add_argument('--chunk_len', type=int, default=16)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--eval_batch', type=int, default=32)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default=None, help='default: a temporary directory')
  args = parser.parse_args()

  config = make_config(args)
  workdir = args.workdir or tempfile.mkdtemp(prefix='lsh_predict_kl_')
  start = time.perf_counter()
  train_and_evaluate(config, workdir)
  print(f'trained {args.steps} steps with terraflax.train in {time.perf_counter() - start:.0f}s '
        f'(workdir {workdir})')

  config, params = ckpt.load_for_inference(workdir)
  experiment_data = config_lib.validate_config(config).data
  batch = next(experiment_data.eval_batches(batch_size=args.eval_batch, n_batches=1))
  ids, scored = jnp.asarray(batch['inputs']), jnp.asarray(batch['weights']) > 0
  eval_model = ckpt.model_from_config(config, 'eval')
  predict_model = ckpt.model_from_config(config, 'predict')

  @jax.jit
  def eval_log_probs(key):
    logits = eval_model.apply({'params': params}, ids, rngs={'hash': key})
    return jax.nn.log_softmax(logits)

  @jax.jit
  def predict_log_probs(key):
    previous = jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]  # The token before each position.
    cache = predict_model.init({'params': key, 'hash': key}, previous[:, :1])['cache']

    def step(cache, token):
      logits, state = predict_model.apply({'params': params, 'cache': cache}, token[:, None],
                                          mutable=['cache'])
      return state['cache'], logits[:, 0]

    _, logits = jax.lax.scan(step, cache, previous.T)
    return jax.nn.log_softmax(jnp.moveaxis(logits, 0, 1))

  def kl(p_log, q_log, where=None):
    per_position = jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)
    if where is None:
      return float(jnp.mean(per_position))
    return float(jnp.sum(per_position * where) / jnp.sum(where))

  def accuracy(log_probs):
    return float(jnp.sum((jnp.argmax(log_probs, -1) == ids) * scored) / jnp.sum(scored))

  eval_a, eval_b = eval_log_probs(jax.random.key(101)), eval_log_probs(jax.random.key(202))
  predict = predict_log_probs(jax.random.key(303))
  m = config.model
  print(f'\nReformerLM on {args.task}, {args.steps} steps: d_model {m.d_model}, {m.n_layers} '
        f'layers, {m.n_heads} heads, n_hashes {m.attention.n_hashes}, n_buckets '
        f'{m.attention.n_buckets}, chunk_len {m.attention.chunk_len}, seq_len {config.data.seq_len} (predict_mem_len = max_len = '
        f'{m.max_len}); {args.eval_batch} eval sequences\n')
  scored_name = 'copied half' if args.task == 'duplication' else 'scored positions (all)'
  print(f'| | all positions | {scored_name} |')
  print('|---|---|---|')
  print(f'| KL(eval \\|\\| predict), nats | {kl(eval_a, predict):.4f} | '
        f'{kl(eval_a, predict, scored):.4f} |')
  print(f'| KL(eval \\|\\| eval, other rotations), nats | {kl(eval_a, eval_b):.4f} | '
        f'{kl(eval_a, eval_b, scored):.4f} |')
  print(f'| next-token accuracy: eval / predict | | {accuracy(eval_a):.3f} / '
        f'{accuracy(predict):.3f} |')


if __name__ == '__main__':
  main()
