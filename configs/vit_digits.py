"""A Vision Transformer on scikit-learn's 8x8 handwritten digits (shipped with the package).

16 patches of 2x2 pixels plus a class token; 1437 training images, 360 held
out (a fixed split) and evaluated whole. Needs scikit-learn
(`pip install 'terraflax[vision]'`).

  python -m terraflax.train --config=configs/vit_digits.py --workdir=runs/vit_digits
"""

import ml_collections

from terraflax.train.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
  config = load_sibling(__file__, 'default')
  config.model = ml_collections.ConfigDict()
  config.model.name = 'ViT'  # Patch embedding, class token, encoder blocks.
  config.model.image_shape = (8, 8, 1)  # Height, width, channels.
  config.model.patch_size = 2  # 2x2-pixel patches: 16 tokens plus the class token.
  config.model.n_classes = 10  # Digits 0-9.
  config.model.d_model = 64  # Width of the residual stream.
  config.model.d_ff = 128  # Feed-forward width.
  config.model.n_layers = 4  # Encoder blocks.
  config.model.n_heads = 4  # Attention heads.
  config.model.dropout = 0.1  # Dropout rate in train mode.
  config.model.pixel_scale = 1 / 16  # Intensities 0..16 -> [0, 1].
  config.model.dtype = 'float32'  # Compute dtype.
  config.data.name = 'digits'  # sklearn.datasets.load_digits.
  config.data.path = ''  # Not used.
  config.data.seq_len = 64  # Pixels per image.
  config.data.eval_examples = 360  # Held-out test images (a multiple of batch_size).
  config.train.steps = 1500  # Updates (~63 epochs of the 1437 training images).
  config.train.batch_size = 60  # Global batch; divides the 360 test images.
  config.train.log_every = 250  # Steps between progress lines.
  config.train.eval_every = 500  # Steps between evaluations of the whole test set.
  config.train.eval_batches = -1  # All 360 test images.
  config.train.checkpoint_every = 500  # Steps between checkpoints.
  config.optimizer.name = 'adamw'  # Adam with decoupled weight decay.
  config.optimizer.learning_rate = 1e-3  # Peak learning rate.
  config.optimizer.warmup_steps = 200  # Linear warm-up from 0.
  config.optimizer.weight_decay = 0.05  # Skips biases and norm scales.
  config.sample.max_new_tokens = 0  # Classification: no sample.
  return config
