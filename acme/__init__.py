"""scepd's ACME server (RFC 8555, ARI RFC 9773), served on the HTTPS listener.

jws: strict JWS codec. store: accounts, orders, authorizations, challenges, nonces, EAB keys.
service: protocol logic (no HTTP). validators: http-01, dns-01, tls-alpn-01 on the wire.
server: the aiohttp transport. cli: `scepd eab create`, `scepd certs renew-now`,
`scepd acme accounts|deactivate`.
frontend: how scepd.http.assembly plugs the routes and commands above into scepd (the only
place scepd/ names this package).

This package name shadows certbot's `acme` library, which is why scepd installs into its own
virtualenv and drives certbot only through its command line.
"""
