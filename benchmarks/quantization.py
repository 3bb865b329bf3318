"""Int8 and bfloat16 weights of a trained model: evaluation loss/accuracy before and after.

Loads the latest checkpoint of a training workdir, quantizes every Dense
kernel (one scale per output channel) and the embedding table (one scale per
row) to int8 (`terraflax.quantization`), casts every matrix to bfloat16
(`cast_weights`), and evaluates the three versions on the same evaluation
batches of the workdir's own data set. Prints a markdown table: weight
bytes, eval loss, accuracy (and bits per byte for byte-level data), and the
change of each against float32.

  python -m terraflax.train --config=configs/transformer_lm.py --workdir=runs/transformer_lm
  python benchmarks/quantization.py --workdir=runs/transformer_lm [--eval_batches 32]
"""

import argparse
import math

import jax
import jax.numpy as jnp

from terraflax import quantization as qz
from terraflax.train import checkpoint
from terraflax.train import config as config_lib
from terraflax.train import evaluation
from terraflax.train import trainer


def evaluate(eval_step, params, batches):
  sums = {name: 0.0 for name in evaluation.SUM_KEYS}
  for index, batch in enumerate(batches):
    for name, value in eval_step(params, batch, index).items():
      sums[name] += float(value)
  return evaluation.normalise(sums, 'eval')


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', required=True, help='a terraflax training workdir')
  parser.add_argument('--eval_batches', type=int, default=32,
                      help='evaluation batches of train.batch_size (-1: all)')
  parser.add_argument('--no_embeddings', action='store_true',
                      help='quantize Dense kernels only, keep the embedding table float32')
  args = parser.parse_args()

  config, params = checkpoint.load_for_inference(args.workdir)
  experiment = config_lib.validate_config(config)
  data, task = experiment.data, experiment.data.info.task
  model = checkpoint.model_from_config(experiment.config, 'eval')
  zeros = jnp.zeros((1, config.data.seq_len), jnp.int32)
  inputs = experiment.spec.model_inputs({'inputs': zeros, 'targets': zeros})
  qparams = qz.quantize_model_params(model, params, *inputs,
                                     embeddings=not args.no_embeddings)
  batches = [jax.tree_util.tree_map(jnp.asarray, b) for b in data.eval_batches(
      batch_size=config.train.batch_size, n_batches=args.eval_batches)]
  step = evaluation.make_eval_step(model, task)
  float_metrics = evaluate(jax.jit(step), params, batches)
  bf16_params = qz.cast_weights(params)
  with qz.LowPrecisionInference():
    int8_metrics = evaluate(jax.jit(step), qparams, batches)
    bf16_metrics = evaluate(jax.jit(step), bf16_params, batches)

  rows = [('float32', qz.nbytes(params), float_metrics),
          ('bfloat16', qz.nbytes(bf16_params), bf16_metrics),
          ('int8', qz.nbytes(qparams), int8_metrics)]
  bpb = data.info.byte_level
  n_examples = len(batches) * config.train.batch_size
  print(f'{config.model.name} from {args.workdir}: {len(batches)} eval batches '
        f'({n_examples} examples of {config.data.seq_len} tokens)\n')
  print('| weights | bytes | eval loss | eval accuracy |' + (' bits/byte |' if bpb else ''))
  print('|---|---|---|---|' + ('---|' if bpb else ''))
  for name, size, m in rows:
    print(f'| {name} | {size:,} | {m["eval/loss"]:.4f} | {m["eval/accuracy"]:.4f} |'
          + (f' {m["eval/loss"] / math.log(2):.4f} |' if bpb else ''))
  for name, size, metrics in rows[1:]:
    d_loss = metrics['eval/loss'] - float_metrics['eval/loss']
    d_acc = metrics['eval/accuracy'] - float_metrics['eval/accuracy']
    print(f'| change ({name}) | {size / qz.nbytes(params):.2f}x | {d_loss:+.4f} | {d_acc:+.4f} |'
          + (f' {d_loss / math.log(2):+.4f} |' if bpb else ''))


if __name__ == '__main__':
  main()
