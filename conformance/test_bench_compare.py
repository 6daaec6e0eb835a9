"""bench/compare.py end to end in its --quick mode: scepd, micromdm's scepserver and pebble all run,
in a private network namespace, and every scepd reply passes verification. Not a timed test: no
figure of speed is asserted, only that the table is complete and scepd's replies are right."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.conftest import require

REPO = Path(__file__).resolve().parent.parent


def run_compare_quick(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`bench/compare.py --quick --json FILE ARGS` with its prerequisites (the reference servers,
    root for the network namespace); it must succeed. Returns the run and its JSON."""
    for binary in ("scepserver", "pebble", "pebble-challtestsrv", "unshare", "ip"):
        require(binary)
    if os.geteuid() != 0:
        if os.environ.get("SCEPD_REQUIRE_CLIENTS") == "1":
            pytest.fail("bench/compare.py needs root for its network namespace")
        pytest.skip("bench/compare.py needs root for its network namespace")
    out_json = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), "--quick", "--json", str(out_json),
                          *args], capture_output=True, text=True, timeout=170, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out, json.loads(out_json.read_text())


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_compare_quick_runs_all_three_servers(tmp_path, database):
    if database == "postgresql":
        from tests import pg
        if not pg.available():
            if os.environ.get("SCEPD_REQUIRE_CLIENTS") == "1":
                pytest.fail("PostgreSQL (Debian postgresql) is not installed")
            pytest.skip("PostgreSQL (Debian postgresql) is not installed")
    out, result = run_compare_quick(tmp_path, "--database", database)
    assert "network namespace interfaces: lo\n" in out.stdout
    assert result["database"] == database
    rows = result["rows"]
    settings = {(r["protocol"], r["clients"], r["server"]) for r in rows}
    assert settings == {("SCEP", c, s) for c in (1, 8, 32) for s in ("scepd", "micromdm")} | \
                       {("ACME", c, s) for c in (1, 16) for s in ("scepd", "pebble")}
    table = [t for t in (line.split() for line in out.stdout.splitlines())
             if len(t) >= 10 and t[0] in ("SCEP", "ACME") and t[1].isdigit() and not t[2].endswith(":")]
    assert sorted((t[0], int(t[1]), t[2]) for t in table) == sorted(settings)
    for r in rows:
        assert r["sent"] > 0 and r["cpu"] >= 0, r
        if r["server"] == "scepd":
            assert r["failures"] == 0 and r["ok"] == r["sent"] and r["duplicate_serials"] == 0, r
        if r["protocol"] == "ACME":
            # the servers validated http-01 for real: our responder answered each certificate's challenge
            assert r["http01_answered"] >= r["ok"], r
    db_cpu = sum(r["db_cpu"] for r in rows if r["server"] == "scepd")
    if database == "postgresql":  # scepd's store really was the PostgreSQL the run started
        assert db_cpu > 0 and "db ms" in out.stdout, rows
    else:
        assert db_cpu == 0 and "db ms" not in out.stdout, rows
    # the reference servers issued too (their failures are counted, not asserted away)
    assert all(r["ok"] > 0 for r in rows if r["server"] == "pebble")
    assert any(r["ok"] > 0 for r in rows if r["server"] == "micromdm")


def test_compare_rounds_interleave_each_pair_and_print_medians(tmp_path):
    """--rounds 2: each round on servers started afresh; every setting runs against scepd and
    its reference back to back (the first of the pair alternating with the round), each row says
    its round and the machine's steal, and the run ends with the median ratios."""
    out, result = run_compare_quick(tmp_path, "--rounds", "2")
    assert result["rounds"] == 2
    rows = result["rows"]
    expected = {("SCEP", c, s) for c in (1, 8, 32) for s in ("scepd", "micromdm")} | \
               {("ACME", c, s) for c in (1, 16) for s in ("scepd", "pebble")}
    for rnd in (1, 2):
        assert {(r["protocol"], r["clients"], r["server"]) for r in rows if r["round"] == rnd} == expected
    assert all(0.0 <= r["steal"] <= 1.0 for r in rows), rows
    assert all(r["failures"] == 0 and r["ok"] == r["sent"] for r in rows if r["server"] == "scepd"), rows
    # the order the settings ran in: each pair back to back, the first of it alternating
    progress = [line for line in out.stdout.splitlines() if line.startswith("round ") and line.endswith(" ...")]
    assert [line for line in progress if "starting" in line] == [
        f"round {n}: starting scepd, micromdm scepserver and pebble ..." for n in (1, 2)]  # afresh each round
    progress = [line for line in progress if "starting" not in line]
    ran = [line.split(": ", 1)[1].rstrip(" .") for line in progress]
    ran_rounds = [int(line.split()[1].rstrip(":")) for line in progress]
    assert len(ran) == 2 * len(expected), out.stdout
    for i in range(0, len(ran), 2):
        first, second = ran[i].split(", "), ran[i + 1].split(", ")
        assert first[:2] == second[:2], ran  # the same protocol and client count
        assert ran_rounds[i] == ran_rounds[i + 1]
        assert "scepd" in (first[2], second[2]) and first[2] != second[2], ran
        assert (first[2] == "scepd") == (ran_rounds[i] % 2 == 1), ran
    medians = out.stdout.split("medians over the rounds", 1)[1]
    for protocol, clients in (("SCEP", 1), ("SCEP", 8), ("SCEP", 32), ("ACME", 1), ("ACME", 16)):
        assert f"{protocol} {clients:>2} clients: x ok/s " in medians, medians
