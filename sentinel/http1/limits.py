"""The limits a hostile client meets on a port served by ``http1`` (``proxy.limits`` on
the traffic port, ``ops.limits`` on the ops port), and the config keys that set them
(named in every refusal)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_request_line_bytes: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body_bytes: int = 4 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    send_timeout_s: float = 30.0
    max_connections: int = 2048
    # open connections from one client address at most (0: no cap; the traffic port's
    # clients often share a load balancer's address)
    max_connections_per_client: int = 0
    # where these limits are set, named in refusals: "<key_prefix>.max_header_bytes", ...
    key_prefix: str = "proxy.limits"
    body_key: str = "proxy.max_body_bytes"

    def key(self, name: str) -> str:
        """The config key of limit ``name``."""
        return self.body_key if name == "max_body_bytes" else f"{self.key_prefix}.{name}"
