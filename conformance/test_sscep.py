"""sscep 0.10 (not packaged for Debian): runs when `sscep` is on PATH, reported skipped otherwise."""
from __future__ import annotations

import shutil

import pytest

from .conftest import assert_subject_kept, run

pytestmark = pytest.mark.skipif(shutil.which("sscep") is None, reason="sscep is not on PATH")


def _getca(server, tmp_path):
    out = run(["sscep", "getca", "-u", server.url, "-c", tmp_path / "ca.crt"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    return tmp_path / "ca.crt-0"


def _csr(tmp_path, cn, challenge):
    cnf = tmp_path / "req.cnf"
    cnf.write_text(f"[req]\nprompt=no\ndistinguished_name=dn\nattributes=attrs\n[dn]\nO=interop-lab\nCN={cn}\n"
                   f"[attrs]\nchallengePassword={challenge}\n")
    out = run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / "key.pem",
               "-out", tmp_path / "req.csr", "-config", cnf])
    assert out.returncode == 0, out.stderr


def test_sscep_getca_wire_order(server, tmp_path):
    first = _getca(server, tmp_path)
    assert first.read_bytes() == server.ca_pem.read_bytes()
    assert (tmp_path / "ca.crt-1").read_bytes() == server.root_pem.read_bytes()


@pytest.mark.parametrize("method", ["post", "get"])
@pytest.mark.parametrize("cipher", ["aes", "3des"])
@pytest.mark.parametrize("digest", ["sha256", "sha1"])
def test_sscep_enroll(server, get_only_server, tmp_path, method, cipher, digest):
    srv = server if method == "post" else get_only_server
    ca = _getca(srv, tmp_path)
    cn = f"sscep-{method}-{cipher}-{digest}"
    _csr(tmp_path, cn, srv.new_challenge())
    out = run(["sscep", "enroll", "-u", srv.url, "-c", ca, "-k", tmp_path / "key.pem",
               "-r", tmp_path / "req.csr", "-l", tmp_path / "cert.pem", "-E", cipher, "-S", digest,
               "-t", "1", "-n", "3", "-v"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    cert = srv.verify(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert cert.subject.rfc4514_string() == f"CN={cn},O=interop-lab"
    assert_subject_kept(cert, tmp_path / "req.csr")


def test_sscep_wrong_challenge_fails_with_badrequest(server, tmp_path):
    ca = _getca(server, tmp_path)
    _csr(tmp_path, "sscep-bad", "wrong")
    out = run(["sscep", "enroll", "-u", server.url, "-c", ca, "-k", tmp_path / "key.pem",
               "-r", tmp_path / "req.csr", "-l", tmp_path / "cert.pem", "-t", "1", "-n", "1"], cwd=tmp_path)
    assert out.returncode == 72, out.stdout + out.stderr  # sscep: 70 + failInfo badRequest (2)
    assert not (tmp_path / "cert.pem").exists()
