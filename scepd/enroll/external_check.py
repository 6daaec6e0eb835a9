"""Optional external CSR check, as NDES policy modules, micromdm `-csrverifierexec` and
step-ca webhooks do: an executable or an HTTP webhook sees each request and allows or denies.

Executable: receives a JSON object on stdin; exit status 0 allows, anything else denies; the
first line of its stdout (or stderr) is the reason shown to the client. Webhook: receives the
same JSON by POST; a 200 answer with {"allow": true} allows, {"allow": false, "reason": "..."}
denies. Timeouts, crashes, unreachable webhooks and answers over 64 KiB deny (fail closed) with
a clear reason.

The payload carries the challenge password, so the webhook must be https:// unless
`[policy] csr_check_allow_http = true` (refused at start otherwise), and the challenge is never
logged nor echoed into a denial reason (a check that prints its input has it replaced by "[challenge]").

The JSON: {"csr_pem", "challenge", "transaction_id", "common_name", "sans", "protocol",
"renewal_of", "profile", "authorization"}; `protocol` is the request's (scep, acme), and
`challenge` is null for requests no challenge authenticated (ACME, renewals).
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass


from ..config import safe_url, validate_url
from ..errors import ExternalCheckDenied

log = logging.getLogger("scepd.external_check")

#: A webhook answer is one small JSON object; anything bigger is refused (and denies).
MAX_RESPONSE_BYTES = 64 * 1024


@dataclass(frozen=True)
class CheckRequest:
    csr_pem: str
    challenge: str | None
    transaction_id: str | None
    common_name: str | None
    sans: tuple[str, ...]
    protocol: str
    renewal_of: str | None = None
    #: the profile the certificate would get, and what authenticated the request
    #: (challenge | renewal | acme-account | tls-client)
    profile: str | None = None
    authorization: str | None = None

    def payload(self) -> bytes:
        return json.dumps({"csr_pem": self.csr_pem, "challenge": self.challenge,
                           "transaction_id": self.transaction_id, "common_name": self.common_name,
                           "sans": list(self.sans), "protocol": self.protocol,
                           "renewal_of": self.renewal_of, "profile": self.profile,
                           "authorization": self.authorization}).encode()


def _without(secret: str | None, text: str) -> str:
    """`text` (an answer of the check, shown to the client and logged) with the challenge removed,
    as given and as JSON-escaped (a check that echoes its input)."""
    if secret:
        for form in {secret, json.dumps(secret)[1:-1]}:
            text = text.replace(form, "[challenge]")
    return text


def _first_line(data: bytes, secret: str | None) -> str:
    text = _without(secret, data.decode("utf-8", "replace")).strip()
    return text.splitlines()[0][:200] if text else ""


class ExternalCheck:
    def __init__(self, command: str = "", url: str = "", timeout: float = 10.0, allow_http: bool = False):
        validate_url(url, allow_http)
        self.command = command
        self.url = url
        self.timeout = timeout

    @property
    def enabled(self) -> bool:
        return bool(self.command or self.url)

    async def check(self, req: CheckRequest) -> None:
        """Raise ExternalCheckDenied unless every configured check allows."""
        if self.command:
            await self._run_command(req)
        if self.url:
            await self._call_webhook(req)

    async def _run_command(self, req: CheckRequest) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError:
            log.error("external CSR check %s cannot be started", self.command)
            raise ExternalCheckDenied("the external CSR check is unavailable") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(req.payload()), self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("external CSR check %s timed out after %ss", self.command, self.timeout)
            raise ExternalCheckDenied("the external CSR check timed out") from None
        if proc.returncode != 0:
            reason = (_first_line(out, req.challenge) or _first_line(err, req.challenge)
                      or f"exit status {proc.returncode}")
            raise ExternalCheckDenied(f"denied by the external CSR check: {reason}")

    async def _call_webhook(self, req: CheckRequest) -> None:
        import aiohttp  # only here: the rest of the core imports no web framework

        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(self.url, data=req.payload(), allow_redirects=False,
                                        headers={"Content-Type": "application/json"}) as resp:
                    status = resp.status
                    body = bytearray()
                    async for chunk in resp.content.iter_any():
                        body += chunk
                        if len(body) > MAX_RESPONSE_BYTES:
                            log.error("CSR webhook %s answered more than %d bytes: denied",
                                      safe_url(self.url), MAX_RESPONSE_BYTES)
                            raise ExternalCheckDenied("the CSR webhook answer is too large")
        except asyncio.TimeoutError:
            log.error("CSR webhook %s timed out", safe_url(self.url))
            raise ExternalCheckDenied("the CSR webhook timed out") from None
        except aiohttp.ClientError as exc:
            log.error("CSR webhook %s unreachable (%s)", safe_url(self.url), type(exc).__name__)
            raise ExternalCheckDenied("the CSR webhook is unavailable") from None
        try:
            answer = json.loads(body or b"{}")
        except ValueError:
            answer = {}
        if status != 200 or not isinstance(answer, dict):
            raise ExternalCheckDenied(f"the CSR webhook answered HTTP {status}")
        if answer.get("allow") is not True:
            reason = _without(req.challenge, str(answer.get("reason") or "no reason given"))[:200]
            raise ExternalCheckDenied(f"denied by the CSR webhook: {reason}")
