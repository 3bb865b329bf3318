"""The Reformer paper's enwik8 model (12 layers, 64K context): needs a GPU/TPU and the data.

enwik8 is the first 10^8 bytes of an English Wikipedia dump; with
eval_fraction = test_fraction = 0.05 the split is the standard 90M/5M/5M.

  python -m terraflax.train --config=configs/reformer_enwik8.py --workdir=runs/enwik8 \
      --config.data.path=/data/enwik8
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.model.d_model = 1024  # Paper size.
  config.model.d_ff = 4096  # Feed-forward width.
  config.model.n_layers = 12  # Reversible blocks.
  config.model.n_heads = 8  # Attention heads.
  config.model.attention.kind = 'lsh'  # Every layer LSH.
  config.model.attention.n_hashes = 4  # LSH rounds during training.
  config.model.attention.chunk_len = 128  # LSH chunk length.
  del config.model.attention['n_buckets']  # An int in the base config; here a factorised pair:
  config.model.attention.n_buckets = (32, 32)  # Trax's rule for 64K / 128: 1024 buckets, 32 x 32.
  config.model.ff_chunk_len = 8192  # Feed-forward 8K positions at a time (no 64K x d_ff array).
  config.model.attention.predict_mem_len = 2048  # LSH positions remembered when sampling.
  config.model.dropout = 0.1  # Dropout rate in train mode.
  config.model.max_len = 65536  # 64K-byte context.
  config.model.dtype = 'bfloat16'  # Mixed precision: bfloat16 compute, float32 params.
  config.data.path = ''  # Required: the enwik8 file (100,000,000 bytes); set on the command line.
  config.data.glob = '*'  # Unused for a single file.
  config.data.seq_len = 65536  # 64K-byte windows.
  config.data.eval_fraction = 0.05  # 5M bytes for evaluation.
  config.data.test_fraction = 0.05  # 5M bytes for test (after eval): 90M/5M/5M.
  config.train.steps = 100_000  # Updates.
  config.train.batch_size = 8  # Global batch.
  config.train.log_every = 100  # Steps between logs.
  config.train.eval_every = 5000  # Steps between evaluations.
  config.train.eval_batches = 8  # Eval windows per evaluation: 8 x 64K bytes.
  config.train.checkpoint_every = 2000  # Steps between checkpoints.
  config.train.keep_checkpoints = 3  # Checkpoints kept.
  config.optimizer.name = 'adafactor'  # As in Trax's Reformer enwik8 config.
  config.optimizer.learning_rate = 1e-3  # Peak learning rate.
  config.optimizer.warmup_steps = 8000  # Linear warm-up.
  config.optimizer.decay = 'rsqrt'  # Reciprocal square-root decay after warm-up.
  config.optimizer.grad_clip = 0.0  # Adafactor clips updates itself.
  config.sample.max_new_tokens = 500  # Decoded sample length at the end.
  return config
