"""Sampled payload logging: metadata of every proxied request, full (redacted,
size-capped) bodies for a sample, JSON lines in rotating files under a disk budget,
written by a background thread so the request path never waits on the disk."""

from sentinel.payloads.log import PayloadLog, PayloadRecord

__all__ = ["PayloadLog", "PayloadRecord"]
