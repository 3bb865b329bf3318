"""`python -m terraflax.serve --workdir=DIR [--prefix=NAME=WORKDIR ...] [--slots=8] [--port=8000]`.

Loads the workdir's latest checkpoint and its prefix-tuned workdirs, compiles
the decoding step, and serves the API of `terraflax.serve.api` until
interrupted.
"""

from __future__ import annotations

from absl import flags
import uvicorn

from terraflax import cli
from terraflax.serve import api
from terraflax.serve import engine as engine_lib
from terraflax.serve import model as model_lib

flags.DEFINE_string('workdir', None, 'A trained language-model workdir (checkpoints/, config.json).')
flags.DEFINE_multi_string('prefix', [], 'NAME=WORKDIR: a prefix-tuning run on the same base '
                          '(repeatable); requests pick it with "prefix": NAME.')
flags.DEFINE_integer('slots', 8, 'Requests decoded together (the decode batch).', lower_bound=1)
flags.DEFINE_integer('steps_per_call', 8, 'Decoding steps run on the device per host round '
                     'trip (new requests join between calls).', lower_bound=1)
flags.DEFINE_integer('max_queue', 1024, 'Requests waiting for a slot before new ones get 503.',
                     lower_bound=1)
flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
flags.DEFINE_integer('port', 8000, 'Port to listen on.', lower_bound=0, upper_bound=65535)
flags.DEFINE_integer('step', None, 'Checkpoint step of --workdir (default: the latest).')
flags.mark_flag_as_required('workdir')


def parse_prefixes(values: list[str]) -> dict[str, str]:
  """['NAME=WORKDIR', ...] -> {NAME: WORKDIR}; raises ServeError on a malformed or repeated one."""
  prefixes = {}
  for value in values:
    name, sep, workdir = value.partition('=')
    if not sep or not name or not workdir:
      raise model_lib.ServeError(f'--prefix={value}: give NAME=WORKDIR.')
    if name in prefixes:
      raise model_lib.ServeError(f'--prefix={value}: the name {name!r} is given twice.')
    prefixes[name] = workdir
  return prefixes


def main(argv):
  del argv
  f = flags.FLAGS
  served = model_lib.load(f.workdir, parse_prefixes(f.prefix), step=f.step)
  engine = engine_lib.Engine(served, n_slots=f.slots, max_queue=f.max_queue,
                              steps_per_call=f.steps_per_call)
  engine.warmup()
  engine.start()
  names = ', '.join(served.prefix_names) or 'none'
  print(f'terraflax.serve: {f.workdir} with prefixes {names}, {f.slots} slots, on '
        f'http://{f.host}:{f.port}', flush=True)
  try:
    uvicorn.run(api.make_app(engine), host=f.host, port=f.port, log_level='warning')
  finally:
    engine.stop()


if __name__ == '__main__':
  cli.run(main, name='terraflax.serve')
