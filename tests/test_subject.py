"""The issued subject DN (issue 10): SCEP certificates carry the CSR's subject exactly — same RDN
order, multi-valued RDNs, same string types, so a byte-identical Name — within the `[policy]`
allow-list of attribute types; `[policy] subject = cn-only` reduces it to the CN."""
from __future__ import annotations

import pytest
from asn1crypto import core as asn1_core, csr as asn1_csr, keys as asn1_keys, x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID

from scepd import config as config_mod
from scepd.ca import policy as policy_mod
from scepd.http.app import SERVICES, create_app
from scepd.ca.csr import decode_csr
from scepd.errors import FailInfo, PolicyViolation
from scepd.ca.policy import PROFILES, SubjectPolicy, approve
from scepd.scep import wire

from .conftest import NOW
from .helpers import pkcs_req, reply_certs, rsa_key, self_signed

# --- Names as clients encode them, built from raw DER so nothing normalises them -------------------

_OIDS = {"CN": "2.5.4.3", "C": "2.5.4.6", "O": "2.5.4.10", "OU": "2.5.4.11", "L": "2.5.4.7",
         "emailAddress": "1.2.840.113549.1.9.1", "DC": "0.9.2342.19200300.100.1.25",
         "private": "1.3.6.1.4.1.55555.1"}
UTF8, PRINTABLE, IA5, TELETEX, BMP = 0x0C, 0x13, 0x16, 0x14, 0x1E


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x81, n]) if n < 0x100 else bytes([0x82, n >> 8, n & 0xFF])
    return bytes([tag]) + length + body


def _oid_der(dotted: str) -> bytes:
    return asn1_core.ObjectIdentifier(dotted).dump()


def name_der(*rdns: list[tuple[str, int, str]]) -> bytes:
    """A Name from RDNs, each a list of (type, string tag, value), in the order given."""
    def value(tag, text):
        return text.encode("utf-16-be") if tag == BMP else text.encode("utf-8")
    return _tlv(0x30, b"".join(
        _tlv(0x31, b"".join(_tlv(0x30, _oid_der(_OIDS[t]) + _tlv(tag, value(tag, v))) for t, tag, v in rdn))
        for rdn in rdns))


def csr_with_name(key, subject_der: bytes, challenge: str | None = "static-secret") -> bytes:
    """A PKCS#10 request whose subject is exactly `subject_der` (RSA PKCS#1 v1.5, SHA-256)."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    attrs = [] if challenge is None else [{"type": "challenge_password",
                                           "values": [asn1_core.PrintableString(challenge)]}]
    info = asn1_csr.CertificationRequestInfo({
        "version": "v1", "subject": asn1_x509.Name.load(subject_der),
        "subject_pk_info": asn1_keys.PublicKeyInfo.load(spki), "attributes": attrs})
    tbs = info.dump()
    return asn1_csr.CertificationRequest({
        "certification_request_info": asn1_csr.CertificationRequestInfo.load(tbs),
        "signature_algorithm": {"algorithm": "sha256_rsa"},
        "signature": key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())}).dump()


def csr_subject_der(csr_der: bytes) -> bytes:
    """The Name bytes inside a CSR, read with asn1crypto (not with the code under test)."""
    return asn1_csr.CertificationRequest.load(csr_der)["certification_request_info"]["subject"].dump()


def cert_subject_der(cert: x509.Certificate) -> bytes:
    der = cert.public_bytes(serialization.Encoding.DER)
    return asn1_x509.Certificate.load(der)["tbs_certificate"]["subject"].dump()


#: subjects as the stock clients send them (see ../shared/vectors/scep/*.csr.pem)
SUBJECTS = {
    # sscep / openssl req: O then CN, UTF8String
    "sscep": name_der([("O", UTF8, "interop-lab")], [("CN", UTF8, "x")]),
    # micromdm scepclient (Go): C, O, OU, CN, all PrintableString
    "scepclient": name_der([("C", PRINTABLE, "US")], [("O", PRINTABLE, "interop-lab")],
                           [("OU", PRINTABLE, "MDM")], [("CN", PRINTABLE, "x")]),
    # certmonger: CN PrintableString then O UTF8String
    "certmonger": name_der([("CN", PRINTABLE, "x")], [("O", UTF8, "interop-lab")]),
    # a multi-valued RDN (DER order inside the SET: CN before OU)
    "multi-valued": name_der([("C", PRINTABLE, "US")], [("CN", UTF8, "x"), ("OU", UTF8, "MDM")]),
    # legacy string types and IA5 attributes
    "legacy-strings": name_der([("DC", IA5, "example")], [("L", TELETEX, "Paris")], [("CN", BMP, "é-x")],
                               [("emailAddress", IA5, "x@example.test")]),
}


def _facts(subject_der: bytes):
    return decode_csr(csr_with_name(rsa_key(0), subject_der))


# --- policy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("client", sorted(SUBJECTS))
async def test_keep_issues_the_csr_name_byte_for_byte(services, client):
    facts = _facts(SUBJECTS[client])
    request = services.enrollment.approve(facts, PROFILES["device"], requested_subject=True)
    cert = services.authority.issue(request, 1234)
    assert cert_subject_der(cert) == SUBJECTS[client]


def test_multi_valued_rdn_is_kept_as_one_rdn():
    facts = _facts(SUBJECTS["multi-valued"])
    subject = approve(facts, PROFILES["device"], NOW, subject_policy=SubjectPolicy()).subject
    assert [len(rdn) for rdn in subject.rdns] == [1, 2]
    assert subject.rfc4514_string() == "CN=x+OU=MDM,C=US"


def test_cn_only_mode_and_acme_keep_the_cn_alone():
    facts = _facts(SUBJECTS["scepclient"])
    cn_only = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    assert approve(facts, PROFILES["device"], NOW, subject_policy=SubjectPolicy("cn-only")).subject == cn_only
    assert approve(facts, PROFILES["server"], NOW).subject == cn_only  # no subject policy: ACME's rule


@pytest.mark.parametrize("allowed, subject, named", [
    ("CN, O", SUBJECTS["scepclient"], "C (2.5.4.6)"),
    ("CN, C, O", SUBJECTS["scepclient"], "OU (2.5.4.11)"),
    ("", name_der([("private", UTF8, "secret")], [("CN", UTF8, "x")]), "1.3.6.1.4.1.55555.1"),
])
def test_refused_attribute_type_is_named(allowed, subject, named):
    policy = SubjectPolicy.from_config("keep", allowed)
    with pytest.raises(PolicyViolation) as err:
        approve(_facts(subject), PROFILES["device"], NOW, subject_policy=policy)
    assert named in err.value.detail and "not allowed" in err.value.detail


def test_allow_list_by_name_and_oid():
    policy = SubjectPolicy.from_config("keep", "cn, O, 1.3.6.1.4.1.55555.1")
    subject = name_der([("private", UTF8, "ok")], [("O", UTF8, "lab")], [("CN", UTF8, "x")])
    issued = approve(_facts(subject), PROFILES["device"], NOW, subject_policy=policy).subject
    assert issued.public_bytes() == subject


@pytest.mark.parametrize("cn, text", [("x" * 65, "longer than 64"), ("a\x07b", "control characters")])
def test_every_cn_of_a_kept_subject_is_checked(cn, text):
    # the second CN is the one a CN-only check of the first would miss
    subject = name_der([("CN", UTF8, "fine")], [("CN", UTF8, cn)])
    with pytest.raises(PolicyViolation) as err:
        approve(_facts(subject), PROFILES["device"], NOW, subject_policy=SubjectPolicy())
    assert text in err.value.detail


def test_policy_config_keys(tmp_path):
    cfg = config_mod.load(tmp_path, environ={"SCEPD_POLICY_SUBJECT": "cn-only",
                                             "SCEPD_POLICY_SUBJECT_ATTRIBUTES": "CN,O"})
    assert policy_mod.subject_policy(cfg) == SubjectPolicy("cn-only", frozenset(
        {NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME}))
    default = policy_mod.subject_policy(config_mod.load(tmp_path, environ={}))
    assert default.mode == "keep" and NameOID.DOMAIN_COMPONENT in default.allowed
    for env, text in [({"SCEPD_POLICY_SUBJECT": "drop"}, "keep, cn-only"),
                      ({"SCEPD_POLICY_SUBJECT_ATTRIBUTES": "CN, colour"}, "'colour'")]:
        with pytest.raises(config_mod.ConfigError) as err:  # at start, when the services are built
            policy_mod.subject_policy(config_mod.load(tmp_path, environ=env))
        assert text in str(err.value)
    (tmp_path / config_mod.CONFIG_NAME).write_text('[policy]\nsubject = "cn-only"\nsubject_attributes = "CN"\n')
    assert policy_mod.subject_policy(config_mod.load(tmp_path, environ={})).mode == "cn-only"


# --- SCEP through the app --------------------------------------------------------------------------

async def _scep(client, subject_der: bytes, key_index: int = 0, challenge="static-secret"):
    key = rsa_key(key_index)
    signer = (self_signed(key), key)
    csr = csr_with_name(key, subject_der, challenge)
    msg, _, _ = pkcs_req(client.server.app[SERVICES].ca_material.cert, key, csr, signer=signer)
    resp = await client.post("/scep?operation=PKIOperation", data=msg)
    assert resp.status == 200
    return wire.decode_cert_rep(await resp.read()), signer


@pytest.mark.parametrize("client_name", sorted(SUBJECTS))
async def test_scep_issues_the_requested_subject(client, client_name):
    rep, signer = await _scep(client, SUBJECTS[client_name])
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    leaf = reply_certs(rep, *signer)[0]
    assert cert_subject_der(leaf) == SUBJECTS[client_name]
    rec = await client.server.app[SERVICES].store.get_certificate(format(leaf.serial_number, "x"))
    assert rec.subject == leaf.subject.rfc4514_string()


async def test_scep_refused_attribute_is_failure_badrequest_unless_cn_only(aiohttp_client, make_services):
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret", "SCEPD_POLICY_SUBJECT_ATTRIBUTES": "CN, O, C"}
    services = await make_services(env)
    client = await aiohttp_client(create_app(services))
    rep, _ = await _scep(client, SUBJECTS["scepclient"])
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST
    assert "OU (2.5.4.11)" in rep.fail_info_text
    assert await services.store.list_certificates() == []  # refused, never silently dropped
    # `cn-only` is the explicit choice to drop everything but the CN
    services = await make_services({**env, "SCEPD_POLICY_SUBJECT": "cn-only"})
    client = await aiohttp_client(create_app(services))
    rep, signer = await _scep(client, SUBJECTS["scepclient"])
    assert rep.status == wire.PkiStatus.SUCCESS
    assert reply_certs(rep, *signer)[0].subject.rfc4514_string() == "CN=x"


async def test_duplicate_refusal_compares_the_issued_subject(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_DUPLICATE_SUBJECTS": "refuse"})
    client = await aiohttp_client(create_app(services))
    rep, _ = await _scep(client, SUBJECTS["sscep"], 0)
    assert rep.status == wire.PkiStatus.SUCCESS
    rep, _ = await _scep(client, SUBJECTS["sscep"], 1)
    assert rep.status == wire.PkiStatus.FAILURE
    assert "CN=x,O=interop-lab already exists" in rep.fail_info_text


async def test_approved_pending_request_keeps_the_subject(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_REQUIRE_APPROVAL": "1"})
    client = await aiohttp_client(create_app(services))
    rep, _ = await _scep(client, SUBJECTS["scepclient"])
    assert rep.status == wire.PkiStatus.PENDING
    [pending] = await services.store.find_pending(rep.transaction_id)
    assert pending.subject == "CN=x,OU=MDM,O=interop-lab,C=US"
    issued = await services.enrollment.approve_pending(pending.id, "admin")
    assert cert_subject_der(issued.cert) == SUBJECTS["scepclient"]
