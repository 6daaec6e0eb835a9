"""Console sessions that work with `serve --workers N`: nothing is kept in memory. The cookie is
`<token id>.<expiry unix>.<session id>.<HMAC-SHA256>` with a key in the state directory (created
once, shared by every worker); each request also checks, in the store, that the admin token is
still live (not revoked) and that the session was not signed out (sign-out records the session
id until its expiry, so a copy of the cookie stops working too).
CSRF tokens are HMACs of the session (or of the admin certificate's serial), so they need no
storage either."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

COOKIE = "scepd_console"
#: before sign-in: a random nonce the login form's CSRF token is bound to
PRE_COOKIE = "scepd_console_login"
SESSION_TTL = dt.timedelta(hours=8)
KEY_FILE = "console-session.key"
_SID = re.compile(r"[A-Za-z0-9_-]{16}")


@dataclass(frozen=True)
class Session:
    token_id: int
    sid: str  # random, in the cookie: what sign-out records
    expires: dt.datetime


def load_key(state_dir: Path) -> bytes:
    """The session key in the state directory, created on first use. Concurrent workers race
    safely: the key is written to a private temporary file, then linked into place (the link
    fails if another worker won; everyone then reads the winner's key)."""
    path = Path(state_dir) / KEY_FILE
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


def _mac(key: bytes, text: str) -> str:
    return base64.urlsafe_b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest()).decode().rstrip("=")


class Sessions:
    def __init__(self, key: bytes, clock, ttl: dt.timedelta = SESSION_TTL):
        self.key = key
        self.clock = clock
        self.ttl = ttl

    def issue(self, token_id: int) -> tuple[str, int]:
        """A cookie value for this token (a new session id), and its lifetime in seconds."""
        expiry = int((self.clock.now() + self.ttl).timestamp())
        body = f"{token_id}.{expiry}.{secrets.token_urlsafe(12)}"
        return f"{body}.{_mac(self.key, 'session|' + body)}", int(self.ttl.total_seconds())

    def verify(self, value: str | None) -> Session | None:
        """The session of a genuine, unexpired session cookie, else None (whether it was signed
        out is the store's to say: queries.session_live)."""
        if not value or len(value) > 200:
            return None
        parts = value.split(".")
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit() or not _SID.fullmatch(parts[2]):
            return None
        body = ".".join(parts[:3])
        if not hmac.compare_digest(parts[3], _mac(self.key, "session|" + body)):
            return None
        expiry = int(parts[1])
        if expiry <= self.clock.now().timestamp():
            return None
        return Session(int(parts[0]), parts[2], dt.datetime.fromtimestamp(expiry, dt.timezone.utc))

    def csrf(self, binding: str) -> str:
        """The CSRF token of a session cookie value, a certificate serial or a login nonce."""
        return _mac(self.key, "csrf|" + binding)

    def csrf_ok(self, binding: str, supplied: str | None) -> bool:
        return bool(supplied) and hmac.compare_digest(str(supplied), self.csrf(binding))
