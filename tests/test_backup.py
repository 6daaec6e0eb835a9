"""`scepd backup` / `scepd restore`: a consistent copy under load, keys only encrypted, and after a
restore nothing goes backwards for relying parties (CRL numbers continue above the past)."""
from __future__ import annotations

import asyncio
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from scepd.ca.revocation import RevocationReason
from scepd.cli import main
from scepd.ops import backup as backup_mod
from scepd.store.sql import certificates

from .helpers import rsa_key
from .test_revocation_tls import _issue

PASS = {"SCEPD_BACKUP_PASSPHRASE": "backup secret"}


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env or {}, catch_exceptions=False)


async def _all_certs(store) -> dict[str, bytes]:
    rows = await store.read(lambda c: c.execute(sa.select(certificates.c.serial, certificates.c.der)).all())
    return {r.serial: bytes(r.der) for r in rows}


async def test_backup_under_load_then_revoke_then_restore(services, state_dir, tmp_path, make_services):
    keys = [rsa_key(i) for i in range(4)]
    before = [await _issue(services, f"before-{i}", keys[i % 4]) for i in range(3)]
    stop = asyncio.Event()
    during: list = []

    async def load():  # issuance continues while the backup copies the database
        i = 0
        while not stop.is_set() and i < 200:
            during.append(await _issue(services, f"during-{i}", keys[i % 4]))
            i += 1

    loader = asyncio.create_task(load())
    await asyncio.sleep(0)  # the loader is running
    archive = tmp_path / "b.tgz"
    result = await asyncio.to_thread(cli, "backup", "--state-dir", state_dir, "--out", archive,
                                     "--include-keys", env=PASS)
    stop.set()
    await loader
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    # after the backup: a revocation and a CRL relying parties see
    await services.revocation.revoke(before[0].record.serial, RevocationReason.KEY_COMPROMISE, "admin")
    published_before = (await services.crl.current()).number
    original = await _all_certs(services.store)

    new = tmp_path / "restored"
    result = await asyncio.to_thread(cli, "restore", "--state-dir", new, "--from", archive, env=PASS)
    assert result.exit_code == 0, result.output
    for rel in ("ca/ca.key", "ca/root.key"):
        assert (new / rel).read_bytes() == (state_dir / rel).read_bytes()
        assert stat.S_IMODE((new / rel).stat().st_mode) == 0o600
    restored = await make_services({}, directory=new)
    got = await _all_certs(restored.store)
    # consistent: every restored certificate is byte-identical to the original, and everything
    # issued before the backup started is there
    assert got and all(original[s] == der for s, der in got.items())
    assert all(b.record.serial in got for b in before)
    assert len(got) <= len(original)
    # the revocation made after the backup is not in the archive (documented: re-apply it) ...
    assert (await restored.store.get_certificate(before[0].record.serial)).status == "valid"
    # ... but the CRL numbering never goes back
    first_after = (await restored.crl.current()).number
    assert first_after > published_before
    await restored.revocation.revoke(before[0].record.serial, RevocationReason.KEY_COMPROMISE, "admin")
    assert (await restored.crl.current()).number > first_after
    # and the restored CA issues, with serials unused before
    fresh = await _issue(restored, "after-restore", keys[0])
    assert fresh.record.serial not in original


async def test_without_keys_restore_names_the_key_files(services, state_dir, tmp_path):
    archive = tmp_path / "nokeys.tgz"
    result = await asyncio.to_thread(cli, "backup", "--state-dir", state_dir, "--out", archive)
    assert result.exit_code == 0 and "ca/ca.key" in result.output
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers())
    assert "keys.enc" not in names and b"PRIVATE KEY" not in blob
    new = tmp_path / "r"
    result = await asyncio.to_thread(cli, "restore", "--state-dir", new, "--from", archive)
    assert result.exit_code == 0
    assert "put these private key files back" in result.output and "ca/ca.key" in result.output
    assert not (new / "ca" / "ca.key").exists() and (new / "ca" / "ca.pem").exists()


async def test_keys_are_encrypted_and_a_wrong_passphrase_writes_nothing(services, state_dir, tmp_path):
    archive = tmp_path / "k.tgz"
    assert (await asyncio.to_thread(cli, "backup", "--state-dir", state_dir, "--out", archive,
                                    "--include-keys", env=PASS)).exit_code == 0
    with tarfile.open(archive) as tar:
        sealed = tar.extractfile("keys.enc").read()
    assert b"PRIVATE KEY" not in sealed
    new = tmp_path / "r"
    result = await asyncio.to_thread(cli, "restore", "--state-dir", new, "--from", archive,
                                     env={"SCEPD_BACKUP_PASSPHRASE": "wrong"})
    assert result.exit_code == 1 and "wrong backup passphrase" in result.output
    assert not new.exists()
    result = await asyncio.to_thread(cli, "restore", "--state-dir", new, "--from", archive)
    assert result.exit_code == 1 and "SCEPD_BACKUP_PASSPHRASE" in result.output  # no TTY, no variable
    # --include-keys without a passphrase is refused
    result = await asyncio.to_thread(cli, "backup", "--state-dir", state_dir, "--out", tmp_path / "x.tgz",
                                     "--include-keys")
    assert result.exit_code == 1 and not (tmp_path / "x.tgz").exists()


def _rewrite(archive: Path, out: Path, change) -> None:
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    change(members)
    with tarfile.open(out, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


async def test_damaged_or_hostile_archives_are_refused(services, state_dir, tmp_path):
    archive = tmp_path / "a.tgz"
    assert (await asyncio.to_thread(cli, "backup", "--state-dir", state_dir, "--out", archive)).exit_code == 0

    def tamper(m):
        m["files/ca/ca.pem"] = m["files/ca/ca.pem"].replace(b"A", b"B", 1)

    def escape(m):
        manifest = json.loads(m["manifest.json"])
        manifest["files"].append("../evil")
        data = b"x"
        m["files/../evil"] = data
        import hashlib
        manifest["sha256"]["files/../evil"] = hashlib.sha256(data).hexdigest()
        m["manifest.json"] = json.dumps(manifest).encode()

    for change, text in ((tamper, "does not match its checksum"), (escape, "outside a state directory")):
        bad = tmp_path / f"{change.__name__}.tgz"
        _rewrite(archive, bad, change)
        new = tmp_path / f"r-{change.__name__}"
        result = await asyncio.to_thread(cli, "restore", "--state-dir", new, "--from", bad)
        assert result.exit_code == 1 and text in result.output, result.output
        assert not (tmp_path / "evil").exists()
    # never over an existing state directory
    result = await asyncio.to_thread(cli, "restore", "--state-dir", state_dir, "--from", archive)
    assert result.exit_code == 1 and "not empty" in result.output
    assert backup_mod.read_manifest(archive)["database"] == "sqlite"
