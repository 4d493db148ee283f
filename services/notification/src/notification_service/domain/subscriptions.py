"""Webhook subscriptions and e-mail recipients: what they are and what a valid one looks like."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

from notification_service.domain.routing import EXCEPTION_EVENT_TYPES, ORDER_EVENT_TYPES
from v2v_contracts.errors import Invalid


@dataclass(frozen=True)
class Subscription:
    """A treatment centre's endpoint for order events (Standard Webhooks)."""

    subscription_id: uuid.UUID
    treatment_center_id: str
    url: str
    secret: str = field(repr=False)  # whsec_<base64>; needed to sign, never returned
    event_types: list[str] | None  # None: every type
    active: bool
    created_at: datetime

    def wants(self, event_type: str) -> bool:
        return self.active and (self.event_types is None or event_type in self.event_types)


@dataclass(frozen=True)
class Recipient:
    """An address a treatment centre's exception alerts are e-mailed to."""

    recipient_id: uuid.UUID
    treatment_center_id: str
    email: str = field(repr=False)
    event_types: list[str] | None  # None: every exception type
    active: bool
    created_at: datetime

    def wants(self, event_type: str) -> bool:
        return self.active and (self.event_types is None or event_type in self.event_types)


# ---- subscriptions ----------------------------------------------------------------------------------


def validate_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise Invalid("url", "must be an absolute http(s) URL")


def validate_secret(secret: str) -> None:
    if not secret.startswith("whsec_"):
        raise Invalid("secret", "must be 'whsec_' followed by base64 (Standard Webhooks)")
    try:
        raw = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("secret", "the part after 'whsec_' is not valid base64") from None
    if not 24 <= len(raw) <= 64:
        raise Invalid("secret", "must decode to 24..64 bytes")


def _validate_types(types: list[str] | None, known: Iterable[str], what: str) -> None:
    if types is None:
        return
    if not types:
        raise Invalid("event_types", f"must not be empty; leave it out to receive every {what}")
    known = list(known)
    unknown = [t for t in types if t not in known]
    if unknown:
        raise Invalid("event_types", f"unknown event types {unknown}; known: {known}")


def validate_event_types(types: list[str] | None) -> None:
    _validate_types(types, ORDER_EVENT_TYPES, "type")


# ---- e-mail recipients ------------------------------------------------------------------------------


def validate_exception_types(types: list[str] | None) -> None:
    _validate_types(types, EXCEPTION_EVENT_TYPES, "exception type")


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def address_problem(address: str) -> str | None:
    """Why `address` is not a plain `local@domain.tld` address (dot-atom, ASCII), or None if it is."""
    if len(address) > 254:
        return "must be at most 254 characters"
    if address.count("@") != 1:
        return "must be an address of the form name@domain.example"
    local, domain = address.split("@")
    if not local or len(local) > 64 or not _LOCAL.fullmatch(local):
        return "the part before '@' must be 1..64 letters, digits or !#$%&'*+/=?^_`{|}~.- (no spaces)"
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return "the part after '@' must be a domain name such as hospital.example"
    return None


def validate_email(address: str) -> None:
    reason = address_problem(address)
    if reason:
        raise Invalid("email", reason)
