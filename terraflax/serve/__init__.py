"""Serving a language-model workdir over HTTP: `python -m terraflax.serve`.

  python -m terraflax.serve --workdir=runs/transformer_lm \
      --prefix=email=runs/prefix_tuning --slots=8 --port=8000

  model.py    load(workdir, prefixes) -> Served; DecodeStep: one token for every slot
  engine.py   Engine: continuous batching over a fixed number of slots (a decode thread)
  api.py      make_app(engine): the Starlette app (completions, SSE, /health, /metrics)

Needs the `serve` extra (starlette, uvicorn; httpx for the tests).
"""

from terraflax.serve.engine import Engine as Engine
from terraflax.serve.engine import Job as Job
from terraflax.serve.model import NO_PREFIX as NO_PREFIX
from terraflax.serve.model import ServeError as ServeError
from terraflax.serve.model import Served as Served
from terraflax.serve.model import load as load
