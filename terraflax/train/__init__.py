"""Training: `python -m terraflax.train --config=configs/NAME.py --workdir=DIR`.

  __main__.py     the command line: trains, or scores a checkpoint when `eval.*` is set
  config.py       schema, validation (`validate_config`, `ConfigError`); the model itself
                  is `terraflax.models.spec.ModelSpec`'s
  data.py         grain pipelines: bytes, duplication, listops, text classification, reverse,
                  masked LM, byte classification, digits, long-document retrieval
  listops.py      the ListOps generator and evaluator (LRA format)
  optimizers.py   optax schedules and optimizers, weight-decay masks, frozen parameters
  checkpoint.py   orbax CheckpointManager items, `load_for_inference`, `load_matching_params`
  distill.py      the teacher of knowledge distillation (`config.distill`)
  metrics.py      metrics.jsonl, TensorBoard events, progress lines
  sharding.py     the ('data', 'fsdp', 'model') mesh, logical-axis rules, shardings and
                  their checks, per-device bytes, multi-process start
  steps.py        `make_train_step`, its compilation and FLOPs (MFU), metric accumulation
  state.py        `TrainState`, `initial_state` / `abstract_state`, optimizer-state shardings,
                  parameter counts, memory.json
  evaluation.py   `make_eval_step`, `evaluate_params`, batch sums and their normalisation
  preemption.py   SIGTERM as a flag the loop checks after every step
  trainer.py      the loop: `train_and_evaluate`, `prepare_workdir` (the workdir set-up)
  eval_only.py    `config.eval.*`: score a checkpoint, e.g. with other LSH hash rounds or
                  as full shared-QK attention, without training
"""

from terraflax.train.checkpoint import load_for_inference as load_for_inference
from terraflax.train.checkpoint import model_from_config as model_from_config
from terraflax.train.config import ConfigError as ConfigError
from terraflax.train.config import validate_config as validate_config
from terraflax.train.eval_only import evaluate_checkpoint as evaluate_checkpoint
from terraflax.train.state import TrainState as TrainState
from terraflax.train.steps import make_train_step as make_train_step
from terraflax.train.trainer import TrainingDivergedError as TrainingDivergedError
from terraflax.train.trainer import train_and_evaluate as train_and_evaluate
