"""RFC 9457 problem details (application/problem+json) for every error a client can cause.

The one place where errors become HTTP answers: domain errors (`v2v_contracts.errors`) raised by domain
and service-layer code, request validation errors, and Starlette's own HTTP errors. No other module builds
a problem response.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from v2v_contracts.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    Unauthenticated,
    Unavailable,
)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://vein2vein.dev/problems/"


# the HTTP status of each kind of domain error (the most specific class wins)
STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (Invalid, 422),
    (NotFound, 404),
    (Conflict, 409),  # NotAllowedNow and CoiMismatch too
    (Unavailable, 503),
    (Unauthenticated, 401),
    (Forbidden, 403),
)


def status_of(error: DomainError) -> int:
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 400


def _body(request: Request, status: int, title: str, detail: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": PROBLEM_BASE + kind,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:] or parts
    return ".".join(parts) if parts else "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        status = status_of(exc)
        body = _body(request, status, exc.title, exc.detail, exc.kind)
        if exc.errors:
            body["errors"] = [e.as_dict() for e in exc.errors]
        headers = {}
        if isinstance(exc, Unauthenticated):  # RFC 6750 §3
            headers["WWW-Authenticate"] = 'Bearer realm="vein2vein", error="invalid_token"'
        elif isinstance(exc, Forbidden):
            headers["WWW-Authenticate"] = (
                f'Bearer realm="vein2vein", error="insufficient_scope", scope="{exc.scope}"'
            )
        return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            reason = str(err.get("msg", "invalid"))
            if err.get("type") == "missing":
                reason = "is required"
            errors.append({"field": _field(err.get("loc", ())), "reason": reason})
        detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors)
        body = _body(request, 422, "Invalid request", detail, "validation", errors=errors)
        return JSONResponse(body, status_code=422, media_type=PROBLEM_JSON)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
        body = _body(request, exc.status_code, title, str(exc.detail), "http-" + str(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, media_type=PROBLEM_JSON)
