"""Hugging Face transformers Reformer throughput, the HF column of issue 12's tables.

Run with the Hugging Face virtualenv's python (never terraflax's); it prints
exactly one JSON line on stdout (everything else goes to stderr):

  /work/venvs/hf/bin/python benchmarks/peers/hf_reformer.py \
      --mode train --attention lsh --length 4096 [--warmup_steps 2 --steps 5]
  ... --mode forward --attention lsh --length 16384
  ... --mode decode --attention lsh --batch 8 --decode_tokens 256 [--length 512]

The virtualenv (Python 3.11, CPU-only torch; exact `pip freeze` in
benchmarks/peers/README.md):
  python3 -m venv hf && hf/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors
(the CPU wheel of torch comes from https://download.pytorch.org/whl/cpu,
e.g. `--index-url https://download.pytorch.org/whl/cpu` for the torch install).

Model (the issue's configuration): `ReformerModelWithLMHead(ReformerConfig(
vocab_size=256, hidden_size=256, feed_forward_size=1024, num_attention_heads=4,
attention_head_size=64, attn_layers=[kind, kind], is_decoder=True,
hidden_act='gelu_new' (the tanh GELU, what Trax's default FastGelu computes),
axial_pos_embds=True, axial_pos_shape=axial_shape(length), axial_pos_embds_dim=
(64, 192), max_position_embeddings=length, tie_word_embeddings=False, and every
dropout probability 0))`, float32. HF's Reformer is always reversible (its
_ReversibleFunction recomputes activations in the backward pass).
  --attention lsh:  kind 'lsh': num_hashes=4, lsh_attn_chunk_length=64,
      lsh_num_chunks_before=1, lsh_num_chunks_after=0, num_buckets=None. With
      num_buckets=None HF sets the count at the first forward pass longer than
      a chunk: n = 2**floor(log2(2 * (l // 64))), factorised into
      [2**(p // 2), 2**(p - p // 2)] (p = log2 n) when n exceeds
      2 * max(int(sqrt(max_position_embeddings // 64)), 64) = 128 here:
      1K -> 32, 4K -> 128, 16K -> [16, 32] (512), 64K -> [32, 64] (2048).
      The JSON's n_buckets is read back from `model.config.num_buckets`.
  --attention full: kind 'local' with local_attn_chunk_length=length and
      local_num_chunks_before=0: HF runs its standard causal self-attention
      (separate query/key/value projections) when the sequence fits in one
      chunk, i.e. exact attention over the whole sequence.

Modes:
  train    `model.train()`, `torch.optim.Adam(model.parameters(), lr=1e-3)`; a
           step is zero_grad, `model(input_ids=ids, labels=ids, use_cache=False)`
           (HF shifts the labels), `loss.backward()`, `optimizer.step()` on random
           bytes; timed to `loss.item()`. tokens/s = batch * length / median
           step time; the first step is reported as first_step_seconds (eager
           PyTorch: no compilation, but first-touch allocation and HF's bucket
           set-up).
  forward  `model.eval()` and `torch.no_grad()`: `model(input_ids=ids,
           use_cache=False).logits`.
  decode   `model.eval()`, `model.generate(prompt, do_sample=False, use_cache=True,
           max_new_tokens=N, min_new_tokens=N)` from a one-token prompt (token 0)
           per row: greedy decoding with HF's Reformer cache (past hidden states
           and LSH buckets). With LSH, one no-grad forward pass over --length
           tokens first lets HF set num_buckets by its rule (cached decoding
           needs it set). tokens/s = batch * N / median generate time.
           --length (default 512) is the model's maximum length: the axial
           shape, max_position_embeddings (hence the bucket rule: 16 buckets at
           512) and the span of full attention. HF caches past hidden states
           (and LSH buckets) and re-projects keys and values from them at
           every step, so its decode time grows with the decoded length, not
           with --length.
torch's intra-op threads are left at torch's default (`torch.get_num_threads()`,
the number of physical cores: 2 on the issue's machine), reported as
torch_num_threads; --torch_threads N overrides it. On a loaded machine torch's
OpenMP threads wait on each other: with the CPUs shared, 1 thread can be
several times faster than 2, so take HF numbers on a quiet machine.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peer_common as common  # pylint: disable=g-import-not-at-top


def reformer_config(args):
  from transformers import ReformerConfig  # pylint: disable=g-import-not-at-top
  kind = 'lsh' if args.attention == 'lsh' else 'local'
  return ReformerConfig(
      vocab_size=common.VOCAB_SIZE, hidden_size=common.D_MODEL,
      feed_forward_size=common.D_FF, num_attention_heads=common.N_HEADS,
      attention_head_size=common.D_HEAD, attn_layers=[kind] * common.N_LAYERS,
      is_decoder=True, hidden_act='gelu_new',
      num_hashes=common.N_HASHES, lsh_attn_chunk_length=common.CHUNK_LEN,
      lsh_num_chunks_before=1, lsh_num_chunks_after=0, num_buckets=None,
      local_attn_chunk_length=args.length, local_num_chunks_before=0,
      local_num_chunks_after=0,
      axial_pos_embds=True, axial_pos_shape=common.axial_shape(args.length, args.axial_shape),
      axial_pos_embds_dim=common.AXIAL_D_EMBS, max_position_embeddings=args.length,
      hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
      local_attention_probs_dropout_prob=0.0, classifier_dropout=None,
      tie_word_embeddings=False, chunk_size_lm_head=0, chunk_size_feed_forward=0,
      eos_token_id=None, pad_token_id=0, use_cache=True)


def build_model(args):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import ReformerModelWithLMHead  # pylint: disable=g-import-not-at-top
  torch.manual_seed(args.seed)
  model = ReformerModelWithLMHead(reformer_config(args))
  dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
  if any(dropouts):
    raise AssertionError(f'a dropout module has p > 0: {dropouts}')
  return model


def random_ids(args, length):
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(args.seed)
  return torch.randint(0, common.VOCAB_SIZE, (args.batch, length), generator=generator)


def timed_loop(n, body):
  seconds = []
  for i in range(n):
    start = time.perf_counter()
    body(i)
    seconds.append(time.perf_counter() - start)
  return seconds


def n_buckets(model, args):
  return model.config.num_buckets if args.attention == 'lsh' else None


def measure_train(args, reporter):
  import torch  # pylint: disable=g-import-not-at-top
  model = build_model(args)
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=common.LEARNING_RATE)
  ids = random_ids(args, args.length)
  losses = []

  def step(_):
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    losses.append(loss.item())

  seconds = timed_loop(args.warmup_steps + args.steps, step)
  reporter.update(first_step_seconds=seconds[0], warmup_step_seconds=seconds[:args.warmup_steps],
                  losses=[round(l, 4) for l in losses], n_buckets=n_buckets(model, args),
                  **common.summarise_steps(seconds[args.warmup_steps:], args.batch * args.length))


def measure_forward(args, reporter):
  import torch  # pylint: disable=g-import-not-at-top
  model = build_model(args)
  model.eval()
  ids = random_ids(args, args.length)

  def step(_):
    with torch.no_grad():
      logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (args.batch, args.length, common.VOCAB_SIZE), logits.shape

  seconds = timed_loop(args.warmup_steps + args.steps, step)
  reporter.update(first_step_seconds=seconds[0], warmup_step_seconds=seconds[:args.warmup_steps],
                  n_buckets=n_buckets(model, args),
                  **common.summarise_steps(seconds[args.warmup_steps:], args.batch * args.length))


def measure_decode(args, reporter):
  import torch  # pylint: disable=g-import-not-at-top
  model = build_model(args)
  model.eval()
  if args.attention == 'lsh':  # HF's rule sets num_buckets at the first long forward pass.
    with torch.no_grad():
      model(input_ids=random_ids(args, args.length)[:1], use_cache=False)
  prompt = torch.zeros((args.batch, 1), dtype=torch.long)
  samples = []

  def decode(_):
    with torch.no_grad():
      out = model.generate(prompt, do_sample=False, use_cache=True,
                           max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens)
    assert out.shape == (args.batch, 1 + args.decode_tokens), out.shape
    samples.append(out[0, 1:17].tolist())

  seconds = timed_loop(args.warmup_steps + args.steps, decode)
  reporter.update(first_step_seconds=seconds[0], warmup_step_seconds=seconds[:args.warmup_steps],
                  n_buckets=n_buckets(model, args),
                  # Greedy decoding of fixed weights; LSH rotations are drawn afresh on
                  # every call (hash_seed=None), so LSH decodes may differ from each other.
                  same_tokens_every_decode=all(s == samples[0] for s in samples),
                  sample_tokens=samples[0],
                  **common.summarise_steps(seconds[args.warmup_steps:],
                                           args.batch * args.decode_tokens))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_common_flags(parser)
  parser.add_argument('--torch_threads', type=int, default=0,
                      help='torch.set_num_threads(n) when n > 0; 0 (default) leaves torch\'s '
                           'default (the number of physical cores).')
  args = parser.parse_args()
  common.check_common_flags(args)

  reporter = common.start_report('hf', args)

  def measure():
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    if args.torch_threads > 0:
      torch.set_num_threads(args.torch_threads)
    reporter.update(library_version=transformers.__version__, torch_version=torch.__version__,
                    torch_num_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    {'train': measure_train, 'forward': measure_forward,
     'decode': measure_decode}[args.mode](args, reporter)

  common.run_guarded(reporter, measure)


if __name__ == '__main__':
  main()
