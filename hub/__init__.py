"""The OpenRed hub server: sessions, routing, topics, limits, config, CLI."""
