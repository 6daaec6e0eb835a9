"""A renewal-shaped request with a valid challenge (issue 10): strongSwan `pki --scep --cert old.pem
--key old.key --password CHALLENGE --dn CN=other`, certmonger after a subject change. A request
signed by one of our certificates that fails the renewal rules but carries a valid challenge is an
initial enrollment authenticated (and paid for) by that challenge, whether PKCSReq or RenewalReq
(strongSwan 5.9 sends RenewalReq); without a valid challenge the renewal refusal stands."""
from __future__ import annotations

import datetime as dt

import pytest

from scepd.http.app import create_app
from scepd.errors import FailInfo
from scepd.ca.revocation import RevocationReason
from scepd.scep import wire

from .helpers import reply_certs, rsa_key
from .test_lifecycle import _enroll, _issued

_DAY = dt.timedelta(days=1)


@pytest.fixture
async def one_time(aiohttp_client, make_services):
    """A server with one-time challenges only (no static secret)."""
    services = await make_services({})
    client = await aiohttp_client(create_app(services))
    return client, services


@pytest.mark.parametrize("message_type", [19, 17])
@pytest.mark.parametrize("case", ["cn-changed", "revoked-signer"])
async def test_valid_challenge_enrolls_instead(one_time, case, message_type):
    client, services = one_time
    old_key, new_key = rsa_key(0), rsa_key(1)
    old = await _issued(client, old_key, cn="dev-1", challenge=await services.challenges.create(_DAY))
    cn = "other" if case == "cn-changed" else "dev-1"
    refusal = "subject CN" if case == "cn-changed" else "revoked"
    if case == "revoked-signer":
        await services.revocation.revoke(format(old.serial_number, "x"), RevocationReason.KEY_COMPROMISE, "t")
    challenge = await services.challenges.create(_DAY)
    # without a valid challenge the renewal refusal stands
    for presented in (None, "wrong"):
        rep, _ = await _enroll(client, new_key, cn, challenge=presented, signer=(old, old_key),
                               message_type=message_type)
        assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST
        assert refusal in rep.fail_info_text, (presented, rep.fail_info_text)
    # with the valid challenge it is an initial enrollment
    rep, signer = await _enroll(client, new_key, cn, challenge=challenge, signer=(old, old_key),
                                message_type=message_type)
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    new = reply_certs(rep, *signer)[0]  # encrypted to the signer: the old certificate's key
    assert new.subject.rfc4514_string() == f"CN={cn}" and new.public_key() == new_key.public_key()
    audit = await services.store.list_audit(limit=1)
    assert audit[0].event == "certificate.issued"  # not certificate.renewed
    assert audit[0].details["challenge"] == "one-time" and audit[0].details["renewal_of"] is None
    assert (await services.store.get_certificate(format(old.serial_number, "x"))).status == (
        "revoked" if case == "revoked-signer" else "valid")
    # and the challenge is spent
    rep, _ = await _enroll(client, rsa_key(2), cn, challenge=challenge, signer=(old, old_key))
    assert rep.status == wire.PkiStatus.FAILURE and refusal in rep.fail_info_text
    assert len(await services.store.list_certificates()) == 2


async def test_fallback_enrollment_waits_for_approval_like_any_initial_one(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_REQUIRE_APPROVAL": "1"})
    client = await aiohttp_client(create_app(services))
    old_key = rsa_key(0)
    rep, _ = await _enroll(client, old_key, "dev-1")  # a first certificate, approved
    assert rep.status == wire.PkiStatus.PENDING
    [pending] = await services.store.find_pending(rep.transaction_id)
    first = (await services.enrollment.approve_pending(pending.id, "admin")).cert
    # renewal-shaped, another CN, the static challenge: a new initial enrollment, so it waits
    rep, _ = await _enroll(client, rsa_key(1), "other", signer=(first, old_key))
    assert rep.status == wire.PkiStatus.PENDING
    [pending] = await services.store.find_pending(rep.transaction_id)
    assert pending.subject == "CN=other" and pending.renewal_of is None
