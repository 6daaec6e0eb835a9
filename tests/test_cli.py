"""The scepd command line, through click's runner (no server process)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from scepd.ca import pki
from scepd.cli import main


ROOT_ENV = {"SCEPD_ROOT_KEY_PASSPHRASE": "root secret"}


@pytest.fixture(scope="module")
def initialised(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "state"
    result = CliRunner().invoke(main, ["init", "--state-dir", str(d), "--org", "Example"], env=ROOT_ENV)
    assert result.exit_code == 0, result.output
    return d


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def test_init_layout_and_permissions(initialised):
    ca = initialised / "ca"
    for name in ("ca.key", "root.key"):
        assert stat.S_IMODE((ca / name).stat().st_mode) == 0o600
    assert (initialised / "scepd.toml").exists() and (initialised / "scepd.db").exists()
    root = x509.load_pem_x509_certificate((ca / "root.pem").read_bytes())
    inter = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    assert root.public_key().key_size == 4096 and inter.public_key().key_size == 2048
    assert (root.not_valid_after_utc - root.not_valid_before_utc).days >= 365 * 20
    assert 365 * 5 <= (inter.not_valid_after_utc - inter.not_valid_before_utc).days < 365 * 5 + 3
    ku = inter.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and ku.key_cert_sign and ku.crl_sign
    inter.verify_directly_issued_by(root)
    assert "O=Example" in inter.subject.rfc4514_string()


def test_init_refuses_to_overwrite(initialised):
    before = (initialised / "ca" / "ca.key").read_bytes()
    result = run("init", "--state-dir", initialised)
    assert result.exit_code == 1 and "refusing to overwrite" in result.output
    assert (initialised / "ca" / "ca.key").read_bytes() == before


def test_ca_root_and_chain(initialised):
    root = x509.load_pem_x509_certificates(run("ca", "root", "--state-dir", initialised).output.encode())
    chain = x509.load_pem_x509_certificates(run("ca", "chain", "--state-dir", initialised).output.encode())
    assert len(root) == 1 and len(chain) == 2 and chain[1] == root[0]
    assert chain[0].issuer == root[0].subject


def test_challenge_create_prints_only_the_secret_and_stores_a_hash(initialised):
    result = run("challenge", "create", "--state-dir", initialised, "--ttl", "10m", "--cn", "host-*")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 1 and len(lines[0]) == 32
    db = (initialised / "scepd.db").read_bytes() + b"".join(
        p.read_bytes() for p in initialised.glob("scepd.db-wal"))
    assert lines[0].encode() not in db
    import hashlib
    assert hashlib.sha256(lines[0].encode()).hexdigest().encode() in db


def test_challenge_create_bad_ttl(initialised):
    result = run("challenge", "create", "--state-dir", initialised, "--ttl", "forever")
    assert result.exit_code == 1 and "duration" in result.output


def test_certs_list_empty_json(initialised):
    result = run("certs", "list", "--state-dir", initialised, "--json")
    assert json.loads(result.output) == []
    assert run("certs", "show", "--state-dir", initialised, "abcd").exit_code == 1


def test_encrypted_ca_keys(tmp_path):
    env = {"SCEPD_CA_KEY_PASSPHRASE": "correct horse"}
    d = tmp_path / "enc"
    assert run("init", "--state-dir", d, "--insecure-unencrypted-root-key", env=env).exit_code == 0
    assert b"ENCRYPTED" in (d / "ca" / "ca.key").read_bytes()
    assert pki.load(d, b"correct horse").key is not None
    with pytest.raises(pki.PkiError, match="encrypted"):
        pki.load(d, None)
    with pytest.raises(pki.PkiError, match="passphrase"):
        pki.load(d, b"wrong")


def test_loading_a_group_readable_key_is_refused(tmp_path):
    d = tmp_path / "perm"
    assert run("init", "--state-dir", d, "--insecure-unencrypted-root-key").exit_code == 0
    os.chmod(d / "ca" / "ca.key", 0o640)
    with pytest.raises(pki.PkiError, match="chmod 600"):
        pki.load(d, None)


def test_import_bring_your_own(tmp_path, initialised):
    src = initialised / "ca"
    d = tmp_path / "byo"
    result = run("init", "--state-dir", d, "--import-ca-cert", src / "ca.pem", "--import-ca-key",
                 src / "ca.key", "--import-chain", src / "root.pem")
    assert result.exit_code == 0, result.output
    assert (d / "ca" / "ca.pem").read_bytes() == (src / "ca.pem").read_bytes()
    assert not (d / "ca" / "root.key").exists()
    assert pki.load(d, None).root == x509.load_pem_x509_certificate((src / "root.pem").read_bytes())


def test_import_refuses_ec_issuing_ca(tmp_path, initialised):
    key = ec.generate_private_key(ec.SECP256R1())
    root_key = serialization.load_pem_private_key((initialised / "ca" / "root.key").read_bytes(),
                                                  ROOT_ENV["SCEPD_ROOT_KEY_PASSPHRASE"].encode())
    root = x509.load_pem_x509_certificate((initialised / "ca" / "root.pem").read_bytes())
    import datetime as dt
    cert = pki.issue_intermediate(root, root_key, key.public_key(),
                                  x509.Name.from_rfc4514_string("CN=EC CA"),
                                  dt.datetime.now(dt.timezone.utc), dt.timedelta(days=30))
    (tmp_path / "ec.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ec.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    result = run("init", "--state-dir", tmp_path / "ec", "--import-ca-cert", tmp_path / "ec.pem",
                 "--import-ca-key", tmp_path / "ec.key", "--import-chain", initialised / "ca" / "root.pem")
    assert result.exit_code == 1
    assert "must be RSA" in result.output


def test_import_refuses_mismatched_key(tmp_path, initialised):
    src = initialised / "ca"
    result = run("init", "--state-dir", tmp_path / "mm", "--import-ca-cert", src / "ca.pem",
                 "--import-ca-key", src / "root.key", "--import-chain", src / "root.pem",
                 "--import-key-passphrase-env", "SCEPD_ROOT_KEY_PASSPHRASE", env=ROOT_ENV)
    assert result.exit_code == 1 and "does not match" in result.output
