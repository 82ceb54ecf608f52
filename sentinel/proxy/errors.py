"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Clients written for the OpenAI API parse these; every error Sentinel makes itself
(bad input, no tier available, timeouts) uses this shape, and errors raised after a
stream has begun are sent as one SSE ``data:`` event of the same shape.
"""

from __future__ import annotations

import json

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


class ProxyError(Exception):
    """An error Sentinel answers itself, with a status and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": _TYPES.get(status, "api_error"),
                "param": param,
                "code": code,
            }
        }
    ).encode()


def sse_error_event(message: str, code: str, status: int = 502) -> bytes:
    """An SSE event that ends a stream which failed after its first byte was sent."""
    return b"data: " + error_body(status, message, code) + b"\n\n"
