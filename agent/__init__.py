"""scepd-agent: enroll, renew and check in over mTLS. Not implemented yet: see issue #6."""
