"""The operator surface over HTTP (aiohttp): health, readiness, metrics, and the /v1/ routes."""
