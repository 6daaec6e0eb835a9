"""strongSwan pki 5.9 (Debian strongswan-pki + libstrongswan-extra-plugins for curl)."""
from __future__ import annotations

import pytest

from .conftest import assert_subject_kept, require, run


@pytest.fixture
def ca_files(server, tmp_path):
    pki = require("pki")
    out = run([pki, "--scepca", "--url", server.url, "--caout", tmp_path / "ca.pem", "--outform", "pem"],
              cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # pki writes the root as ca.pem and the issuing CA as ca-1.pem (wire order: issuing CA first)
    assert (tmp_path / "ca-1.pem").exists() and (tmp_path / "ca.pem").exists()
    return tmp_path / "ca-1.pem", tmp_path / "ca.pem"


def _key(tmp_path, name="key.pem"):
    gen = run([require("pki"), "--gen", "--type", "rsa", "--size", "2048", "--outform", "pem"])
    assert gen.returncode == 0, gen.stderr
    (tmp_path / name).write_text(gen.stdout)
    return tmp_path / name


def _requested_name(tmp_path, key, dn: str) -> bytes:
    """The CSR `pki --req` makes for this DN: the same code turns --dn into the Name that
    `pki --scep` puts in its request."""
    out = run([require("pki"), "--req", "--in", key, "--dn", dn, "--outform", "pem"])
    assert out.returncode == 0, out.stderr
    return out.stdout.encode()


def _scep(server, tmp_path, ca_files, key, dn, *extra, out_name="cert.pem"):
    issuing, root = ca_files
    out = run([require("pki"), "--scep", "--url", server.url, "--in", key, "--dn", dn,
               "--cacert-enc", issuing, "--cacert-sig", issuing, "--cacert", root, "--outform", "pem",
               *extra], cwd=tmp_path)
    if out.returncode == 0:
        (tmp_path / out_name).write_text(out.stdout)
    return out


@pytest.mark.parametrize("cipher, digest, padding", [("aes", "sha256", "pkcs1"), ("des3", "sha256", "pkcs1"),
                                                     ("aes", "sha1", "pkcs1"), ("aes", "sha256", "pss")])
def test_pki_scep_enrolls(server, tmp_path, ca_files, cipher, digest, padding):
    """`--digest sha1` signs the message and the CSR with SHA-1 (GetCACaps advertises SHA-1);
    `--rsa-padding pss` signs the PKIMessage's SignerInfo and the CSR with RSASSA-PSS; the
    issued subject is the requested DN, byte for byte."""
    key = _key(tmp_path)
    cn = f"sw-{cipher}-{digest}-{padding}"
    dn = f"C=US, O=interop-lab, OU=MDM, CN={cn}"
    out = _scep(server, tmp_path, ca_files, key, dn, "--san", f"{cn}.example.test",
                "--password", server.new_challenge(), "--cipher", cipher, "--digest", digest,
                "--rsa-padding", padding)
    assert out.returncode == 0, out.stderr
    cert = server.verify(tmp_path / "cert.pem", key)
    assert cert.subject.rfc4514_string() == f"CN={cn},OU=MDM,O=interop-lab,C=US"
    assert_subject_kept(cert, _requested_name(tmp_path, key, dn))
    serial = format(cert.serial_number, "x")
    [line] = [ln for ln in server.log_text().splitlines() if f"serial={serial}" in ln and "PKIOperation" in ln]
    assert f"digest={digest}" in line, line


def test_pki_scep_renewal_and_a_new_subject_with_a_challenge(server, tmp_path, ca_files):
    """Renewal with --cert/--key (no challenge) keeps the subject; then the same old certificate
    with --password and another --dn (a renewal-shaped request that is no renewal) enrolls as a
    new initial enrollment paid by the challenge, instead of failing on the renewal rules."""
    old_key = _key(tmp_path, "old.key")
    dn = "O=interop-lab, CN=sw-renew"
    assert _scep(server, tmp_path, ca_files, old_key, dn, "--password", server.new_challenge(),
                 out_name="old.pem").returncode == 0
    old = server.verify(tmp_path / "old.pem", old_key)
    new_key = _key(tmp_path, "new.key")
    out = _scep(server, tmp_path, ca_files, new_key, dn, "--cert", tmp_path / "old.pem", "--key", old_key,
                out_name="new.pem")
    assert out.returncode == 0, out.stderr
    new = server.verify(tmp_path / "new.pem", new_key)
    assert new.serial_number != old.serial_number
    assert_subject_kept(new, _requested_name(tmp_path, new_key, dn))
    assert '"certificate.renewed"' in server.scepd("audit", "list", "--serial", format(new.serial_number, "x"))
    # no challenge and another CN: still the renewal refusal
    other_key = _key(tmp_path, "other.key")
    out = _scep(server, tmp_path, ca_files, other_key, "CN=sw-other", "--cert", tmp_path / "new.pem",
                "--key", new_key, "--interval", "1", "--maxpolltime", "1", out_name="refused.pem")
    assert out.returncode != 0 and not (tmp_path / "refused.pem").exists()
    assert "subject CN" in server.log_text()
    # with a valid challenge: an initial enrollment for the new subject
    out = _scep(server, tmp_path, ca_files, other_key, "CN=sw-other", "--cert", tmp_path / "new.pem",
                "--key", new_key, "--password", server.new_challenge(), out_name="other.pem")
    assert out.returncode == 0, out.stderr
    other = server.verify(tmp_path / "other.pem", other_key)
    assert other.subject.rfc4514_string() == "CN=sw-other"
    audit = server.scepd("audit", "list", "--serial", format(other.serial_number, "x"))
    assert '"certificate.issued"' in audit and '"certificate.renewed"' not in audit
