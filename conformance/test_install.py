"""A real `pip install .` into a fresh virtualenv, no extras: the agent alone (issue 15). Pip
resolves from the configured index with constraints.txt, as scripts/serve and scripts/test do."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_DISTS = {"sqlalchemy", "aiosqlite", "asyncpg", "prometheus-client", "prometheus_client", "dnspython",
                "josepy", "greenlet"}


def test_plain_install_brings_only_the_agent(tmp_path):
    src = tmp_path / "src"  # a copy: pip's in-tree build leaves build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("scepd", "acme", "agent"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    out = subprocess.run(pip + ["install", "-q", "-c", str(src / "constraints.txt"), str(src)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = subprocess.run(pip + ["list", "--format=freeze"], capture_output=True, text=True, timeout=120).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines() if "==" in line}
    assert "scepd" in installed and "cryptography" in installed and "aiohttp" in installed
    assert not installed & SERVER_DISTS, installed & SERVER_DISTS
    agent = subprocess.run([str(venv / "bin" / "scepd-agent"), "--help"], capture_output=True, text=True, timeout=120)
    assert agent.returncode == 0 and "enroll" in agent.stdout, agent.stderr
    server = subprocess.run([str(venv / "bin" / "scepd"), "--help"], capture_output=True, text=True, timeout=120)
    assert server.returncode == 1 and "pip install 'scepd[server]'" in server.stderr
