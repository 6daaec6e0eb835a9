"""The CA: keys (pki, keyfile), profiles and issuance policy, CSR facts, issuance (authority), revocation, CRL, OCSP."""
