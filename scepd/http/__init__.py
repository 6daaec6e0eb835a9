"""HTTP assembly: the aiohttp app factory, the front-end/migration assembly, TLS listeners."""
