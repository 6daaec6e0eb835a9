"""A throwaway SoftHSM2 (Debian `softhsm2`) for the tests and benchmarks of PKCS#11 CA keys.

SoftHSM reads SOFTHSM2_CONF and its token directory once, when a process first initializes the
module: every token a process will use must exist before that. So one SoftHsm per test session
creates all its tokens up front (`labels`), and points SOFTHSM2_CONF at its configuration for
this process and its children (`scepd serve` subprocesses inherit it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/local/lib/softhsm/libsofthsm2.so")
PIN = "31415926"
SO_PIN = "27182818"


def module_path() -> str | None:
    return next((p for p in MODULE_CANDIDATES if os.path.exists(p)), None)


def missing() -> str | None:
    """Why SoftHSM tests cannot run here, or None."""
    if module_path() is None or shutil.which("softhsm2-util") is None:
        return "softhsm2 (Debian package softhsm2) is not installed"
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 is not installed (pip install 'scepd[server]')"
    return None


class SoftHsm:
    def __init__(self, directory: Path, labels: tuple[str, ...]):
        self.directory = directory
        tokens = directory / "tokens"
        tokens.mkdir(parents=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                             "log.level = ERROR\nslots.removable = false\n")
        self.pin_file = directory / "pin"
        self.pin_file.write_text(PIN + "\n")
        self.pin_file.chmod(0o600)
        self.module = module_path()
        self.env = {"SOFTHSM2_CONF": str(self.conf)}
        for label in labels:
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
                            "--so-pin", SO_PIN], check=True, capture_output=True, timeout=60,
                           env={**os.environ, **self.env})
        self._previous = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def uri(self, token: str, obj: str, pin_file: Path | None = None) -> str:
        return (f"pkcs11:token={token};object={obj}?module-path={self.module}"
                f"&pin-source=file:{pin_file or self.pin_file}")

    def close(self) -> None:
        if self._previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = self._previous


#: Every token any test uses (see the module docstring: all are made before the first use).
LABELS = ("scepd-ca", "scepd-roll", "scepd-vectors", "scepd-misc")
_shared: SoftHsm | None = None


def shared(tmp_path_factory) -> SoftHsm:
    """The one SoftHSM of this test process (tests/ and conformance/ share it), or a failure
    when softhsm2 is missing and SCEPD_REQUIRE_CLIENTS=1 (a skip otherwise)."""
    import pytest

    global _shared
    reason = missing()
    if reason is not None:
        if os.environ.get("SCEPD_REQUIRE_CLIENTS") == "1":
            pytest.fail(f"{reason} but SCEPD_REQUIRE_CLIENTS=1")
        pytest.skip(reason)
    if _shared is None:
        _shared = SoftHsm(tmp_path_factory.mktemp("softhsm"), LABELS)
    return _shared
