"""strongSwan pki 5.9 (Debian strongswan-pki + libstrongswan-extra-plugins for curl)."""
from __future__ import annotations

import pytest

from .conftest import require, run


@pytest.fixture
def ca_files(server, tmp_path):
    pki = require("pki")
    out = run([pki, "--scepca", "--url", server.url, "--caout", tmp_path / "ca.pem", "--outform", "pem"],
              cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # pki writes the root as ca.pem and the issuing CA as ca-1.pem (wire order: issuing CA first)
    assert (tmp_path / "ca-1.pem").exists() and (tmp_path / "ca.pem").exists()
    return tmp_path / "ca-1.pem", tmp_path / "ca.pem"


@pytest.mark.parametrize("cipher", ["aes", "des3"])
def test_pki_scep_enrolls(server, tmp_path, ca_files, cipher):
    issuing, root = ca_files
    pki = require("pki")
    key = tmp_path / "key.pem"
    gen = run([pki, "--gen", "--type", "rsa", "--size", "2048", "--outform", "pem"])
    key.write_text(gen.stdout)
    out = run([pki, "--scep", "--url", server.url, "--in", key, "--dn", f"CN=sw-{cipher}",
               "--san", f"sw-{cipher}.example.test", "--password", server.new_challenge(),
               "--cacert-enc", issuing, "--cacert-sig", issuing, "--cacert", root,
               "--cipher", cipher, "--outform", "pem"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (tmp_path / "cert.pem").write_text(out.stdout)
    cert = server.verify(tmp_path / "cert.pem", key)
    assert cert.subject.rfc4514_string() == f"CN=sw-{cipher}"
