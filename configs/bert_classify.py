"""Sequence classification fine-tuned from a BERT/ALBERT pre-training run.

Which standard-library package does a 128-byte window of Python source come
from (asyncio, email, http or unittest)? The `TransformerEncoder` has the
pre-training config's body (same fields, same parameter paths); with
`--config.init_from=DIR` the body starts from DIR's latest checkpoint and the
classification head starts fresh. Without it, the same model trains from
scratch: the baseline.

  python -m terraflax.train --config=configs/bert_classify.py --workdir=runs/bert_classify \
      --config.init_from=runs/bert_mlm
"""

import os

import ml_collections
from ml_collections import config_dict

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'bert_mlm')
  config.init_from = ''  # A bert_mlm/albert_mlm workdir (set with --config.init_from=DIR).
  body = config.model.to_dict()
  config.model = ml_collections.ConfigDict()
  config.model.name = 'TransformerEncoder'  # The encoder body with a mean-pooled Dense head.
  for field in ('vocab_size', 'd_model', 'd_ff', 'n_layers', 'n_heads', 'dropout', 'max_len',
                'share_layers'):
    config.model[field] = body[field]  # As pre-trained, so the body's parameters load.
  config.model.d_embedding = config_dict.placeholder(int)  # As pre-trained (None: d_model).
  config.model.n_classes = 4  # One per entry of data.classes.
  config.data.name = 'byte_classification'  # Windows labelled by the folder they come from.
  config.data.path = os.path.dirname(os.__file__)  # The standard library.
  config.data.classes = ('asyncio', 'email', 'http', 'unittest')  # Sub-directories: the classes.
  config.data.glob = '*.py'  # Files of each class folder.
  config.data.eval_fraction = 0.1  # The last 10% of each class's bytes are for evaluation.
  config.data.eval_examples = 512  # Evaluation windows (balanced over the classes).
  config.train.steps = 500  # Updates.
  config.train.eval_every = 250  # Steps between evaluations.
  config.train.eval_batches = -1  # The whole evaluation set.
  config.optimizer.learning_rate = 3e-4  # Fine-tuning: a lower peak learning rate.
  config.optimizer.warmup_steps = 50  # Linear warm-up from 0.
  return config
