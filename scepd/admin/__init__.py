"""Administration: the admin service, its HTTP API and CLI."""
