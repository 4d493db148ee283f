"""The audit trail's entries and their hash chain: pure rules, no I/O (the writer, the in-memory fake and
the verifier all use these, so that there is exactly one definition of an entry's hash).

An entry records who (the actor: client, user, kind of principal, organisation), when (the database
server's clock), what (action, object type and id, the old and new values) and why (a reason code, and the
cause: the event a consumer reacted to, or the request's trace). 21 CFR 11.10(e) asks for "secure,
computer-generated, time-stamped audit trails to independently record the date and time of operator
entries and actions that create, modify, or delete electronic records", where "record changes shall not
obscure previously recorded information"; EU GMP Annex 11 §9 asks for a record of "all GMP-relevant changes
and deletions" with their reason.

Each entry carries `prev_hash`, the `entry_hash` of the entry before it in the same schema (32 zero bytes
for the first), and its own `entry_hash` = SHA-256 over `canonical(entry)`: a compact JSON object with
sorted keys (RFC 8785-like: no insignificant whitespace, ASCII-escaped strings) of every field, the schema
and the sequence number included. A changed field, a removed or moved entry breaks the chain at that
entry; `verify` names the first one.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

FORMAT = 1  # the canonical form's version, part of every hash
GENESIS = bytes(32)  # prev_hash of a chain's first entry
MAX_TEXT = 200  # actor, action, object, reason and cause fields are ids and codes, not prose

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


@dataclass(frozen=True)
class Actor:
    """Who made the change. `client_id`, `kind` and `entity_id` come from the caller's access token (the
    OAuth client, its kind of principal: centre, carrier, site, qa, admin, ops; and its organisation);
    `user_id` is the individual when one signed in (electronic signatures, 21 CFR 11.50/11.100). Changes
    a service makes on its own (an event consumer, a background loop) have kind `system` and the consumer
    or loop as client id."""

    client_id: str
    kind: str
    entity_id: str | None = None
    user_id: str | None = None

    @classmethod
    def system(cls, name: str) -> Actor:
        """The service itself: `Actor.system("order.saga")` for the order service's event consumer."""
        return cls(client_id=name, kind="system")

    @classmethod
    def of_principal(cls, principal: Any) -> Actor:
        """From a `v2v_servicekit.auth.Principal` (or anything with `client_id`, `kind`, `entity_id` and,
        once users sign, `user_id`)."""
        return cls(
            client_id=str(principal.client_id),
            kind=str(principal.kind),
            entity_id=_opt_str(getattr(principal, "entity_id", None)),
            user_id=_opt_str(getattr(principal, "user_id", None)),
        )


UNKNOWN_SYSTEM = Actor.system("system")


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class Entry:
    """An entry as the service layer asks for it, before it has a place in the chain."""

    action: str
    object_type: str
    object_id: str
    actor: Actor
    old: JsonValue = None
    new: JsonValue = None
    reason: str | None = None
    cause: str | None = None
    entry_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def seal(self, schema: str, seq: int, recorded_at: datetime, prev_hash: bytes) -> Record:
        """The entry at `seq` of `schema`'s chain, after `prev_hash`, timed by the database's clock."""
        draft = Record(
            schema=schema,
            seq=seq,
            entry_id=self.entry_id,
            recorded_at=recorded_at,
            actor=self.actor,
            action=self.action,
            object_type=self.object_type,
            object_id=self.object_id,
            old=self.old,
            new=self.new,
            reason=self.reason,
            cause=self.cause,
            prev_hash=prev_hash,
            entry_hash=b"",
        )
        return dataclasses.replace(draft, entry_hash=entry_hash(draft))


@dataclass(frozen=True)
class Record:
    """An entry in its chain, as stored (and as read back by the verifier)."""

    schema: str
    seq: int
    entry_id: uuid.UUID
    recorded_at: datetime
    actor: Actor
    action: str
    object_type: str
    object_id: str
    old: JsonValue
    new: JsonValue
    reason: str | None
    cause: str | None
    prev_hash: bytes
    entry_hash: bytes

    def computed_hash(self) -> bytes:
        return entry_hash(self)


def timestamp(at: datetime) -> str:
    """UTC, microseconds, `Z`: the one text form of a time in the canonical form."""
    if at.tzinfo is None:
        raise ValueError("audit times are timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _content(e: Entry | Record) -> dict[str, Any]:
    """The canonical form's fields that the writer knows: those of the entry itself (the database adds
    the schema, the seq, the time and the previous hash)."""
    return {
        "format": FORMAT,
        "entry_id": str(e.entry_id),
        "actor": {
            "client_id": e.actor.client_id,
            "user_id": e.actor.user_id,
            "kind": e.actor.kind,
            "entity_id": e.actor.entity_id,
        },
        "action": e.action,
        "object": {"type": e.object_type, "id": e.object_id},
        "old": e.old,
        "new": e.new,
        "reason": e.reason,
        "cause": e.cause,
    }


def canonical(record: Record) -> bytes:
    """The bytes an entry's hash is taken over: every field but the hash itself, the previous hash
    included, as compact JSON with sorted keys and ASCII-escaped strings."""
    doc = {
        **_content(record),
        "schema": record.schema,
        "seq": record.seq,
        "recorded_at": timestamp(record.recorded_at),
        "prev_hash": record.prev_hash.hex(),
    }
    return _json(doc).encode()


def entry_hash(record: Record) -> bytes:
    return hashlib.sha256(canonical(record)).digest()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def template(entry: Entry) -> tuple[str, str]:
    """The canonical form of `entry` with the four values only the database knows left out, as the text
    before the previous hash (`head`) and between it and the time (`middle`): for any schema, seq, time
    and previous hash,

        canonical(entry.seal(schema, seq, at, prev)) == (head + prev.hex() + middle + timestamp(at)
            + '","schema":' + <schema as JSON> + ',"seq":' + str(seq) + '}').encode()

    (the keys are sorted: `prev_hash`, `reason`, `recorded_at`, `schema` and `seq` come last). The
    database's `audit_append` hashes that text under the chain lock (one round trip; the verifier
    hashes `canonical` as ever)."""
    before = _content(entry)
    reason = before.pop("reason")  # sorted after `prev_hash`, as are the four values the database adds
    head = "{" + ",".join(f"{_json(k)}:{_json(v)}" for k, v in sorted(before.items())) + ',"prev_hash":"'
    middle = '","reason":' + _json(reason) + ',"recorded_at":"'
    return head, middle


def chain(schema: str, entries: Iterable[Entry], *, after: tuple[int, bytes], at: datetime) -> list[Record]:
    """Seal `entries` in order after the chain's tail `after` = (its seq, its entry_hash); (0, GENESIS)
    for an empty chain."""
    seq, prev = after
    out: list[Record] = []
    for e in entries:
        seq += 1
        record = e.seal(schema, seq, at, prev)
        out.append(record)
        prev = record.entry_hash
    return out


# ---- values ------------------------------------------------------------------------------------------


def jsonable(value: Any, *, _depth: int = 0) -> JsonValue:
    """Old and new values as plain JSON that survives a round trip through `jsonb` unchanged (so that the
    verifier recomputes the same hash from what it reads back): UUIDs, dates, times, decimals and enums
    become strings, tuples and sets lists (sets sorted), dataclasses dicts. NaN and infinities, NUL
    characters (which `jsonb` refuses) and non-string keys are refused: the caller's bug, found at once."""
    if _depth > 32:
        raise ValueError("audit values nest too deeply")
    if value is None or isinstance(value, bool | str | int):
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("audit values may not hold NUL characters")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("audit values must be finite numbers")
        if value.is_integer() and abs(value) >= 1e16:  # jsonb gives these back as integers
            return int(value)
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value, _depth=_depth + 1)
    if isinstance(value, datetime):
        return timestamp(value) if value.tzinfo else value.isoformat()
    if isinstance(value, date | time | uuid.UUID | Decimal):
        return str(value) if not isinstance(value, date | time) else value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), _depth=_depth + 1)
    if isinstance(value, Mapping):
        out: dict[str, JsonValue] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError("audit value keys must be strings")
            out[jsonable(k)] = jsonable(v, _depth=_depth + 1)  # type: ignore[index]
        return out
    if isinstance(value, set | frozenset):
        return [jsonable(v, _depth=_depth + 1) for v in sorted(value, key=repr)]
    if isinstance(value, list | tuple):
        return [jsonable(v, _depth=_depth + 1) for v in value]
    raise TypeError(f"not an audit value: {type(value).__name__}")


def short_text(name: str, value: Any, *, optional: bool = False) -> str | None:
    """An id or code field: a short single-line string (never prose)."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"audit {name} is required")
    text = str(value)
    if not text and not optional:
        raise ValueError(f"audit {name} is empty")
    if len(text) > MAX_TEXT or any(c in text for c in "\x00\r\n"):
        raise ValueError(f"audit {name} must be a short single-line id or code")
    return text or None


# ---- verification ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement, kept outside the database, that `schema`'s chain had `seq` entries and that
    entry `seq` hashed to `entry_hash` at `signed_at`."""

    database: str
    schema: str
    seq: int
    entry_hash: bytes
    signed_at: datetime
    source: str = ""  # where it was read from (a file name), for the report


@dataclass(frozen=True)
class Break:
    """The first broken entry of a chain: where, and what is wrong."""

    schema: str
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"{self.schema}: entry seq {self.seq}: {self.problem}"


@dataclass
class ChainSummary:
    schema: str
    entries: int = 0
    last_seq: int = 0
    last_hash: bytes = GENESIS
    first_at: datetime | None = None
    last_at: datetime | None = None
    checkpoints: int = 0
    latest_checkpoint: Checkpoint | None = None
    broken: Break | None = None

    def line(self) -> str:
        if self.broken is not None:
            return f"BROKEN {self.broken}"
        cp = self.latest_checkpoint
        checkpoint = (
            f"{self.checkpoints} checkpoint(s), latest at seq {cp.seq} ({timestamp(cp.signed_at)})"
            if cp
            else "no checkpoint yet"
        )
        return (
            f"ok {self.schema}: {self.entries} entries, seq 1..{self.last_seq}, "
            f"head {self.last_hash.hex()[:16]}…; {checkpoint}"
        )


class ChainVerifier:
    """Feed a schema's records in the order of their seq; `finish()` compares the chain with the signed
    checkpoints. Stops at the first broken entry (what follows a break cannot be trusted either).

        verifier = ChainVerifier("ordering", checkpoints)
        for record in rows_in_seq_order:
            if not verifier.add(record):
                break
        summary = verifier.finish()
    """

    def __init__(
        self,
        schema: str,
        checkpoints: Iterable[Checkpoint] = (),
    ) -> None:
        self.summary = ChainSummary(schema)
        self._expected_seq = 1
        self._prev = GENESIS
        self._checkpoints: dict[int, list[Checkpoint]] = {}
        for cp in checkpoints:
            self._checkpoints.setdefault(cp.seq, []).append(cp)
            self.summary.checkpoints += 1
            latest = self.summary.latest_checkpoint
            if latest is None or (cp.seq, cp.signed_at) > (latest.seq, latest.signed_at):
                self.summary.latest_checkpoint = cp

    def _break(self, seq: int, problem: str) -> bool:
        self.summary.broken = Break(self.summary.schema, seq, problem)
        return False

    def add(self, record: Record) -> bool:
        """False once the chain is broken (at this record or before)."""
        s = self.summary
        if s.broken is not None:
            return False
        expected = self._expected_seq
        if record.schema != s.schema:
            return self._break(record.seq, f"belongs to schema {record.schema!r}")
        if record.seq < expected:
            return self._break(record.seq, f"out of order: seq {record.seq} after seq {expected - 1}")
        if record.seq > expected:
            missing = f"seq {expected}" if record.seq == expected + 1 else f"seq {expected}..{record.seq - 1}"
            return self._break(
                expected, f"missing: {missing} removed (the next entry present is seq {record.seq})"
            )
        if record.computed_hash() != record.entry_hash:
            return self._break(record.seq, mismatch(record))
        if record.prev_hash != self._prev:
            return self._break(
                record.seq,
                f"does not chain to seq {record.seq - 1}: its prev_hash {record.prev_hash.hex()[:16]}… is "
                f"not that entry's hash {self._prev.hex()[:16]}… (an entry was removed, moved or replaced)",
            )
        for cp in self._checkpoints.get(record.seq, ()):
            if cp.entry_hash != record.entry_hash:
                return self._break(
                    record.seq,
                    f"differs from the signed checkpoint {cp.source or ''} of {timestamp(cp.signed_at)} "
                    "(the chain was rewritten from here or before)",
                )
        s.entries += 1
        s.last_seq = record.seq
        s.last_hash = record.entry_hash
        s.first_at = s.first_at or record.recorded_at
        s.last_at = record.recorded_at
        self._prev = record.entry_hash
        self._expected_seq += 1
        return True

    def explain(self, record: Record, chained_to_seq: int | None) -> None:
        """Refine the break at `record` (a hash mismatch) once the seq of the entry its prev_hash names is
        known (the database verifier looks it up): a moved entry is then named as moved."""
        broken = self.summary.broken
        if broken is not None and broken.seq == record.seq:
            self.summary.broken = Break(broken.schema, broken.seq, mismatch(record, chained_to_seq))

    def finish(self) -> ChainSummary:
        s = self.summary
        if s.broken is None:
            beyond = [cp for seq, cps in self._checkpoints.items() if seq > s.last_seq for cp in cps]
            if beyond:
                cp = max(beyond, key=lambda c: c.seq)
                self._break(
                    s.last_seq + 1,
                    f"missing: the signed checkpoint {cp.source or ''} of {timestamp(cp.signed_at)} records "
                    f"seq {cp.seq}, the table ends at seq {s.last_seq} (the tail was removed)",
                )
        return s


def mismatch(record: Record, chained_to_seq: int | None = None) -> str:
    """Why a hash does not match: a changed value, or an entry moved to another seq (its hash covers the
    seq it was written at). A move is named when that seq is found: after the entry its prev_hash names
    (`chained_to_seq`, when known), or a neighbour's."""
    candidates = [1] if record.prev_hash == GENESIS else []
    if chained_to_seq is not None:
        candidates.append(chained_to_seq + 1)
    candidates += [record.seq - 1, record.seq + 1]
    for candidate in candidates:
        if (
            candidate >= 1
            and candidate != record.seq
            and dataclasses.replace(record, seq=candidate).computed_hash() == record.entry_hash
        ):
            return f"moved: this entry was written as seq {candidate} (rows reordered)"
    return "changed: its contents do not match its entry_hash (a value was altered after it was written)"


def verify(schema: str, records: Iterable[Record], checkpoints: Iterable[Checkpoint] = ()) -> ChainSummary:
    """A whole chain at once (tests, the in-memory trail): its summary, `broken` set at the first break."""
    verifier = ChainVerifier(schema, checkpoints)
    for record in records:
        if not verifier.add(record):
            break
    return verifier.finish()


def by_seq(records: Iterable[Record]) -> Iterator[Record]:
    return iter(sorted(records, key=lambda r: r.seq))
