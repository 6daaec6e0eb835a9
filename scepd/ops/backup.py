"""`scepd backup` / `scepd restore`: a consistent copy of a state directory, taken while the
server runs.

An archive (tar, gzip) holds:
  manifest.json     what is inside, with the SHA-256 of every member
  files/...         scepd.toml and the CA, TLS and OCSP certificates (everything but private keys)
  database/scepd.db the SQLite database, copied with SQLite's online backup (a consistent
                    snapshot while writers continue); PostgreSQL is dumped with pg_dump instead
  keys.enc          only with --include-keys: the private key files, as a tar encrypted with
                    AES-256-GCM under a key derived by scrypt from SCEPD_BACKUP_PASSPHRASE

Restore writes a new state directory (never over an existing one), keys 0600 through the one key
writer, and then moves every CA's CRL number above a number derived from the time of the restore,
so no CRL published after it carries a number already used before it (the backup cannot know
what was published after it was taken). Serial numbers are random 64-bit draws checked against
the inventory, so they stay unique.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import secrets
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .. import __version__
from ..ca import pki
from ..ca.keyfile import PRIVATE_MODE, fsync_dir, write_private_key
from ..config import CONFIG_NAME, Config

PASSPHRASE_ENV = "SCEPD_BACKUP_PASSPHRASE"
FORMAT = 1
#: the directories of a state directory a backup covers (pki.PRIVATE_KEY_DIRS: ca, tls, ocsp)
COVERED_DIRS = pki.PRIVATE_KEY_DIRS
_SCRYPT = {"n": 2 ** 15, "r": 8, "p": 1}
MAX_MEMBER_BYTES = 4 * 1024 ** 3


class BackupError(Exception):
    """A one-line reason for the operator."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    files: list[str]
    keys: list[str]
    keys_included: bool
    database: str  # "sqlite" or "postgresql (not included: use pg_dump)"


@dataclass(frozen=True)
class RestoreResult:
    state_dir: Path
    files: list[str]
    keys_restored: list[str]
    keys_missing: list[str]
    database: str
    crl_numbers_raised: int


def _scan(state_dir: Path) -> tuple[list[str], list[str]]:
    """(plain files, private key files), relative paths, of the covered directories + config."""
    files = [CONFIG_NAME] if (state_dir / CONFIG_NAME).is_file() else []
    keys: list[str] = []
    for sub in COVERED_DIRS:
        base = state_dir / sub
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.is_symlink() or path.name.startswith("."):
                continue
            rel = path.relative_to(state_dir).as_posix()
            (keys if path.suffix == ".key" else files).append(rel)
    return files, keys


def _kdf(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, **_SCRYPT).derive(passphrase)


def _encrypt_keys(state_dir: Path, keys: list[str], passphrase: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in keys:
            data = (state_dir / rel).read_bytes()
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), PRIVATE_MODE
            tar.addfile(info, io.BytesIO(data))
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    header = json.dumps({"kdf": "scrypt", **_SCRYPT, "salt": salt.hex(), "nonce": nonce.hex(),
                         "cipher": "AES-256-GCM"}, sort_keys=True).encode()
    sealed = AESGCM(_kdf(passphrase, salt)).encrypt(nonce, buf.getvalue(), header)
    return len(header).to_bytes(4, "big") + header + sealed


def _decrypt_keys(blob: bytes, passphrase: bytes) -> dict[str, bytes]:
    try:
        size = int.from_bytes(blob[:4], "big")
        header = blob[4:4 + size]
        params = json.loads(header)
        key = Scrypt(salt=bytes.fromhex(params["salt"]), length=32, n=params["n"], r=params["r"],
                     p=params["p"]).derive(passphrase)
        plain = AESGCM(key).decrypt(bytes.fromhex(params["nonce"]), blob[4 + size:], header)
    except InvalidTag:
        raise BackupError("wrong backup passphrase (the keys cannot be decrypted)") from None
    except (ValueError, KeyError, TypeError):
        raise BackupError("the archive's key section is damaged") from None
    out = {}
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r") as tar:
        for member in tar.getmembers():
            out[_safe_name(member.name)] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return out


def _safe_name(rel: str) -> str:
    """Only relative paths inside the covered directories (or the config) may come back."""
    parts = Path(rel).parts
    if rel == CONFIG_NAME:
        return rel
    if not parts or parts[0] not in COVERED_DIRS or ".." in parts or Path(rel).is_absolute():
        raise BackupError(f"the archive names a path outside a state directory: {rel!r}")
    return rel


def _add(tar: tarfile.TarFile, name: str, data: bytes, sums: dict[str, str]) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    info.mtime = int(dt.datetime.now(dt.timezone.utc).timestamp())
    tar.addfile(info, io.BytesIO(data))
    sums[name] = hashlib.sha256(data).hexdigest()


def create(cfg: Config, out: Path, include_keys: bool, passphrase: bytes | None,
           now: dt.datetime) -> BackupResult:
    """Write the archive to `out` (0600, via a temporary file renamed into place)."""
    state = cfg.state_dir
    if not pki.exists(state):
        raise BackupError(f"{state} holds no CA (nothing to back up)")
    if include_keys and not passphrase:
        raise BackupError(f"--include-keys needs a passphrase ({PASSPHRASE_ENV} or the prompt)")
    files, keys = _scan(state)
    sums: dict[str, str] = {}
    db_path = cfg.sqlite_path
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for rel in files:
                _add(tar, f"files/{rel}", (state / rel).read_bytes(), sums)
            if db_path is not None:
                if not db_path.exists():
                    raise BackupError(f"no database at {db_path}")
                with tempfile.TemporaryDirectory(prefix="scepd-backup-") as work:
                    copy = Path(work) / "scepd.db"
                    # SQLite's online backup: a consistent snapshot while the server writes
                    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
                    dst = sqlite3.connect(copy)
                    try:
                        src.backup(dst, pages=1024)
                    finally:
                        dst.close()
                        src.close()
                    _add(tar, "database/scepd.db", copy.read_bytes(), sums)
                database = "sqlite"
            else:
                database = "postgresql (not included: use pg_dump)"
            if include_keys:
                _add(tar, "keys.enc", _encrypt_keys(state, keys, passphrase or b""), sums)
            manifest = {"format": FORMAT, "scepd": __version__, "created_at": now.isoformat(),
                        "files": files, "keys": keys, "keys_included": include_keys,
                        "database": database, "sha256": sums}
            _add(tar, "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode(), {})
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        fsync_dir(out.resolve().parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BackupResult(out, files, keys, include_keys, database)


def read_manifest(archive: Path) -> dict:
    with tarfile.open(archive, mode="r:gz") as tar:
        return _members(tar)[0]


def _members(tar: tarfile.TarFile) -> tuple[dict, dict[str, bytes]]:
    data: dict[str, bytes] = {}
    for member in tar.getmembers():
        if not member.isfile() or member.size > MAX_MEMBER_BYTES:
            raise BackupError(f"unexpected member in the archive: {member.name!r}")
        data[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    try:
        manifest = json.loads(data.pop("manifest.json"))
    except (KeyError, ValueError):
        raise BackupError("not a scepd backup (no readable manifest.json)") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"unsupported backup format {manifest.get('format')!r}")
    for name, blob in data.items():
        if manifest["sha256"].get(name) != hashlib.sha256(blob).hexdigest():
            raise BackupError(f"the archive is damaged: {name} does not match its checksum")
    missing = set(manifest["sha256"]) - set(data)
    if missing:
        raise BackupError(f"the archive is incomplete: {sorted(missing)[0]} is missing")
    return manifest, data


def unpack(archive: Path, state_dir: Path, passphrase: bytes | None) -> RestoreResult:
    """Write the archive's files into a new state directory (the database step that follows
    is `restored_database`). Nothing is written if the archive does not verify."""
    state_dir = Path(state_dir)
    if state_dir.exists() and any(state_dir.iterdir()):
        raise BackupError(f"{state_dir} is not empty; restore into a new directory")
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            manifest, data = _members(tar)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BackupError(f"cannot read {archive}: {exc}") from None
    keys: dict[str, bytes] = {}
    if manifest.get("keys_included"):
        if passphrase:
            keys = _decrypt_keys(data["keys.enc"], passphrase)
    files = [_safe_name(rel) for rel in manifest["files"]]
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for rel in files:
        target = state_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.write_bytes(data[f"files/{rel}"])
    for rel, blob in keys.items():
        target = state_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_key(target, blob)
    if "database/scepd.db" in data:
        db = state_dir / "scepd.db"
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data["database/scepd.db"])
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(state_dir)
    missing = [rel for rel in manifest["keys"] if rel not in keys]
    return RestoreResult(state_dir, files, sorted(keys), missing, manifest["database"], 0)


def commands():
    """`scepd backup` and `scepd restore` (click imported here, not by the functions above)."""
    import asyncio
    import sys

    import click

    from .. import config as config_mod
    from ..ca.crl import raise_numbers, time_floor
    from ..cli_support import STATE_DIR, fail, load_config, with_store
    from ..clock import SystemClock
    from ..store import AuditRecord

    def passphrase(confirm: bool) -> bytes | None:
        value = os.environ.get(PASSPHRASE_ENV)
        if value:
            return value.encode()
        if not sys.stdin.isatty():
            return None
        return click.prompt("backup passphrase", hide_input=True,
                            confirmation_prompt=confirm).encode()

    async def audit(store, event: str, details: dict) -> None:
        async with store.transaction() as tx:
            await tx.audit(AuditRecord(at=SystemClock().now(), event=event, actor="cli", details=details))

    @click.command("backup")
    @STATE_DIR
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
                  help="Archive to write (tar.gz, mode 0600).")
    @click.option("--include-keys", is_flag=True,
                  help=f"Also the private keys, encrypted with ${PASSPHRASE_ENV} (or a prompt).")
    def backup(state_dir: Path, out: Path, include_keys: bool) -> None:
        """A consistent copy of DIR while the server runs (SQLite online backup)."""
        cfg = load_config(state_dir)
        if out.exists():
            fail(f"{out} exists; choose a new file")
        secret = passphrase(confirm=True) if include_keys else None
        if include_keys and not secret:
            fail(f"--include-keys needs a passphrase: set {PASSPHRASE_ENV}")
        try:
            result = create(cfg, out, include_keys, secret, SystemClock().now())
        except (BackupError, OSError, sqlite3.Error) as exc:
            fail(f"backup failed: {exc}")
            return
        asyncio.run(with_store(cfg, lambda s: audit(s, "backup.created", {
            "file": str(out), "keys_included": include_keys, "database": result.database})))
        click.echo(f"wrote {out}: {len(result.files)} files, database: {result.database}, "
                   f"private keys: {'included (encrypted)' if include_keys else 'not included'}")
        if not include_keys and result.keys:
            click.echo("keep these private key files safe separately: " + ", ".join(result.keys))

    @click.command("restore")
    @STATE_DIR
    @click.option("--from", "archive", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                  required=True, help="An archive written by `scepd backup`.")
    def restore(state_dir: Path, archive: Path) -> None:
        """Restore an archive into a NEW state directory; CRL numbers continue above the past."""
        try:
            manifest = read_manifest(archive)
        except (BackupError, OSError, tarfile.TarError, EOFError) as exc:
            fail(f"cannot restore: {exc}")
            return
        secret = passphrase(confirm=False) if manifest.get("keys_included") else None
        if manifest.get("keys_included") and not secret:
            fail(f"the archive holds encrypted private keys: set {PASSPHRASE_ENV}")
        try:
            result = unpack(archive, state_dir, secret)
        except (BackupError, OSError) as exc:
            fail(f"cannot restore: {exc}")
            return
        cfg = load_config(state_dir)
        db = cfg.sqlite_path
        if db is not None and db.resolve() != (state_dir / "scepd.db").resolve():
            click.echo(f"note: the configuration names the database {db}; the restored one is "
                       f"{state_dir / 'scepd.db'} -- edit [database] url", err=True)
        now = SystemClock().now()
        floor = time_floor(now)
        from cryptography import x509
        ca_ids = [pki.ca_id_of(x509.load_pem_x509_certificate(p.read_bytes()))
                  for p in sorted(pki.ca_dir(state_dir).rglob("ca.pem"))]

        async def finish(store):
            raised = await store.write(lambda conn: raise_numbers(conn, floor, ca_ids, now))
            await audit(store, "backup.restored", {"file": str(archive), "crl_number_floor": floor,
                                                   "keys_missing": result.keys_missing})
            return raised
        raised = asyncio.run(with_store(cfg, finish))
        click.echo(f"restored {archive} into {state_dir}: {len(result.files)} files, "
                   f"{len(result.keys_restored)} private keys, database: {result.database}; "
                   f"CRL numbers continue above {floor} ({raised} CA(s))")
        if result.keys_missing:
            click.echo("put these private key files back (0600) before `scepd serve`: "
                       + ", ".join(result.keys_missing))
        if not result.database.startswith("sqlite"):
            click.echo("PostgreSQL: restore the database with pg_restore first; this command then "
                       "moved its CRL numbers on")

    return backup, restore
