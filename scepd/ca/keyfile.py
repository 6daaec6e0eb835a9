"""Writing private keys: the one helper every private key write goes through (server and agent).

A key file is created 0600 with O_EXCL|O_NOFOLLOW (a file or symlink planted at its path is never
written through), fsynced, and its directory is fsynced, so a key that `init` reported as written
survives a power cut. A key that is replaced in place (the server's TLS and OCSP keys, the agent's
keys) goes to a fresh temporary file created the same way and is renamed over the old one; a
symlink at the target path is refused rather than replaced.
"""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

PRIVATE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path, data: bytes) -> None:
    """O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600 whatever the umask; removed again if writing fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                 PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_private_key(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write `data` to `path`, readable by its owner only.

    replace=False: `path` must not exist (FileExistsError otherwise, also for a dangling symlink).
    replace=True: atomically replace a regular file at `path` (a symlink there: OSError ELOOP).
    """
    path = Path(path)
    if replace:
        if path.is_symlink():
            raise OSError(errno.ELOOP, "is a symbolic link; refusing to write a private key through it",
                          str(path))
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        _create(tmp, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    else:
        _create(path, data)
    fsync_dir(path.parent)
