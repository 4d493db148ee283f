"""Domain errors: what domain and service-layer code raise when a request cannot be honoured.

They carry no HTTP status: `v2v_servicekit.problems` is the one place that turns them into RFC 9457
problem+json answers (Invalid 422, NotFound 404, Conflict / NotAllowedNow / CoiMismatch 409,
Unavailable 503). Every error names the field it is about (when there is one) and the reason; its text
must never echo the caller's input (it may carry patient data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason}


class DomainError(Exception):
    """Base of every error a caller can cause. `kind` is the problem type's last path segment."""

    kind = "error"
    title = "Error"
    # RFC 9457 extension members the problem carries beside `errors` (e.g. the window a request missed);
    # fixed values the service computed, never the caller's input
    extensions: dict[str, Any] = {}  # read-only default; an instance assigns its own

    def __init__(
        self,
        detail: str,
        errors: list[FieldError] | None = None,
        *,
        kind: str | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors or [])
        if kind:
            self.kind = kind
        if title:
            self.title = title


class Invalid(DomainError):
    """Well formed, but the content breaks a rule (unknown reference, date out of range, ...)."""

    kind = "validation"
    title = "Invalid request"

    def __init__(self, field: str, reason: str, *, detail: str | None = None) -> None:
        super().__init__(detail or f"{field}: {reason}", [FieldError(field, reason)])

    @classmethod
    def many(cls, errors: list[FieldError]) -> Invalid:
        first = errors[0]
        self = cls(first.field, first.reason)
        self.errors = list(errors)
        self.detail = "; ".join(f"{e.field}: {e.reason}" for e in errors)
        self.args = (self.detail,)
        return self


class NotFound(DomainError):
    kind = "not-found"

    def __init__(self, what: str, ident: object) -> None:
        super().__init__(f"no {what.lower()} with id {ident}", title=f"{what} not found")


class Conflict(DomainError):
    """Conflicts with the current state of a resource (already exists, already decided, ...)."""

    kind = "conflict"
    title = "Conflict with the current state"

    def __init__(
        self,
        field: str,
        reason: str,
        *,
        detail: str | None = None,
        kind: str | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(detail or f"{field}: {reason}", [FieldError(field, reason)], kind=kind, title=title)


class NotAllowedNow(Conflict):
    """Allowed in principle, not in the object's current state (a state machine refused the step)."""

    kind = "order-state"
    title = "Not allowed in the order's current state"


class CoiMismatch(Conflict):
    """The chain-of-identity id presented at a handoff is not the one of the material or order."""

    kind = "coi-mismatch"
    title = "Chain of identity mismatch"

    def __init__(
        self, reason: str = "does not match the order", *, field: str = "coi", detail: str | None = None
    ) -> None:
        super().__init__(field, reason, detail=detail)


class Unavailable(DomainError):
    """A dependency the request needs is not there right now; retrying later may succeed."""

    kind = "unavailable"
    title = "Service unavailable"


class Unauthenticated(DomainError):
    """No credentials, or credentials that do not prove who the caller is (answered 401, Bearer)."""

    kind = "unauthenticated"
    title = "Authentication required"

    def __init__(
        self, reason: str = "a valid bearer token is required", *, no_credentials: bool = False
    ) -> None:
        super().__init__(reason)
        self.no_credentials = no_credentials  # none were sent (RFC 6750 §3.1: then no error code)


class Forbidden(DomainError):
    """The caller is known but lacks the scope this action needs (answered 403)."""

    kind = "forbidden"
    title = "Not permitted"

    def __init__(self, scope: str) -> None:
        super().__init__(f"this action needs the scope {scope}")
        self.scope = scope
