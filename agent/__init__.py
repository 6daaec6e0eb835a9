"""scepd-agent: holds a private key that never leaves the machine, enrolls once, renews forever,
and checks in with the server over mutual TLS."""
__version__ = "0.1.0"
