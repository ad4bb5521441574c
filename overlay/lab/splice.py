"""Splicing the userspace link emulator (linkem.py) into a bridge port, and out again.

Used when the kernel has no `sch_netem`. The emulator gets a namespace of its
own holding the node's old bridge port (renamed `le0`) and the far end (`le1`)
of a new veth pair whose near end takes the old port's name and place in the
bridge, so the fault rules that match on port names keep working and the
node's own interface (and every socket on it) is never touched.
"""

from __future__ import annotations

import select
import subprocess
import sys

from .faults import Impairment
from .netns import Namespace, kill_namespace_processes
from .nodes import LabError, ip_batch, link_exists, sysctls


def _profile(imp: Impairment) -> str:
    return f"{imp.loss},{imp.delay_ms},{imp.jitter_ms}"


def splice(ns: Namespace, em: Namespace, port: str, bridge: str,
           egress: Impairment, ingress: Impairment) -> subprocess.Popen:
    """Insert the emulator (in the fresh namespace `em`) between `port` of `bridge` in `ns` and its node."""
    sysctls(em, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
    ip_batch(ns, [f"link set {port} nomaster", f"link set {port} down", f"link set {port} netns {em.name}",
                  f"link add {port} type veth peer name le1 netns {em.name}",
                  f"link set {port} master {bridge} up"])
    ip_batch(em, [f"link set dev {port} name le0", "link set dev le0 up promisc on", "link set dev le1 up promisc on"])
    proc = em.popen([sys.executable, "-m", "overlay.lab.linkem", "le0", "le1",
                     "--egress", _profile(egress), "--ingress", _profile(ingress)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise LabError(f"the link emulator in {em.name} did not start")
    proc.stdout.close()
    return proc


def unsplice(ns: Namespace, em: Namespace, port: str, bridge: str, proc: subprocess.Popen | None) -> None:
    """Stop the emulator, give the node's port back to the bridge, delete `em`."""
    if not em.exists:
        return
    kill_namespace_processes(em.name)
    if proc is not None:
        proc.wait(5)
    # The node's own veth end must leave before the namespace goes, or it dies with it.
    if link_exists(em, "le0"):
        if link_exists(ns, port):
            ip_batch(ns, [f"link del {port}"])
        ip_batch(em, ["link set dev le0 down", f"link set dev le0 name {port}", f"link set dev {port} netns {ns.name}"])
        ip_batch(ns, [f"link set {port} master {bridge} up"])
    em.delete()
