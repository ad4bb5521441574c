"""Run coturn's `turnserver` on the lab's relay host.

With two listening addresses and an alternate port it answers RFC 5780 NAT
behaviour discovery (and the classic RFC 3489 CHANGE-REQUEST tests of the
`stun` client), which is how the lab's NAT emulation is checked by tools
nobody here wrote; it also serves as a stock STUN/TURN server for tests.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .processes import stop_process  # (also what the lab tests stop coturn with)
from .topology import LabError, Relay

STUN_PORT = 3478
ALT_PORT = 3479


def start_turnserver(relay: Relay, workdir: Path, extra_args: Sequence[str] = (), timeout: float = 10) -> subprocess.Popen:
    """Start turnserver (anonymous, no TLS, no CLI) on both relay IPv4 addresses; wait until it listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "turnserver.log", "w")
    argv = [
        "turnserver", "-n",  # no config file: only what is given here
        "-L", relay.ipv4, "-L", relay.ipv4_alt,
        "-p", str(STUN_PORT), "--alt-listening-port", str(ALT_PORT),
        "-z", "--no-tls", "--no-dtls", "--no-cli", "-m", "1",
        "--log-file", "stdout", "--simple-log",
        "--pidfile", str(workdir / "turnserver.pid"),
        "--userdb", str(workdir / "turndb"),
        *extra_args,
    ]
    proc = relay.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wanted = {f"{relay.ipv4}:{STUN_PORT}", f"{relay.ipv4_alt}:{STUN_PORT}",
              f"{relay.ipv4}:{ALT_PORT}", f"{relay.ipv4_alt}:{ALT_PORT}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"turnserver exited {proc.returncode}; see {workdir / 'turnserver.log'}")
        out = relay.ns.run("ss", "-Hlnu", check=False).stdout
        listening = {line.split()[3] for line in out.splitlines() if len(line.split()) > 3}
        if wanted <= listening:
            return proc
        time.sleep(0.1)
    stop_process(proc)
    raise LabError(f"turnserver did not listen on {sorted(wanted)} within {timeout}s")
