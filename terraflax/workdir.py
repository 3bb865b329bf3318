"""A training workdir's files, read and written in one place.

  WORKDIR/config.json     the resolved config the run was started with
  WORKDIR/checkpoints/    orbax CheckpointManager steps: params, opt_state, train, data

Decoding, export, conversion and the trainer all reach a workdir through this
module; it builds no model (parameters are restored as stored), so it sits
below `terraflax.train` and `terraflax.decoding` alike.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
ITEM_NAMES = ('params', 'opt_state', 'train', 'data')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `WORKDIR/checkpoints`, keeping the last `keep`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEM_NAMES)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """`WORKDIR/config.json`: the resolved config (defaults filled in)."""
  with open(os.path.join(workdir, CONFIG_FILE), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir!r} is not a terraflax workdir.')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def save_params(workdir: str, step: int, params) -> None:
  """A checkpoint of `params` alone at `step`, written before returning (`load_params`
  reads it): how models made outside the trainer (converted ones) become workdirs."""
  manager = make_manager(workdir, async_save=False)
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
  manager.wait_until_finished()
  manager.close()


def load_params(workdir: str, step: int | None = None, abstract_params=None):
  """(config, params, step) of the latest (or the given) checkpoint in `workdir`.

  Restores just the `params` item onto the default device: shaped like
  `abstract_params` (a tree of `jax.ShapeDtypeStruct`, e.g. a model's abstract
  init) when given, else as stored.
  """
  config = read_config(workdir)
  manager = make_manager(workdir, read_only=True, async_save=False)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{checkpoint_dir(workdir)} holds no checkpoint.')
    target = None
    if abstract_params is not None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  return config, restored['params'], step
