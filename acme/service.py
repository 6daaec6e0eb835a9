"""ACME protocol logic (RFC 8555): accounts, orders, authorizations, http-01, finalize,
revocation, keyChange. No HTTP here; URLs come from a `links` object the transport provides.
Certificates are issued only through scepd's EnrollmentService (policy -> CA -> store)."""
from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac, serialization

from scepd.challenges import ChallengeGrant
from scepd.csr import decode_csr
from scepd.logctx import set_transaction_id
from scepd.errors import (AccountDoesNotExist, AlreadyReplaced, BadCsr, BadNonce, BadRevocationReason,
                          BadSignatureAlgorithm, ExternalAccountRequired, MalformedRequest,
                          NotFound, OrderNotReady, PolicyViolation, ScepdError, Unauthorized,
                          ValidationFailed, mapping_for)
from scepd.policy import PROFILES, valid_dns_name
from scepd.revocation import RevocationReason
from scepd.store import StoreNotFound

from . import jws
from .store import AcmeStore, accounts, authzs, challenges, eab_keys, orders, replacements

log = logging.getLogger("scepd.acme")

NONCE_LIFETIME = dt.timedelta(minutes=30)
ORDER_LIFETIME = dt.timedelta(days=7)
VALIDATION_TIMEOUT = 10.0


def new_id() -> str:
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class AcmeSettings:
    http01_port: int = 80
    resolve: str = ""  # "name=addr,*=addr"
    terms_of_service: str = ""
    eab_required: bool = False

    def address_for(self, name: str) -> str:
        default = None
        for item in filter(None, (p.strip() for p in self.resolve.split(","))):
            host, _, addr = item.partition("=")
            if host == name:
                return addr
            if host == "*":
                default = addr
        return default or name


def problem(err: ScepdError) -> dict:
    m = mapping_for(err)
    return {"type": m.acme_type, "detail": err.detail, "status": m.http_status}


class AcmeService:
    def __init__(self, services, settings: AcmeSettings):
        self.services = services
        self.clock = services.clock
        self.db = AcmeStore(services.store)
        self.settings = settings
        self._tasks: set[asyncio.Task] = set()

    # --- nonces and authentication ---------------------------------------------------------------

    async def new_nonce(self) -> str:
        value = jws.b64u_encode(secrets.token_bytes(16))
        now = self.clock.now()
        await self.db.add_nonce(value, now + NONCE_LIFETIME, now)
        return value

    async def authenticate(self, req: jws.JwsRequest, url: str, *, jwk_required: bool = False,
                           allow_jwk: bool = False) -> tuple[dict | None, object]:
        """Check nonce, url and signature. Returns (account or None, josepy JWK)."""
        if not await self.db.use_nonce(req.nonce, self.clock.now()):
            raise BadNonce("the nonce is unknown, used or expired")
        if req.url != url:
            raise Unauthorized("the url in the protected header does not match the request")
        if req.jwk is not None:
            if not (jwk_required or allow_jwk):
                raise MalformedRequest("this resource needs a kid, not a jwk")
            key = jws.load_jwk(req.jwk)
            jws.verify(req, key)
            return await self.db.account_by_thumbprint(jws.thumbprint(key)), key
        if jwk_required:
            raise MalformedRequest("this resource needs a jwk, not a kid")
        account_id = req.kid.rstrip("/").rsplit("/", 1)[-1]
        account = await self.db.get(accounts, account_id)
        if account is None or not req.kid.endswith(f"/acct/{account_id}"):
            raise AccountDoesNotExist("no account with this kid")
        key = jws.load_jwk(json.loads(account["jwk"]))
        jws.verify(req, key)
        if account["status"] != "valid":
            raise Unauthorized("the account is deactivated")
        return account, key

    # --- accounts ------------------------------------------------------------------------------------

    async def new_account(self, req: jws.JwsRequest, key) -> tuple[dict, bool]:
        payload = req.payload_json()
        tp = jws.thumbprint(key)
        existing = await self.db.account_by_thumbprint(tp)
        if existing is not None:
            return existing, False
        if payload.get("onlyReturnExisting"):
            raise AccountDoesNotExist("no account exists for this key")
        contact = self._contact(payload.get("contact", []))
        account = dict(id=new_id(), thumbprint=tp, jwk=json.dumps(req.jwk), status="valid",
                       contact=contact, created_at=self.clock.now())
        binding = payload.get("externalAccountBinding")
        if binding is not None:
            kid = await self._verify_eab(binding, req)
            if not await self.db.create_account_bound(account, kid, self.clock.now()):
                raise Unauthorized("the external account binding key is unknown, expired or already used")
        elif self.settings.eab_required:
            raise ExternalAccountRequired("this server requires an external account binding "
                                          "(`scepd eab create`)")
        else:
            await self.db.insert(accounts, **account)
        await self._audit("acme.account.created", {"account": account["id"]})
        return await self.db.get(accounts, account["id"]), True

    async def _verify_eab(self, binding, outer: jws.JwsRequest) -> str:
        """RFC 8555 §7.3.4: a JWS over the account key, MACed with the EAB key."""
        if not isinstance(binding, dict):
            raise MalformedRequest("externalAccountBinding must be a JWS object")
        try:
            protected = json.loads(jws.b64u_decode(binding.get("protected", "")))
            payload = json.loads(jws.b64u_decode(binding.get("payload", "")))
            signature = jws.b64u_decode(binding.get("signature", ""))
        except (ValueError, TypeError, AttributeError):
            raise MalformedRequest("externalAccountBinding is not a valid JWS") from None
        if set(binding) != {"protected", "payload", "signature"} or not isinstance(protected, dict):
            raise MalformedRequest("externalAccountBinding must be a flattened JWS")
        alg = protected.get("alg")
        hash_cls = {"HS256": hashes.SHA256, "HS384": hashes.SHA384, "HS512": hashes.SHA512}.get(alg)
        if hash_cls is None:
            raise BadSignatureAlgorithm("externalAccountBinding must use HS256, HS384 or HS512")
        if protected.get("url") != outer.url or "nonce" in protected:
            raise MalformedRequest("externalAccountBinding must name the newAccount url and no nonce")
        if payload != outer.jwk:
            raise MalformedRequest("externalAccountBinding must sign the account key")
        key = await self.db.get_eab(str(protected.get("kid", "")))
        if key is None or not key["hmac_key"] or key["used_at"] is not None \
                or key["expires_at"] <= self.clock.now():
            raise Unauthorized("the external account binding key is unknown, expired or already used")
        mac = hmac.HMAC(jws.b64u_decode(key["hmac_key"]), hash_cls())
        mac.update(f"{binding['protected']}.{binding['payload']}".encode())
        try:
            mac.verify(signature)
        except InvalidSignature:
            raise Unauthorized("the external account binding MAC does not verify") from None
        return key["kid"]

    async def create_eab(self, ttl: dt.timedelta, identifiers: str | None, actor: str) -> tuple[str, str]:
        """A single-use EAB key id and HMAC key (base64url), optionally limited to identifiers
        matching a shell pattern: how an enrollment token becomes an ACME account."""
        kid, key = new_id(), jws.b64u_encode(secrets.token_bytes(32))
        now = self.clock.now()
        await self.db.insert(eab_keys, kid=kid, hmac_key=key, identifiers=identifiers or None,
                             created_at=now, expires_at=now + ttl)
        await self._audit("acme.eab.created", {"kid": kid, "identifiers": identifiers,
                                               "expires_at": (now + ttl).isoformat(), "actor": actor})
        return kid, key

    @staticmethod
    def _contact(contact) -> list:
        if not isinstance(contact, list) or not all(isinstance(c, str) and c.startswith("mailto:")
                                                    for c in contact):
            raise MalformedRequest("contact must be a list of mailto: URLs")
        return contact

    async def update_account(self, account: dict, req: jws.JwsRequest) -> dict:
        if req.is_post_as_get:
            return account
        payload = req.payload_json()
        if payload.get("status") == "deactivated":
            await self.db.update(accounts, account["id"], status="deactivated")
        elif "status" in payload:
            raise MalformedRequest("an account can only be deactivated")
        if "contact" in payload:
            await self.db.update(accounts, account["id"], contact=self._contact(payload["contact"]))
        return await self.db.get(accounts, account["id"])

    async def key_change(self, account: dict, outer: jws.JwsRequest, outer_url: str) -> dict:
        inner = jws.parse(outer.payload, inner=True)
        if inner.url != outer_url:
            raise MalformedRequest("the inner JWS must name the same url")
        new_key = jws.load_jwk(inner.jwk)
        jws.verify(inner, new_key)
        payload = inner.payload_json()
        if not str(payload.get("account", "")).endswith(f"/acct/{account['id']}"):
            raise MalformedRequest("the inner payload names another account")
        old_key = payload.get("oldKey")
        if not isinstance(old_key, dict) or jws.thumbprint(jws.load_jwk(old_key)) != account["thumbprint"]:
            raise Unauthorized("oldKey is not the account key")
        tp = jws.thumbprint(new_key)
        clash = await self.db.account_by_thumbprint(tp)
        if clash is not None:
            raise KeyConflict(clash["id"])
        await self.db.update(accounts, account["id"], thumbprint=tp, jwk=json.dumps(inner.jwk))
        await self._audit("acme.account.key_changed", {"account": account["id"]})
        return await self.db.get(accounts, account["id"])

    # --- orders --------------------------------------------------------------------------------------

    async def new_order(self, account: dict, req: jws.JwsRequest) -> dict:
        payload = req.payload_json()
        idents = payload.get("identifiers")
        if not isinstance(idents, list) or not idents or len(idents) > 100:
            raise MalformedRequest("identifiers must be a non-empty list")
        clean = []
        for ident in idents:
            if not isinstance(ident, dict) or ident.get("type") not in ("dns", "ip") \
                    or not isinstance(ident.get("value"), str):
                raise MalformedRequest("each identifier needs type dns or ip and a value")
            value = ident["value"].lower() if ident["type"] == "dns" else ident["value"]
            if ident["type"] == "dns" and (value.startswith("*.") or not valid_dns_name(value)):
                raise PolicyViolation(f"{value!r} is not an identifier this server validates "
                                      "(wildcards need dns-01, which is not offered)")
            if ident["type"] == "ip":
                try:
                    value = str(ipaddress.ip_address(value))
                except ValueError:
                    raise PolicyViolation(f"{value!r} is not an IP address") from None
            if {"type": ident["type"], "value": value} not in clean:
                clean.append({"type": ident["type"], "value": value})
        bound = await self.db.find(eab_keys, account_id=account["id"])
        pattern = bound[0]["identifiers"] if bound else None
        if pattern:
            refused = [i["value"] for i in clean if not fnmatch.fnmatchcase(i["value"], pattern)]
            if refused:
                raise Unauthorized(f"this account may only order identifiers matching {pattern!r}: "
                                   + ", ".join(refused))
        replaced = None
        if payload.get("replaces") is not None:
            replaced = await self._check_replaces(payload["replaces"], account, clean)
        now = self.clock.now()
        order = dict(id=new_id(), account_id=account["id"], status="pending", identifiers=clean,
                     expires=now + ORDER_LIFETIME, created_at=now)
        az, ch = [], []
        for ident in clean:
            aid = new_id()
            az.append(dict(id=aid, order_id=order["id"], account_id=account["id"], type=ident["type"],
                           value=ident["value"], status="pending", expires=now + ORDER_LIFETIME))
            ch.append(dict(id=new_id(), authz_id=aid, type="http-01", token=jws.b64u_encode(secrets.token_bytes(24)),
                           status="pending"))
        replacement = None if replaced is None else dict(replaced_serial=replaced, order_id=order["id"],
                                                         account_id=account["id"])
        set_transaction_id(order["id"])  # log lines of this request carry the new order id
        if not await self.db.create_order(order, az, ch, replacement):
            raise AlreadyReplaced("that certificate has already been replaced")
        return await self.order(order["id"])

    # --- ARI (RFC 9773) -----------------------------------------------------------------------------

    def _serial_from_cert_id(self, cert_id: str) -> str:
        if not isinstance(cert_id, str) or cert_id.count(".") != 1:
            raise MalformedRequest("a certID is base64url(AKI) '.' base64url(serial)")
        aki_b64, serial_b64 = cert_id.split(".")
        aki, serial = jws.b64u_decode(aki_b64), jws.b64u_decode(serial_b64)
        if not serial or not aki:
            raise MalformedRequest("a certID is base64url(AKI) '.' base64url(serial)")
        ours = [c for c in (self.services.ca_material.cert,)
                if c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == aki]
        if not ours:
            raise NotFound("that certificate was not issued by this CA")
        return format(int.from_bytes(serial, "big"), "x")

    async def renewal_info(self, cert_id: str) -> dict:
        serial = self._serial_from_cert_id(cert_id)
        try:
            rec = await self.services.store.get_certificate(serial)
        except StoreNotFound:
            raise NotFound("no such certificate") from None
        now = self.clock.now()
        if rec.status == "revoked" or await self.db.get_renew_now(serial):
            start, end = now - dt.timedelta(hours=2), now - dt.timedelta(hours=1)
        else:
            lifetime = rec.not_after - rec.not_before
            start = rec.not_after - lifetime / 3  # about one third of the lifetime left
            end = start + lifetime / 9
        fmt = lambda t: t.replace(microsecond=0).isoformat().replace("+00:00", "Z")  # noqa: E731
        return {"suggestedWindow": {"start": fmt(start), "end": fmt(end)}}

    async def _check_replaces(self, cert_id, account: dict, identifiers: list[dict]) -> str:
        serial = self._serial_from_cert_id(cert_id)
        owned = await self.db.find(orders, cert_serial=serial)
        if not owned:
            raise NotFound("replaces names a certificate this server did not issue over ACME")
        if owned[0]["account_id"] != account["id"]:
            raise Unauthorized("replaces names another account's certificate")
        old = {(i["type"], i["value"]) for i in json.loads(owned[0]["identifiers"])}
        if not old & {(i["type"], i["value"]) for i in identifiers}:
            raise MalformedRequest("the new order shares no identifier with the certificate it replaces")
        if await self.db.find(replacements, replaced_serial=serial):
            raise AlreadyReplaced("that certificate has already been replaced")
        return serial

    async def mark_renew_now(self, serial: str) -> None:
        try:
            await self.services.store.get_certificate(serial)
        except StoreNotFound:
            raise NotFound(f"no certificate with serial {serial}") from None
        await self.db.set_renew_now(serial, self.clock.now())

    async def order(self, order_id: str, account: dict | None = None) -> dict:
        order = await self.db.get(orders, order_id)
        if order is None or (account is not None and order["account_id"] != account["id"]):
            raise NotFound("no such order")
        order["identifiers"] = json.loads(order["identifiers"])
        order["authzs"] = await self.db.find(authzs, order_id=order_id)
        order["status"] = self._order_status(order)
        return order

    def _order_status(self, order: dict) -> str:
        if order["status"] in ("valid", "invalid", "processing"):
            return order["status"]
        states = {a["status"] for a in order["authzs"]}
        if "invalid" in states or "deactivated" in states:
            return "invalid"
        if order["expires"] <= self.clock.now():
            return "invalid"
        return "ready" if states == {"valid"} else "pending"

    async def authz(self, authz_id: str, account: dict) -> dict:
        a = await self.db.get(authzs, authz_id)
        if a is None or a["account_id"] != account["id"]:
            raise NotFound("no such authorization")
        a["challenges"] = await self.db.find(challenges, authz_id=authz_id)
        return a

    async def challenge(self, challenge_id: str, account: dict) -> tuple[dict, dict]:
        ch = await self.db.get(challenges, challenge_id)
        if ch is None:
            raise NotFound("no such challenge")
        a = await self.authz(ch["authz_id"], account)
        return ch, a

    async def respond(self, challenge_id: str, account: dict, key) -> dict:
        ch, a = await self.challenge(challenge_id, account)
        if ch["status"] == "pending" and a["status"] == "pending":
            if await self.db.update(challenges, ch["id"], where={"status": "pending"}, status="processing"):
                task = asyncio.create_task(self._validate(ch, a, jws.thumbprint(key)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return await self.db.get(challenges, challenge_id)

    async def _validate(self, ch: dict, a: dict, thumb: str) -> None:
        """http-01 under a time limit; the outcome is recorded on challenge and authorization."""
        expected = f"{ch['token']}.{thumb}"
        host = a["value"]
        addr = self.settings.address_for(host)
        netloc = f"[{addr}]" if ":" in addr else addr
        url = f"http://{netloc}:{self.settings.http01_port}/.well-known/acme-challenge/{ch['token']}"
        error = None
        try:
            timeout = aiohttp.ClientTimeout(total=VALIDATION_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url, headers={"Host": host}, allow_redirects=False) as resp:
                    body = (await resp.content.read(4096)).decode("utf-8", "replace").strip()
                    if resp.status != 200 or body != expected:
                        error = ValidationFailed(f"http-01: {host} answered HTTP {resp.status} with "
                                                 "the wrong key authorization")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            error = ValidationFailed(f"http-01: could not fetch the challenge from {host}")
        except Exception:  # the supervisor records any failure; nothing stays processing
            log.exception("http-01 validation crashed")
            error = ValidationFailed("http-01 validation failed")
        now = self.clock.now()
        if error is None:
            await self.db.update(challenges, ch["id"], status="valid", validated=now)
            await self.db.update(authzs, a["id"], status="valid")
        else:
            await self.db.update(challenges, ch["id"], status="invalid", error=problem(error))
            await self.db.update(authzs, a["id"], status="invalid")
        log.info("acme http-01 %s for %s", "valid" if error is None else "invalid", host)

    async def finalize(self, order_id: str, account: dict, req: jws.JwsRequest, key) -> dict:
        order = await self.order(order_id, account)
        if order["status"] != "ready":
            raise OrderNotReady(f"the order is {order['status']}, not ready")
        payload = req.payload_json()
        try:
            csr_der = jws.b64u_decode(payload.get("csr", ""))
        except MalformedRequest:
            raise BadCsr("csr is not base64url") from None
        facts = decode_csr(csr_der)
        names = {("dns", s.value.lower()) if s.kind == "dns" else (s.kind, s.value) for s in facts.sans}
        if facts.common_name:
            names.add(("ip", facts.common_name) if _is_ip(facts.common_name) else ("dns", facts.common_name.lower()))
        wanted = {(i["type"], i["value"]) for i in order["identifiers"]}
        if names != wanted:
            raise BadCsr("the CSR must name exactly the order's identifiers")
        account_spki = jws.public_key_of(key).public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        if account_spki == facts.spki_der:
            raise BadCsr("the certificate key must differ from the account key")
        if not await self.db.update(orders, order_id, where={"status": "pending"}, status="processing"):
            raise OrderNotReady("the order is already being finalized")
        try:
            request = self.services.enrollment.approve(facts, PROFILES["server"])
            issued = await self.services.enrollment.issue(
                request, ChallengeGrant("acme"), protocol="acme", transaction_id=order_id,
                requester=f"acme:{account['id']}", spki_sha256=facts.spki_sha256)
        except ScepdError as err:
            await self.db.update(orders, order_id, status="invalid", error=problem(err))
            raise
        await self.db.update(orders, order_id, status="valid", cert_serial=issued.record.serial)
        return await self.order(order_id, account)

    async def certificate_pem(self, serial: str, account: dict) -> str:
        owned = await self.db.find(orders, cert_serial=serial, account_id=account["id"])
        if not owned:
            raise NotFound("no such certificate for this account")
        rec = await self.services.store.get_certificate(serial)
        cert = x509.load_der_x509_certificate(rec.der)
        chain = [cert, self.services.ca_material.cert, *self.services.ca_material.intermediates]
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)

    async def revoke(self, req: jws.JwsRequest, account: dict | None, key) -> None:
        payload = req.payload_json()
        try:
            cert = x509.load_der_x509_certificate(jws.b64u_decode(payload.get("certificate", "")))
        except ValueError:
            raise MalformedRequest("certificate is not a DER certificate") from None
        reason = payload.get("reason", 0)
        if not isinstance(reason, int) or isinstance(reason, bool):
            raise BadRevocationReason("reason must be an integer")
        try:
            parsed = RevocationReason.parse(reason)
        except ScepdError:
            raise BadRevocationReason(f"revocation reason {reason} is not allowed") from None
        serial = format(cert.serial_number, "x")
        try:
            rec = await self.services.store.get_certificate(serial)
        except StoreNotFound:
            raise NotFound("this server did not issue that certificate") from None
        if rec.der != cert.public_bytes(serialization.Encoding.DER):
            raise NotFound("this server did not issue that certificate")
        if account is None:  # signed with the certificate's own key
            cert_spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
            key_spki = jws.public_key_of(key).public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
            if cert_spki != key_spki:
                raise Unauthorized("the JWS key is neither an account key nor the certificate key")
            actor = "acme:certificate-key"
        else:
            if not await self.db.find(orders, cert_serial=serial, account_id=account["id"]):
                raise Unauthorized("this account did not order that certificate")
            actor = f"acme:{account['id']}"
        await self.services.revocation.revoke(serial, parsed, actor)

    async def _audit(self, event: str, details: dict) -> None:
        from scepd.store import AuditRecord
        async with self.services.store.transaction() as tx:
            await tx.audit(AuditRecord(at=self.clock.now(), event=event, actor="acme", details=details))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class KeyConflict(Exception):
    def __init__(self, account_id: str):
        super().__init__(account_id)
        self.account_id = account_id
