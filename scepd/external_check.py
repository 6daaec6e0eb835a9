"""Optional external CSR check, as NDES policy modules, micromdm `-csrverifierexec` and
step-ca webhooks do: an executable or an HTTP webhook sees each request and allows or denies.

Executable: receives a JSON object on stdin; exit status 0 allows, anything else denies; the
first line of its stdout (or stderr) is the reason shown to the client. Webhook: receives the
same JSON by POST; a 200 answer with {"allow": true} allows, {"allow": false, "reason": "..."}
denies. Timeouts, crashes and unreachable webhooks deny (fail closed) with a clear reason.

The JSON: {"csr_pem", "challenge", "transaction_id", "common_name", "sans", "protocol",
"renewal_of"}.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from .errors import ExternalCheckDenied

log = logging.getLogger("scepd.external_check")


@dataclass(frozen=True)
class CheckRequest:
    csr_pem: str
    challenge: str | None
    transaction_id: str | None
    common_name: str | None
    sans: tuple[str, ...]
    protocol: str
    renewal_of: str | None = None

    def payload(self) -> bytes:
        return json.dumps({"csr_pem": self.csr_pem, "challenge": self.challenge,
                           "transaction_id": self.transaction_id, "common_name": self.common_name,
                           "sans": list(self.sans), "protocol": self.protocol,
                           "renewal_of": self.renewal_of}).encode()


def _first_line(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text.splitlines()[0][:200] if text else ""


class ExternalCheck:
    def __init__(self, command: str = "", url: str = "", timeout: float = 10.0):
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
            raise ExternalCheckDenied("the external CSR check timed out") from None
        if proc.returncode != 0:
            reason = _first_line(out) or _first_line(err) or f"exit status {proc.returncode}"
            raise ExternalCheckDenied(f"denied by the external CSR check: {reason}")

    async def _call_webhook(self, req: CheckRequest) -> None:
        import aiohttp  # only here: the rest of the core imports no web framework

        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(self.url, data=req.payload(),
                                        headers={"Content-Type": "application/json"}) as resp:
                    body = await resp.read()
                    status = resp.status
        except asyncio.TimeoutError:
            raise ExternalCheckDenied("the CSR webhook timed out") from None
        except aiohttp.ClientError:
            log.error("CSR webhook %s unreachable", self.url)
            raise ExternalCheckDenied("the CSR webhook is unavailable") from None
        try:
            answer = json.loads(body or b"{}")
        except ValueError:
            answer = {}
        if status != 200 or not isinstance(answer, dict):
            raise ExternalCheckDenied(f"the CSR webhook answered HTTP {status}")
        if answer.get("allow") is not True:
            reason = str(answer.get("reason") or "no reason given")[:200]
            raise ExternalCheckDenied(f"denied by the CSR webhook: {reason}")
