"""ACME (RFC 8555, ARI RFC 9773) as the agent speaks it: the second EnrollmentProtocol.

Trust: the directory URL is HTTPS and every connection verifies against the pinned root
(`bootstrap_anchor` fetches it once over an unverified connection and keeps it only if its
SHA-256 fingerprint is the pinned one, like `step ca bootstrap`).
Account: an ES256 (P-256) key kept in DIR/account-key.pem (0600), created once with the
enrollment token as external account binding (single use on the server); renewals and
re-enrollments are authorised by the account.
Orders: identifiers from the CN and SANs, profile `agent` (clientAuth, for the mTLS listener)
when the directory offers it, http-01 answered by a responder the agent runs only while an
order is validated, or dns-01 through the operator's hook command (`--dns01-hook`: sets the
TXT record, then always clears it); renewals carry `replaces` (ARI). Wire only: no scepd server code here and
never certbot's `acme` package (ours shadows it).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import ssl
from typing import Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .protocol import AgentError, Identity, Issued, TrustError, fingerprint, issued_path
from .scep_client import build_csr, identity_of
from .schedule import RenewalWindow

log = logging.getLogger("scepd.agent.acme")

TIMEOUT = aiohttp.ClientTimeout(total=60)
VALIDATION_DEADLINE = 120.0  # seconds an order may take from challenge to certificate
PROFILE = "agent"
DNS01_HOOK_TIMEOUT = 300.0  # seconds one run of the dns-01 hook may take (it may wait for propagation)


class AcmeProblem(AgentError):
    """An RFC 7807 problem document from the server."""

    def __init__(self, ptype: str, detail: str, status: int):
        short = ptype.rsplit(":", 1)[-1]
        super().__init__(f"ACME {short}: {detail} (HTTP {status})")
        self.type, self.detail, self.status = ptype, detail, status


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_account_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict:
    n = key.public_key().public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": b64u(n.x.to_bytes(32, "big")), "y": b64u(n.y.to_bytes(32, "big"))}


def thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    return b64u(hashlib.sha256(json.dumps(public_jwk(key), sort_keys=True, separators=(",", ":"))
                               .encode()).digest())


def cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(DER INTEGER serial contents)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    if aki is None:
        raise AgentError("the certificate has no authority key identifier: no ARI for it")
    serial = cert.serial_number
    return f"{b64u(aki)}.{b64u(serial.to_bytes(serial.bit_length() // 8 + 1, 'big'))}"


def csr_identity(identity: Identity) -> Identity:
    """The identity an ACME CSR names: every order identifier as a subjectAltName, the CN included
    (RFC 8555 §7.4 and every public ACME CA read the names from the SAN; pebble refuses a CSR whose
    CN is not among its SANs)."""
    sans = tuple(f"{'IP' if i['type'] == 'ip' else 'DNS'}:{i['value']}" for i in identifiers_of(identity))
    return Identity(identity.common_name, sans)


def identifiers_of(identity: Identity) -> list[dict]:
    """ACME identifiers from the CN and DNS/IP SANs (the server wants the CSR to name exactly these)."""
    out: list[dict] = []

    def add(value: str) -> None:
        try:
            ident = {"type": "ip", "value": str(ipaddress.ip_address(value))}
        except ValueError:
            ident = {"type": "dns", "value": value.lower()}
        if ident not in out:
            out.append(ident)
    if identity.common_name:
        add(identity.common_name)
    for san in identity.sans:
        kind, _, value = san.partition(":")
        if kind.upper() not in ("DNS", "IP"):
            raise AgentError(f"ACME certificates name DNS names and IP addresses only, not {san!r}")
        add(value)
    return out


def parse_eab(secret: str) -> tuple[str, str] | None:
    """The enrollment token of ACME mode: "KID:HMAC" (empty: no binding)."""
    if not secret:
        return None
    kid, sep, key = secret.partition(":")
    if not sep or not kid or not key:
        raise AgentError("an ACME enrollment token is the EAB key id and HMAC key (--eab-kid, --eab-hmac)")
    return kid, key


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def context_for(anchor: x509.Certificate) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cadata=anchor.public_bytes(serialization.Encoding.PEM).decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def bootstrap_anchor(directory_url: str, pin: str | None) -> x509.Certificate:
    """The root to trust from now on: by its pinned fingerprint (GET /root/<fp>), or on first use
    (GET /roots.pem, the caller having been told to allow it). The fetch itself is unverified;
    the fingerprint check is what makes it safe."""
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    url = f"{origin_of(directory_url)}/{'root/' + pin.lower() if pin else 'roots.pem'}"
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.get(url, ssl=insecure if url.startswith("https:") else None) as resp:
                if resp.status == 404 and pin:
                    raise TrustError(f"the server has no root with the pinned fingerprint {pin}")
                if resp.status != 200:
                    raise AgentError(f"trust bootstrap: GET {url} answered HTTP {resp.status}")
                body = await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise AgentError(f"trust bootstrap: cannot fetch {url}: {exc or 'timeout'}") from None
    try:
        roots = x509.load_pem_x509_certificates(body)
    except ValueError:
        raise AgentError(f"trust bootstrap: {url} did not return PEM certificates") from None
    if pin:
        matching = [r for r in roots if fingerprint(r) == pin.upper()]
        if not matching:
            raise TrustError(f"the root served at {url} does not have the pinned fingerprint {pin}")
        return matching[0]
    anchor = roots[-1]
    log.warning("trusting on first use: %s SHA-256 %s", anchor.subject.rfc4514_string(), fingerprint(anchor))
    return anchor


def dns01_txt_value(token: str, key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 8555 §8.4: base64url(SHA-256(key authorization))."""
    return b64u(hashlib.sha256(f"{token}.{thumbprint(key)}".encode()).digest())


def dns01_environment(action: str, domain: str, value: str, base: dict | None = None) -> dict:
    """What the dns-01 hook sees: SCEPD_DNS01_ACTION (set|clear), _NAME (the record's FQDN with
    its trailing dot), _VALUE (the TXT value), _DOMAIN (the name validated; a wildcard's base)."""
    import os
    domain = domain.removeprefix("*.").rstrip(".")
    return {**(os.environ if base is None else base), "SCEPD_DNS01_ACTION": action,
            "SCEPD_DNS01_NAME": f"_acme-challenge.{domain}.", "SCEPD_DNS01_VALUE": value,
            "SCEPD_DNS01_DOMAIN": domain}


async def run_dns01_hook(command: str, action: str, domain: str, value: str,
                         timeout: float = DNS01_HOOK_TIMEOUT) -> None:
    """Run the hook (a shell command) for one record and wait for it, at most `timeout` seconds;
    a non-zero exit, a kill at the timeout or a command that cannot start is an AgentError
    naming the action, the record and the hook's last line of stderr."""
    env = dns01_environment(action, domain, value)
    what = f"dns-01 hook ({action} {env['SCEPD_DNS01_NAME']})"
    try:
        proc = await asyncio.create_subprocess_shell(command, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                     stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise AgentError(f"{what} cannot start: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AgentError(f"{what} killed after {timeout:.0f} s") from None
    for line in (out + err).decode("utf-8", "replace").splitlines():
        if line.strip():
            log.info("%s: %s", what, line.rstrip())
    if proc.returncode != 0:
        last = next((x.strip() for x in reversed(err.decode("utf-8", "replace").splitlines()) if x.strip()), "")
        raise AgentError(f"{what} exited with status {proc.returncode}" + (f": {last[:200]}" if last else ""))
    log.info("%s done", what)


def choose_challenge(authz: dict, dns01: bool) -> dict:
    """dns-01 when the agent has a hook (http-01 otherwise); the other one when that is not
    offered. A wildcard is only ever offered dns-01 (RFC 8555 §7.1.3)."""
    offered = {c.get("type"): c for c in authz.get("challenges", [])}
    order = ("dns-01", "http-01") if dns01 else ("http-01",)
    for kind in order:
        if kind in offered:
            return offered[kind]
    name = authz.get("identifier", {}).get("value")
    if "dns-01" in offered and not dns01:
        raise AgentError(f"no http-01 challenge offered for {'*.' if authz.get('wildcard') else ''}{name}: "
                         "answer dns-01 with --dns01-hook")
    raise AgentError(f"no challenge the agent can answer is offered for {name} "
                     f"(offered: {', '.join(sorted(filter(None, offered))) or 'none'})")


class Http01Responder:
    """Answers /.well-known/acme-challenge/<token> while an order is validated, nothing else."""

    def __init__(self, address: str, port: int):
        self.address, self.port = address, port
        self.tokens: dict[str, str] = {}
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        answer = self.tokens.get(request.match_info["token"])
        if answer is None:
            return web.Response(status=404)
        log.info("http-01: answered the validation of %s", request.host)
        return web.Response(text=answer, content_type="text/plain")

    async def __aenter__(self) -> "Http01Responder":
        app = web.Application()
        app.router.add_get("/.well-known/acme-challenge/{token}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.address, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise AgentError(f"http-01: cannot listen on {self.address}:{self.port}: {exc.strerror}") from None
        return self

    async def __aexit__(self, *exc) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class AcmeClient:
    """One ACME server (its directory URL), trusted through `anchor`.

    `account_key`/`account_url`: the persisted account, if any; `save_account(key, url)` is
    called once when the account is created. `ssl_context` overrides the one built from the
    anchor (tests on plain HTTP pass None with an http:// URL)."""

    def __init__(self, directory_url: str, anchor: x509.Certificate | None, *,
                 account_key: ec.EllipticCurvePrivateKey | None = None, account_url: str | None = None,
                 save_account: Callable[[ec.EllipticCurvePrivateKey, str], None] | None = None,
                 http01_address: str = "0.0.0.0", http01_port: int = 80, dns01_hook: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, sleep=asyncio.sleep,
                 now=lambda: dt.datetime.now(dt.timezone.utc)):
        self.directory_url = directory_url
        self.anchor = anchor
        self.account_key = account_key
        self.account_url = account_url
        self.save_account = save_account
        self.http01_address, self.http01_port = http01_address, http01_port
        self.dns01_hook = dns01_hook or None
        if ssl_context is None and anchor is not None and directory_url.startswith("https:"):
            ssl_context = context_for(anchor)
        self.ssl_context = ssl_context
        self.sleep = sleep
        self.now = now
        self._directory: dict | None = None
        self._nonce: str | None = None
        self._session: aiohttp.ClientSession | None = None

    # --- transport ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self):
        """One HTTP session (kept-alive TLS connection) for a whole operation; nested uses share it."""
        if self._session is not None:
            yield self._session
            return
        self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        try:
            yield self._session
        finally:
            session, self._session = self._session, None
            await session.close()

    async def _request(self, method: str, url: str, **kw) -> tuple[int, dict, bytes]:
        try:
            async with self._connection() as session:
                async with session.request(method, url, ssl=self.ssl_context, **kw) as resp:
                    body = await resp.read()
                    if "Replay-Nonce" in resp.headers:
                        self._nonce = resp.headers["Replay-Nonce"]
                    return resp.status, dict(resp.headers), body
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TrustError(f"the ACME server's certificate does not chain to the pinned root: "
                             f"{exc.certificate_error}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise AgentError(f"ACME {method} {url} failed: {exc or 'timeout'}") from None

    async def directory(self) -> dict:
        if self._directory is None:
            status, _, body = await self._request("GET", self.directory_url)
            try:
                d = json.loads(body) if status == 200 else None
            except ValueError:
                d = None
            if not isinstance(d, dict) or "newOrder" not in d:
                raise AgentError(f"{self.directory_url} is not an ACME directory (HTTP {status})")
            self._directory = d
        return self._directory

    async def _fresh_nonce(self) -> str:
        if self._nonce:
            nonce, self._nonce = self._nonce, None
            return nonce
        d = await self.directory()
        await self._request("HEAD", d["newNonce"])
        if not self._nonce:
            raise AgentError("the ACME server gave no nonce")
        nonce, self._nonce = self._nonce, None
        return nonce

    def _sign(self, url: str, payload: dict | None, nonce: str, use_jwk: bool) -> bytes:
        key = self.account_key
        protected = {"alg": "ES256", "nonce": nonce, "url": url}
        if use_jwk:
            protected["jwk"] = public_jwk(key)
        else:
            protected["kid"] = self.account_url
        p64 = b64u(json.dumps(protected).encode())
        pl64 = "" if payload is None else b64u(json.dumps(payload).encode())
        r, s = decode_dss_signature(key.sign(f"{p64}.{pl64}".encode(), ec.ECDSA(hashes.SHA256())))
        return json.dumps({"protected": p64, "payload": pl64,
                           "signature": b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))}).encode()

    async def post(self, url: str, payload: dict | None, *, use_jwk: bool = False) -> tuple[int, dict, bytes]:
        """A signed POST (payload None = POST-as-GET); one retry on badNonce; problems raise."""
        for attempt in range(2):
            body = self._sign(url, payload, await self._fresh_nonce(), use_jwk)
            status, headers, raw = await self._request(
                "POST", url, data=body, headers={"Content-Type": "application/jose+json"})
            if status < 400:
                return status, headers, raw
            problem = _problem(status, headers, raw)
            if problem.type.endswith(":badNonce") and attempt == 0:
                continue
            raise problem
        raise AssertionError("unreachable")

    async def post_json(self, url: str, payload: dict | None, **kw) -> tuple[dict, dict]:
        status, headers, raw = await self.post(url, payload, **kw)
        try:
            return json.loads(raw), headers
        except ValueError:
            raise AgentError(f"ACME {url}: the reply is not JSON (HTTP {status})") from None

    # --- account --------------------------------------------------------------------------------

    async def ensure_account(self, eab: tuple[str, str] | None) -> str:
        if self.account_url:
            return self.account_url
        d = await self.directory()
        if self.account_key is None:
            self.account_key = await asyncio.to_thread(new_account_key)
        payload: dict = {"termsOfServiceAgreed": True}
        if eab is not None:
            kid, hmac_key = eab
            protected = b64u(json.dumps({"alg": "HS256", "kid": kid, "url": d["newAccount"]}).encode())
            jwk = b64u(json.dumps(public_jwk(self.account_key)).encode())
            try:
                mac = hmac.new(b64u_decode(hmac_key), f"{protected}.{jwk}".encode(), hashlib.sha256).digest()
            except (ValueError, TypeError):
                raise AgentError("the EAB HMAC key is not base64url") from None
            payload["externalAccountBinding"] = {"protected": protected, "payload": jwk, "signature": b64u(mac)}
        elif d.get("meta", {}).get("externalAccountRequired"):
            raise AgentError("this ACME server requires an enrollment token: pass --eab-kid and --eab-hmac")
        _, headers = await self.post_json(d["newAccount"], payload, use_jwk=True)
        url = headers.get("Location")
        if not url:
            raise AgentError("the ACME server created no account (no Location)")
        self.account_url = url
        if self.save_account is not None:
            self.save_account(self.account_key, url)
        log.info("ACME account %s", url)
        return url

    # --- EnrollmentProtocol ----------------------------------------------------------------------

    async def enroll(self, key, identity: Identity, secret: str) -> Issued:
        async with self._connection():
            await self.ensure_account(parse_eab(secret) if not self.account_url else None)
            return await self._order(key, identity, None)

    async def renew(self, new_key, current_cert: x509.Certificate, current_key) -> Issued:
        if not self.account_url:
            raise AgentError("no ACME account in the state directory: enroll again")
        identity = identity_of(current_cert)
        try:
            replaces = cert_id(current_cert)
        except AgentError:
            replaces = None
        async with self._connection():
            try:
                return await self._order(new_key, identity, replaces)
            except AcmeProblem as exc:
                if replaces is None or not (exc.type.endswith(":alreadyReplaced") or "replaces" in exc.detail):
                    raise
                log.warning("the server refused `replaces` (%s): ordering without it", exc)
                return await self._order(new_key, identity, None)

    async def next_ca(self) -> list[x509.Certificate]:
        return []  # ACME announces no successor CA; the anchor is the root

    async def renewal_window(self, cert: x509.Certificate) -> RenewalWindow | None:
        try:
            base = (await self.directory()).get("renewalInfo")
            if not base:
                return None
            status, _, body = await self._request("GET", f"{base.rstrip('/')}/{cert_id(cert)}")
            if status != 200:
                return None
            w = json.loads(body)["suggestedWindow"]
            start, end = _time(w["start"]), _time(w["end"])
        except (AgentError, ValueError, KeyError, TypeError) as exc:
            log.debug("no ARI window: %s", exc)
            return None
        return RenewalWindow(start, end) if start <= end else None

    # --- orders -----------------------------------------------------------------------------------

    def responder(self) -> Http01Responder:
        """The http-01 responder of one order (bench/acme_issue.py shares one across clients)."""
        return Http01Responder(self.http01_address, self.http01_port)

    async def _order(self, key, identity: Identity, replaces: str | None) -> Issued:
        d = await self.directory()
        payload: dict = {"identifiers": identifiers_of(identity)}
        if PROFILE in d.get("meta", {}).get("profiles", {}):
            payload["profile"] = PROFILE
        else:
            log.warning("the ACME server offers no %r profile: the certificate may lack clientAuth", PROFILE)
        if replaces:
            payload["replaces"] = replaces
        order, headers = await self.post_json(d["newOrder"], payload)
        order_url = headers.get("Location")
        if not order_url:
            raise AgentError("the ACME server returned an order without a Location")
        deadline = asyncio.get_running_loop().time() + VALIDATION_DEADLINE
        pending = []
        for authz_url in order.get("authorizations", []):
            authz, _ = await self.post_json(authz_url, None)
            if authz.get("status") == "valid":
                continue
            pending.append((authz_url, authz, choose_challenge(authz, self.dns01_hook is not None)))
        if pending:
            async with contextlib.AsyncExitStack() as stack:
                http01 = [ch for _, _, ch in pending if ch["type"] == "http-01"]
                if http01:
                    responder = await stack.enter_async_context(self.responder())
                    for ch in http01:
                        responder.tokens[ch["token"]] = f"{ch['token']}.{thumbprint(self.account_key)}"
                for _, authz, ch in pending:
                    if ch["type"] == "dns-01":
                        await stack.enter_async_context(self._dns01_record(authz, ch))
                        # the hook's own time (propagation) does not count against validation
                        deadline = max(deadline, asyncio.get_running_loop().time() + VALIDATION_DEADLINE)
                answers = [(await self.post_json(ch["url"], {}))[0] for _, _, ch in pending]
                for (authz_url, authz, _), answer in zip(pending, answers):
                    if answer.get("status") == "valid":
                        continue  # validated while we asked (RFC 8555 §7.1.6: so is its authorization)
                    final = await self._poll(authz_url, ("pending", "processing"), deadline)
                    if final.get("status") != "valid":
                        errs = [c.get("error", {}).get("detail") for c in final.get("challenges", []) if c.get("error")]
                        raise AgentError(f"authorization for {authz.get('identifier', {}).get('value')} is "
                                         f"{final.get('status')}: {'; '.join(filter(None, errs)) or 'no detail'}")
        # every authorization is valid now, so the order is ready: finalize at once (as certbot
        # and lego do); only a server that disagrees (orderNotReady) is polled first
        csr = build_csr(key, csr_identity(identity), None)
        try:
            order, _ = await self.post_json(order["finalize"], {"csr": b64u(csr)})
        except AcmeProblem as exc:
            if not exc.type.endswith(":orderNotReady"):
                raise
            order = await self._poll(order_url, ("pending",), deadline)
            if order.get("status") != "ready":
                raise AgentError(f"the order is {order.get('status')}, not ready: {order.get('error')}") from None
            order, _ = await self.post_json(order["finalize"], {"csr": b64u(csr)})
        if order.get("status") != "valid":
            order = await self._poll(order_url, ("processing", "ready"), deadline)
        if order.get("status") != "valid" or not order.get("certificate"):
            raise AgentError(f"the order ended {order.get('status')}: {order.get('error')}")
        _, _, pem = await self.post(order["certificate"], None)
        return self._check_chain(pem, key)

    @contextlib.asynccontextmanager
    async def _dns01_record(self, authz: dict, ch: dict):
        """The TXT record of one dns-01 challenge, set by the hook for the duration of the block;
        `clear` always runs afterwards (also when `set` failed half-way); a failing `clear` is
        logged, not raised (the certificate may already be issued)."""
        domain = authz.get("identifier", {}).get("value", "")
        value = dns01_txt_value(ch["token"], self.account_key)
        try:
            await run_dns01_hook(self.dns01_hook, "set", domain, value)
            yield
        finally:
            try:
                await run_dns01_hook(self.dns01_hook, "clear", domain, value)
            except AgentError as exc:
                log.warning("%s", exc)

    async def _poll(self, url: str, waiting: tuple[str, ...], deadline: float) -> dict:
        loop = asyncio.get_running_loop()
        while True:
            body, headers = await self.post_json(url, None)
            if body.get("status") not in waiting:
                return body
            if loop.time() >= deadline:
                raise AgentError(f"{url} still {body.get('status')} after {VALIDATION_DEADLINE:.0f} s")
            try:
                delay = float(headers.get("Retry-After", "1"))
            except ValueError:
                delay = 1.0
            await self.sleep(min(max(delay, 0.2), 10.0, max(0.0, deadline - loop.time())))

    def _check_chain(self, pem: bytes, key) -> Issued:
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise AgentError("the certificate download is not a PEM chain") from None
        leaf, rest = certs[0], certs[1:]
        if leaf.public_key() != key.public_key():
            raise AgentError("the issued certificate is not for our key")
        if self.anchor is not None:
            issued_path(leaf, self.anchor, rest, self.now())
        chain = [c for c in rest if c.subject != c.issuer]
        return Issued(leaf, chain, [])


def _problem(status: int, headers: dict, raw: bytes) -> AcmeProblem:
    try:
        doc = json.loads(raw)
        return AcmeProblem(str(doc.get("type", "about:blank")), str(doc.get("detail", ""))[:300], status)
    except (ValueError, AttributeError):
        return AcmeProblem("about:blank", raw[:200].decode("utf-8", "replace"), status)


def _time(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError("a time without zone")
    return t
