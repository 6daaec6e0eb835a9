"""ACME protocol logic (RFC 8555): accounts, orders, authorizations, http-01, finalize,
revocation, keyChange. No HTTP here; URLs come from a `links` object the transport provides.
Certificates are issued only through scepd's EnrollmentService (policy -> CA -> store)."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import fnmatch
import glob
import hmac as hmac_mod
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass

import sqlalchemy.exc as sa_exc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac, serialization

from scepd.ca.csr import decode_csr
from scepd.ops.logctx import set_transaction_id
from scepd.errors import (AccountDeactivated, AccountDoesNotExist, AlreadyReplaced, BadCsr, BadNonce,
                          BadRevocationReason, BadSignatureAlgorithm, ExternalAccountRequired,
                          ForbiddenAlgorithm, InvalidProfile, MalformedRequest, NotFound, OrderNotReady,
                          PolicyViolation, RejectedIdentifiers, RequestRejected, ScepdError, Unauthorized,
                          UnsupportedIdentifier, ValidationConnection, ValidationFailed, mapping_for)
from scepd.enroll.pipeline import Approved, Authorization, CsrRequest, Pipeline
from scepd.ca.policy import PROFILES, check_key, valid_dns_name
from scepd.ops.ratelimit import ACME_FAILED_VALIDATIONS_PER_ACCOUNT
from scepd.ca.revocation import RevocationReason
from scepd.render import serial_hex
from scepd.store import StoreNotFound

from . import jws, validators
from . import store as acme_store
from .store import AcmeStore, accounts, authzs, challenges, eab_keys, orders

log = logging.getLogger("scepd.acme")

NONCE_LIFETIME = dt.timedelta(minutes=30)
#: a nonce issued this far in the future (a replica's clock ahead) is still good, and a used
#: nonce's record is kept this long past its expiry (a replica's clock behind)
NONCE_CLOCK_SKEW = dt.timedelta(minutes=5)
NONCE_PRUNE_EVERY = dt.timedelta(minutes=1)  # expired used-nonce records go at most this often
_NONCE_ID_BYTES, _NONCE_MAC_BYTES = 16, 16
_NONCE_BYTES = _NONCE_ID_BYTES + 8 + _NONCE_MAC_BYTES
_NONCE_CHARS = (_NONCE_BYTES * 4 + 2) // 3  # unpadded base64url
ORDER_LIFETIME = dt.timedelta(days=7)
AUTHZ_LIFETIME = dt.timedelta(days=30)  # a valid authorization (revocation by authorization holders)
VALIDATION_TIMEOUT = 30.0
#: an order `processing` for longer than this without a live issuance is settled from the store
ISSUANCE_DEADLINE = dt.timedelta(minutes=5)
MAX_IDENTIFIERS = 100
KEY_CACHE_SIZE = 4096  # parsed account keys kept per process (by thumbprint)

#: draft-ietf-acme-profiles: what newOrder may name, mapped to scepd's issuance profiles
ACME_PROFILES = {
    "server": "TLS server certificate (serverAuth); the default",
    "agent": "TLS client certificate (clientAuth): scepd-agent, mutual TLS",
    "device": "TLS client and server (clientAuth + serverAuth)",
}


def _nonce_mac(key: bytes, body: bytes) -> bytes:
    return hmac_mod.digest(key, b"scepd-acme-nonce\0" + body, "sha256")[:_NONCE_MAC_BYTES]  # one-shot, in C


def new_id(nbytes: int = 16) -> str:
    """A random base64url id that never starts with "-": ids and EAB keys are typed as command
    line arguments (`scepd acme deactivate ID`, certbot's --eab-hmac-key KEY), where a leading
    dash reads as an option."""
    for _ in range(64):  # each draw starts with "-" with probability 1/64
        value = secrets.token_urlsafe(nbytes)
        if not value.startswith("-"):
            return value
    return "a" + value[1:]


@dataclass(frozen=True)
class AcmeSettings:
    http01_port: int = 80
    tlsalpn01_port: int = 443
    resolve: str = ""  # "name=addr,*=addr"
    dns_resolver: str = ""  # "addr[:port],..."
    terms_of_service: str = ""
    eab_required: bool = False
    default_profile: str = "server"

    @property
    def validators(self) -> validators.ValidatorSettings:
        return validators.ValidatorSettings(http01_port=self.http01_port, tlsalpn01_port=self.tlsalpn01_port,
                                            resolve=self.resolve, dns_resolvers=self.dns_resolver)


@dataclass
class Auth:
    """One POST's authentication: its nonce (checked, spent by the request's write unit or at
    the end by `settle`), and once known the signing key and account."""
    req: jws.JwsRequest
    nonce_id: str
    nonce_expires: dt.datetime
    prune: dt.datetime | None
    kid_account: str | None = None  # the account id the kid names
    key: object = None
    thumbprint: str | None = None
    account: dict | None = None
    spent: bool = False
    #: what `_read(then=...)` returned, run in the unit itself (None: it did not run there)
    then_result: object = None


def problem(err: ScepdError) -> dict:
    m = mapping_for(err)
    out = {"type": m.acme_type, "detail": err.detail, "status": m.http_status}
    if isinstance(err, RejectedIdentifiers):  # RFC 8555 §6.7.1
        out["subproblems"] = [{"type": mapping_for(sub).acme_type, "detail": sub.detail, "identifier": ident}
                              for sub, ident in err.subproblems]
    return out


class AcmeService:
    def __init__(self, services, settings: AcmeSettings):
        self.services = services
        self.clock = services.clock
        self.db = AcmeStore(services.store)
        self._writes = acme_store.WriteBatcher(services.store)  # every ACME write unit (group commit)
        self.settings = settings
        if settings.default_profile not in ACME_PROFILES:
            raise ValueError(f"acme.default_profile must be one of {', '.join(ACME_PROFILES)}")
        self._tasks: set[asyncio.Task] = set()
        self._finalizing: set[str] = set()  # orders this process is issuing
        self.finalize_wait = 2.0  # seconds finalize waits before answering `processing`
        self.respond_wait = 1.0  # seconds a challenge response waits for its validation
        self.orders_page_size = 50
        self._nonce_key: bytes | None = None
        self._nonce_key_lock = asyncio.Lock()
        self._nonces_pruned: dt.datetime | None = None
        self._keys: dict[str, object] = {}  # thumbprint -> parsed account key (see _account_key)
        self._chain_pem: tuple[object, str] | None = None  # (CA material, its PEM chain)

    # --- nonces and authentication ---------------------------------------------------------------

    async def _key(self) -> bytes:
        if self._nonce_key is None:
            async with self._nonce_key_lock:
                if self._nonce_key is None:
                    self._nonce_key = await self.db.nonce_key()
        return self._nonce_key

    async def new_nonce(self) -> str:
        """Issuing writes nothing (RFC 8555 §6.5 asks only that a nonce be used once): the nonce
        is a random id, its issue time and an HMAC over both under the key every replica on the
        database shares. Redeeming it inserts the id into the used-nonces table."""
        body = secrets.token_bytes(_NONCE_ID_BYTES) + int(self.clock.now().timestamp()).to_bytes(8, "big")
        return jws.b64u_encode(body + _nonce_mac(await self._key(), body))

    async def open(self, req: jws.JwsRequest) -> "Auth":
        """The request's nonce, checked without the database: one this service (or a replica
        on the same database) issued, within NONCE_LIFETIME; BadNonce for anything else (forged,
        malformed, expired). Whether it was used before is settled by the request's write unit,
        where spending it is the first statement (`_write`)."""
        value = req.nonce
        if not isinstance(value, str) or len(value) != _NONCE_CHARS:
            raise BadNonce("the nonce is unknown, used or expired")
        try:
            raw = jws.b64u_decode(value)
        except ScepdError:
            raise BadNonce("the nonce is unknown, used or expired") from None
        body, mac = raw[:-_NONCE_MAC_BYTES], raw[-_NONCE_MAC_BYTES:]
        if len(raw) != _NONCE_BYTES or not hmac_mod.compare_digest(mac, _nonce_mac(await self._key(), body)):
            raise BadNonce("the nonce is unknown, used or expired")
        issued = dt.datetime.fromtimestamp(int.from_bytes(body[_NONCE_ID_BYTES:], "big"), dt.timezone.utc)
        now = self.clock.now()
        expires = issued + NONCE_LIFETIME
        if not (issued - NONCE_CLOCK_SKEW <= now <= expires):
            raise BadNonce("the nonce is unknown, used or expired")
        prune = None
        if self._nonces_pruned is None or now - self._nonces_pruned >= NONCE_PRUNE_EVERY:
            # records are kept NONCE_CLOCK_SKEW past expiry, so a replica whose clock lags
            # still finds them
            prune, self._nonces_pruned = now - NONCE_CLOCK_SKEW, now
        return Auth(req, jws.b64u_encode(body[:_NONCE_ID_BYTES]), expires, prune)

    async def precheck(self, auth: "Auth", url: str, *, jwk_required: bool = False,
                       allow_jwk: bool = False) -> None:
        """What needs no database: the url, jwk or kid, and for a jwk its limits and the
        signature (a kid's key is the account's: checked by `_read`)."""
        req = auth.req
        if req.url != url:
            raise Unauthorized("the url in the protected header does not match the request")
        if req.jwk is not None:
            if not (jwk_required or allow_jwk):
                raise MalformedRequest("this resource needs a kid, not a jwk")
            key = jws.load_jwk(req.jwk)
            check_key(jws.public_key_of(key), self.services.enrollment.key_limits, allow_ed25519=True)
            await asyncio.to_thread(jws.verify, req, key)
            auth.key, auth.thumbprint = key, jws.thumbprint(key)
            return
        if jwk_required:
            raise MalformedRequest("this resource needs a jwk, not a kid")
        auth.kid_account = req.kid.rstrip("/").rsplit("/", 1)[-1]

    async def _read(self, auth: "Auth", fn=None, *, spend: bool = False, then=None, prepare=None):
        """One read unit: the signing account (by kid, or by the jwk's thumbprint) and whatever
        `fn(conn)` reads for the request; then the kid's signature is verified with the key of
        the row just read (deactivation and key rollover by any process count at once).
        Returns (account or None, fn's result).

        `spend`: a request that writes nothing else (POST-as-GET) reads in its write unit
        instead, the nonce spent first: one unit (and one thread hop) instead of a read unit
        and `settle`'s write unit. Its nonce is spent whatever the reads find, as `settle`
        would have.

        `then(conn, account, data)` (with `spend`): the request's own writes, in the same unit,
        run only once the kid's signature verified there with the key of the valid account
        just read (SQLite, a cached key); its result is left in `auth.then_result`. Where it
        did not run (None there) the caller writes in a unit of its own after `_read`.

        `prepare()` (without `spend`): the request's CPU work that needs no database (a CSR's
        check), run in the read's own thread hop before the unit (SqlStore.read); it must hold
        its outcome (errors included) for the caller rather than raise."""
        aid, tp = auth.kid_account, auth.thumbprint
        req = auth.req
        # SQLite runs read units in a store thread (scepd.store.sql): a kid's signature is
        # verified there with the cached key of the row, saving the request a thread hop of
        # its own. Elsewhere (PostgreSQL runs units on the loop) it goes to a worker thread.
        keys = self._keys if aid is not None and self.services.store.dialect == "sqlite" else None

        def unit(conn):
            account = acme_store.account_by_id(conn, aid) if aid is not None \
                else acme_store.account_by_thumbprint(conn, tp)
            data = None if fn is None else fn(conn)
            verified = None
            if keys is not None and account is not None and (key := keys.get(account["thumbprint"])) is not None:
                try:
                    jws.verify(req, key)
                    verified = key
                except ScepdError as err:
                    verified = err
            if then is not None and verified is not None and not isinstance(verified, ScepdError) \
                    and account["status"] == "valid" and req.kid.endswith(f"/acct/{aid}"):
                auth.then_result = then(conn, account, data)
            return account, data, verified
        if spend:
            account, data, verified = await self._write(auth, unit)
        elif prepare is not None:
            account, data, verified = await self.services.store.read(lambda conn, _: unit(conn), prepare)
        else:
            account, data, verified = await self.services.store.read(unit)
        if aid is None:
            if account is not None and account["status"] != "valid":  # RFC 8555 §7.3.6
                raise AccountDeactivated("the account of this key is deactivated")
        else:
            if account is None or not req.kid.endswith(f"/acct/{aid}"):
                raise AccountDoesNotExist("no account with this kid")
            if isinstance(verified, ScepdError):
                raise verified
            key = verified
            if key is None:
                key = self._account_key(account)
                await asyncio.to_thread(jws.verify, req, key)
            if account["status"] != "valid":
                raise AccountDeactivated("the account is deactivated")
            auth.key, auth.thumbprint = key, account["thumbprint"]
        auth.account = account
        return account, data

    def _remember_key(self, tp: str, key) -> None:
        """newAccount: the request's jwk (limits checked, signature verified, `tp` its own
        thumbprint) is the account's key: cached as `_account_key` would cache it, so the
        account's first kid request verifies in its unit too (newOrder: one unit, not two)."""
        if tp in self._keys:
            return
        if len(self._keys) >= KEY_CACHE_SIZE:
            self._keys.pop(next(iter(self._keys)))
        self._keys[tp] = key

    def _account_key(self, account: dict):
        """The parsed (and limit-checked) key of an account row, cached by its RFC 7638
        thumbprint: a key rollover changes the row's thumbprint, so the cache can never hand out
        a key the row no longer names; status is read from the row on every request."""
        tp = account["thumbprint"]
        key = self._keys.get(tp)
        if key is None:
            key = jws.load_jwk(json.loads(account["jwk"]))
            check_key(jws.public_key_of(key), self.services.enrollment.key_limits, allow_ed25519=True)
            if jws.thumbprint(key) != tp:  # a row written inconsistently: never cache it
                raise AccountDoesNotExist("the account key is unreadable")
            if len(self._keys) >= KEY_CACHE_SIZE:
                self._keys.pop(next(iter(self._keys)))
            self._keys[tp] = key
        return key

    async def _write(self, auth: "Auth", fn=None):
        """One write unit: spend the nonce (its first statement; BadNonce, and nothing
        written, if it was spent before) and `fn(conn)`'s writes, committed together."""
        nonce_id, expires, prune = auth.nonce_id, auth.nonce_expires, auth.prune

        def unit(conn):
            acme_store.spend_nonce(conn, nonce_id, expires, prune)
            return None if fn is None else fn(conn)
        try:
            result = await self._writes.write(unit)
        except acme_store.NonceUsed:
            raise BadNonce("the nonce is unknown, used or expired") from None
        auth.spent = True
        return result

    async def settle(self, auth: "Auth | None", err: ScepdError | None = None) -> ScepdError | None:
        """At the end of every POST: a nonce the request did not spend in a write unit of its
        own (read-only requests, refused ones) is spent now, in one small write unit. Returns
        the error to answer: BadNonce if the nonce was used before, else `err`."""
        if auth is None or auth.spent:
            return err
        try:
            await self._write(auth)
        except BadNonce as bad:
            return bad
        return err

    # --- accounts ------------------------------------------------------------------------------------

    async def account_for_key(self, auth: Auth) -> dict | None:
        """newAccount: the account that holds the request's (verified) jwk, if any; refused if
        it is deactivated."""
        existing = await self.db.account_by_thumbprint(auth.thumbprint)
        if existing is not None and existing["status"] != "valid":  # RFC 8555 §7.3.6
            raise AccountDeactivated("the account of this key is deactivated")
        return existing

    async def new_account(self, auth: Auth, existing: dict | None) -> tuple[dict, bool]:
        req = auth.req
        payload = req.payload_json()
        tp = auth.thumbprint
        if existing is not None:
            self._remember_key(tp, auth.key)
            return existing, False
        if payload.get("onlyReturnExisting"):
            raise AccountDoesNotExist("no account exists for this key")
        contact = self._contact(payload.get("contact", []))
        account = dict(id=new_id(), thumbprint=tp, jwk=json.dumps(req.jwk), status="valid",
                       contact=json.dumps(contact), created_at=self.clock.now())
        binding = payload.get("externalAccountBinding")
        if binding is not None:
            kid = await self._verify_eab(binding, req)
            now = self.clock.now()

            def bind(conn):
                result = conn.execute(eab_keys.update().where(
                    eab_keys.c.kid == kid, eab_keys.c.used_at.is_(None),
                    eab_keys.c.expires_at > acme_store._naive(now))
                    .values(used_at=acme_store._naive(now), account_id=account["id"], hmac_key=""))
                if result.rowcount != 1:
                    return False
                conn.execute(accounts.insert(), acme_store._naive_values(account))
                return True
            try:
                created = await self._write(auth, bind)
            except sa_exc.IntegrityError:  # a concurrent newAccount with this key won
                return await self._race_winner(tp), False
            if not created:
                raise Unauthorized("the external account binding key is unknown, expired or already used")
        elif self.settings.eab_required:
            raise ExternalAccountRequired("this server requires an external account binding "
                                          "(`scepd eab create`)")
        else:
            try:
                await self._write(auth, lambda conn: conn.execute(accounts.insert(),
                                                                  acme_store._naive_values(account)))
            except sa_exc.IntegrityError:
                return await self._race_winner(tp), False
        self._remember_key(tp, auth.key)  # the account's next request verifies in its unit
        await self._audit("acme.account.created", {"account": account["id"]})
        return account, True

    async def _race_winner(self, tp: str) -> dict:
        """A concurrent newAccount with the same key created the account first: it is the answer."""
        winner = await self.db.account_by_thumbprint(tp)
        if winner is None:  # created and gone again: nothing sensible to point at
            raise Unauthorized("the account for this key could not be created; retry")
        if winner["status"] != "valid":
            raise AccountDeactivated("the account of this key is deactivated")
        return winner

    async def _verify_eab(self, binding, outer: jws.JwsRequest) -> str:
        """RFC 8555 §7.3.4: a JWS over the account key, MACed with the EAB key."""
        if not isinstance(binding, dict):
            raise MalformedRequest("externalAccountBinding must be a JWS object")
        try:
            protected = json.loads(jws.b64u_decode(binding.get("protected", "")))
            payload = json.loads(jws.b64u_decode(binding.get("payload", "")))
            signature = jws.b64u_decode(binding.get("signature", ""))
        except (ValueError, TypeError, AttributeError, RecursionError):
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
        kid, key = new_id(), new_id(32)
        now = self.clock.now()
        await self.db.insert(eab_keys, kid=kid, hmac_key=key, identifiers=identifiers or None,
                             created_at=now, expires_at=now + ttl)
        await self._audit("acme.eab.created", {"kid": kid, "identifiers": identifiers,
                                               "expires_at": (now + ttl).isoformat(), "actor": actor})
        return kid, key

    async def list_accounts(self) -> list[dict]:
        """Every account with its binding (EAB key id and identifier pattern), oldest first."""
        bound = {k["account_id"]: k for k in await self.db.find(eab_keys) if k["account_id"]}
        out = []
        for a in sorted(await self.db.find(accounts), key=lambda a: (a["created_at"], a["id"])):
            key = bound.get(a["id"], {})
            out.append({"id": a["id"], "status": a["status"], "contact": json.loads(a["contact"]),
                        "created_at": a["created_at"].isoformat(), "eab_kid": key.get("kid"),
                        "identifiers": key.get("identifiers")})
        return out

    async def deactivate_account(self, account_id: str, actor: str) -> None:
        """An operator cuts an account off (a lost machine): it can order and revoke nothing more."""
        if not await self.db.update(accounts, account_id, status="deactivated"):
            raise NotFound(f"no ACME account {account_id}")
        await self._audit("acme.account.deactivated", {"account": account_id, "actor": actor})

    @staticmethod
    def _contact(contact) -> list:
        if not isinstance(contact, list) or not all(isinstance(c, str) and c.startswith("mailto:")
                                                    for c in contact):
            raise MalformedRequest("contact must be a list of mailto: URLs")
        return contact

    async def update_account(self, auth: Auth, account_id: str) -> dict:
        account, _ = await self._read(auth, spend=auth.req.is_post_as_get)
        if account_id != account["id"]:
            raise Unauthorized("that account is not yours")
        req = auth.req
        if req.is_post_as_get:
            return account
        payload = req.payload_json()
        changes = {}
        if payload.get("status") == "deactivated":
            changes["status"] = "deactivated"
        elif "status" in payload:
            raise MalformedRequest("an account can only be deactivated")
        if "contact" in payload:
            changes["contact"] = json.dumps(self._contact(payload["contact"]))
        if changes:
            await self._write(auth, lambda conn: conn.execute(
                accounts.update().where(accounts.c.id == account["id"]).values(**changes)))
        return {**account, **changes}

    async def _verify(self, req: jws.JwsRequest, key) -> None:
        """The key limits first (cheap: an absurd key costs no verification), then the
        signature, in a worker thread."""
        check_key(jws.public_key_of(key), self.services.enrollment.key_limits, allow_ed25519=True)
        await asyncio.to_thread(jws.verify, req, key)

    async def key_change(self, auth: Auth, outer_url: str) -> dict:
        account, _ = await self._read(auth)
        outer = auth.req
        inner = jws.parse(outer.payload, inner=True)
        if inner.url != outer_url:
            raise MalformedRequest("the inner JWS must name the same url")
        new_key = jws.load_jwk(inner.jwk)
        await self._verify(inner, new_key)
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
        changes = dict(thumbprint=tp, jwk=json.dumps(inner.jwk))
        try:  # only if the key is still the one this request was signed with
            changed = await self._write(auth, lambda conn: conn.execute(accounts.update().where(
                accounts.c.id == account["id"], accounts.c.thumbprint == account["thumbprint"])
                .values(**changes)).rowcount == 1)
        except sa_exc.IntegrityError:  # a concurrent keyChange or newAccount took that key
            clash = await self.db.account_by_thumbprint(tp)
            raise KeyConflict(clash["id"] if clash else account["id"]) from None
        if not changed:
            raise Unauthorized("the account key changed meanwhile")
        await self._audit("acme.account.key_changed", {"account": account["id"]})
        return {**account, **changes}

    # --- orders --------------------------------------------------------------------------------------

    def profiles(self) -> dict[str, str]:
        """What the directory's meta.profiles advertises (draft-ietf-acme-profiles)."""
        return dict(ACME_PROFILES)

    def _identifier(self, ident) -> dict:
        """One identifier, normalized, or the ScepdError that refuses it (a subproblem)."""
        if not isinstance(ident, dict) or not isinstance(ident.get("type"), str) \
                or not isinstance(ident.get("value"), str):
            raise MalformedRequest("each identifier needs a type and a value")
        kind, value = ident["type"], ident["value"]
        if kind == "dns":
            value = value.lower()
            if not valid_dns_name(value, allow_wildcard=True) or "*" in value[2:] \
                    or (value.startswith("*.") and "." not in value[2:]):
                raise PolicyViolation(f"{value[:80]!r} is not a valid DNS name "
                                      "(a wildcard is allowed only as the whole leftmost label)")
            return {"type": "dns", "value": value}
        if kind == "ip":
            try:
                addr = ipaddress.ip_address(value) if "%" not in value else None
            except ValueError:
                addr = None
            if addr is None:
                raise PolicyViolation(f"{value[:80]!r} is not an IP address (without zone)")
            return {"type": "ip", "value": str(addr)}
        raise UnsupportedIdentifier(f"identifier type {kind[:20]!r} is not supported (dns and ip are)")

    def _identifiers(self, idents) -> list[dict]:
        if not isinstance(idents, list) or not idents or len(idents) > MAX_IDENTIFIERS:
            raise MalformedRequest(f"identifiers must be a list of 1 to {MAX_IDENTIFIERS} objects")
        clean, refused = [], []
        for ident in idents:
            try:
                value = self._identifier(ident)
            except (PolicyViolation, UnsupportedIdentifier) as err:
                refused.append((err, {"type": str(ident.get("type"))[:20], "value": str(ident.get("value"))[:255]}))
                continue
            if value not in clean:
                clean.append(value)
        if len(refused) == 1 and len(idents) == 1:
            raise refused[0][0]
        if refused:
            raise RejectedIdentifiers(f"{len(refused)} of the {len(idents)} identifiers are refused", refused)
        return clean

    @staticmethod
    def _time(payload: dict, field: str) -> dt.datetime | None:
        value = payload.get(field)
        if value is None:
            return None
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise MalformedRequest(f"{field} must be an RFC 3339 date-time with a time zone")
        try:
            return parsed.astimezone(dt.timezone.utc)
        except OverflowError:  # 0001-01-01T00:00:00+01:00 is before datetime.min in UTC
            raise MalformedRequest(f"{field} is out of range") from None

    async def new_order(self, auth: Auth, gate=None, peek=None) -> dict:
        """One write unit: nonce spent, account (with its EAB binding) read, and -- on SQLite
        with the account key cached, once the signature verified in it -- the order, its
        authorizations and challenges inserted. Otherwise (PostgreSQL, a key not cached yet, a
        `replaces`, a request refused) the checks run after it, as before, and a second unit
        inserts. `gate(account)` (the rate limit) runs once the account is authenticated, at
        most once a request: in the unit when the order is inserted there. `peek(account_id)`
        (counts nothing): whether the gate would pass, before the unit."""
        req = auth.req
        early, serial = None, None
        try:  # a certID is read before the unit, refused after authentication
            payload = req.payload_json()
            if payload.get("replaces") is not None:
                serial = self._serial_from_cert_id(payload["replaces"])
        except ScepdError as err:
            early = err
        checked = None  # the request's own checks, answered after authentication
        if early is None:
            try:
                clean, profile, window = self._order_request(payload)
            except ScepdError as err:
                checked = err
        gated = []

        def take(account):
            if gate is not None and not gated:  # once, even when a batch runs its units again
                gate(account)
                gated.append(account["id"])

        now = self.clock.now()
        rows = None
        if early is None and checked is None and serial is None and auth.kid_account is not None \
                and (peek is None or peek(auth.kid_account)):
            rows = self._order_rows(auth.kid_account, clean, profile, window, now)

        def create(conn, account, _data):  # in the unit, the signature verified
            try:
                take(account)
                self._check_pattern(account, clean)
            except ScepdError as err:  # answered after the unit; the nonce stays spent
                return err
            acme_store.insert_order(conn, *rows, None)
            return True

        def reads(conn):
            if serial is None:
                return None, False
            return acme_store.order_of_serial(conn, serial), acme_store.is_replaced(conn, serial)
        account, (replaced_order, replaced) = await self._read(
            auth, reads, spend=True, then=create if rows is not None else None)
        created = auth.then_result
        if isinstance(created, ScepdError):
            raise created
        if created is None:  # not in the unit: the checks, then a unit of its own
            take(account)
            if early is not None:
                raise early
            if checked is not None:
                raise checked
            self._check_pattern(account, clean)
            if serial is not None:
                self._check_replaces(serial, replaced_order, replaced, account, clean)
            rows = self._order_rows(account["id"], clean, profile, window, now)
            replacement = None if serial is None else dict(replaced_serial=serial, order_id=rows[0]["id"],
                                                           account_id=account["id"])
            set_transaction_id(rows[0]["id"])  # log lines of this request carry the new order id
            try:
                await self._writes.write(lambda conn: acme_store.insert_order(conn, *rows, replacement))
            except sa_exc.IntegrityError:  # a concurrent order replaced it first
                raise AlreadyReplaced("that certificate has already been replaced") from None
        else:
            set_transaction_id(rows[0]["id"])
        order, az, _ = rows
        view = dict(order, error=None, cert_serial=None, authzs=az)
        view["status"] = self._order_status(view)
        return view

    def _order_request(self, payload: dict) -> tuple[list[dict], str, tuple]:
        """A newOrder payload's identifiers, profile and validity window, checked."""
        clean = self._identifiers(payload.get("identifiers"))
        profile = payload.get("profile") or self.settings.default_profile
        if not isinstance(profile, str) or profile not in ACME_PROFILES:
            raise InvalidProfile(f"unknown profile {str(profile)[:40]!r}; the directory lists "
                                 + ", ".join(sorted(ACME_PROFILES)))
        window = (self._time(payload, "notBefore"), self._time(payload, "notAfter"))
        if window != (None, None):
            try:
                self.services.enrollment.check_window(window, PROFILES[profile])
            except PolicyViolation as err:
                raise MalformedRequest(err.detail) from None
        return clean, profile, window

    @staticmethod
    def _check_pattern(account: dict, clean: list[dict]) -> None:
        pattern = account.get("eab_identifiers")  # read with the account
        if pattern:
            refused = [i for i in clean if not fnmatch.fnmatchcase(i["value"], pattern)]
            if refused:
                raise Unauthorized(f"this account may only order identifiers matching {pattern!r}: "
                                   + ", ".join(i["value"] for i in refused))

    @staticmethod
    def _order_rows(account_id: str, clean: list[dict], profile: str, window: tuple,
                    now: dt.datetime) -> tuple[dict, list[dict], list[dict]]:
        """The rows of a new order: the order, its authorizations, their challenges."""
        order = dict(id=new_id(), account_id=account_id, status="pending", identifiers=clean,
                     expires=now + ORDER_LIFETIME, created_at=now, profile=profile,
                     not_before=window[0], not_after=window[1])
        az, ch = [], []
        for ident in clean:
            aid = new_id()
            wildcard = ident["value"].startswith("*.")
            az.append(dict(id=aid, order_id=order["id"], account_id=account_id, type=ident["type"],
                           value=ident["value"][2:] if wildcard else ident["value"], wildcard=wildcard,
                           status="pending", expires=now + ORDER_LIFETIME))
            for kind in challenge_types(ident["type"], wildcard):
                ch.append(dict(id=new_id(), authz_id=aid, type=kind, status="pending",
                               token=jws.b64u_encode(secrets.token_bytes(24))))
        return order, az, ch

    async def orders_page(self, auth: Auth, account_id: str, cursor: str | None) -> tuple[list[str], str | None]:
        """Order ids of the account (oldest first, invalid ones left out) and the next cursor."""
        account, _ = await self._read(auth, spend=True)
        if account_id != account["id"]:
            raise Unauthorized("that account is not yours")
        size = self.orders_page_size
        rows = await self.db.orders_page(account["id"], cursor, size)
        if rows is None:
            raise MalformedRequest("unknown cursor")
        more = len(rows) > size
        rows = rows[:size]
        now = self.clock.now()
        ids = [r["id"] for r in rows if r["status"] != "invalid"
               and not (r["status"] == "pending" and r["expires"] <= now)]
        return ids, (rows[-1]["id"] if more else None)

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

    @staticmethod
    def _check_replaces(serial: str, owned: dict | None, replaced: bool, account: dict,
                        identifiers: list[dict]) -> None:
        if owned is None:
            raise NotFound("replaces names a certificate this server did not issue over ACME")
        if owned["account_id"] != account["id"]:
            raise Unauthorized("replaces names another account's certificate")
        old = {(i["type"], i["value"]) for i in json.loads(owned["identifiers"])}
        if not old & {(i["type"], i["value"]) for i in identifiers}:
            raise MalformedRequest("the new order shares no identifier with the certificate it replaces")
        if replaced:
            raise AlreadyReplaced("that certificate has already been replaced")

    async def mark_renew_now(self, serial: str) -> None:
        try:
            await self.services.store.get_certificate(serial)
        except StoreNotFound:
            raise NotFound(f"no certificate with serial {serial}") from None
        await self.db.set_renew_now(serial, self.clock.now())

    async def order(self, auth: Auth, order_id: str) -> dict:
        """POST-as-GET of an order: the nonce spent, the account and the order with its
        authorizations read, in one unit."""
        account, (order, order_authzs) = await self._read(
            auth, lambda conn: acme_store.order_with_authzs(conn, order_id), spend=True)
        return await self._order_view(order, order_authzs, account)

    async def _order_view(self, order: dict | None, order_authzs: list[dict], account: dict) -> dict:
        if order is None or order["account_id"] != account["id"]:
            raise NotFound("no such order")
        order["identifiers"] = json.loads(order["identifiers"])
        order["authzs"] = order_authzs
        if order["status"] == "processing" and order["id"] not in self._finalizing:
            order = await self._recover_processing(order)
        order["status"] = self._order_status(order)
        return order

    async def _recover_processing(self, order: dict) -> dict:
        """An order left `processing` by a process that stopped mid-issuance (or by another
        replica), or waiting for an administrator (`scepd pending approve`/`reject`, which
        another process runs): the store says how it ended."""
        certs, pendings = await self.services.store.find_transaction(order["id"])
        mine = [c for c in certs if c.protocol == "acme"]
        waiting = [p for p in pendings if p.protocol == "acme"]
        if not mine and any(p.status == "pending" for p in waiting):
            return order  # still `processing`, Retry-After
        rejected = [p for p in waiting if p.status == "rejected"]
        if not mine and rejected:
            err = RequestRejected(f"rejected by an administrator: {rejected[0].reason or 'no reason given'}")
            await self.db.update(orders, order["id"], where={"status": "processing"}, status="invalid",
                                 error=problem(err))
            fresh = await self.db.get(orders, order["id"])
            order.update(status=fresh["status"], cert_serial=fresh["cert_serial"], error=fresh["error"])
            return order
        if not mine and self.clock.now() - (order.get("processing_at") or order["created_at"]) \
                < ISSUANCE_DEADLINE:
            return order
        if mine:
            await self.db.update(orders, order["id"], where={"status": "processing"}, status="valid",
                                 cert_serial=mine[0].serial)
        else:
            err = ScepdError("the issuance was interrupted; place a new order")
            await self.db.update(orders, order["id"], where={"status": "processing"}, status="invalid",
                                 error=problem(err))
        fresh = await self.db.get(orders, order["id"])
        order.update(status=fresh["status"], cert_serial=fresh["cert_serial"], error=fresh["error"])
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

    def _authz_view(self, a: dict | None, authz_challenges: list[dict], account: dict) -> dict:
        if a is None or a["account_id"] != account["id"]:
            raise NotFound("no such authorization")
        if a["status"] == "pending" and a["expires"] <= self.clock.now():
            a["status"] = "expired"
        a["challenges"] = authz_challenges
        return a

    async def authz(self, auth: Auth, authz_id: str, *, spend: bool = True) -> dict:
        """POST-as-GET (`spend`: its one unit spends the nonce), or the read of a deactivation."""
        account, (a, chs) = await self._read(auth, lambda conn: acme_store.authz_with_challenges(conn, authz_id),
                                             spend=spend)
        return self._authz_view(a, chs, account)

    async def deactivate_authz(self, auth: Auth, authz_id: str) -> dict:
        a = await self.authz(auth, authz_id, spend=False)
        if a["status"] not in ("pending", "valid"):
            raise MalformedRequest(f"an authorization that is {a['status']} cannot be deactivated")
        await self._write(auth, lambda conn: conn.execute(
            authzs.update().where(authzs.c.id == a["id"]).values(status="deactivated")))
        a["status"] = "deactivated"
        return a

    async def challenge(self, auth: Auth, challenge_id: str, gate=None) -> tuple[dict, dict]:
        """POST-as-GET of a challenge: the nonce spent, the challenge and its authorization (with
        its challenges) read, in one unit."""
        account, (ch, a, chs) = await self._read(auth, lambda conn: acme_store.challenge_view(conn, challenge_id),
                                                 spend=True)
        if gate is not None:
            gate(account)
        if ch is None:
            raise NotFound("no such challenge")
        return ch, self._authz_view(a, chs, account)

    async def respond(self, auth: Auth, challenge_id: str, gate=None, peek=None) -> dict:
        """The client is ready: validate in the background (RFC 8555 §7.5.1). Responding again,
        or to a second challenge while one runs, changes nothing. One unit: nonce spent, challenge
        read and (on SQLite with the account key cached, once the signature verified in it) set
        `processing`; elsewhere a second unit sets it. A validation that ends within
        `respond_wait` is answered with its outcome, which the validation's own unit recorded."""
        now = self.clock.now()
        # `peek(account)`: whether the rate limit would let the claimed account start a validation
        # (nothing counted); `gate(account)` refuses for real, below, once it is authenticated
        gate_open = gate is None or (peek is not None and auth.kid_account is not None
                                     and peek({"id": auth.kid_account}))

        def start(conn, account, view):  # in the read's unit, the signature verified
            ch, a, chs = view
            if ch is None or a is None or a["account_id"] != account["id"] or ch["status"] != "pending" \
                    or a["status"] != "pending" or a["expires"] <= now \
                    or any(c["status"] == "processing" for c in chs):
                return False
            return acme_store.start_challenge(conn, ch["id"])
        account, (ch, a, chs) = await self._read(auth, lambda conn: acme_store.challenge_view(conn, challenge_id),
                                                 spend=True, then=start if gate_open else None)
        started = auth.then_result
        if gate is not None and not started:  # (a challenge started in the unit passed it above)
            gate(account)
        if ch is None:
            raise NotFound("no such challenge")
        a = self._authz_view(a, chs, account)
        busy = any(c["status"] == "processing" for c in a["challenges"])
        if started is None and ch["status"] == "pending" and a["status"] == "pending" and not busy:
            # not started in the read's unit (PostgreSQL, or the account key not cached yet)
            started = await self._writes.write(lambda conn: acme_store.start_challenge(conn, ch["id"]))
            if not started:  # another request started it meanwhile
                ch = (await self.db.get(challenges, challenge_id)) or ch
        if started:
            ch["status"] = "processing"
            task = self._spawn_validation(ch, a, auth.thumbprint)
            # a validation that completes quickly is answered at once, so the client's first
            # poll finds the authorization settled instead of sleeping a Retry-After second
            await asyncio.wait({task}, timeout=self.respond_wait)
            if task.done() and not task.cancelled() and task.exception() is None:
                ch.update(task.result())
        return ch

    def _spawn_validation(self, ch: dict, a: dict, thumb: str) -> asyncio.Task:
        task = asyncio.create_task(self._validate(ch, a, thumb))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def resume(self) -> None:
        """At start-up: validations a stopped process left `processing` run again."""
        for ch in await self.db.find(challenges, status="processing"):
            a = await self.db.get(authzs, ch["authz_id"])
            acct = await self.db.get(accounts, a["account_id"]) if a else None
            if a is None or acct is None:
                continue
            log.info("acme: resuming the %s validation of %s", ch["type"], a["value"])
            self._spawn_validation(ch, a, acct["thumbprint"])

    async def _validate(self, ch: dict, a: dict, thumb: str) -> dict:
        """The supervisor: one validator under a time limit; whatever happens, the outcome is
        recorded on challenge and authorization in one write unit (nothing stays
        `processing`). Returns the challenge's new fields."""
        target = validators.Target(a["type"], a["value"])
        key_authorization = f"{ch['token']}.{thumb}"
        error: ScepdError | None = None
        try:
            await asyncio.wait_for(validators.VALIDATORS[ch["type"]](
                target, ch["token"], key_authorization, self.settings.validators), VALIDATION_TIMEOUT)
        except ScepdError as err:
            error = err
        except asyncio.TimeoutError:
            error = ValidationConnection(f"{ch['type']}: no answer from {a['value']} in time")
        except asyncio.CancelledError:  # shutting down: resume() picks it up at the next start
            raise
        except Exception:
            log.exception("%s validation crashed", ch["type"])
            error = ValidationFailed(f"{ch['type']} validation failed")
        now = self.clock.now()
        # the challenge and its authorization change in one transaction (a stop in between
        # cannot leave a valid challenge under a pending authorization); only a challenge still
        # `processing` takes an outcome, so a duplicate validation records nothing
        body = None if error is None else problem(error)
        expires = now + AUTHZ_LIFETIME if error is None else a["expires"]
        recorded = await self._writes.write(lambda conn: acme_store.settle_challenge(
            conn, ch["id"], a["id"], error is None, now, body, expires))
        if error is not None and recorded:
            self.services.limits.spend(ACME_FAILED_VALIDATIONS_PER_ACCOUNT, a["account_id"])
        log.info("acme %s %s for %s%s", ch["type"], "valid" if error is None else "invalid", a["value"],
                 "" if error is None else f": {error.detail}")
        return {"status": "valid" if error is None else "invalid", "validated": now,
                "error": None if body is None else json.dumps(body)}

    async def finalize(self, auth: Auth, order_id: str) -> dict:
        """Checks in the request; issuance runs as a background task (the order is `processing`
        meanwhile). The response waits briefly so fast issuances answer `valid` at once. One
        read unit (account, order, authorizations, EAB binding), the CSR decoded and verified in
        its thread hop; then the policy, one write unit (nonce, order `processing`), then the
        issuance's own units."""
        req = auth.req
        limits = self.services.enrollment.key_limits
        csr: list = []  # [csr_der, facts] or [the error to answer once the order is found ready]

        def check_csr():  # in the read's own thread hop, before its unit (never on the loop)
            try:
                payload = req.payload_json()
                try:
                    csr_der = jws.b64u_decode(payload.get("csr", ""))
                except MalformedRequest:
                    raise BadCsr("csr is not base64url") from None
                try:  # the key limits before the signature check (SHA-2 only, as Boulder: no SHA-1 CSRs)
                    csr[:] = [csr_der, decode_csr(csr_der, True, lambda k: check_key(k, limits))]
                except (PolicyViolation, ForbiddenAlgorithm) as err:  # RFC 8555 §6.7: badCSR, "e.g., due to a short key"
                    raise BadCsr(err.detail) from None
            except ScepdError as err:
                csr[:] = [err]
        account, (order, order_authzs) = await self._read(
            auth, lambda conn: acme_store.order_with_authzs(conn, order_id), prepare=check_csr)
        order = await self._order_view(order, order_authzs, account)
        key = auth.key
        if order["status"] != "ready":
            raise OrderNotReady(f"the order is {order['status']}, not ready")
        if len(csr) == 1:
            raise csr[0]
        csr_der, facts = csr
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
        window = (order.get("not_before"), order.get("not_after"))
        # the account proved exactly the order's identifiers (and its EAB key may bind a pattern)
        authorization = Authorization(
            "acme-account", protocol="acme", names=tuple(glob.escape(i["value"]) for i in order["identifiers"]),
            bound_names=(account["eab_identifiers"],) if account.get("eab_identifiers") else None,
            profile=order.get("profile") or self.settings.default_profile, challenge_kind="acme",
            requester=f"acme:{account['id']}", transaction_id=order_id,
            allow_wildcard=any(a.get("wildcard") for a in order["authzs"]))
        try:  # name scope, profile, policy now; external check, approval, issuance in the background
            approved = await self._pipeline.authorize(
                authorization, CsrRequest(facts, csr_der, window if window != (None, None) else None))
        except PolicyViolation as err:
            raise BadCsr(err.detail) from None
        now = self.clock.now()
        if not await self._write(auth, lambda conn: acme_store.start_order(conn, order_id, now)):
            raise OrderNotReady("the order is already being finalized")
        self._finalizing.add(order_id)
        task = asyncio.create_task(self._issue(order_id, approved))
        self._tasks.add(task)
        task.add_done_callback(_reap)
        task.add_done_callback(self._tasks.discard)
        done, _ = await asyncio.wait({task}, timeout=self.finalize_wait)
        if done and task.exception() is not None:
            raise task.exception()
        order.update(status="processing", processing_at=now)
        if done and task.result() is not None:  # issued: the serial the order now names
            order.update(status="valid", cert_serial=task.result())
        return order

    @property
    def _pipeline(self) -> Pipeline:
        pipeline = getattr(self.services, "pipeline", None)
        if pipeline is None:  # services assembled without one: the plain path, ACME defaults
            pipeline = self.services.pipeline = Pipeline(
                self.services.enrollment, default_profiles={"acme": self.settings.default_profile})
        return pipeline

    async def _issue(self, order_id: str, approved: Approved) -> str | None:
        """The rest of the pipeline (external check, approval, issuance). The certificate is in
        the store before the order says `valid`; a request waiting for an administrator leaves
        the order `processing` (the store settles it: see _recover_processing)."""
        try:
            try:
                # the order turns `valid` in the certificate's own transaction
                decision = await self._pipeline.complete(approved, also=lambda conn, rec: acme_store.order_issued(
                    conn, order_id, rec.serial))
            except ScepdError as err:
                await self.db.update(orders, order_id, status="invalid", error=problem(err))
                raise
            except Exception:
                log.exception("ACME issuance for order %s failed", order_id)
                await self.db.update(orders, order_id, status="invalid",
                                     error=problem(ScepdError("the issuance failed")))
                raise ScepdError("the issuance failed") from None
            if decision.pending is not None:
                log.info("acme order %s waits for approval (pending request %s)", order_id, decision.pending.id)
                return None
            return decision.issued.record.serial
        finally:
            self._finalizing.discard(order_id)

    async def certificate_pem(self, auth: Auth, serial: str) -> str:
        """The nonce spent, the account, the order naming the certificate and its DER read: one unit."""
        account, (owner, der) = await self._read(
            auth, lambda conn: (acme_store.order_of_serial(conn, serial), acme_store.certificate_der(conn, serial)),
            spend=True)
        if owner is None or owner["account_id"] != account["id"] or der is None:
            raise NotFound("no such certificate for this account")
        return _pem(der) + self._ca_chain_pem()

    def _ca_chain_pem(self) -> str:
        """The CA part of every chain, encoded once per CA material (a rollover replaces it)."""
        material = self.services.ca_material
        if self._chain_pem is None or self._chain_pem[0] is not material:
            chain = [material.cert, *material.intermediates]
            self._chain_pem = (material, "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain))
        return self._chain_pem[1]

    async def revoke(self, auth: Auth) -> None:
        account, _ = await self._read(auth)
        req, key = auth.req, auth.key
        payload = req.payload_json()
        try:
            cert = x509.load_der_x509_certificate(jws.b64u_decode(payload.get("certificate", "")))
        except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError (fuzz_acme_payloads)
            raise MalformedRequest("certificate is not a DER certificate") from None
        reason = payload.get("reason", 0)
        if not isinstance(reason, int) or isinstance(reason, bool):
            raise BadRevocationReason("reason must be an integer")
        try:
            parsed = RevocationReason.parse(reason)
        except ScepdError:
            raise BadRevocationReason(f"revocation reason {reason} is not allowed") from None
        serial = serial_hex(cert.serial_number)
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
            if not await self.db.find(orders, cert_serial=serial, account_id=account["id"]) \
                    and not await self._authorized_for_all(account, cert):
                raise Unauthorized("this account neither ordered that certificate nor holds valid "
                                   "authorizations for all its names")
            actor = f"acme:{account['id']}"
        await self._write(auth)  # the nonce before the revocation: a replay revokes nothing
        await self.services.revocation.revoke(serial, parsed, actor)

    async def _authorized_for_all(self, account: dict, cert: x509.Certificate) -> bool:
        """RFC 8555 §7.6: an account holding valid authorizations for every identifier in the
        certificate may revoke it, whoever ordered it."""
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        names = [("dns", n.value.lower()) for n in sans if isinstance(n, x509.DNSName)] + \
                [("ip", str(n.value)) for n in sans if isinstance(n, x509.IPAddress)]
        if not names or len(names) != len(list(sans)):
            return False
        now = self.clock.now()
        for kind, value in names:
            wildcard = value.startswith("*.")
            held = await self.db.find(authzs, account_id=account["id"], value=value[2:] if wildcard else value,
                                      type=kind, status="valid")
            if not any(a["expires"] > now and bool(a.get("wildcard")) == wildcard for a in held):
                return False
        return True

    async def _audit(self, event: str, details: dict) -> None:
        from scepd.store import AuditRecord
        async with self.services.store.transaction() as tx:
            await tx.audit(AuditRecord(at=self.clock.now(), event=event, actor="acme", details=details))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _pem(der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64)) \
        + "\n-----END CERTIFICATE-----\n"


def _reap(task: asyncio.Task) -> None:
    """The outcome of a background issuance is on the order; its exception is not lost noise."""
    if not task.cancelled():
        task.exception()


def challenge_types(kind: str, wildcard: bool) -> tuple[str, ...]:
    """Wildcards only via dns-01; IP addresses never via DNS (RFC 8738)."""
    if wildcard:
        return ("dns-01",)
    if kind == "ip":
        return ("http-01", "tls-alpn-01")
    return ("http-01", "dns-01", "tls-alpn-01")


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
