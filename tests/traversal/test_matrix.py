"""Every pair of NAT behaviours of notes/natlab.md: two joined nodes ping each
other over their overlay addresses, move a TCP transfer intact, and use the
path the table predicts (direct or relay), as `overlay status --json` reports
it and as the bytes counted on the emulated internet confirm. A UDP-blocked
NAT reaches the relay over TCP. The relay here is `overlay-relay` itself."""

from __future__ import annotations

import pytest

from tests.support import needs_root, needs_tools

from .conftest import MATRIX_WORKERS
from .matrix import PAIRS, Matrix, assert_case, pair_id, selected_pairs, write_summary
from .scenario import Scenario

IFNAME_LETTER = "m"
pytestmark = [needs_root(), needs_tools("conntrack", "ping"), pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def results(request, module_lab, tmp_path_factory, ifprefix):
    module_lab.add_relay()
    workdir = tmp_path_factory.mktemp("matrix")
    scenario = Scenario(module_lab, workdir, ifprefix)
    try:
        scenario.start_relay()
        out = Matrix(module_lab, scenario, MATRIX_WORKERS).run_all(selected_pairs(request))
        write_summary(out, workdir / "summary.txt", "overlay-relay")
        yield out
    finally:
        scenario.close()


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_pair_connects_on_the_expected_path(results, pair):
    assert_case(results[pair])
