"""The agent: one check (decide, renew or re-enroll, install, hook, check in) and the daemon loop.

Time and randomness are injected (a clock with now(), a rand() in [0, 1)); the schedule itself is
agent.schedule, a pure function. The daemon only sleeps between checks.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Callable

from cryptography import x509

from . import schedule
from .checkin import checkin
from .files import AgentDir
from .protocol import AgentError, EnrollmentProtocol, Identity, Issued, TrustError, fingerprint
from .scep_client import ScepClient, new_key

log = logging.getLogger("scepd.agent")

HOOK_TIMEOUT = 300


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z") if t else None


def parse_iso(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def lifetime_of(cert: x509.Certificate) -> schedule.Lifetime:
    return schedule.Lifetime(cert.not_valid_before_utc, cert.not_valid_after_utc)


def policy_json(policy: schedule.Policy) -> dict:
    return {"interval_seconds": policy.interval.total_seconds(),
            "renew_before_seconds": policy.renew_before.total_seconds() if policy.renew_before else None,
            "renew_at_fraction": policy.renew_at_fraction}


def policy_from_json(data: dict | None) -> schedule.Policy | None:
    if not data:
        return None
    try:
        rb = data.get("renew_before_seconds")
        return schedule.Policy(dt.timedelta(seconds=data["interval_seconds"]),
                               dt.timedelta(seconds=rb) if rb is not None else None,
                               data.get("renew_at_fraction"))
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class CheckResult:
    decision: schedule.Decision
    ok: bool
    message: str
    next_check: dt.datetime
    renewed: x509.Certificate | None = None


def protocol_for(state: dict, directory: AgentDir, clock) -> EnrollmentProtocol:
    anchor = directory.load_anchor()
    if anchor is None:
        raise AgentError(f"no trust anchor in {directory.root}: run `scepd-agent enroll` first")
    proto = state.get("protocol", "scep")
    if proto == "scep":
        return ScepClient(state["server"], anchor, now=clock.now)
    if proto == "acme":
        return acme_client_for(state, directory, anchor, clock)
    if proto == "est":
        from .est_client import EstClient
        return EstClient(state["server"], anchor, now=clock.now)
    raise AgentError(f"unknown protocol {proto!r} in {directory.state_path}")


def acme_client_for(state: dict, directory: AgentDir, anchor, clock=None):
    """The ACME client of this state directory: its account (key file + URL in the state) and
    the http-01 responder address it was enrolled with, the dns-01 hook if one was given."""
    from .acme_client import AcmeClient
    acme = state.get("acme", {})

    def save_account(key, url: str) -> None:
        directory.save_account_key(key)
        st = directory.load_state()
        st.setdefault("acme", {})["account"] = url
        directory.save_state(st)
        acme["account"] = url
    return AcmeClient(state["server"], anchor, account_key=directory.load_account_key(),
                      account_url=acme.get("account"), save_account=save_account,
                      http01_address=acme.get("http01_address", "0.0.0.0"),
                      http01_port=int(acme.get("http01_port", 80)),
                      dns01_hook=acme.get("dns01_hook"),
                      now=(clock or SystemClock()).now)


class Agent:
    def __init__(self, directory: AgentDir, policy: schedule.Policy, *, clock=None,
                 rand: Callable[[], float] = random.random, on_renew: str | None = None,
                 challenge: str | None = None,
                 protocol_factory: Callable[[dict], EnrollmentProtocol] | None = None,
                 hostname: str | None = None, reuse_key: bool = False):
        self.dir = directory
        self.reuse_key = reuse_key
        self.policy = policy
        self.clock = clock or SystemClock()
        self.rand = rand
        self.on_renew = on_renew
        self.challenge = challenge
        self.protocol_factory = protocol_factory or (lambda st: protocol_for(st, self.dir, self.clock))
        self.hostname = hostname or socket.gethostname()

    # --- one check --------------------------------------------------------------------------

    async def check(self, force: bool = False, checkin_after: bool = True, daemon: bool = False) -> CheckResult:
        """One check. `daemon`: the caller will sleep until the returned next_check (recorded)."""
        state = self.dir.load_state()
        if not state.get("server"):
            raise AgentError(f"{self.dir.root} holds no enrollment: run `scepd-agent enroll` first")
        now = self.clock.now()
        cert = self.dir.load_cert()
        life = lifetime_of(cert) if cert else None
        failures = int(state.get("failures", 0))
        renewed = None
        # ACME: the account itself authorises a new order, so an expired certificate is replaced
        can_reenroll = self.challenge is not None or bool(
            state.get("protocol") == "acme" and state.get("acme", {}).get("account"))
        decision = schedule.decide(now, life, self.policy, can_reenroll=can_reenroll, force=force)
        try:
            protocol = self.protocol_factory(state)
            await self._follow_rollover(protocol, state)
            ari = await protocol.renewal_window(cert) if cert is not None else None
            decision = schedule.decide(now, life, self.policy, can_reenroll=can_reenroll,
                                       ari=ari, rand=self.rand(), force=force)
            log.info("check: %s: %s", decision.action.value, decision.reason)
            if decision.action is schedule.Action.RENEW:
                pair = self.dir.load_pair()
                if pair is None:
                    raise AgentError("the installed key cannot be read")
                key = pair.key if self.reuse_key else await asyncio.to_thread(new_key)
                issued = await protocol.renew(key, pair.cert, pair.key)
                renewed = await self._install(key, issued, state, "renewed")
            elif decision.action is schedule.Action.REENROLL:
                ident = state.get("identity", {})
                key = await asyncio.to_thread(new_key)
                issued = await protocol.enroll(key, Identity(ident.get("cn", ""), tuple(ident.get("sans", ()))),
                                               self.challenge or "")
                renewed = await self._install(key, issued, state, "re-enrolled")
            elif decision.action is schedule.Action.STUCK:
                log.error("CERTIFICATE PROBLEM: %s", decision.reason)
                raise AgentError(decision.reason)
        except (AgentError, OSError, asyncio.TimeoutError) as exc:
            failures += 1
            message = str(exc) or exc.__class__.__name__
            not_after = life.not_after if life else None
            at, pulled_in = schedule.retry_at(now, failures, self.policy, self.rand(), not_after)
            level = logging.ERROR if (pulled_in or (decision.time_left is not None and decision.due_at
                                                    and now >= decision.due_at)) else logging.WARNING
            log.log(level, "check failed (%d in a row): %s; retry at %s", failures, message, iso(at))
            if pulled_in:
                log.error("CERTIFICATE EXPIRES AT %s and renewal keeps failing", iso(not_after))
            state = self.dir.load_state()
            state.update(failures=failures, next_check=iso(at) if daemon else state.get("next_check"),
                         last_check={"at": iso(now), "result": "error", "action": decision.action.value,
                                     "message": message})
            self.dir.save_state(state)
            result = CheckResult(decision, False, message, at)
        else:
            state = self.dir.load_state()
            installed = self.dir.load_cert()
            due = schedule.renewal_due_at(lifetime_of(installed), self.policy) if installed else None
            at = schedule.next_check(now, self.policy, due, self.rand())
            message = decision.reason if renewed is None else \
                f"{decision.reason}; installed serial {format(renewed.serial_number, 'x')}"
            if renewed is not None and due is not None and due <= now:
                log.warning("the new certificate is already due under the renewal rules (lifetime %s): "
                            "renewing at every check; adjust --renew-before/--renew-at-fraction",
                            schedule.human(lifetime_of(installed).length))
            if daemon:
                state["policy"] = policy_json(self.policy)
            state.update(failures=0, next_check=iso(at) if daemon else state.get("next_check"),
                         renewal_due_at=iso(due),
                         last_check={"at": iso(now), "result": "ok", "action": decision.action.value,
                                     "message": message})
            self.dir.save_state(state)
            result = CheckResult(decision, True, message, at, renewed)
        if checkin_after and state.get("mtls_url") and self.dir.load_cert() is not None:
            await self.checkin()
        return result

    async def _follow_rollover(self, protocol: EnrollmentProtocol, state: dict) -> None:
        try:
            announced = await protocol.next_ca()
        except TrustError as exc:
            log.error("CA rollover announcement refused: %s", exc)
            return
        except (AgentError, OSError) as exc:
            log.warning("GetNextCACert failed: %s", exc)
            return
        current = self._read_pem(self.dir.next_ca_path)
        if announced and announced != current:
            for c in announced:
                log.warning("CA rollover announced: next issuing CA %s (SHA-256 %s); it will be used "
                            "from the first renewal after the server switches",
                            c.subject.rfc4514_string(), fingerprint(c))
            self.dir.save_next_ca(announced)

    @staticmethod
    def _read_pem(path) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return []

    async def _install(self, key, issued: Issued, state: dict, verb: str) -> x509.Certificate:
        old = self.dir.load_cert()
        self.dir.install(key, issued.cert, issued.chain)
        if issued.ca_certs:
            self.dir.save_ca_certs(issued.ca_certs)
        if old is not None and issued.chain and not _signed_by(old, issued.chain[0]):
            log.warning("CA rollover picked up: the new certificate is issued by the next CA "
                        "(SHA-256 %s); chain updated", fingerprint(issued.chain[0]))
        nxt = self._read_pem(self.dir.next_ca_path)
        if nxt and issued.chain and issued.chain[0] in nxt:
            self.dir.save_next_ca(None)
        serial = format(issued.cert.serial_number, "x")
        log.info("%s: serial %s, not after %s (previous serial %s kept in %s)", verb, serial,
                 iso(issued.cert.not_valid_after_utc), format(old.serial_number, "x") if old else "-",
                 self.dir.root / "previous")
        st = self.dir.load_state()
        st["renewals"] = int(st.get("renewals", 0)) + 1
        st["last_renewal"] = {"at": iso(self.clock.now()), "serial": serial, "how": verb}
        self.dir.save_state(st)
        await self._run_hook(issued.cert)
        return issued.cert

    async def _run_hook(self, cert: x509.Certificate) -> None:
        if not self.on_renew:
            return
        env = {**os.environ,
               "SCEPD_AGENT_DIR": str(self.dir.root),
               "SCEPD_AGENT_KEY": str(self.dir.key_path),
               "SCEPD_AGENT_CERT": str(self.dir.cert_path),
               "SCEPD_AGENT_CHAIN": str(self.dir.chain_path),
               "SCEPD_AGENT_FULLCHAIN": str(self.dir.fullchain_path),
               "SCEPD_AGENT_CA": str(self.dir.anchor_path),
               "SCEPD_AGENT_SERIAL": format(cert.serial_number, "x"),
               "SCEPD_AGENT_NOT_AFTER": iso(cert.not_valid_after_utc) or ""}
        proc = await asyncio.create_subprocess_shell(self.on_renew, env=env)
        try:
            rc = await asyncio.wait_for(proc.wait(), HOOK_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("on-renew hook killed after %d s", HOOK_TIMEOUT)
            return
        if rc != 0:
            log.error("on-renew hook exited with status %d", rc)
        else:
            log.info("on-renew hook ran")

    # --- check-in ---------------------------------------------------------------------------

    async def checkin(self, url: str | None = None) -> dict | None:
        state = self.dir.load_state()
        url = url or state.get("mtls_url")
        if not url:
            raise AgentError("no mTLS URL: pass --mtls-url (enroll remembers it)")
        now = self.clock.now()
        cert = self.dir.load_cert()
        serial = format(cert.serial_number, "x") if cert else None
        try:
            answer = await checkin(url, self.dir.anchor_path, self.dir.fullchain_path, self.dir.key_path,
                                   self.hostname)
        except (AgentError, OSError) as exc:
            log.warning("check-in failed: %s", exc)
            state = self.dir.load_state()
            state["last_checkin"] = {"at": iso(now), "ok": False, "serial": serial, "message": str(exc)}
            self.dir.save_state(state)
            return None
        log.info("checked in over mTLS as serial %s", serial)
        state = self.dir.load_state()
        state["last_checkin"] = {"at": iso(now), "ok": True, "serial": serial, "message": "ok"}
        self.dir.save_state(state)
        return answer

    # --- the daemon -------------------------------------------------------------------------

    async def daemon_check(self) -> dt.datetime:
        """One check of the daemon (in `run`, or in the child process of agent.daemon): never
        raises; returns the instant of the next check."""
        try:
            return (await self.check(daemon=True)).next_check
        except AgentError as exc:  # not enrolled: nothing to do but say so and wait
            log.error("%s", exc)
        except Exception:  # a bug or a surprise: the daemon keeps its certificate and goes on
            log.exception("unexpected error during the check; retrying after the interval")
        return self.clock.now() + self.policy.interval

    async def run(self, stop: asyncio.Event, wake: asyncio.Event | None = None,
                  max_checks: int | None = None) -> None:
        """Check, sleep until the next check (or SIGHUP/SIGTERM), repeat."""
        wake = wake or asyncio.Event()
        checks = 0
        while not stop.is_set():
            next_at = await self.daemon_check()
            checks += 1
            if max_checks is not None and checks >= max_checks:
                return
            delay = max(0.0, (next_at - self.clock.now()).total_seconds())
            if stop.is_set():
                break
            log.info("next check at %s", iso(next_at))
            if not wake.is_set():  # a SIGHUP during the check is not lost
                stopper = asyncio.create_task(stop.wait())
                waker = asyncio.create_task(wake.wait())
                try:
                    await asyncio.wait({stopper, waker}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopper.cancel()
                    waker.cancel()
            wake.clear()
        log.info("stopped")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:  # InvalidSignature, ValueError, TypeError
        return False
