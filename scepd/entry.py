"""The `scepd` console script. `pip install .` alone is the agent: without the `server` extra the
server's modules are missing, and the command says so in one line instead of a traceback."""
from __future__ import annotations

import sys

#: top-level modules of the `server` extra (pyproject.toml)
SERVER_ONLY = ("sqlalchemy", "aiosqlite", "asyncpg", "prometheus_client", "dns", "josepy", "greenlet")


def main() -> None:
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_ONLY:
            raise
        sys.stderr.write(f"scepd: the server is not installed (module {exc.name} is missing); "
                         "install it with: pip install 'scepd[server]'  (pip install . alone is the agent)\n")
        sys.exit(1)
    cli_main()
