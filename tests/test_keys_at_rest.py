"""Keys at rest: the root key is encrypted (or written elsewhere), every private key is written
0600 without following symlinks and durably, and the server refuses keys others may read."""
from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scepd import cli
from scepd.ca import pki
from scepd.cli import main
from scepd.ca.keyfile import write_private_key

from .helpers import rsa_key

PASSPHRASE = "correct horse battery"
WITH_PASSPHRASE = {"SCEPD_ROOT_KEY_PASSPHRASE": PASSPHRASE}
NO_PASSPHRASE = {"SCEPD_ROOT_KEY_PASSPHRASE": None, "SCEPD_CA_KEY_PASSPHRASE": None}


@pytest.fixture
def fast_init(monkeypatch):
    """`scepd init` as is, with a 2048-bit root (a 4096-bit one only costs time here)."""
    monkeypatch.setattr(pki, "create", functools.partial(pki.create, root_bits=2048))


def scepd(*args, env=None, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, input=input)


def _root_key_matches(key_pem: bytes, passphrase: bytes | None, state_dir: Path) -> bool:
    key = serialization.load_pem_private_key(key_pem, passphrase)
    root = x509.load_pem_x509_certificate((state_dir / "ca" / "root.pem").read_bytes())
    return key.public_key() == root.public_key()


# --- init ---------------------------------------------------------------------------------------


def test_init_without_a_passphrase_and_without_a_terminal_refuses(tmp_path, fast_init):
    d = tmp_path / "state"
    result = scepd("init", "--state-dir", d, env=NO_PASSPHRASE)
    assert result.exit_code == 1
    assert "SCEPD_ROOT_KEY_PASSPHRASE" in result.output and "--insecure-unencrypted-root-key" in result.output
    assert not pki.exists(d) and not (d / "ca" / "root.key").exists()


def test_init_encrypts_the_root_key_and_rollover_needs_its_passphrase(tmp_path, fast_init):
    d = tmp_path / "state"
    result = scepd("init", "--state-dir", d, env=WITH_PASSPHRASE)
    assert result.exit_code == 0, result.output
    assert "OFFLINE" in result.output and str(d / "ca" / "root.key") in result.output
    key_path = d / "ca" / "root.key"
    key_pem = key_path.read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")  # PKCS#8, encrypted
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, None)
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(key_pem, b"wrong")
    assert _root_key_matches(key_pem, PASSPHRASE.encode(), d)
    # the online CA key has its own passphrase (none here): the server starts without the root's
    assert pki.load(d, None).key is not None

    refused = scepd("ca", "rollover", "--state-dir", d, env=NO_PASSPHRASE)
    assert refused.exit_code == 1 and "SCEPD_ROOT_KEY_PASSPHRASE" in refused.output
    wrong = scepd("ca", "rollover", "--state-dir", d, env={"SCEPD_ROOT_KEY_PASSPHRASE": "wrong"})
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.output
    assert pki.load_next(d) is None
    done = scepd("ca", "rollover", "--state-dir", d, env=WITH_PASSPHRASE)
    assert done.exit_code == 0, done.output
    pki.load_next(d).verify_directly_issued_by(pki.load(d, None).root)


def test_init_root_key_out_keeps_no_root_key_in_the_state_dir(tmp_path, fast_init):
    d = tmp_path / "state"
    inside = scepd("init", "--state-dir", d, "--root-key-out", d / "ca" / "root.key", env=WITH_PASSPHRASE)
    assert inside.exit_code == 1 and "inside the state directory" in inside.output
    offline = tmp_path / "offline" / "root.key"
    result = scepd("init", "--state-dir", d, "--root-key-out", offline, env=WITH_PASSPHRASE)
    assert result.exit_code == 0, result.output
    assert str(offline) in result.output and "OFFLINE" in result.output
    assert not list(d.rglob("root.key"))
    assert stat.S_IMODE(offline.stat().st_mode) == 0o600
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(offline.read_bytes(), None)
    assert _root_key_matches(offline.read_bytes(), PASSPHRASE.encode(), d)

    missing = scepd("ca", "rollover", "--state-dir", d, env=WITH_PASSPHRASE)
    assert missing.exit_code == 1 and "--root-key" in missing.output
    done = scepd("ca", "rollover", "--state-dir", d, "--root-key", offline, env=WITH_PASSPHRASE)
    assert done.exit_code == 0, done.output
    assert pki.load_next(d) is not None


def test_init_asks_for_the_root_passphrase_on_a_terminal(tmp_path, fast_init, monkeypatch):
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    d = tmp_path / "state"
    mismatch = scepd("init", "--state-dir", d, env=NO_PASSPHRASE, input="one\ntwo\n")
    assert mismatch.exit_code != 0 and not pki.exists(d)
    result = scepd("init", "--state-dir", d, env=NO_PASSPHRASE, input="typed secret\ntyped secret\n")
    assert result.exit_code == 0, result.output
    assert _root_key_matches((d / "ca" / "root.key").read_bytes(), b"typed secret", d)
    # rollover asks too
    done = scepd("ca", "rollover", "--state-dir", d, env=NO_PASSPHRASE, input="typed secret\n")
    assert done.exit_code == 0, done.output


def test_serve_first_start_encrypts_the_root_key_with_a_passphrase_shown_once(tmp_path, fast_init,
                                                                               monkeypatch):
    """scripts/serve on a fresh machine: no terminal needed, no unencrypted root key either."""
    async def no_listening(cfg, demo_challenge, reloader):
        return None
    monkeypatch.setattr(cli, "_serve", no_listening)
    d = tmp_path / "state"
    first = scepd("serve", "--state-dir", d, "--no-demo-challenge", "--workers", "1",
                   env=NO_PASSPHRASE)
    assert first.exit_code == 0, first.output
    shown = re.search(r"Passphrase of the root CA key \(shown once[^)]*\): (\S+)", first.output)
    assert shown and "OFFLINE" in first.output
    key_pem = (d / "ca" / "root.key").read_bytes()
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, None)
    assert _root_key_matches(key_pem, shown.group(1).encode(), d)
    again = scepd("serve", "--state-dir", d, "--no-demo-challenge", "--workers", "1", env=NO_PASSPHRASE)
    assert again.exit_code == 0 and shown.group(1) not in again.output


# --- refused at start -----------------------------------------------------------------------------


def _key_pem(index: int) -> bytes:
    return rsa_key(index).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())


def _make_key(state_dir: Path, kind: str, clock) -> Path:
    """Put a key of `kind` where the server keeps it, as the server writes it (0600)."""
    d = pki.ca_dir(state_dir)
    if kind == "ra":
        pki.create_ra(state_dir, pki.load(state_dir, None), clock, None)
        return d / "ra.key"
    if kind in ("previous", "next"):
        pki.rollover(state_dir, clock, (d / "root.key").read_bytes(), None, None)
        if kind == "next":
            return pki.next_dir(state_dir) / "ca.key"
        old_id = pki.load(state_dir, None).ca_id
        pki.activate_next(state_dir)
        return pki.previous_dir(state_dir) / old_id / "ca.key"
    if kind == "root":
        return d / "root.key"
    path = state_dir / {"tls": "tls/server.key", "ocsp": "ocsp/responder.key"}[kind]
    pki.write_private(path, _key_pem(1))
    return path


@pytest.mark.parametrize("kind", ["ra", "tls", "ocsp", "previous", "next", "root"])
async def test_start_refuses_a_key_others_may_read_naming_the_file(state_dir, clock, make_services, kind):
    path = _make_key(state_dir, kind, clock)
    services = await make_services()  # 0600: starts
    await services.close()
    os.chmod(path, 0o644)
    with pytest.raises(pki.PkiError) as refused:
        await make_services()
    assert str(path) in str(refused.value) and "chmod 600" in str(refused.value)


def test_serve_refuses_a_group_readable_ra_key(state_dir, clock, monkeypatch):
    path = _make_key(state_dir, "ra", clock)
    os.chmod(path, 0o640)

    async def must_not_listen(*args, **kwargs):
        raise AssertionError("serve got as far as listening")
    monkeypatch.setattr(cli, "_start_sock_site", must_not_listen)
    result = scepd("serve", "--state-dir", state_dir, "--no-demo-challenge")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert f"{path} is readable by group or others" in result.output


# --- the key writer ---------------------------------------------------------------------------------


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    victim.write_bytes(b"not yours")
    victim.chmod(0o644)
    return victim


def test_key_writer_refuses_a_symlink_at_the_target(tmp_path):
    from agent.files import atomic_write
    victim = _victim(tmp_path)
    d = tmp_path / "ca"
    d.mkdir()
    link = d / "ca.key"
    link.symlink_to(victim)
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.write_private(link, b"KEY")
    with pytest.raises(pki.PkiError, match="symbolic link"):
        pki.write_private(link, b"KEY", replace=True)  # TLS/OCSP key renewal
    with pytest.raises(FileExistsError):
        write_private_key(link, b"KEY")
    with pytest.raises(OSError, match="symbolic link"):
        atomic_write(link, b"KEY", 0o600)  # the agent's key writes
    assert victim.read_bytes() == b"not yours" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert link.is_symlink()
    assert sorted(p.name for p in d.iterdir()) == ["ca.key"]  # no temporary file left behind


def test_key_writer_never_writes_through_a_planted_temporary_name(tmp_path):
    """Old writers used a predictable temporary name (KEY.tmp): a symlink planted there was followed."""
    from agent.files import atomic_write
    victim = _victim(tmp_path)
    d = tmp_path / "ca"
    d.mkdir()
    (d / "ca.key.tmp").symlink_to(victim)
    (d / f".key.pem.tmp.{os.getpid()}").symlink_to(victim)
    pki.write_private(d / "ca.key", b"KEY")
    atomic_write(d / "key.pem", b"AGENT KEY", 0o600)
    assert victim.read_bytes() == b"not yours" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    for name, data in (("ca.key", b"KEY"), ("key.pem", b"AGENT KEY")):
        assert not (d / name).is_symlink() and (d / name).read_bytes() == data
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600


def test_key_writer_never_overwrites_and_syncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_IFMT(os.fstat(fd).st_mode))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    old_umask = os.umask(0)
    try:
        pki.write_private(tmp_path / "ca" / "ra.key", b"FIRST")
    finally:
        os.umask(old_umask)
    path = tmp_path / "ca" / "ra.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IFREG in synced and stat.S_IFDIR in synced
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.write_private(path, b"SECOND")
    assert path.read_bytes() == b"FIRST"
    pki.write_private(path, b"RENEWED", replace=True)
    assert path.read_bytes() == b"RENEWED" and stat.S_IMODE(path.stat().st_mode) == 0o600

