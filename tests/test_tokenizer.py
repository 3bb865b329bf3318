"""terraflax.tokenizer: bytes / SentencePiece / HF tokenizers, training, workdirs, the CLIs."""

import json
import os
import pathlib
import shutil
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece
import tokenizers
from absl.testing import absltest
from absl.testing import parameterized

from terraflax import decoding
from terraflax import tokenizer as tokenizer_lib
from terraflax import workdir as workdir_lib
from terraflax.models import spec as spec_lib
from terraflax.train.trainer import train_and_evaluate
from tests.contracts import run_module

REPO = pathlib.Path(__file__).resolve().parents[1]
# Mixed text: ASCII, Latin-1, CJK, an emoji (4 UTF-8 bytes), tabs, newlines, runs of spaces.
MIXED = 'Grüße aus Köln!\n東京  tower\tcafé  naïve 😀 — "quotes"\n\n  end'
TokenizerError = tokenizer_lib.TokenizerError


def write(path, content):
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  mode = 'wb' if isinstance(content, bytes) else 'w'
  with open(path, mode, **({} if mode == 'wb' else {'encoding': 'utf-8'})) as f:
    f.write(content)
  return str(path)


def corpus_text():
  """A few tens of KB of prose (the repository's README) plus the mixed text."""
  return (REPO / 'README.md').read_text(encoding='utf-8')[:40000] + '\n' + MIXED + '\n'


class TrainedTokenizers(parameterized.TestCase):
  """Trains one spm (byte fallback), one spm (without) and one bpe tokenizer per class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.corpus = write(os.path.join(cls.tmp, 'corpus', 'a.txt'), corpus_text())
    cls.spm = tokenizer_lib.train([cls.corpus], vocab_size=400, kind='spm',
                                  out=os.path.join(cls.tmp, 'spm.model'), byte_fallback=True)
    cls.spm_small = tokenizer_lib.train(cls.corpus, vocab_size=120, kind='spm',
                                        out=os.path.join(cls.tmp, 'small.model'))
    cls.bpe = tokenizer_lib.train(os.path.join(cls.tmp, 'corpus'), vocab_size=300, kind='bpe',
                                  out=os.path.join(cls.tmp, 'out', 'bpe.json'))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()


class RoundTripTest(TrainedTokenizers):

  @parameterized.parameters('bytes', 'spm', 'bpe')
  def test_decode_encode_is_the_identity_on_mixed_text(self, kind):
    tok = tokenizer_lib.load('bytes') if kind == 'bytes' else getattr(self, kind)
    for text in (MIXED, '', ' ', 'x', '\n\n', 'unseen: ∮ ⅋ 𝄞 ꙮ'):
      ids = tok.encode(text)
      self.assertTrue(all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids))
      self.assertNotIn(tok.eos_id, ids)
      self.assertEqual(tok.decode(ids), text)
    texts = [MIXED, '', 'river', MIXED[::-1]]
    self.assertEqual(tok.encode_batch(texts), [tok.encode(t) for t in texts])

  def test_bytes_is_utf8(self):
    tok = tokenizer_lib.load('bytes')
    self.assertEqual((tok.kind, tok.path, tok.vocab_size, tok.pad_id, tok.eos_id),
                     ('bytes', None, 256, 0, 255))
    self.assertEqual(tok.encode('aé'), [97, 0xC3, 0xA9])
    self.assertEqual(tok.decode(np.asarray([97, 0xC3, 0xA9])), 'aé')

  def test_decode_drops_special_and_out_of_range_ids_and_replaces_bad_utf8(self):
    tok = tokenizer_lib.load('bytes')
    self.assertEqual(tok.decode([0, 104, 255, 105, 256, -1, 0]), 'hi')
    self.assertEqual(tok.decode([104, 0xC3, 105]), 'h\ufffdi')  # A lone lead byte.
    for t in (self.spm, self.bpe):
      ids = t.encode('river')
      self.assertEqual(t.decode([t.pad_id] + ids + [t.eos_id, t.vocab_size + 5]), 'river')
      # Half of a character's UTF-8 bytes (byte pieces) decodes to U+FFFD, not an error.
      ids = t.encode('ꙮ')[-3:]  # Not in the corpus: 3 byte pieces (spm: after its '▁').
      self.assertEqual(t.decode(ids), 'ꙮ')
      self.assertRegex(t.decode(ids[:2]), '^\ufffd+$')  # spm: one per byte, hf: one.

  def test_encode_rejects_non_unicode(self):
    for tok in (tokenizer_lib.load('bytes'), self.spm, self.bpe):
      with self.assertRaisesRegex(TokenizerError, 'not valid Unicode'):
        tok.encode('a\ud800b')
      with self.assertRaisesRegex(TokenizerError, 'takes a str'):
        tok.encode(b'bytes')
      with self.assertRaisesRegex(TokenizerError, 'not valid Unicode'):
        tok.encode_batch(['fine', 'a\udfffb'])

  def test_trained_files_reserve_pad_and_eos(self):
    processor = sentencepiece.SentencePieceProcessor(model_file=self.spm.path)
    self.assertEqual([processor.IdToPiece(i) for i in (0, 1, 2)], ['<pad>', '</s>', '<unk>'])
    self.assertEqual((self.spm.kind, self.spm.vocab_size, self.spm.pad_id, self.spm.eos_id),
                     ('spm', 400, 0, 1))
    hf = tokenizers.Tokenizer.from_file(self.bpe.path)
    self.assertEqual((hf.id_to_token(0), hf.id_to_token(1)), ('<pad>', '</s>'))
    self.assertEqual((self.bpe.kind, self.bpe.vocab_size, self.bpe.eos_id), ('hf', 300, 1))
    # Subword tokenizers are shorter than bytes on text like their corpus.
    text = corpus_text()[:2000]
    for tok in (self.spm, self.bpe):
      self.assertLess(len(tok.encode(text)), 0.85 * len(text.encode('utf-8')))

  def test_spm_without_byte_fallback_marks_unseen_characters(self):
    self.assertEqual(self.spm_small.vocab_size, 120)
    self.assertEqual(self.spm_small.decode(self.spm_small.encode('the cat')), 'the cat')
    self.assertIn('⁇', self.spm_small.decode(self.spm_small.encode('ꙮ')))


class DetectionTest(TrainedTokenizers):

  def test_kind_comes_from_content_not_the_file_name(self):
    spm_as_json = shutil.copy(self.spm.path, os.path.join(self.tmp, 'looks_like.json'))
    hf_as_model = shutil.copy(self.bpe.path, os.path.join(self.tmp, 'looks_like.model'))
    self.assertEqual(tokenizer_lib.load(spm_as_json).kind, 'spm')
    self.assertEqual(tokenizer_lib.load(hf_as_model).kind, 'hf')
    self.assertEqual(tokenizer_lib.load(hf_as_model).encode(MIXED), self.bpe.encode(MIXED))

  def test_files_that_are_not_tokenizers(self):
    d = self.tmp
    cases = {
        write(f'{d}/bad/text.model', 'just some text\n'): r'text.model is neither a '
                                                          r'SentencePiece model nor an HF',
        write(f'{d}/bad/config.json', '{"vocab_size": 3}'): r"config.json is JSON but not an HF "
                                                            r"tokenizer.json \(it has no 'model'",
        write(f'{d}/bad/broken.json', '{"model": '): r'broken.json starts like JSON but does '
                                                     r'not parse',
        write(f'{d}/bad/empty.model', b''): r'empty.model is empty',
        f'{d}/bad/missing.model': r"missing.model does not exist \(give 'bytes', a "
                                  r'SentencePiece',
        f'{d}/bad': r'bad is a directory',
    }
    for path, message in cases.items():
      with self.assertRaisesRegex(TokenizerError, message, msg=path):
        tokenizer_lib.load(path)
    with self.assertRaisesRegex(TokenizerError, "must be 'bytes' or a tokenizer file path"):
      tokenizer_lib.load('')

  def test_hf_tokenizer_without_an_end_of_document_token(self):
    content = json.loads(pathlib.Path(self.bpe.path).read_text())
    content['added_tokens'] = [t for t in content['added_tokens'] if t['content'] != '</s>']
    content['model']['vocab'] = {k: v for k, v in content['model']['vocab'].items()
                                 if k != '</s>'}
    path = write(os.path.join(self.tmp, 'no_eos.json'), json.dumps(content))
    with self.assertRaisesRegex(TokenizerError, 'no_eos.json: the tokenizer has no '
                                                'end-of-document token'):
      tokenizer_lib.load(path)

  def test_missing_package_is_a_pip_install_hint(self):
    with mock.patch.dict(sys.modules, {'sentencepiece': None}):
      with self.assertRaisesRegex(TokenizerError, r'pip install terraflax\[text\]'):
        tokenizer_lib.load(self.spm.path)
    with mock.patch.dict(sys.modules, {'tokenizers': None}):
      with self.assertRaisesRegex(TokenizerError, r'pip install terraflax\[text\]'):
        tokenizer_lib.load(self.bpe.path)
    self.assertEqual(tokenizer_lib.load('bytes').vocab_size, 256)  # bytes needs neither.


class CheckVocabTest(TrainedTokenizers):

  def test_check_vocab(self):
    tokenizer_lib.check_vocab(self.spm, 400)  # Equal fits.
    tokenizer_lib.check_vocab(tokenizer_lib.load('bytes'), 256)
    with self.assertRaisesRegex(TokenizerError, r'model.vocab_size=399 is smaller than the '
                                r'vocabulary of tokenizer .*spm.model \(400 ids\); set '
                                r'model.vocab_size >= 400'):
      tokenizer_lib.check_vocab(self.spm, 399)
    with self.assertRaisesRegex(TokenizerError, r'config.x=255 .* bytes \(256 ids\)'):
      tokenizer_lib.check_vocab(tokenizer_lib.load('bytes'), 255, field='config.x')


class WorkdirTest(TrainedTokenizers):

  def test_save_to_and_from_workdir(self):
    workdir = os.path.join(self.tmp, 'wd_spm')
    self.assertEqual(tokenizer_lib.from_workdir(workdir).kind, 'bytes')  # Nothing stored.
    stored = self.spm.save_to(workdir)
    self.assertEqual(stored, os.path.join(workdir, 'tokenizer.model'))
    self.assertEqual(pathlib.Path(stored).read_bytes(), pathlib.Path(self.spm.path).read_bytes())
    again = tokenizer_lib.from_workdir(workdir)
    self.assertEqual((again.kind, again.vocab_size, again.path), ('spm', 400, stored))
    self.assertEqual(again.encode(MIXED), self.spm.encode(MIXED))
    self.assertEqual(self.spm.save_to(workdir), stored)  # The same file again: a no-op.
    self.assertEqual(sorted(os.listdir(workdir)), ['tokenizer.model'])

    hf_dir = os.path.join(self.tmp, 'wd_hf')
    self.assertEqual(self.bpe.save_to(hf_dir), os.path.join(hf_dir, 'tokenizer.json'))
    self.assertEqual(tokenizer_lib.from_workdir(hf_dir).encode(MIXED), self.bpe.encode(MIXED))
    self.assertEqual(tokenizer_lib.load('bytes').save_to(os.path.join(self.tmp, 'wd_b')), '')

  def test_a_workdir_keeps_one_tokenizer(self):
    workdir = os.path.join(self.tmp, 'wd_one')
    self.spm.save_to(workdir)
    for other in (self.spm_small, self.bpe, tokenizer_lib.load('bytes')):
      with self.assertRaisesRegex(TokenizerError, 'tokenizer.model is already this workdir'):
        other.save_to(workdir)
    shutil.copy(self.bpe.path, os.path.join(workdir, 'tokenizer.json'))
    with self.assertRaisesRegex(TokenizerError, 'holds both .*tokenizer.model and '
                                                '.*tokenizer.json'):
      tokenizer_lib.from_workdir(workdir)


class WorkdirTokenizerTest(TrainedTokenizers):
  """decoding.workdir_tokenizer: how decoding and export read a workdir's prompts."""

  def test_stored_file_then_bytes_then_ids(self):
    def config(name, vocab_size=512, **data):
      return ml_collections.ConfigDict({'data': dict(name=name, **data),
                                        'model': {'vocab_size': vocab_size}})
    empty = tempfile.mkdtemp(dir=self.tmp)
    self.assertEqual(decoding.workdir_tokenizer(empty, config('bytes')).kind, 'bytes')
    self.assertIsNone(decoding.workdir_tokenizer(empty, config('copy')))
    self.assertEqual(decoding.workdir_tokenizer(empty, config('text', tokenizer='bytes')).kind,
                     'bytes')
    self.assertIsNone(decoding.workdir_tokenizer(empty, config('copy', tokenizer='bytes')))
    stored = tempfile.mkdtemp(dir=self.tmp)
    self.spm.save_to(stored)
    for name in ('bytes', 'copy', 'text'):
      self.assertEqual(decoding.workdir_tokenizer(stored, config(name)).path,
                       os.path.join(stored, 'tokenizer.model'))
    with self.assertRaisesRegex(TokenizerError, r'model.vocab_size=256 is smaller .*\(400 ids\)'):
      decoding.workdir_tokenizer(stored, config('text', vocab_size=256))


class TrainErrorTest(TrainedTokenizers):

  def test_bad_inputs(self):
    d = os.path.join(self.tmp, 'errors')
    empty = write(f'{d}/empty.txt', '')
    write(f'{d}/blank/a.txt', '\n \n')
    bad_utf8 = write(f'{d}/latin1.txt', 'fine line\ncaf\xe9\n'.encode('latin-1'))
    out = f'{d}/out.model'
    cases = [
        (dict(paths=[f'{d}/missing.txt']), r'--input .*missing.txt: no such file'),
        (dict(paths=[f'{d}/*.nothing']), r'--input .*\*.nothing: no such file'),
        (dict(paths=[]), r'--input: no training text'),
        (dict(paths=[empty]), r'the input holds no text \(1 file\(s\), all empty\)'),
        (dict(paths=[f'{d}/blank']), r'the input holds no text'),
        (dict(paths=[bad_utf8]), r'latin1.txt:2: not UTF-8 text'),
        (dict(paths=[self.corpus], kind='wordpiece'), r"--kind='wordpiece': must be one of spm, "
                                                      'bpe'),
        (dict(paths=[self.corpus], vocab_size=0), r'--vocab_size=0: must be a positive int'),
        (dict(paths=[self.corpus], vocab_size=40, byte_fallback=False),
         r'--vocab_size=40 is too small for the input .*distinct characters .* use '
         r'--vocab_size >= \d+'),
        (dict(paths=[self.corpus], vocab_size=259, byte_fallback=True),
         r'--vocab_size=259 is too small: a SentencePiece model needs at least 260 ids'),
        (dict(paths=[self.corpus], vocab_size=100000),
         r'--vocab_size=100000 is too large for the input \(1 file\(s\): .*a.txt\): it supports '
         r'at most \d+ pieces'),
        (dict(paths=[self.corpus], vocab_size=100, kind='bpe'),
         r'--vocab_size=100 is too small: a byte-level BPE tokenizer needs at least 258 ids'),
        (dict(paths=[self.corpus], vocab_size=100000, kind='bpe'),
         r'--vocab_size=100000 is too large for the input .*BPE found only \d+ ids'),
    ]
    for kwargs, message in cases:
      kwargs = dict(dict(vocab_size=200, kind='spm', out=out), **kwargs)
      with self.assertRaisesRegex(TokenizerError, message, msg=str(kwargs)):
        tokenizer_lib.train(kwargs.pop('paths'), **kwargs)
    self.assertFalse(os.path.exists(out))



class CommandLineTest(absltest.TestCase):

  def test_train_command(self):
    with tempfile.TemporaryDirectory() as tmp:
      write(f'{tmp}/docs/a.txt', corpus_text()[:20000])
      write(f'{tmp}/docs/sub/b.md', MIXED)
      result = run_module('terraflax.tokenizer', 'train', f'--input={tmp}/docs/*.txt',
                   f'--input={tmp}/docs/sub', '--vocab_size=300', '--kind=bpe',
                   f'--out={tmp}/tok.json')
      self.assertEqual(result.returncode, 0, result.stderr)
      self.assertIn(f'Wrote {tmp}/tok.json: hf tokenizer, 300 ids (pad 0, end of document 1)',
                    result.stdout)
      tok = tokenizer_lib.load(f'{tmp}/tok.json')
      self.assertEqual(tok.decode(tok.encode(MIXED)), MIXED)

      for args, message in [
          (['train', f'--input={tmp}/nope', '--vocab_size=300', f'--out={tmp}/x'],
           f'terraflax.tokenizer: --input {tmp}/nope: no such file, directory or glob match.'),
          ([f'--input={tmp}/docs', '--vocab_size=300', f'--out={tmp}/x'],
           'terraflax.tokenizer: expected the command `train`, got none'),
      ]:
        result = run_module('terraflax.tokenizer', *args)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith(message), result.stderr)
      self.assertFalse(os.path.exists(f'{tmp}/x'))


def tiny_lm_config(data_path: str):
  """configs/transformer_lm.py, tiny: a byte LM with vocab_size 256 trained for 2 steps."""
  sys.path.insert(0, str(REPO / 'configs'))
  try:
    import transformer_lm  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = transformer_lm.get_config()
  config.model.d_model, config.model.d_ff, config.model.n_heads = 16, 32, 2
  config.model.max_len = 64
  config.data.path, config.data.seq_len, config.data.eval_fraction = data_path, 32, 0.2
  config.train.steps, config.train.batch_size = 2, 2
  config.train.log_every = config.train.eval_every = config.train.checkpoint_every = 2
  config.train.eval_batches = 1
  config.optimizer.warmup_steps = 1
  config.sample.max_new_tokens = 0
  return config


class DecodingWithTokenizerTest(absltest.TestCase):

  def test_decoding_cli_reads_and_writes_text_with_the_workdirs_spm(self):
    with tempfile.TemporaryDirectory() as tmp:
      corpus = write(f'{tmp}/corpus.txt', corpus_text())
      workdir = os.path.join(tmp, 'run')
      train_and_evaluate(tiny_lm_config(corpus), workdir)
      # A 200-piece SentencePiece vocabulary fits the model's 256 ids.
      tok = tokenizer_lib.train(corpus, vocab_size=200, kind='spm', out=f'{tmp}/t.model')
      tok.save_to(workdir)
      prompt, n = 'The model', 5
      result = run_module('terraflax.decoding', f'--workdir={workdir}', f'--prompt={prompt}',
                   f'--max_new_tokens={n}', '--temperature=0')
      self.assertEqual(result.returncode, 0, result.stderr)
      # Reference: the prompt encoded by sentencepiece itself, greedy ids from the
      # model in process, decoded by sentencepiece.
      processor = sentencepiece.SentencePieceProcessor(model_file=f'{tmp}/t.model')
      ids = processor.encode(prompt, out_type=int)
      config = workdir_lib.read_config(workdir)
      spec = spec_lib.ModelSpec.from_config(config)
      _, _, params = spec_lib.load_workdir(workdir)
      generated = np.asarray(decoding.autoregressive_sample(
          spec.build('predict'), params, jnp.asarray([ids], jnp.int32), n, temperature=0.0,
          rng=jax.random.key(0))).reshape(-1).tolist()
      kept = [i for i in ids + generated if i < 200 and i not in (0, 1)]
      self.assertEqual(result.stdout.rstrip('\n'), processor.decode(kept))
      self.assertTrue(result.stdout.startswith(prompt))

      # (A stored tokenizer larger than the model: WorkdirTokenizerTest, in process.)

if __name__ == '__main__':
  absltest.main()
