"""API errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from vllm.engine.async_engine import EngineDeadError
from vllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error to return to the client with an HTTP status."""

    def __init__(self, status_code: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(
            message=self.message, type=_TYPES.get(self.status_code, "Error"), param=self.param,
            code=self.status_code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status_code)


def to_api_error(exc: BaseException) -> APIError:
    """The client-facing error for an exception raised while serving."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc))
    if isinstance(exc, ValueError):  # invalid prompt, sampling parameter or adapter
        return APIError(400, str(exc))
    return APIError(500, f"internal server error: {exc!r}")
