"""The HTTP API (Starlette on uvicorn) over an `Engine`.

  POST /v1/completions  {"prompt": str, "max_tokens": 16, "temperature": 0.0, "top_k": null,
                         "top_p": null, "stop": null | str | [str], "prefix": null | NAME,
                         "stream": false, "seed": 0}
      -> {"text", "tokens", "finish_reason": "length"|"stop", "prefix", "usage": {...}}
      stream: server-sent events, `data: {"token": id, "text": piece}` per generated token,
      then `data: {"finish_reason", "text", "tokens", "usage"}` and `data: [DONE]`.
  GET /health   -> {"status": "ok", ...}
  GET /metrics  -> requests, completed, cancelled, failed, tokens, tokens_per_sec (last 10 s),
                   queue_length, active_slots, slots, prefixes

A request the server cannot take gets a 4xx and `{"error": message}`: 400
for malformed JSON, an unknown field, a value of the wrong type or range
(sampling values are checked as `terraflax.decoding` checks them), an unknown
prefix, or a prompt that with `max_tokens` needs more positions than the
model's cache; 503 when the queue is full. A client that disconnects while
waiting or streaming has its request cancelled, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
import uvicorn

from terraflax import decoding
from terraflax import tokenizer as tokenizer_lib
from terraflax.serve import engine as engine_lib
from terraflax.serve import model as model_lib

FIELDS = ('prompt', 'max_tokens', 'temperature', 'top_k', 'top_p', 'stop', 'prefix', 'stream',
          'seed')
DEFAULT_MAX_TOKENS = 16


class BadRequest(ValueError):
  """A request the server refuses; the message says which field and what is valid."""


def _typed(body: dict, field: str, kinds, default, what: str):
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  value = body.get(field, default)
  if value is None:
    return default
  if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
    raise BadRequest(f'"{field}" must be {what}, got {json.dumps(value)[:40]}.')
  return value


def parse(body, served: model_lib.Served) -> tuple[engine_lib.Job, bool]:
  """(the job without its `emit`, stream) of a JSON request body; raises BadRequest."""
  if not isinstance(body, dict):
    raise BadRequest(f'the body must be a JSON object with fields {", ".join(FIELDS)}.')
  unknown = sorted(set(body) - set(FIELDS))
  if unknown:
    raise BadRequest(f'unknown field(s) {", ".join(map(repr, unknown))}; valid fields: '
                     f'{", ".join(FIELDS)}.')
  if 'prompt' not in body or not isinstance(body['prompt'], str):
    raise BadRequest('"prompt" (a string) is required.')
  max_tokens = _typed(body, 'max_tokens', int, DEFAULT_MAX_TOKENS, 'a positive integer')
  temperature = float(_typed(body, 'temperature', (int, float), 0.0, 'a number >= 0'))
  top_k = _typed(body, 'top_k', int, None, 'a positive integer or null')
  top_p = _typed(body, 'top_p', (int, float), None, 'a number in [0, 1] or null')
  stop = _typed(body, 'stop', (str, list), [], 'a string or a list of strings')
  stop = [stop] if isinstance(stop, str) else stop
  if not all(isinstance(s, str) and s for s in stop):
    raise BadRequest('"stop" must be a non-empty string or a list of them.')
  prefix = _typed(body, 'prefix', str, model_lib.NO_PREFIX, 'a prefix name or null')
  stream = _typed(body, 'stream', bool, False, 'true or false')
  seed = _typed(body, 'seed', int, 0, 'an integer in [0, 2**32)')
  if not 0 <= seed < 2**32:
    raise BadRequest(f'"seed" must be an integer in [0, 2**32), got {seed}.')
  try:
    decoding._check_new_tokens(max_tokens)  # pylint: disable=protected-access
    # Only whether a key is given matters to the check; each request's key comes from its seed.
    decoding._check_sampling(temperature, top_k, top_p, rng=seed)  # pylint: disable=protected-access
  except ValueError as e:
    raise BadRequest(str(e).replace('max_new_tokens', '"max_tokens"')) from None
  try:
    served.route(prefix)
  except KeyError:
    names = ', '.join(served.prefix_names) or 'none are loaded'
    raise BadRequest(f'unknown prefix {prefix!r}; the served prefixes: {names} (null: the '
                     'base model).') from None
  try:
    ids = decoding.prompt_ids(body['prompt'], served.tokenizer)
  except (decoding.DecodingError, tokenizer_lib.TokenizerError) as e:
    raise BadRequest(str(e)) from None
  vocab = served.config.model.get('vocab_size')
  if isinstance(vocab, int) and any(not 0 <= t < vocab for t in ids):
    raise BadRequest(f'the prompt holds token ids outside [0, {vocab}) (the model\'s vocabulary).')
  try:
    decoding.check_length(len(ids), max_tokens, served.max_len)
  except decoding.DecodingError:
    raise BadRequest(f'the prompt ({len(ids)} tokens) plus "max_tokens" ({max_tokens}) needs '
                     f'{len(ids) + max_tokens} positions, more than the model\'s cache holds '
                     f'(model.max_len={served.max_len}); shorten the prompt or lower '
                     '"max_tokens".') from None
  job = engine_lib.Job(ids=list(ids), max_tokens=max_tokens, emit=None, temperature=temperature,
                       top_k=top_k or 0, top_p=1.0 if top_p is None else float(top_p),
                       stop=tuple(stop), prefix=prefix, seed=seed)
  return job, stream


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({'error': message}, status_code=status)


def make_app(engine: engine_lib.Engine) -> Starlette:
  """The Starlette app serving `engine` (which the caller starts and stops)."""
  served = engine.served

  async def completions(request: Request):
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return _error(400, f'malformed JSON: {e}.')
    try:
      job, stream = parse(body, served)
    except BadRequest as e:
      return _error(400, str(e))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    try:
      engine.submit(job)
    except engine_lib.QueueFull as e:
      return _error(503, str(e))

    def usage():
      return {'prompt_tokens': len(job.ids), 'completion_tokens': len(job.generated),
              'total_tokens': len(job.ids) + len(job.generated)}

    def final(event):
      return {'text': event['text'], 'tokens': event['tokens'],
              'finish_reason': event['finish_reason'], 'prefix': job.prefix, 'usage': usage()}

    if stream:
      async def sse():
        try:
          while True:
            event = await events.get()
            if event['type'] == 'token':
              yield _sse({'token': event['token'], 'text': event['text']})
            elif event['type'] == 'error':
              yield _sse({'error': event['message']})
              return
            else:
              yield _sse(final(event))
              yield 'data: [DONE]\n\n'
              return
        finally:
          engine.cancel(job)  # A no-op once finished; frees the slot of a client gone.
      return StreamingResponse(sse(), media_type='text/event-stream',
                               headers={'Cache-Control': 'no-cache'})

    async def watch_disconnect():  # The body is read: the next message is the disconnect.
      while (await request.receive())['type'] != 'http.disconnect':
        pass
      engine.cancel(job)
      events.put_nowait({'type': 'gone'})

    watcher = asyncio.create_task(watch_disconnect())
    try:
      while True:
        event = await events.get()
        if event['type'] == 'gone':
          return _error(499, 'client disconnected')
        if event['type'] == 'error':
          return _error(500, event['message'])
        if event['type'] == 'done':
          return JSONResponse(final(event))
    finally:
      watcher.cancel()
      engine.cancel(job)

  async def health(_):
    return JSONResponse({'status': 'ok', 'workdir': served.workdir,
                         'prefixes': served.prefix_names, 'slots': engine.n_slots})

  async def metrics(_):
    return JSONResponse(engine.metrics())

  return Starlette(routes=[Route('/v1/completions', completions, methods=['POST']),
                           Route('/health', health, methods=['GET']),
                           Route('/metrics', metrics, methods=['GET'])])


def _sse(payload: dict) -> str:
  return f'data: {json.dumps(payload)}\n\n'


class BackgroundServer:
  """uvicorn serving `app` from a thread, on a free loopback port (tests, benchmarks).

    with BackgroundServer(app) as server: httpx.post(server.url + '/v1/completions', ...)
  """

  def __init__(self, app, host: str = '127.0.0.1', port: int = 0):
    self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.socket.bind((host, port))
    self.url = f'http://{host}:{self.socket.getsockname()[1]}'
    self.server = uvicorn.Server(uvicorn.Config(app, log_level='warning', lifespan='off'))
    self.thread = threading.Thread(target=self.server.run, kwargs={'sockets': [self.socket]},
                                   daemon=True)

  def __enter__(self):
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      if time.monotonic() > deadline or not self.thread.is_alive():
        raise RuntimeError('uvicorn did not start.')
      time.sleep(0.01)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(timeout=10)
    self.socket.close()
