"""`scepd-agent` (also `python -m agent`): enroll, run, status, renew, checkin."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from . import __version__, schedule
from .core import Agent, SystemClock, iso, lifetime_of, policy_from_json, policy_json
from .files import AgentDir
from .protocol import AgentError, Identity, fingerprint, normalize_fingerprint, pinned_anchor
from .scep_client import ScepClient, new_key, parse_san

log = logging.getLogger("scepd.agent")

DIR = click.option("--dir", "directory", required=True, envvar="SCEPD_AGENT_DIR",
                   type=click.Path(file_okay=False, path_type=Path),
                   help="State directory: key (0600), certificate, chain, trust anchor, state file.")


def parse_duration(text: str) -> dt.timedelta:
    """30s, 10m, 1h30m, 2m15s, 5d, 2w (or plain seconds)."""
    import re
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return dt.timedelta(seconds=float(text))
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise click.BadParameter(f"expected a duration like 30s, 20m, 2m15s, 5d; got {text!r}")
    return dt.timedelta(seconds=sum(float(n) * units[u] for n, u in parts))


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"scepd-agent: {message}", err=True)
    sys.exit(code)


def _logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


def _policy(interval: str | None, renew_before: str | None, fraction: float | None,
            directory: Path | None = None) -> schedule.Policy:
    """The rules given on the command line; without any, the daemon's (saved in the state file)."""
    if directory is not None and renew_before is None and fraction is None:
        saved = policy_from_json(AgentDir(directory).load_state().get("policy"))
        if saved is not None:
            return saved
    try:
        return schedule.Policy.from_options(parse_duration(interval) if interval else None,
                                            parse_duration(renew_before) if renew_before else None,
                                            fraction)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _challenge(challenge_file: Path | None) -> str | None:
    if challenge_file is not None:
        return challenge_file.read_text().strip() or None
    return os.environ.get("SCEPD_AGENT_CHALLENGE") or None


@click.group()
@click.version_option(__version__, prog_name="scepd-agent")
def main() -> None:
    """scepd-agent: keeps this machine's certificate valid, unattended."""


# --- enroll -----------------------------------------------------------------------------------


DNS01_HOOK = click.option(
    "--dns01-hook", default=None, metavar="CMD",
    help="ACME: answer dns-01 (wildcards, machines without an open port): the shell command CMD sets "
         "and clears the TXT record (env SCEPD_DNS01_ACTION=set|clear, _NAME, _VALUE, _DOMAIN); "
         "remembered for renewals (run --dns01-hook '' forgets it).")


@main.command()
@DIR
@click.option("--server", required=True, help="SCEP URL (http://ca.example:8080/scep), ACME directory "
              "URL (https://ca.example:8443/acme/directory) or EST URL "
              "(https://ca.example:8443/.well-known/est[/LABEL]).")
@click.option("--cn", required=True, help="Subject common name (ACME: a DNS name or IP address).")
@click.option("--san", "sans", multiple=True, help="DNS:name or IP:address (repeatable).")
@click.option("--challenge", default=None, envvar="SCEPD_AGENT_CHALLENGE",
              help="Challenge password (SCEP; EST: the HTTP Basic password) for the first enrollment.")
@click.option("--eab-kid", default=None, envvar="SCEPD_AGENT_EAB_KID",
              help="ACME enrollment token: external account binding key id (`scepd eab create`).")
@click.option("--eab-hmac", default=None, envvar="SCEPD_AGENT_EAB_HMAC",
              help="ACME enrollment token: external account binding HMAC key (base64url).")
@click.option("--protocol", type=click.Choice(["scep", "acme", "est"]), default="scep", show_default=True)
@click.option("--ca-fingerprint", default=None, help="SHA-256 fingerprint of the root CA to trust "
              "(`scepd init` and `scepd serve` print it).")
@click.option("--trust-first-use", is_flag=True, help="Trust whatever root the server presents now.")
@click.option("--mtls-url", default=None, help="Base URL of the server's mTLS listener, "
              "e.g. https://ca.example:8444 (remembered for run/checkin).")
@click.option("--http01-port", type=click.IntRange(1, 65535), default=80, show_default=True,
              help="ACME: port of the agent's http-01 responder (where the server's validator connects; "
                   "it listens only while an order is validated).")
@click.option("--http01-address", default="0.0.0.0", show_default=True,
              help="ACME: address the http-01 responder binds.")
@DNS01_HOOK
@click.option("--force", is_flag=True, help="Enroll again although DIR already holds a certificate.")
@click.option("-v", "--verbose", is_flag=True)
def enroll(directory, server, cn, sans, challenge, eab_kid, eab_hmac, protocol, ca_fingerprint,
           trust_first_use, mtls_url, http01_port, http01_address, dns01_hook, force, verbose):
    """First enrollment: new private key (it never leaves DIR), certificate, pinned CA."""
    _logging(verbose)
    if AgentDir(directory).load_cert() is not None and not force:
        _fail(f"{directory} already holds a certificate: `scepd-agent renew` renews it; "
              "pass --force to enroll again")
    if protocol == "acme":
        if challenge:
            _fail("--challenge is for SCEP; ACME enrolls with --eab-kid and --eab-hmac")
        if bool(eab_kid) != bool(eab_hmac):
            _fail("--eab-kid and --eab-hmac go together")
        if not server.startswith("https://"):
            _fail("the ACME directory URL must be https://")
    else:
        if eab_kid or eab_hmac:
            _fail("--eab-kid/--eab-hmac go with --protocol acme")
        if dns01_hook:
            _fail("--dns01-hook goes with --protocol acme")
        if not challenge:
            _fail(f"--challenge is required for {protocol.upper()} enrollment")
        if protocol == "est" and not server.startswith("https://"):
            _fail("the EST URL must be https:// (e.g. https://ca.example:8443/.well-known/est)")
    try:
        for s in sans:
            parse_san(s)
        pin = normalize_fingerprint(ca_fingerprint) if ca_fingerprint else None
        identity = Identity(cn, tuple(sans))
        if protocol == "acme":
            from .acme_client import identifiers_of
            for ident in identifiers_of(identity):
                if ident["type"] == "dns" and not _dns_name(ident["value"]):
                    raise ValueError(f"{ident['value']!r} is not a DNS name or IP address (ACME names only those)")
                if ident["value"].startswith("*.") and not dns01_hook:
                    raise ValueError(f"{ident['value']!r}: a wildcard is validated by dns-01 only: pass --dns01-hook")
    except (ValueError, AgentError) as exc:
        _fail(str(exc))
        return
    if pin is None and not trust_first_use:
        _fail("refusing to trust the server's CA on first use: pass --ca-fingerprint SHA256 "
              "(printed by `scepd serve`) or --trust-first-use")
    try:
        if protocol == "acme":
            asyncio.run(_enroll_acme(AgentDir(directory), server, identity,
                                     f"{eab_kid}:{eab_hmac}" if eab_kid else "", pin, mtls_url,
                                     http01_address, http01_port, dns01_hook=dns01_hook))
        elif protocol == "est":
            asyncio.run(_enroll_est(AgentDir(directory), server, identity, challenge, pin, mtls_url))
        else:
            asyncio.run(_enroll(AgentDir(directory), server, identity, challenge, pin, mtls_url))
    except AgentError as exc:
        _fail(str(exc))


def _dns_name(value: str) -> bool:
    from scepd.ca.policy import valid_dns_name
    return valid_dns_name(value, allow_wildcard=True)


async def _enroll_pinned(client_class, protocol: str, ca_source: str, directory: AgentDir, server: str,
                         identity: Identity, challenge: str, pin: str | None, mtls_url: str | None,
                         hostname: str | None) -> None:
    """SCEP and EST alike: the CA certificates fetched unverified, the anchor chosen by its pin
    (or trusted on first use), then enrollment verified against it."""
    anchor = pinned_anchor(await client_class(server, None).fetch_ca_certs(), pin, ca_source)
    if pin is None:
        log.warning("trusting on first use: %s SHA-256 %s", anchor.subject.rfc4514_string(), fingerprint(anchor))
    directory.create()
    directory.save_anchor(anchor)
    key = await asyncio.to_thread(new_key)
    issued = await client_class(server, anchor).enroll(key, identity, challenge)
    directory.save_ca_certs(issued.ca_certs)
    await _installed(directory, server, protocol, identity, anchor, key, issued, mtls_url, hostname)


async def _enroll(directory: AgentDir, server: str, identity: Identity, challenge: str,
                  pin: str | None, mtls_url: str | None, hostname: str | None = None) -> None:
    await _enroll_pinned(ScepClient, "scep", "GetCACert", directory, server, identity, challenge, pin,
                         mtls_url, hostname)


async def _enroll_est(directory: AgentDir, server: str, identity: Identity, challenge: str,
                      pin: str | None, mtls_url: str | None, hostname: str | None = None) -> None:
    """EST: cacerts over an unverified connection, then TLS verified against the pinned anchor
    (agent/est_client.py)."""
    from .est_client import EstClient
    await _enroll_pinned(EstClient, "est", "EST cacerts", directory, server, identity, challenge, pin,
                         mtls_url, hostname)


async def _enroll_acme(directory: AgentDir, server: str, identity: Identity, token: str, pin: str | None,
                       mtls_url: str | None, http01_address: str, http01_port: int,
                       hostname: str | None = None, dns01_hook: str | None = None) -> None:
    from .acme_client import bootstrap_anchor
    from .core import acme_client_for
    anchor = await bootstrap_anchor(server, pin)
    directory.create()
    directory.save_anchor(anchor)
    state = directory.load_state()
    if state.get("server") != server:  # another server: its account is no use here
        state.pop("acme", None)
    state.update(server=server, protocol="acme")
    state.setdefault("acme", {}).update(http01_address=http01_address, http01_port=http01_port,
                                        dns01_hook=dns01_hook or None)
    directory.save_state(state)
    key = await asyncio.to_thread(new_key)
    issued = await acme_client_for(directory.load_state(), directory, anchor).enroll(key, identity, token)
    await _installed(directory, server, "acme", identity, anchor, key, issued, mtls_url, hostname)


async def _installed(directory: AgentDir, server: str, protocol: str, identity: Identity, anchor, key,
                     issued, mtls_url: str | None, hostname: str | None) -> None:
    """After the first enrollment (either protocol): install, record, report, first check-in."""
    directory.install(key, issued.cert, issued.chain)
    state = directory.load_state()
    state.update(server=server, protocol=protocol, mtls_url=mtls_url, ca_fingerprint=fingerprint(anchor),
                 identity={"cn": identity.common_name, "sans": list(identity.sans)},
                 enrolled_at=iso(SystemClock().now()), failures=0,
                 last_renewal={"at": iso(SystemClock().now()), "serial": format(issued.cert.serial_number, "x"),
                               "how": "enrolled"})
    directory.save_state(state)
    click.echo(f"enrolled: serial {format(issued.cert.serial_number, 'x')}, "
               f"not after {iso(issued.cert.not_valid_after_utc)}")
    click.echo(f"key: {directory.key_path}  cert: {directory.cert_path}  chain: {directory.chain_path}")
    if mtls_url:
        agent = Agent(directory, schedule.Policy.from_options(None, None, None), hostname=hostname)
        if await agent.checkin() is None:
            raise AgentError("enrolled, but the first mTLS check-in failed (see the log above)")
        click.echo("checked in over mTLS")


# --- run --------------------------------------------------------------------------------------


RULES = [click.option("--renew-before", default=None, help="Renew when less than this is left (e.g. 5d)."),
         click.option("--renew-at-fraction", type=float, default=None,
                      help="Renew when this fraction of the lifetime is left (e.g. 0.33).")]


def _rules(fn):
    for opt in reversed(RULES):
        fn = opt(fn)
    return fn


@main.command()
@DIR
@click.option("--interval", default="20m", show_default=True, help="Time between checks (+-10% jitter).")
@_rules
@click.option("--on-renew", default=None, help="Shell command run after each installation "
              "(env: SCEPD_AGENT_KEY, _CERT, _CHAIN, _FULLCHAIN, _CA, _SERIAL, _NOT_AFTER, _DIR).")
@click.option("--challenge-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Challenge used to enroll again if the certificate has expired "
                   "(or SCEPD_AGENT_CHALLENGE); without one an expired certificate is only reported.")
@click.option("--reuse-key", is_flag=True, help="Renew with the same key (default: a new key each time; "
              "the server must allow it: SCEPD_SCEP_RENEWAL_SAME_KEY=1).")
@DNS01_HOOK
@click.option("-v", "--verbose", is_flag=True)
@click.option("--check-once-fd", type=int, default=None, hidden=True,
              help="Internal (agent.daemon): run one check, write the next check's instant to this fd.")
def run(directory, interval, renew_before, renew_at_fraction, on_renew, challenge_file, reuse_key, dns01_hook,
        verbose, check_once_fd):
    """The daemon: check every interval, renew inside the threshold, check in over mTLS."""
    _logging(verbose)
    policy = _policy(interval, renew_before, renew_at_fraction)
    agent_dir = AgentDir(directory)
    from .daemon import CHALLENGE_ENV, exec_supervisor
    if check_once_fd is not None:  # the challenge as read at the daemon's start; not for the hook
        challenge = os.environ.pop(CHALLENGE_ENV, None)
    else:
        challenge = _challenge(challenge_file)
    agent = Agent(agent_dir, policy, on_renew=on_renew, challenge=challenge, reuse_key=reuse_key)
    if check_once_fd is not None:
        _check_once(agent, check_once_fd)
        return
    state = agent_dir.load_state()
    if state:
        state["policy"] = policy_json(policy)
        if dns01_hook is not None:  # kept in the state: every check (and renew) uses it
            state.setdefault("acme", {})["dns01_hook"] = dns01_hook or None
        agent_dir.save_state(state)
    log.info("scepd-agent %s: dir %s, interval %s, renew-before %s, renew-at-fraction %s", __version__,
             directory, policy.interval, policy.renew_before, policy.renew_at_fraction)
    # the idle daemon is a small supervisor (agent/daemon.py) running each check in a child
    # process with these same options (the challenge travels read, not as its file)
    args = ["run", *_forwarded(click.get_current_context(), skip={"check_once_fd", "challenge_file"})]
    exec_supervisor(policy.interval.total_seconds(), verbose, args, challenge)


def _forwarded(ctx: click.Context, skip: set[str]) -> list[str]:
    """The command line that gives a command the options it was given (every option, so one added
    to `run` later reaches the checks too)."""
    out: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or param.name in skip or value is None:
            continue
        if param.is_flag:
            if value:
                out.append(param.opts[0])
            elif param.secondary_opts:
                out.append(param.secondary_opts[0])
            continue
        for item in value if param.multiple else (value,):
            out += [param.opts[0], str(item)]
    return out


def _check_once(agent: Agent, report_fd: int) -> None:
    """The check of one daemon round, in the supervisor's child: SIGTERM/SIGINT/SIGHUP (blocked
    until now) only get logged here — the supervisor decides whether to stop or to check again,
    this check runs to its end — then the next check's instant goes to `report_fd`."""
    os.set_inheritable(report_fd, False)  # not for the hook

    def _noted(signum, _frame) -> None:
        log.debug("%s: this check runs to its end", signal.Signals(signum).name)
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    for signum in signals:
        signal.signal(signum, _noted)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    next_at = asyncio.run(agent.daemon_check())
    os.write(report_fd, f"{iso(next_at)}\n".encode())
    os.close(report_fd)


# --- renew, checkin ---------------------------------------------------------------------------


@main.command()
@DIR
@click.option("--force", is_flag=True, help="Renew even if not due.")
@_rules
@click.option("--on-renew", default=None, help="Shell command run after installation.")
@click.option("--reuse-key", is_flag=True, help="Renew with the same key (default: a new key each time; "
              "the server must allow it: SCEPD_SCEP_RENEWAL_SAME_KEY=1).")
@click.option("-v", "--verbose", is_flag=True)
def renew(directory, force, renew_before, renew_at_fraction, on_renew, reuse_key, verbose):
    """Renew now if due (always with --force)."""
    _logging(verbose)
    agent = Agent(AgentDir(directory), _policy(None, renew_before, renew_at_fraction, directory),
                  on_renew=on_renew, reuse_key=reuse_key)
    try:
        result = asyncio.run(agent.check(force=force))
    except AgentError as exc:
        _fail(str(exc))
        return
    if not result.ok:
        _fail(result.message)
    click.echo(("renewed: serial " + format(result.renewed.serial_number, "x")) if result.renewed
               else f"not renewed: {result.message}")


@main.command("checkin")
@DIR
@click.option("--mtls-url", default=None, help="Default: the URL given to enroll.")
@click.option("-v", "--verbose", is_flag=True)
def checkin_cmd(directory, mtls_url, verbose):
    """One mutual-TLS check-in with the server."""
    _logging(verbose)
    agent = Agent(AgentDir(directory), schedule.Policy.from_options(None, None, None))
    try:
        answer = asyncio.run(agent.checkin(mtls_url))
    except AgentError as exc:
        _fail(str(exc))
        return
    if answer is None:
        _fail("check-in failed")
    click.echo(json.dumps(answer, sort_keys=True))


# --- status -----------------------------------------------------------------------------------


def status_report(directory: AgentDir, now: dt.datetime, policy: schedule.Policy) -> dict:
    """Everything `status` shows, as data (tested with a fixed `now`)."""
    state = directory.load_state()
    cert = directory.load_cert()
    out: dict = {"dir": str(directory.root), "server": state.get("server"), "protocol": state.get("protocol"),
                 "mtls_url": state.get("mtls_url"), "certificate": None,
                 "last_check": state.get("last_check"), "next_check": state.get("next_check"),
                 "failures": state.get("failures", 0), "last_renewal": state.get("last_renewal"),
                 "renewals": state.get("renewals", 0), "last_checkin": state.get("last_checkin"),
                 "next_ca_announced": directory.next_ca_path.exists(),
                 "acme_account": state.get("acme", {}).get("account")}
    if cert is None:
        out["state"] = "missing"
        return out
    life = lifetime_of(cert)
    left = life.not_after - now
    due = schedule.renewal_due_at(life, policy)
    out["certificate"] = {
        "subject": cert.subject.rfc4514_string(), "serial": format(cert.serial_number, "x"),
        "issuer": cert.issuer.rfc4514_string(), "not_before": iso(life.not_before),
        "not_after": iso(life.not_after), "time_left_seconds": int(left.total_seconds()),
        "time_left": schedule.human(left), "renewal_due_at": iso(due)}
    out["state"] = "expired" if left <= dt.timedelta(0) else ("renewal-due" if now >= due else "valid")
    return out


def render_status(report: dict) -> str:
    lines = [f"directory:     {report['dir']}", f"server:        {report['server']} ({report['protocol']})"]
    if report.get("acme_account"):
        lines.append(f"ACME account:  {report['acme_account']}")
    c = report["certificate"]
    if c is None:
        lines.append("certificate:   MISSING")
    else:
        lines += [f"subject:       {c['subject']}", f"serial:        {c['serial']}",
                  f"issuer:        {c['issuer']}", f"not after:     {c['not_after']}",
                  f"time left:     {c['time_left']}", f"renewal due:   {c['renewal_due_at']}"]
    lines.append(f"state:         {report['state'].upper()}")
    lc = report.get("last_check")
    lines.append(f"last check:    {lc['at']} {lc['result']}: {lc['message']}" if lc else "last check:    never")
    lines.append(f"next check:    {report.get('next_check') or '-'}")
    ci = report.get("last_checkin")
    if ci:
        lines.append(f"last check-in: {ci['at']} {'ok' if ci['ok'] else 'FAILED: ' + ci['message']}")
    if report.get("next_ca_announced"):
        lines.append("CA rollover:   a next CA is announced (GetNextCACert)")
    return "\n".join(lines)


@main.command()
@DIR
@click.option("--json", "as_json", is_flag=True)
@_rules
def status(directory, as_json, renew_before, renew_at_fraction):
    """Certificate and schedule; exit 1 if the certificate is missing, 2 if expired."""
    report = status_report(AgentDir(directory), SystemClock().now(),
                           _policy(None, renew_before, renew_at_fraction, directory))
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else render_status(report))
    if report["state"] == "missing":
        sys.exit(1)
    if report["state"] == "expired":
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
