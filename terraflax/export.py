"""Export a model's decode step (or forward pass) as serialized StableHLO, and serve it.

  export_decode_step(model, params, out_dir, batch_size=1)    # model in 'predict' mode
  export_forward(model, params, out_dir, batch_size=1, length=128)   # 'eval' mode

write `out_dir/` with

  function.jaxexport   `jax.export` serialization of the jitted function (StableHLO
                       and its calling convention), for the CPU platform by default
  params.npz           the parameters, as the function's flattened leaves
  cache.npz            (decode step) the empty cache, flattened: the initial state
  meta.json            what the function is, its batch size, vocabulary, leaves

A decode step is `(params, cache, tokens (b, 1) int32, key (2,) uint32) ->
(logits (b, 1, v) float32, cache)`: one token of every row in, the next
token's logits and the updated cache out (the caller feeds pad id 0 first, as
`terraflax.decoding` does). A forward pass is `(params, tokens (b, l), key)
-> logits (b, l, v)`. `key` is the raw data of a jax PRNG key for layers that
draw randomness (LSH rotations in 'eval' mode).

`Exported(out_dir)` loads and runs the artifact with jax and numpy only: it
does not import terraflax, flax or the model's code, so this file can be
copied next to the artifact and used on its own:

  served = Exported('artifact/')
  cache = served.initial_cache()
  logits, cache = served.step(cache, np.zeros((1, 1), np.int32))
  ids = served.greedy([[5, 6, 7]], max_new_tokens=20)   # decode steps only
  text = served.greedy_text('Once upon', max_new_tokens=20)   # with the workdir's tokenizer

An exported workdir carries its tokenizer: `meta.json`'s 'tokenizer' is
'bytes' (UTF-8 bytes), 'spm' / 'hf' (the workdir's tokenizer.model /
tokenizer.json, copied next to the artifact; read with sentencepiece /
tokenizers) or 'ids' (a model that reads token ids: no text methods).

The command line exports a training (or converted) workdir's latest checkpoint:

  python -m terraflax.export --workdir=DIR --out=ARTIFACT [--batch_size=1]
      [--forward_len=L]   # export the eval forward pass of length L instead
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

FUNCTION_FILE = 'function.jaxexport'
PARAMS_FILE = 'params.npz'
CACHE_FILE = 'cache.npz'
META_FILE = 'meta.json'
TOKENIZER_FILES = {'spm': 'tokenizer.model', 'hf': 'tokenizer.json'}  # as in terraflax.tokenizer
FORMAT_VERSION = 1


def _save_leaves(path: str, tree) -> int:
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
  np.savez(path, **{f'leaf_{i:05d}': x for i, x in enumerate(leaves)})
  return len(leaves)


def _load_leaves(path: str) -> list[np.ndarray]:
  with np.load(path) as data:
    return [data[k] for k in sorted(data.files)]


def rngs_of(key_data):
  """The model's rng streams from raw key data (`terraflax.rng.stream_keys`, as decoding)."""
  # Imported here, like every terraflax import of this file: `Exported` runs without terraflax.
  from terraflax import rng as rng_lib  # pylint: disable=import-outside-toplevel
  return rng_lib.stream_keys(jax.random.wrap_key_data(key_data))


def _write(out_dir: str, exported, params, meta: dict, cache=None) -> str:
  serialized = exported.serialize()  # Needs the `flatbuffers` package.
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, FUNCTION_FILE), 'wb') as f:
    f.write(serialized)
  meta = dict(meta, format_version=FORMAT_VERSION, jax_version=jax.__version__,
              platforms=list(exported.platforms),
              n_param_leaves=_save_leaves(os.path.join(out_dir, PARAMS_FILE), params))
  if cache is not None:
    meta['n_cache_leaves'] = _save_leaves(os.path.join(out_dir, CACHE_FILE), cache)
  with open(os.path.join(out_dir, META_FILE), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write('\n')
  return out_dir


def _plain(params):
  """`params` with `init`'s metadata boxes (flax's LogicallyPartitioned) replaced by their arrays.

  Duck-typed (`.unbox()`), so that this module, which also serves as the
  standalone loader, imports only jax and numpy.
  """
  boxed = lambda x: callable(getattr(x, 'unbox', None))  # noqa: E731
  return jax.tree_util.tree_map(lambda x: x.unbox() if boxed(x) else x, params, is_leaf=boxed)


def export_decode_step(model, params, out_dir: str, *, batch_size: int = 1, seed: int = 0,
                       platforms=None, meta: dict | None = None) -> str:
  """Exports `model`'s one-token decode step (model built with mode='predict')."""
  params = _plain(params)
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'export_decode_step batch_size must be a positive int, got {batch_size!r}.')
  key_data = jax.random.key_data(jax.random.key(seed))
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  if 'cache' not in jax.eval_shape(model.init, rngs_of(key_data), tokens):
    raise ValueError("export_decode_step needs a model built with mode='predict' (it keeps no "
                     'cache).')
  cache = jax.jit(model.init)(rngs_of(key_data), tokens)['cache']

  def step(params, cache, tokens, key_data):
    logits, state = model.apply({'params': params, 'cache': cache}, tokens,
                                rngs=rngs_of(key_data), mutable=['cache'])
    return logits.astype(jnp.float32), state['cache']

  spec = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                             tree)
  from terraflax import kernels  # pylint: disable=import-outside-toplevel
  with kernels.xla_only():  # The artifact must run without terraflax's native kernels.
    exported = jax.export.export(jax.jit(step), platforms=platforms)(
        spec(params), spec(cache), spec(tokens), spec(key_data))
  logits_shape = exported.out_avals[0].shape
  return _write(out_dir, exported, params, dict(
      meta or {}, kind='decode_step', batch_size=batch_size, vocab_size=int(logits_shape[-1]),
      key_data=np.asarray(key_data).tolist()), cache=cache)


def export_forward(model, params, out_dir: str, *, batch_size: int = 1, length: int,
                   seed: int = 0, platforms=None, meta: dict | None = None) -> str:
  """Exports `model`'s forward pass on (batch_size, length) int32 tokens (mode='eval')."""
  params = _plain(params)
  key_data = jax.random.key_data(jax.random.key(seed))

  def forward(params, tokens, key_data):
    return model.apply({'params': params}, tokens, rngs=rngs_of(key_data)).astype(jnp.float32)

  spec = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                             tree)
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  from terraflax import kernels  # pylint: disable=import-outside-toplevel
  with kernels.xla_only():  # The artifact must run without terraflax's native kernels.
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(
        spec(params), tokens, spec(key_data))
  return _write(out_dir, exported, params, dict(
      meta or {}, kind='forward', batch_size=batch_size, length=length,
      vocab_size=int(exported.out_avals[0].shape[-1]),
      key_data=np.asarray(key_data).tolist()))


class Exported:
  """An exported decode step or forward pass, run with jax and numpy only."""

  def __init__(self, path: str):
    for name in (META_FILE, FUNCTION_FILE, PARAMS_FILE):
      if not os.path.exists(os.path.join(path, name)):
        raise FileNotFoundError(f'{os.path.join(path, name)} is missing: {path!r} is not an '
                                'exported terraflax artifact.')
    with open(os.path.join(path, META_FILE), encoding='utf-8') as f:
      self.meta = json.load(f)
    with open(os.path.join(path, FUNCTION_FILE), 'rb') as f:
      self.function = jax.export.deserialize(bytearray(f.read()))
    self.kind = self.meta['kind']
    self.batch_size = self.meta['batch_size']
    self.params = _load_leaves(os.path.join(path, PARAMS_FILE))
    self._cache = (_load_leaves(os.path.join(path, CACHE_FILE))
                   if self.kind == 'decode_step' else None)
    self._key = np.asarray(self.meta['key_data'], np.uint32)
    self.tokenizer = self.meta.get('tokenizer', 'ids')  # 'bytes' | 'spm' | 'hf' | 'ids'
    self._text = _load_text_tokenizer(path, self.tokenizer)
    n_in = len(self.function.in_avals)
    extra = 2  # tokens and key data
    expected = len(self.params) + (len(self._cache) if self._cache is not None else 0) + extra
    if n_in != expected:
      raise ValueError(f'{path}: the function takes {n_in} arrays but the artifact holds '
                       f'{expected}; the files do not belong together.')

  def _call(self, *flat):
    args, kwargs = jax.tree_util.tree_unflatten(self.function.in_tree, list(flat))
    return self.function.call(*args, **kwargs)

  def initial_cache(self) -> list:
    """The empty decoding state (flattened cache leaves)."""
    if self._cache is None:
      raise ValueError('initial_cache: this artifact is a forward pass, not a decode step.')
    return list(self._cache)

  def step(self, cache, tokens):
    """(cache, tokens (b, 1) int) -> (logits (b, 1, v) float32, new cache)."""
    if self.kind != 'decode_step':
      raise ValueError('step: this artifact is a forward pass; call forward(tokens).')
    tokens = np.asarray(tokens, np.int32).reshape(self.batch_size, 1)
    logits, new_cache = self._call(*self.params, *cache, tokens, self._key)
    return logits, jax.tree_util.tree_leaves(new_cache)

  def forward(self, tokens):
    """tokens (b, l) int -> logits (b, l, v) float32."""
    if self.kind != 'forward':
      raise ValueError('forward: this artifact is a decode step; call step(cache, tokens).')
    return self._call(*self.params, np.asarray(tokens, np.int32), self._key)

  def greedy(self, prompt, max_new_tokens: int):
    """Greedy continuation of equal-length prompts (b, lp): returns (b, max_new_tokens) ids."""
    prompt = np.asarray(prompt, np.int32).reshape(self.batch_size, -1)
    cache = self.initial_cache()
    token = np.zeros((self.batch_size, 1), np.int32)  # The pad a shift would insert.
    out = []
    for t in range(prompt.shape[1] + max_new_tokens):
      logits, cache = self.step(cache, token)
      if t < prompt.shape[1]:
        token = prompt[:, t:t + 1]
      else:
        token = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)[:, None]
        out.append(token)
    return np.concatenate(out, axis=1) if out else np.zeros((self.batch_size, 0), np.int32)


  def encode(self, text: str) -> list[int]:
    """Text -> ids with the artifact's tokenizer (as the workdir's encodes them)."""
    if self.tokenizer == 'bytes':
      return list(text.encode('utf-8'))
    if self.tokenizer == 'spm':
      return list(self._text.encode(text, out_type=int))
    if self.tokenizer == 'hf':
      return list(self._text.encode(text, add_special_tokens=False).ids)
    raise ValueError('encode: this artifact\'s model reads token ids (meta.json tokenizer '
                     "'ids'); pass ids to greedy/step.")

  def decode(self, ids) -> str:
    """Ids -> text; special ids and ids outside the vocabulary are dropped, bad UTF-8 replaced."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    special = set(self.meta.get('special_ids', ()))
    vocab = self.meta.get('tokenizer_vocab_size', self.meta.get('vocab_size'))
    ids = [i for i in ids if 0 <= i < vocab and i not in special]
    if self.tokenizer == 'bytes':
      return bytes(ids).decode('utf-8', errors='replace')
    if self.tokenizer == 'spm':
      return self._text.decode(ids)
    if self.tokenizer == 'hf':
      return self._text.decode(ids, skip_special_tokens=True)
    raise ValueError("decode: this artifact's model reads token ids (meta.json tokenizer 'ids').")

  def greedy_text(self, prompt: str, max_new_tokens: int) -> str:
    """The prompt and its greedy continuation as text (every row gets the same prompt)."""
    ids = self.encode(prompt)
    out = self.greedy(np.tile(np.asarray(ids, np.int32), (self.batch_size, 1)), max_new_tokens)
    return self.decode(ids + [int(t) for t in out[0]])


def _load_text_tokenizer(path: str, kind: str):
  """The sentencepiece / tokenizers object of an artifact's tokenizer file (None otherwise)."""
  if kind not in TOKENIZER_FILES:
    return None
  file = os.path.join(path, TOKENIZER_FILES[kind])
  if not os.path.exists(file):
    raise FileNotFoundError(f'{file} is missing: meta.json says the artifact reads text with a '
                            f'{kind} tokenizer.')
  if kind == 'spm':
    import sentencepiece  # pylint: disable=import-outside-toplevel
    return sentencepiece.SentencePieceProcessor(model_file=file)
  import tokenizers  # pylint: disable=import-outside-toplevel
  return tokenizers.Tokenizer.from_file(file)


def _copy_tokenizer(workdir: str, config, out_dir: str) -> dict:
  """Copies the workdir's tokenizer file into out_dir; returns the meta.json fields."""
  from terraflax import decoding  # pylint: disable=import-outside-toplevel
  tokenizer = decoding.workdir_tokenizer(workdir, config)
  if tokenizer is None:
    return {'tokenizer': 'ids'}
  os.makedirs(out_dir, exist_ok=True)
  for name in TOKENIZER_FILES.values():
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  if tokenizer.path is not None:
    shutil.copyfile(tokenizer.path, os.path.join(out_dir, TOKENIZER_FILES[tokenizer.kind]))
  return {'tokenizer': tokenizer.kind, 'tokenizer_vocab_size': tokenizer.vocab_size,
          'eos_id': tokenizer.eos_id, 'pad_id': tokenizer.pad_id,
          'special_ids': sorted(int(i) for i in tokenizer.special_ids)}


def export_workdir(workdir: str, out_dir: str, *, batch_size: int = 1,
                   forward_len: int | None = None) -> str:
  """Exports the latest checkpoint of a workdir (its decode step, or forward pass)."""
  from terraflax.models import spec as spec_lib  # pylint: disable=import-outside-toplevel
  config, spec, params = spec_lib.load_workdir(workdir)
  meta = {'workdir': os.path.abspath(workdir), 'model': spec.name,
          'data': config.data.get('name', '?'), **_copy_tokenizer(workdir, config, out_dir)}
  if forward_len is None:
    return export_decode_step(spec.build('predict'), params, out_dir, batch_size=batch_size,
                              meta=meta)
  return export_forward(spec.build('eval', packed=False), params, out_dir, batch_size=batch_size,
                        length=forward_len, meta=meta)


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  try:
    out = export_workdir(f.workdir, f.out, batch_size=f.batch_size, forward_len=f.forward_len)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'terraflax.export: {e}')
  print(f'Exported {f.workdir} to {out} ({"forward pass" if f.forward_len else "decode step"}, '
        f'batch size {f.batch_size}).')


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('workdir', None, 'A workdir with checkpoints/ and config.json.')
  flags.DEFINE_string('out', None, 'Directory to write the artifact to.')
  flags.DEFINE_integer('batch_size', 1, 'Rows the exported function takes (fixed).',
                       lower_bound=1)
  flags.DEFINE_integer('forward_len', None, 'Export the eval forward pass on this many tokens '
                       'instead of the decode step.', lower_bound=1)
  flags.mark_flags_as_required(['workdir', 'out'])


if __name__ == '__main__':
  from terraflax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, name='terraflax.export')
