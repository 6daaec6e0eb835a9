"""Trust bootstrap on the HTTPS listener: the root by its SHA-256 fingerprint, or all roots."""
from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scepd.http.app import create_https_app


async def test_root_by_fingerprint_and_all_roots(aiohttp_client, services):
    client = await aiohttp_client(create_https_app(services))
    root = services.ca_material.root
    fp = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    resp = await client.get(f"/root/{fp.upper()}")
    assert resp.status == 200
    assert x509.load_pem_x509_certificate((await resp.text()).encode()) == root
    resp = await client.get("/root/" + "00" * 32)
    assert resp.status == 404
    resp = await client.get("/roots.pem")
    assert x509.load_pem_x509_certificates((await resp.text()).encode()) == [root]
    # the issuing CA is not a root: it is never served as one
    issuing = hashlib.sha256(services.ca_material.cert_der).hexdigest()
    assert (await client.get(f"/root/{issuing}")).status == 404
