"""Background tasks owned by one long-lived object (the gatherer, the rendezvous session).

Each owner keeps strong references to its tasks (asyncio keeps only weak ones),
cancels them all when it closes, and logs a task that died with an error
instead of letting asyncio print "exception was never retrieved" later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog


class BackgroundTasks:
    def __init__(self, what: str) -> None:
        self._what = what  # named in the log line of a failed task
        self._tasks: set[asyncio.Task] = set()
        self._log = structlog.get_logger("overlay.traversal")

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error(f"{self._what} task failed", error=repr(task.exception()))
