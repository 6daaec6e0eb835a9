"""micromdm scepclient 2.1.0 (Debian `scep`): single DES + SHA-1 whatever the caps say."""
from __future__ import annotations

from .conftest import assert_subject_kept, require, run


def _enroll(server, tmp_path, cn, *extra):
    binary = require("scepclient")
    return run([binary, "-server-url", server.url, "-challenge", server.new_challenge(), "-cn", cn,
                "-private-key", tmp_path / "key.pem", "-certificate", tmp_path / "cert.pem", *extra], cwd=tmp_path)


def test_scepclient_gets_badalg_without_legacy_switch(server, tmp_path):
    out = _enroll(server, tmp_path, "scepclient-strict")
    assert out.returncode != 0
    assert "badAlg" in out.stdout + out.stderr
    assert not (tmp_path / "cert.pem").exists()


def test_scepclient_enrolls_with_legacy_switch(legacy_server, tmp_path):
    out = _enroll(legacy_server, tmp_path, "scepclient-legacy", "-organization", "interop-lab")
    assert out.returncode == 0, out.stdout + out.stderr
    cert = legacy_server.verify(tmp_path / "cert.pem", tmp_path / "key.pem")
    # the subject scepclient requests (C, O, OU, CN as Go's PrintableStrings), not CN alone
    assert cert.subject.rfc4514_string() == "CN=scepclient-legacy,OU=MDM,O=interop-lab,C=US"
    assert_subject_kept(cert, tmp_path / "csr.pem")
    listed = legacy_server.scepd("certs", "list", "--json")
    assert format(cert.serial_number, "x") in listed
