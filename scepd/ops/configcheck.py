"""`scepd config check`: every problem of a state directory's configuration, one line each.

The checks call the same parsers and builders `scepd serve` uses (config.load, parse_duration,
the policy and rate-limit builders, pki.load), so a configuration that passes here starts; the
one thing checked only here is that the database answers (without migrating it).
"""
from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from .. import config as config_mod
from ..ca import pki
from ..ca.policy import ENROLLMENT_PROFILES, subject_policy
from ..clock import SystemClock
from ..config import Config, ConfigError, parse_duration, parse_hostport
from ..enroll.enrollment import DUPLICATE_POLICIES
from ..enroll.pipeline import RENEWAL_PROFILE_MODES, approval_policy
from .ratelimit import RateLimiter
from .retention import RetentionSettings

#: (url) -> None when the database answers, else raises with the reason
Probe = Callable[[str], Awaitable[None]]


def _check(problems: list[str], where: str, fn) -> None:
    try:
        fn()
    except (ConfigError, ValueError, pki.PkiError) as exc:
        text = str(exc)
        problems.append(text if text.startswith(("[", where)) else f"{where}: {text}")


def static_problems(cfg: Config) -> list[str]:
    """Everything that needs no database: listeners, URLs, durations, profiles, policies, files."""
    problems: list[str] = []
    s = cfg.server
    listeners: dict[tuple[str, int], str] = {}
    for key in ("http", "https", "mtls", "admin"):
        value = getattr(s, key)
        if value or key == "http":
            _check(problems, f"[server] {key}", lambda v=value: parse_hostport(v))
            try:
                address = parse_hostport(value)
            except ConfigError:
                continue
            if address in listeners and address[1]:
                problems.append(f"[server] {key}: {value} is also [server] {listeners[address]}")
            listeners.setdefault(address, key)
    if s.metrics_on_admin and not s.admin:
        problems.append("[server] metrics_on_admin: needs [server] admin (the admin listener)")
    if s.base_url:
        parts = urlsplit(s.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(f"[server] base_url: expected an http:// or https:// URL, got {s.base_url!r}")
    if s.log_format not in ("text", "json"):
        problems.append(f"[server] log_format: must be text or json, not {s.log_format!r}")
    for where, value in (("[ca] default_validity", cfg.ca.default_validity),
                         ("[ca] crl_validity", cfg.ca.crl_validity),
                         ("[scep] renewal_grace", cfg.scep.renewal_grace)):
        _check(problems, where, lambda v=value: parse_duration(v))
    for where, name in (("[scep] profile", cfg.scep.profile), ("[acme] default_profile", cfg.acme.default_profile)):
        if name not in ENROLLMENT_PROFILES:
            problems.append(f"{where}: unknown profile {name!r} (one of {', '.join(ENROLLMENT_PROFILES)})")
    if cfg.scep.duplicate_subjects not in DUPLICATE_POLICIES:
        problems.append(f"[scep] duplicate_subjects: must be one of {', '.join(DUPLICATE_POLICIES)}, "
                        f"not {cfg.scep.duplicate_subjects!r}")
    if cfg.policy.renewal_profile not in RENEWAL_PROFILE_MODES:
        problems.append(f"[policy] renewal_profile: must be keep or default, not {cfg.policy.renewal_profile!r}")
    _check(problems, "[policy] subject", lambda: subject_policy(cfg))
    _check(problems, "[policy] require_approval", lambda: approval_policy(cfg))
    _check(problems, "[limits]", lambda: RateLimiter.from_config(cfg.limits, SystemClock()))
    _check(problems, "[retention]", lambda: RetentionSettings.from_config(cfg.retention))
    command = cfg.policy.csr_check_command
    if command:
        try:
            program = shlex.split(command)[0]
        except (ValueError, IndexError):
            program = ""
        found = shutil.which(program) if program and "/" not in program else program
        if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
            problems.append(f"[policy] csr_check_command: {program or command!r} is not an executable file")
    problems.extend(_file_problems(cfg))
    return problems


def _file_problems(cfg: Config) -> list[str]:
    problems: list[str] = []
    state = cfg.state_dir
    for path in pki.private_key_files(state):
        try:
            mode = path.stat().st_mode
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(f"{path}: not readable ({exc.strerror})")
            continue
        loose = pki.loose_mode(mode)
        if loose is not None:
            problems.append(f"{path}: readable by group or others (mode {loose:o}); chmod 600 it")
    if not pki.exists(state):
        problems.append(f"{pki.ca_dir(state)}: no CA here; run `scepd init --state-dir {state}`")
        return problems
    env = cfg.ca.key_passphrase_env
    passphrase = os.environ.get(env).encode() if env and os.environ.get(env) else None
    if not any("readable" in p for p in problems):
        try:
            pki.load(state, passphrase)
        except pki.PkiError as exc:
            problems.append(f"{pki.ca_dir(state)}: {exc}")
    return problems


def _database_target(cfg: Config) -> str | None:
    """For a SQLite file: a problem with its directory or file, before connecting."""
    url = cfg.database_url
    if not url.startswith("sqlite"):
        return None
    path = cfg.sqlite_path
    if path is None:
        return f"[database] url: cannot read a file path from {url!r}"
    if not path.parent.is_dir():
        return f"[database] url: directory {path.parent} does not exist"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"[database] {path}: not readable and writable by this user"
    if not path.exists() and not os.access(path.parent, os.W_OK):
        return f"[database] {path.parent}: cannot create the database here (not writable)"
    return None


async def problems(state_dir: Path, probe: Probe) -> list[str]:
    """Every problem found, one line each; [] when the configuration is usable."""
    try:
        cfg = config_mod.load(state_dir)
    except (ConfigError, ValueError) as exc:
        return [str(exc)]
    found = static_problems(cfg)
    target = _database_target(cfg)
    if target:
        found.append(target)
    else:
        try:
            await probe(cfg.database_url)
        except Exception as exc:  # the reason, first line only; never a traceback
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            found.append(f"[database] url: cannot reach the database ({reason[0] if reason else type(exc).__name__})")
    return found


def config_cli():
    """The `scepd config` command group (click is imported here, not by the checks)."""
    import asyncio

    import click

    from ..cli_support import STATE_DIR
    from ..store import SqlStore

    @click.group("config")
    def group() -> None:
        """The configuration file (DIR/scepd.toml and SCEPD_* variables)."""

    @group.command("check")
    @STATE_DIR
    def check(state_dir: Path) -> None:
        """Check every key, the CA files and the database; one line per problem, exit 1 if any."""
        found = asyncio.run(problems(state_dir, SqlStore.probe))
        for line in found:
            click.echo(line, err=True)
        if found:
            click.echo(f"scepd: {len(found)} problem(s) in the configuration of {state_dir}", err=True)
            raise SystemExit(1)
        click.echo(f"configuration of {state_dir}: OK")

    return group
