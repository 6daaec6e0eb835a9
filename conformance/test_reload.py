"""Conformance: SIGHUP instead of a restart. sscep reads the next CA `scepd ca rollover` prepared
once the running server reloaded, and enrolls from the CA `scepd ca activate-next` switched to
after a second reload (the server's default worker processes, one per core)."""
from __future__ import annotations

import signal
import time

from cryptography import x509

from .conftest import run, start_server, stop_server
from .test_lifecycle import _chain_pem, _csr, _der_of, _getca, _sscep_enroll, needs_sscep


def _reload(srv) -> None:
    before = srv.log_text().count("reloaded")
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and srv.log_text().count("reloaded") == before:
        assert srv.proc.poll() is None, srv.log_text()
        time.sleep(0.05)
    assert srv.log_text().count("reloaded") > before, srv.log_text()


@needs_sscep
def test_sscep_getnextca_and_enroll_after_sighup_without_restart(tmp_path):
    srv = start_server(tmp_path / "srv", {"SCEPD_ROOT_KEY_PASSPHRASE": "conformance-root-passphrase"})
    try:
        pid = srv.proc.pid
        srv.scepd("ca", "rollover")
        _reload(srv)
        out = run(["sscep", "getnextca", "-u", srv.url, "-C", _chain_pem(srv, tmp_path), "-c",
                   tmp_path / "next.crt", "-v"], cwd=tmp_path)
        assert out.returncode == 0 and "signature ok" in out.stdout, out.stdout + out.stderr
        next_pem = srv.state_dir / "ca" / "next" / "ca.pem"
        assert _der_of(tmp_path / "next.crt-0") == _der_of(next_pem)
        nxt = x509.load_pem_x509_certificate(next_pem.read_bytes())

        srv.scepd("ca", "activate-next")
        _reload(srv)
        _getca(srv, tmp_path)
        _csr(tmp_path, "after", "sscep-after-reload", srv.new_challenge())
        out = _sscep_enroll(srv, tmp_path, "after")
        assert out.returncode == 0, out.stdout + out.stderr
        cert = srv.verify(tmp_path / "after.crt", tmp_path / "after.key")  # ca.pem is the new CA now
        assert cert.issuer == nxt.subject
        cert.verify_directly_issued_by(nxt)
        assert srv.proc.pid == pid and srv.proc.poll() is None  # the same server, never restarted
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.log_text()
