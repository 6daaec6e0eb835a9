"""bench/flat.py end to end in its --quick mode (20,000 seeded certificates), on SQLite and on a
throwaway PostgreSQL: both phases run every operation with verified replies, and the server sees
the seeded rows (its /metrics counts them as valid). Not a timed test: no figure is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OPS = {"SCEP PKCSReq", "SCEP RenewalReq", "OCSP (known serial)", "CRL fetch", "/metrics scrape",
       "certs list CLI (wall)", "certs list (store call)"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_flat_quick_seeds_and_measures_both_stores(tmp_path, backend):
    args = []
    if backend == "postgresql":
        from tests import pg
        if not pg.available():
            if os.environ.get("SCEPD_REQUIRE_CLIENTS") == "1":
                pytest.fail("PostgreSQL (Debian postgresql) is not installed")
            pytest.skip("PostgreSQL (Debian postgresql) not installed")
        args = ["--postgres"]
    out_json = tmp_path / "flat.json"
    out = subprocess.run([sys.executable, str(REPO / "bench" / "flat.py"), "--quick", *args,
                          "--json", str(out_json)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["failures"] == 0 and result["count"] == 20_000
    assert result["backend"] == ("PostgreSQL" if backend == "postgresql" else "SQLite")
    for phase in ("empty", "seeded"):
        ops = result[phase]["ops"]
        assert set(ops) == OPS
        assert all(o["done"] > 0 and o["failures"] == 0 for o in ops.values()), ops
    # 20,000 seeded, 0.2 % of them revoked, plus what the two phases enrolled
    assert result["seeded"]["metrics"]["scepd_certificates_active"] >= 20_000 - 40
    assert result["empty"]["metrics"]["scepd_certificates_active"] < 100
    assert "| SCEP PKCSReq |" in out.stdout
