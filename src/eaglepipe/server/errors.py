"""API errors and their OpenAI-style JSON bodies."""
from __future__ import annotations

from aiohttp import web


class ApiError(Exception):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param

    def body(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}` with the HTTP status as code."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> web.Response:
        """The error as a JSON response."""
        return web.json_response(self.body(), status=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    """400 invalid_request_error."""
    return ApiError(400, message, param=param)


def overloaded(message: str) -> ApiError:
    """503: the server is at capacity; the client should retry later."""
    return ApiError(503, message, type="overloaded_error")
