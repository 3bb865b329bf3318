"""`make train`: a small ReformerLM on the Python standard library's source, byte by byte.

The corpus is the top-level `*.py` files of the running Python's standard
library (about 5 MB), so it exists on every machine without a download. Meant
to finish in a few minutes on 2 CPU cores with eval bits-per-byte below 3.0,
then print a decoded sample.

  python -m terraflax.train --config=configs/default.py --workdir=runs/default

Every other config imports this one and overrides a few fields.
"""

import os

import ml_collections


def stdlib_dir() -> str:
  """The directory of the standard library's pure-Python modules (e.g. .../lib/python3.11)."""
  return os.path.dirname(os.__file__)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, dropout/hashing noise and the data order.

  # The model: `name` is a factory in terraflax.models (or 'package.module:Factory');
  # every other field is one of its keyword arguments. The trainer passes `mode` itself.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'ReformerLM'  # Decoder-only Reformer: LSH attention, reversible layers.
  config.model.vocab_size = 256  # Byte-level: one token per byte.
  config.model.d_model = 128  # Width of each of the two residual streams.
  config.model.d_ff = 256  # Hidden width of each feed-forward block.
  config.model.n_layers = 2  # Attention + feed-forward blocks (scanned, reversible).
  config.model.n_heads = 4  # Attention heads; d_model must be divisible by n_heads.
  # The attention spec (terraflax.models.attention) as a dict: 'kind' is 'lsh', 'full' or
  # 'local', the other keys are that kind's fields (a list of such dicts cycles over the layers).
  config.model.attention = ml_collections.ConfigDict()
  config.model.attention.kind = 'lsh'  # LSH attention (Reformer): hashed, chunked, shared-QK.
  config.model.attention.n_hashes = 2  # Hash rounds (more rounds: closer to full attention).
  config.model.attention.n_buckets = 8  # Buckets per round (about 2 per chunk of the sequence).
  config.model.attention.chunk_len = 64  # Chunk length (positions per chunk).
  config.model.positions = 'axial'  # Positions: axial (factorised), sinusoidal or learned.
  config.model.ff_chunk_len = 0  # Feed-forward run this many positions at a time (0: whole).
  config.model.dropout = 0.0  # Dropout rate in train mode (a tiny model does not need it).
  config.model.max_len = 256  # Longest sequence (positions, decoding caches).
  config.model.reversible = True  # Rebuild activations in the backward pass (False: store).
  config.model.dtype = 'float32'  # Compute dtype ('bfloat16': mixed precision); params float32.

  # The data: byte-level LM windows of `seq_len` bytes.
  config.data = ml_collections.ConfigDict()
  config.data.name = 'bytes'  # bytes, duplication, listops, text_classification or reverse.
  config.data.path = stdlib_dir()  # A file, or a directory whose `glob` files are concatenated.
  config.data.glob = '*.py'  # Files of `path` to read when it is a directory (sorted).
  config.data.seq_len = 256  # Tokens per example.
  config.data.eval_fraction = 0.05  # Bytes held out for evaluation (taken from the end).
  config.data.test_fraction = 0.0  # Bytes held out for testing, after the eval bytes.
  config.data.num_threads = 1  # grain reader threads (examples are cheap to make).

  # The loop.
  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000  # Optimizer updates in total.
  config.train.batch_size = 8  # Global batch (split over data-parallel devices and processes).
  config.train.grad_accum_steps = 1  # Micro-batches per update (batch_size must divide by it).
  config.train.loss_chunk_len = 0  # LM head + loss this many positions at a time (0: whole).
  config.train.log_every = 100  # Steps between metrics.jsonl lines and progress lines.
  config.train.eval_every = 250  # Steps between evaluations (and at the last step).
  config.train.eval_batches = 32  # Evaluation batches per evaluation (-1: the whole eval split).
  config.train.checkpoint_every = 250  # Steps between checkpoints (and at the last step).
  config.train.keep_checkpoints = 2  # Checkpoints kept in workdir/checkpoints.
  config.train.async_checkpoints = True  # Write checkpoints in the background.

  # The optimizer and learning-rate schedule (optax).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adam'  # adam, adamw, adafactor or sgd.
  config.optimizer.learning_rate = 3e-3  # Peak learning rate, reached after warm-up.
  config.optimizer.warmup_steps = 100  # Linear warm-up from 0.
  config.optimizer.decay = 'cosine'  # After warm-up: constant, rsqrt or cosine.
  config.optimizer.final_lr_fraction = 0.1  # Cosine ends at this fraction of the peak.
  config.optimizer.b1 = 0.9  # Adam first-moment decay.
  config.optimizer.b2 = 0.98  # Adam second-moment decay.
  config.optimizer.eps = 1e-9  # Adam epsilon.
  config.optimizer.momentum = 0.0  # SGD momentum (sgd only).
  config.optimizer.weight_decay = 0.0  # Decoupled decay (adamw, sgd, adafactor); not biases/scales.
  config.optimizer.grad_clip = 1.0  # Clip gradients to this global norm (0: off).

  # Devices: one mesh ('data', 'fsdp', 'model'); data = devices / (fsdp * tensor_parallel).
  # The batch is split over ('data', 'fsdp'); parameters by their logical axis names.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.fsdp = 1  # Devices that split every parameter's 'embed' axis (ZeRO-3).
  config.sharding.tensor_parallel = 1  # Devices that split 'heads', 'mlp', 'vocab', 'modules'.
  config.sharding.model_parallel = 0  # Deprecated alias of tensor_parallel (0: unset).
  # ((logical_axis, None | 'data' | 'fsdp' | 'model' | a tuple of them), ...):
  config.sharding.logical_axis_rules = ()  # Override sharding.DEFAULT_RULES name by name.

  # Multi-process start (TPU pods, multi-host GPU).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False  # Call jax.distributed.initialize() first.
  config.distributed.coordinator_address = ''  # 'host:port' of process 0 ('' : auto-detect).
  config.distributed.num_processes = 0  # Number of processes (0: auto-detect).
  config.distributed.process_id = -1  # This process's index (-1: auto-detect).

  # A sample decoded at the end of training.
  config.sample = ml_collections.ConfigDict()
  config.sample.prompt = 'def '  # Text the sample continues.
  config.sample.max_new_tokens = 200  # Tokens to generate (0: no sample).
  config.sample.temperature = 0.8  # Sampling temperature (0: greedy).

  # Eval-only runs (terraflax/train/eval_only.py): setting any field here away from its default
  # trains nothing and scores a checkpoint of the workdir, appending to eval_results.jsonl.
  config.eval = ml_collections.ConfigDict()
  config.eval.only = False  # True: score the checkpoint with the model as trained.
  config.eval.step = 0  # The checkpoint to score (0: the latest).
  config.eval.attention = ''  # '' (as trained), 'lsh', or 'full' (LSH layers as full shared-QK).
  config.eval.n_hashes = 0  # LSH hash rounds (0: as trained).
  config.eval.n_buckets = 0  # Buckets per round (0: as trained, -1: from the length, 1: none).
  config.eval.chunk_len = 0  # LSH chunk length (0: as trained).
  config.eval.n_chunks_before = -1  # Neighbouring chunks attended to (-1: as trained).
  return config
