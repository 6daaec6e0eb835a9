"""The systemd units in contrib/systemd start commands that really parse."""
from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest

from agent.cli import main as agent_main
from scepd.cli import main as scepd_main

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def _exec_start(unit: str) -> list[str]:
    lines = [l for l in (UNITS / unit).read_text().splitlines() if l.startswith("ExecStart=")]
    assert len(lines) == 1
    return shlex.split(lines[0].removeprefix("ExecStart="))


@pytest.mark.parametrize("unit,cli,prog", [("scepd.service", scepd_main, "scepd"),
                                           ("scepd-agent.service", agent_main, "scepd-agent")])
def test_unit_exec_start_parses(unit, cli, prog):
    argv = _exec_start(unit)
    assert Path(argv[0]).name == prog
    with cli.make_context(prog, argv[1:], resilient_parsing=False) as ctx:
        sub = cli.get_command(ctx, argv[1])
        assert isinstance(sub, click.Command)
        sub.make_context(argv[1], argv[2:], parent=ctx)  # raises on an unknown option


def test_readme_references_the_units():
    readme = (UNITS.parent.parent / "README.md").read_text()
    assert "contrib/systemd/scepd.service" in readme and "contrib/systemd/scepd-agent.service" in readme


def test_the_agent_reuses_the_codec_never_the_server():
    import subprocess
    import sys
    code = "import sys, agent.cli, agent.core; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=UNITS.parent.parent)
    assert out.returncode == 0, out.stderr
    loaded = {m for m in out.stdout.split() if m.startswith("scepd")}
    assert "scepd.scep.wire" in loaded
    server = {"scepd.http.app", "scepd.scep.service", "scepd.scep.transport", "scepd.store", "scepd.ca.authority",
              "scepd.enroll.enrollment", "scepd.ca.policy", "scepd.ops.agents", "sqlalchemy"}
    assert not (loaded | set(out.stdout.split())) & server
