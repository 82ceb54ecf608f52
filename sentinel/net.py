"""Addresses: the URL a local client uses to reach a server bound to host:port."""

from __future__ import annotations


def local_url(host: str, port: int) -> str:
    """http URL for reaching host:port from this machine (wildcard binds -> loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
