"""Stopping the lab's child processes (agents, relays, coturn) politely, then firmly."""

from __future__ import annotations

import signal
import subprocess


def stop_process(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM, and SIGKILL if it is still there after `grace` seconds (the agents
    take down their TUN devices and routes on SIGTERM, so they get the chance)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
