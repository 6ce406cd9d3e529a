"""Fault-injection hooks for the chaos tests, switched on only by environment variables.

Outside the tests neither variable is set and every hook is a no-op. They live in one module so what the
tests can inject is plain to see (docs/reliability.md lists them):

- `SDBATCH_TEST_POISON_PROMPT`: a row whose prompt equals it kills the worker process inside the model
  call, the way a segfault or the OOM killer would.
- `SDBATCH_TEST_PAUSE_AT`: the driver stops at the named point (see PAUSE_POINTS), prints
  `sdbatch-test: paused at <point>` on stderr and sleeps, so a test can SIGKILL it exactly there.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

PAUSE_POINTS = (
    "commit",  # every pass done and the contact sheet written; nothing of the commit written yet
    "commit:run-manifest-written",  # `_run.json` written, `_SUCCESS` not yet
)
PAUSE_SECONDS = 600.0


def inject_worker_death(rows: Sequence[dict]) -> None:
    """Kill this worker process if one of `rows` carries the poison prompt."""
    poison = os.environ.get("SDBATCH_TEST_POISON_PROMPT")
    if poison and any(row["prompt"] == poison for row in rows):
        os._exit(86)


def pause_point(name: str) -> None:
    """Sleep here (to be killed) when $SDBATCH_TEST_PAUSE_AT names this point."""
    if os.environ.get("SDBATCH_TEST_PAUSE_AT") != name:
        return
    print(f"sdbatch-test: paused at {name}", file=sys.stderr, flush=True)
    time.sleep(PAUSE_SECONDS)
