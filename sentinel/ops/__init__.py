"""The ops server: /livez /startupz /readyz /status /metrics on their own port."""
