"""Each fuzz harness (fuzz/) for a short, fixed-seed run: it replays its seeds and the crash
inputs kept under tests/data/fuzz/<harness>/, then makes a bounded number of mutations.
A crash (any exception outside what the harness allows) fails the test with atheris' report.
Long runs are fuzz/run.py's job (see fuzz/README.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, VECTORS

pytest.importorskip("atheris", reason="atheris (test extra) has wheels for Linux x86_64 only")

DATA = REPO / "tests" / "data" / "fuzz"
#: harness -> mutations after the seed replay (the slow harnesses sign or decrypt every input)
RUNS = {"scep_message": 400, "scep_envelope": 60, "csr": 400, "der": 3000, "jws": 3000, "ocsp": 3000,
        "acme_payloads": 300}


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_harness_short_run_finds_no_crash(harness, tmp_path, vectors):
    corpus = [tmp_path / "corpus"] + [d for d in (REPO / "fuzz" / "corpus" / harness, DATA / harness) if d.is_dir()]
    env = dict(os.environ, SCEPD_VECTORS=str(VECTORS), PYTHONPATH=str(REPO))
    env.pop("FUZZ_TOLERATE", None)  # known crash classes count here
    proc = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / f"fuzz_{harness}.py"), f"-runs={RUNS[harness]}", "-seed=1",
         "-timeout=20", f"-artifact_prefix={tmp_path}/", *map(str, corpus)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    report = proc.stderr[-4000:]
    assert proc.returncode == 0, f"fuzz_{harness} crashed:\n{report}"
    assert f"Done {RUNS[harness]} runs" in proc.stderr, report
