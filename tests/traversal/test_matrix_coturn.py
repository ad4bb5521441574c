"""The same NAT-pair matrix with coturn as the TURN server ("bring your own
TURN"): `overlay-relay` only does the rendezvous (its own STUN/TURN moved to
another port) and hands out TURN REST credentials for coturn's `turnserver`,
which shares its secret (`--use-auth-secret --static-auth-secret`). Relayed
pairs must then move their bytes through coturn."""

from __future__ import annotations

import pytest

from overlay.lab.addressing import RELAY_V4

from tests.support import needs_root, needs_tools

from .conftest import MATRIX_WORKERS
from .matrix import PAIRS, Matrix, assert_case, pair_id, selected_pairs, write_summary
from .scenario import STUN_PORT, Scenario

IFNAME_LETTER = "c"
SECRET = "shared-with-coturn"
OWN_TURN_PORT = 3490  # overlay-relay's own STUN/TURN, out of coturn's way
pytestmark = [needs_root(), needs_tools("conntrack", "ping", "turnserver"), pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix-coturn")


@pytest.fixture(scope="module")
def results(request, module_lab, workdir, ifprefix):
    module_lab.add_relay()
    scenario = Scenario(module_lab, workdir, ifprefix)
    try:
        scenario.start_coturn(secret=SECRET, port=STUN_PORT)
        turn = f"turn:{RELAY_V4[0]}:{STUN_PORT}"
        scenario.start_relay(port=OWN_TURN_PORT, secret=SECRET,
                             turn_urls=[f"{turn}?transport=udp", f"{turn}?transport=tcp"])
        out = Matrix(module_lab, scenario, MATRIX_WORKERS).run_all(selected_pairs(request))
        write_summary(out, workdir / "summary.txt", "coturn as TURN")
        yield out
    finally:
        scenario.close()


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_pair_connects_on_the_expected_path_with_coturn(results, pair):
    assert_case(results[pair])


def test_relayed_pairs_were_allocated_on_coturn(results, workdir):
    relayed = [p for p, r in results.items() if r.peer_a and r.peer_a.get("path") == "relay"]
    if not relayed:
        pytest.skip("no pair ended up relayed in this run")
    log = (workdir / "turnserver.log").read_text(errors="replace")
    assert "ALLOCATE processed, success" in log, "coturn never granted an allocation"
