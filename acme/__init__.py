"""scepd's ACME server (RFC 8555 + RFC 9773 ARI). Not implemented yet: see issue #4.

This package name shadows certbot's `acme` library, which is why scepd installs into its own
virtualenv and drives certbot only through its command line.
"""
