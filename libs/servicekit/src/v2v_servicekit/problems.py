"""RFC 9457 problem details (application/problem+json) for every error a client can cause.

The one place where errors become HTTP answers: domain errors (`v2v_contracts.errors`) raised by domain
and service-layer code, request validation errors, and Starlette's own HTTP errors. No other module builds
a problem response.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
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
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"  # (v2v_servicekit.idempotency.HEADER)


class ProblemResponse(JSONResponse):
    """A problem+json answer, rendered as ASCII JSON: nothing in it can fail to encode (a lone surrogate
    that slipped into a message becomes an escape, not a 500)."""

    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def problem_response(
    path: str,
    status: int,
    kind: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> ProblemResponse:
    """A problem answer built outside a request handler (the edge middleware: 413, 429, idempotency)."""
    body = {
        "type": PROBLEM_BASE + kind,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": path,
        **extra,
    }
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


def idempotency_key_missing(path: str) -> ProblemResponse:
    return problem_response(
        path,
        400,
        "idempotency-key-missing",
        "Idempotency-Key required",
        f"this request needs an {IDEMPOTENCY_KEY_HEADER} header (1 to 255 printable ASCII characters)",
        errors=[{"field": IDEMPOTENCY_KEY_HEADER, "reason": "is required"}],
    )


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


# a location segment is shown only when it looks like a field name or a code (an unknown field's name, a
# dict key such as a product code); anything else a caller sent as a key is shown as "*", never echoed
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,63}$")


def _segment(part: Any) -> str:
    if isinstance(part, int):
        return str(part)
    text = str(part)
    return text if _SAFE_SEGMENT.match(text) else "*"


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [_segment(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:] or parts
    return ".".join(parts) if parts else "body"


def idempotency_key_invalid(path: str) -> ProblemResponse:
    return problem_response(
        path,
        400,
        "idempotency-key-invalid",
        "Invalid Idempotency-Key",
        f"the {IDEMPOTENCY_KEY_HEADER} header must be one value of 1 to 255 printable ASCII characters",
        errors=[{"field": IDEMPOTENCY_KEY_HEADER, "reason": "must be 1 to 255 printable ASCII characters"}],
    )


def _reason(err: Mapping[str, Any]) -> str:
    """A validation error's reason, never carrying the caller's input."""
    kind = str(err.get("type", ""))
    if kind == "missing":
        return "is required"
    if kind == "json_invalid":
        return "is not valid JSON"
    if kind.startswith("uuid"):
        return "must be a UUID"  # pydantic's UUID messages quote a character of the input
    reason = str(err.get("msg", "invalid"))
    return reason if len(reason) <= 300 else reason[:300] + "..."


def _error_field(err: Mapping[str, Any]) -> str:
    loc = list(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        return "body"  # its location is a character position
    return _field(loc)


def _idempotency_key_error(exc: RequestValidationError) -> str | None:
    """ "missing" or "invalid" when the request's Idempotency-Key header is what failed validation."""
    for err in exc.errors():
        if [str(p).lower() for p in err.get("loc", ())] == ["header", IDEMPOTENCY_KEY_HEADER.lower()]:
            return "missing" if err.get("type") == "missing" else "invalid"
    return None


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        status = status_of(exc)
        body = _body(request, status, exc.title, exc.detail, exc.kind)
        if exc.errors:
            body["errors"] = [e.as_dict() for e in exc.errors]
        for key, value in exc.extensions.items():  # extension members never replace the standard ones
            body.setdefault(key, value)
        headers = {}
        if isinstance(exc, Unauthenticated):  # RFC 6750 §3
            headers["WWW-Authenticate"] = (
                'Bearer realm="vein2vein"'
                if exc.no_credentials
                else 'Bearer realm="vein2vein", error="invalid_token"'
            )
        elif isinstance(exc, Forbidden):
            headers["WWW-Authenticate"] = (
                f'Bearer realm="vein2vein", error="insufficient_scope", scope="{exc.scope}"'
            )
        return ProblemResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        key_error = _idempotency_key_error(exc)  # the same 400s the edge middleware gives, without it
        if key_error == "missing":
            return idempotency_key_missing(request.url.path)
        if key_error == "invalid":
            return idempotency_key_invalid(request.url.path)
        errors = [{"field": _error_field(err), "reason": _reason(err)} for err in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors)
        body = _body(request, 422, "Invalid request", detail, "validation", errors=errors)
        return ProblemResponse(body, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """Anything else. The database or the broker being unavailable (a lost connection, a fail-over,
        a read-only window) is 503 with Retry-After: the client retries, with its Idempotency-Key; any
        other error is a bare 500 problem that carries nothing of the request or the error's text."""
        from v2v_messaging import is_transient

        if is_transient(exc):
            body = _body(
                request,
                503,
                "Service unavailable",
                "the database or the broker is unavailable; retry",
                "unavailable",
            )
            return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON, headers={"Retry-After": "1"})
        body = _body(request, 500, "Internal error", "an unexpected error; it has been logged", "internal")
        return JSONResponse(body, status_code=500, media_type=PROBLEM_JSON)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {
            400: "Bad request",
            404: "Not found",
            405: "Method not allowed",
            413: "Content too large",
            415: "Unsupported media type",
        }.get(exc.status_code, "Error")
        body = _body(request, exc.status_code, title, str(exc.detail), "http-" + str(exc.status_code))
        return ProblemResponse(body, status_code=exc.status_code, headers=exc.headers)
