"""What the connection refuses itself (bad framing, a limit, a timeout) and what the
client is told: each refusal names the limit it met and the config key that sets it.
A refusal is answered in its turn, then the connection closes."""

from __future__ import annotations

from sentinel.http1.limits import HttpLimits


class Refusal:
    """A request the connection refuses itself: its status, error code and message."""

    __slots__ = ("status", "code", "message")

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message


class Refused(Exception):
    """Raised from a parser callback: httptools stops, and the connection refuses."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def internal_error() -> Refusal:
    return Refusal(500, "internal_error", "internal error")


def malformed(exc: Exception) -> Refusal:
    return Refusal(400, "bad_request", f"Malformed HTTP request: {exc}")


def upgrade_not_supported() -> Refusal:
    return Refusal(
        400,
        "upgrade_not_supported",
        "A chunked request body with an Upgrade offer is not supported: send it without "
        "the Upgrade header (HTTP/1.1), or with a Content-Length",
    )


def header_too_large(limits: HttpLimits) -> Refusal:
    return Refusal(
        431,
        "header_too_large",
        "Request headers are larger than "
        f"{limits.max_header_bytes} bytes ({limits.key('max_header_bytes')})",
    )


def uri_too_long(limits: HttpLimits) -> Refusal:
    return Refusal(
        414,
        "uri_too_long",
        "Request target is longer than "
        f"{limits.max_request_line_bytes} bytes ({limits.key('max_request_line_bytes')})",
    )


def too_many_headers(limits: HttpLimits) -> Refusal:
    return Refusal(
        431,
        "too_many_headers",
        f"More than {limits.max_headers} request headers ({limits.key('max_headers')})",
    )


def body_too_large(size: int, limits: HttpLimits) -> Refusal:
    return Refusal(
        413,
        "body_too_large",
        f"Request body is {size} bytes, over the limit of {limits.max_body_bytes} "
        f"({limits.key('max_body_bytes')})",
    )


def header_timeout(limits: HttpLimits) -> Refusal:
    return Refusal(
        408,
        "header_timeout",
        "Request headers not received within "
        f"{limits.header_timeout_s:g} s ({limits.key('header_timeout_s')})",
    )


def body_timeout(limits: HttpLimits) -> Refusal:
    return Refusal(
        408,
        "body_timeout",
        "Request body not received within "
        f"{limits.body_timeout_s:g} s ({limits.key('body_timeout_s')})",
    )
