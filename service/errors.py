"""The service's errors: each class carries its HTTP status and a stable `error` code.

Every error response, ours or FastAPI's, has the body {"error": "...", "detail": "..."}.
"""

import logging
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from service.db import is_disconnect

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": "PoolNotFound", "detail": "no pool 42"}]}
    )

    error: str
    detail: Any


class ServiceError(HTTPException):
    """Base class: subclasses set `status_code` and may set `error` (default: the class name)."""

    status_code: int = 400
    error: str = ""

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=self.status_code, detail=detail, headers=headers)

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.error = cls.__name__


class NotAuthenticated(ServiceError):
    status_code = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class PoolNotFound(NotFound):
    pass


class ItemNotFound(NotFound):
    pass


class RoundNotFound(NotFound):
    pass


class KeyNotFound(NotFound):
    pass


class NoImage(NotFound):
    pass


class BadInput(ServiceError):
    """The request is well-formed but makes no sense for this pool (400)."""

    status_code = 400


class InvalidLabel(BadInput):
    pass


class InvalidImage(BadInput):
    pass


class InvalidArchive(BadInput):
    pass


class WrongInputKind(BadInput):
    pass


class StrategyNotApplicable(BadInput):
    pass


class InvalidParams(ServiceError):
    """A round's params do not fit its strategy (422, like any other payload error)."""

    status_code = 422


class InvalidKeyScope(ServiceError):
    """A key's pools do not fit its role: admin keys are never restricted (422)."""

    status_code = 422


class Conflict(ServiceError):
    """The request clashes with the current state (409)."""

    status_code = 409


class PoolNameTaken(Conflict):
    pass


class NotEnoughLabels(Conflict):
    pass


class BudgetTooLarge(Conflict):
    pass


class RoundInProgress(Conflict):
    pass


class RoundNotCancellable(Conflict):
    pass


class RoundNotReady(Conflict):
    pass


class DatasetMismatch(Conflict):
    pass


class ShapeMismatch(Conflict):
    """Items of one pool must share a shape: its first items fix it."""


class ConcurrentUpload(Conflict):
    pass


class PayloadTooLarge(ServiceError):
    status_code = 413


class ImageTooLarge(PayloadTooLarge):
    pass


class UnsupportedMediaType(ServiceError):
    status_code = 415


class Unavailable(ServiceError):
    status_code = 503


class DatabaseUnavailable(Unavailable):
    """The database connection was lost or refused; retry.

    A connection lost during COMMIT leaves it unknown whether the request was applied:
    POST /labels is safe to retry (idempotent, when a request gives each item one answer per
    annotator), a retried POST /rounds or /pools may be a 409
    (it exists already), and a retried POST /keys can create a second key.
    """


def responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: each status with the error codes it may carry."""
    by_status: dict[int, list[str]] = {422: ["ValidationError"]}
    for error in (NotAuthenticated, Forbidden, DatabaseUnavailable, *errors):
        by_status.setdefault(error.status_code, []).append(error.error)
    return {
        status: {
            "model": ErrorBody,
            "description": f"{HTTPStatus(status).phrase}: " + ", ".join(codes),
        }
        for status, codes in sorted(by_status.items())
    }


def _code(exc: HTTPException) -> str:
    if isinstance(exc, ServiceError):
        return exc.error
    return HTTPStatus(exc.status_code).phrase.replace(" ", "").replace("-", "")


# FastAPI answers JSON it cannot decode with a 422, but a body its reader fails on before
# that with a bare 400 "error parsing the body", the reader's error as the cause.
_UNREADABLE_BODY: dict[type[Exception], str] = {
    UnicodeDecodeError: "the body is not UTF-8 encoded JSON",
    RecursionError: "the JSON body is nested too deeply",
}


def _unreadable_body(exc: HTTPException) -> str | None:
    """Why FastAPI could not read the request's JSON body, if that is what `exc` reports."""
    if isinstance(exc, ServiceError) or exc.status_code != 400:
        return None
    for cause, reason in _UNREADABLE_BODY.items():
        if isinstance(exc.__cause__, cause):
            return reason
    return None


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    reason = _unreadable_body(exc)
    if reason is not None:
        # A malformed payload like any other: 422, as broken JSON is.
        return _validation_response([{"loc": ["body"], "msg": reason, "type": "json_invalid"}])
    return JSONResponse(
        {"error": _code(exc), "detail": exc.detail},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Drop pydantic's echo of the input: it may be a large upload or a secret.
    return _validation_response(
        [
            {key: value for key, value in error.items() if key in ("loc", "msg", "type")}
            for error in exc.errors()
        ]
    )


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"error": "ValidationError", "detail": errors}, status_code=422)


async def database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A dropped or refused database connection is a 503 to retry, not a 500."""
    assert isinstance(exc, DBAPIError)
    if not is_disconnect(exc):
        raise exc  # a bug: the server error middleware answers 500 and logs it
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, exc.orig)
    return await http_error_handler(request, database_unavailable())


def database_unavailable() -> DatabaseUnavailable:
    return DatabaseUnavailable(
        "the database is unavailable (connection lost or refused); the request may or may not"
        " have been applied: retry it",
        headers={"Retry-After": "1"},
    )
