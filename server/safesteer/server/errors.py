"""One exception hierarchy for the API; `app` maps it to OpenAI error JSON in one place."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}`."""

    status_code = 500
    error_type = "internal_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    """A field that would change the output, which this server does not implement."""

    default_code = "unsupported_parameter"

    def __init__(self, param: str, why: str = "") -> None:
        super().__init__(
            f"'{param}' is not supported by this server{': ' + why if why else ''}", param=param
        )


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class ModelNotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class NotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(APIError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class ServerOverloaded(APIError):
    status_code = 429
    error_type = "server_overloaded"
    default_code = "queue_full"


class EngineFailure(APIError):
    """The model step failed; the message is generic on purpose (no internals leak)."""

    status_code = 500
    error_type = "internal_error"
    default_code = "engine_failure"


class AuthenticationFailed(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(APIError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class Conflict(APIError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"
