"""scepd: a certificate enrollment server (SCEP, RFC 8894) with its own two-tier CA."""

__version__ = "0.1.0"
