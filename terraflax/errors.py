"""The project's user-facing error base and its one notice channel.

Every error a user can fix by changing a flag, a config field, a path or a
file derives from `UserError` (or is registered with `terraflax.cli.run`):
the command lines print it as one line, `terraflax.<cli>: <message>`, and exit
non-zero without a traceback. Messages name the offending field, flag or path
and what is valid.

`notice(message)` is how library code (the workdir lock, the checkpoint
fallback) tells the user something went wrong but was handled: one line on
stderr, shown whatever the logging verbosity (absl/orbax logging is hidden by
default in the CLIs).
"""

from __future__ import annotations

import sys


class UserError(Exception):
  """An error the user fixes (a flag, a config field, a path): printed as one line."""


def notice(message: str) -> None:
  """One `terraflax: <message>` line on stderr, flushed."""
  print(f'terraflax: {message}', file=sys.stderr, flush=True)
