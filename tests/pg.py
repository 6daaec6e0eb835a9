"""A real PostgreSQL 15 (Debian `postgresql`) started for the tests: a throwaway cluster in a
temporary directory, listening on 127.0.0.1 only, stopped at the end of the session."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def available() -> bool:
    return _bin("initdb") is not None and _bin("pg_ctl") is not None


class PostgresCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="scepd-pg-"))
        self.data = self.dir / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root: run as the postgres user
            user = "postgres"
            pwd.getpwnam(user)
            shutil.chown(self.dir, user)
            self._as_user = ["runuser", "-u", user, "--"]

    def _run(self, *cmd: str) -> None:
        out = subprocess.run([*self._as_user, *cmd], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {out.stdout}{out.stderr}")

    def start(self, durable: bool = False) -> "PostgresCluster":
        """durable=False (the tests): fsync off, a crash may lose the cluster. durable=True (the
        benchmarks): fsync and synchronous_commit on, as in production."""
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        sync = "" if durable else " -c fsync=off"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir}{sync}",
                  "start")
        return self

    def create_database(self, name: str) -> str:
        self._run(_bin("psql") or "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  "-c", f'CREATE DATABASE "{name}"')
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
