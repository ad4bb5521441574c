"""Where the CLI keeps a running lab's description between commands.

`overlay-lab up` and the commands after it run as separate processes; each
one re-attaches to the namespaces through this JSON file, under a lock so two
commands never interleave their changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_DIR = Path(os.environ.get("OVERLAY_LAB_STATE_DIR", "/run/overlay-lab"))


def state_path(prefix: str) -> Path:
    return STATE_DIR / f"{prefix}.json"


@contextlib.contextmanager
def locked(prefix: str) -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / f"{prefix}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load(prefix: str) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(prefix).read_text())
    except FileNotFoundError:
        return None


def save(prefix: str, state: dict[str, Any]) -> None:
    path = state_path(prefix)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def forget(prefix: str) -> None:
    """Remove the state of every lab whose prefix starts with `prefix`."""
    if not STATE_DIR.exists():
        return
    for path in STATE_DIR.iterdir():
        if path.name.startswith(prefix) and path.suffix in (".json", ".lock", ".tmp"):
            path.unlink(missing_ok=True)
