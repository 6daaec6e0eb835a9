"""`pip install .` is the agent alone; the server is the `server` extra; versions are pinned in
constraints.txt (issue 15). The real install into a fresh virtualenv is conformance/test_install.py."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
AGENT_DEPS = {"aiohttp", "cryptography", "asn1crypto", "click"}
SERVER_MODULES = ("sqlalchemy", "aiosqlite", "asyncpg", "prometheus_client", "dns", "josepy", "greenlet")

#: run with these modules unimportable, as on a machine with `pip install .` only
BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in %r:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
""" % (SERVER_MODULES,)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_plain_install_is_the_agent_and_the_server_is_an_extra():
    project = PYPROJECT["project"]
    assert {_name(r) for r in project["dependencies"]} == AGENT_DEPS
    server = {_name(r) for r in project["optional-dependencies"]["server"]}
    assert {"sqlalchemy", "aiosqlite", "asyncpg", "prometheus-client", "dnspython", "josepy"} <= server
    assert "scepd[server]" in project["optional-dependencies"]["test"]
    assert project["license"] == "Apache-2.0"  # SPDX expression (PEP 639), no table


def test_constraints_pin_every_dependency():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[name.lower().replace("_", "-")] = version
    project = PYPROJECT["project"]
    named = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        named |= {_name(r) for r in extra if not r.startswith("scepd")}
    assert named <= set(pins), named - set(pins)
    for script in ("scripts/test", "scripts/serve"):
        assert "-c constraints.txt" in (ROOT / script).read_text(), script


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_every_agent_module_imports_without_the_server_extra():
    out = _run("""
import importlib, pkgutil, agent
for m in pkgutil.iter_modules(agent.__path__):
    if m.name != "__main__":
        importlib.import_module("agent." + m.name)
sys.argv = ["scepd-agent", "--help"]
from agent.cli import main
main()
""")
    assert out.returncode == 0, out.stderr
    assert "scepd-agent" in out.stdout


def test_the_server_command_without_its_extra_says_what_to_install():
    out = _run("sys.argv = ['scepd', '--help']\nfrom scepd.entry import main\nmain()\n")
    assert out.returncode == 1
    assert "pip install 'scepd[server]'" in out.stderr and "Traceback" not in out.stderr
