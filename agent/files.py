"""The agent's state directory, written so that a kill at any instant leaves a matching pair.

Layout of DIR (0700):
    key.pem, cert.pem, chain.pem, fullchain.pem   symlinks into current/ (stable paths for users)
    current -> pairs/<serial>                      the installed pair (switched by one rename)
    previous -> pairs/<serial>                     the pair before it, kept until the next install
    pairs/<serial>/{key.pem (0600), cert.pem, chain.pem, fullchain.pem}
    ca.pem                                         the trust anchor (root CA, pinned at enrollment)
    ca-certs.pem                                   the CA certificates last served by GetCACert
    next-ca.pem                                    a successor CA announced by GetNextCACert
    state.json (0600)                              settings given at enrollment and the last checks

Every file is written to a temporary name, fsynced, renamed over its final name, and the
directory is fsynced. A new pair is complete in its own directory before the single atomic
rename of the `current` symlink makes it the installed one, so key and certificate never come
from different pairs, whatever instant the process dies at. Pair directories that are neither
current nor previous (an install cut short) are removed on the next install.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scepd.ca.keyfile import PRIVATE_MODE, fsync_dir, write_private_key

PAIR_FILES = ("key.pem", "cert.pem", "chain.pem", "fullchain.pem")


class SimulatedCrash(BaseException):
    """Raised by the tests' fault hook to stop an install between two steps."""


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """temp file (created with `mode`, so a key is never readable by others, not even briefly),
    fsync, rename over `path`, fsync the directory. Private files (0600: keys, state) go through
    the one key writer, scepd.ca.keyfile: temp file O_EXCL|O_NOFOLLOW, a symlink at `path` refused."""
    if mode == PRIVATE_MODE:
        write_private_key(path, data, replace=True)
        return
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _atomic_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.lnk.{os.getpid()}")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)


def pem_certs(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Pair:
    key: object
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    directory: Path


class AgentDir:
    def __init__(self, root: Path):
        self.root = Path(root).absolute()

    # --- paths users see --------------------------------------------------------------------

    @property
    def key_path(self) -> Path:
        return self.root / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.root / "cert.pem"

    @property
    def chain_path(self) -> Path:
        return self.root / "chain.pem"

    @property
    def fullchain_path(self) -> Path:
        return self.root / "fullchain.pem"

    @property
    def anchor_path(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_certs_path(self) -> Path:
        return self.root / "ca-certs.pem"

    @property
    def next_ca_path(self) -> Path:
        return self.root / "next-ca.pem"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def account_key_path(self) -> Path:
        return self.root / "account-key.pem"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        (self.root / "pairs").mkdir(mode=0o700, exist_ok=True)

    # --- the key/certificate pair -----------------------------------------------------------

    def install(self, key, cert: x509.Certificate, chain: list[x509.Certificate],
                fault: Callable[[str], None] | None = None) -> Pair:
        """Install a new pair; the previous one stays in `previous` until the next install."""
        step = fault or (lambda _name: None)
        self.create()
        serial = format(cert.serial_number, "x")
        pair_dir = self.root / "pairs" / serial
        if pair_dir.exists():
            shutil.rmtree(pair_dir)
        pair_dir.mkdir(mode=0o700)
        step("pair-dir")
        atomic_write(pair_dir / "key.pem", key_pem(key), PRIVATE_MODE)
        step("key-written")
        atomic_write(pair_dir / "cert.pem", pem_certs(cert))
        step("cert-written")
        atomic_write(pair_dir / "chain.pem", pem_certs(*chain))
        atomic_write(pair_dir / "fullchain.pem", pem_certs(cert, *chain))
        fsync_dir(pair_dir.parent)
        step("pair-complete")
        current = self.root / "current"
        if current.is_symlink():
            _atomic_symlink(self.root / "previous", os.readlink(current))
            fsync_dir(self.root)
        step("previous-linked")
        _atomic_symlink(current, f"pairs/{serial}")  # the one atomic switch
        fsync_dir(self.root)
        step("current-switched")
        for name in PAIR_FILES:
            link = self.root / name
            if not link.is_symlink() or os.readlink(link) != f"current/{name}":
                _atomic_symlink(link, f"current/{name}")
        fsync_dir(self.root)
        step("links")
        self.prune()
        return Pair(key, cert, tuple(chain), pair_dir)

    def _linked(self, name: str) -> str | None:
        link = self.root / name
        return os.readlink(link) if link.is_symlink() else None

    def prune(self) -> None:
        keep = {p.rsplit("/", 1)[-1] for p in (self._linked("current"), self._linked("previous")) if p}
        pairs = self.root / "pairs"
        if not pairs.is_dir():
            return
        for sub in pairs.iterdir():
            if sub.name not in keep:
                shutil.rmtree(sub, ignore_errors=True)

    def load_pair(self, which: str = "current") -> Pair | None:
        target = self._linked(which)
        if target is None:
            return None
        d = self.root / target
        try:
            key = serialization.load_pem_private_key((d / "key.pem").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((d / "cert.pem").read_bytes())
            chain_bytes = (d / "chain.pem").read_bytes()
        except (FileNotFoundError, ValueError):
            return None
        chain = tuple(x509.load_pem_x509_certificates(chain_bytes)) if chain_bytes.strip() else ()
        return Pair(key, cert, chain, d)

    def load_cert(self) -> x509.Certificate | None:
        """The installed certificate alone (status needs no key)."""
        target = self._linked("current")
        if target is None:
            return None
        try:
            return x509.load_pem_x509_certificate((self.root / target / "cert.pem").read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    # --- trust ------------------------------------------------------------------------------

    def load_anchor(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.anchor_path.read_bytes())
        except FileNotFoundError:
            return None

    def save_anchor(self, cert: x509.Certificate) -> None:
        atomic_write(self.anchor_path, pem_certs(cert))

    def save_ca_certs(self, certs: list[x509.Certificate]) -> None:
        atomic_write(self.ca_certs_path, pem_certs(*certs))

    def save_next_ca(self, certs: list[x509.Certificate] | None) -> None:
        if certs:
            atomic_write(self.next_ca_path, pem_certs(*certs))
        elif self.next_ca_path.exists():
            self.next_ca_path.unlink()
            fsync_dir(self.root)

    # --- ACME account ----------------------------------------------------------------------

    def load_account_key(self):
        try:
            return serialization.load_pem_private_key(self.account_key_path.read_bytes(), None)
        except FileNotFoundError:
            return None

    def save_account_key(self, key) -> None:
        self.create()
        atomic_write(self.account_key_path, key_pem(key), PRIVATE_MODE)

    # --- state ------------------------------------------------------------------------------

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}

    def save_state(self, state: dict) -> None:
        atomic_write(self.state_path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(), 0o600)
