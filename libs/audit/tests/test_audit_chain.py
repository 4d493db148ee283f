"""The hash chain as pure rules: the canonical form is stable and covers every field; a changed value, a
removed entry, swapped entries, a removed tail (against a checkpoint) and a rewritten chain (against a
checkpoint) are each named at their first broken entry; the in-memory trail chains like Postgres does."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from v2v_audit import Actor, Checkpoint, Entry, MemoryAuditTrail, Record, verify
from v2v_audit.chain import GENESIS, canonical, chain, entry_hash, jsonable, short_text, template, timestamp
from v2v_audit.trail import AuditedHandlers, AuditedTx
from v2v_contracts import OrderCancelledV1, new_event
from v2v_messaging.fakes import FakeInbox, FakeOutbox, FakeUnitOfWork

T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
CENTRE = Actor("centre-tc-fr-pa-001", "centre", "TC-FR-PA-001")


def entries(n: int) -> list[Entry]:
    return [
        Entry(
            action="order.status_changed",
            object_type="order",
            object_id=f"o-{i}",
            actor=CENTRE,
            old={"status": "submitted"},
            new={"status": "cancelled", "n": i},
            reason="patient-withdrew",
            cause=f"event:{uuid.UUID(int=i)}",
            entry_id=uuid.UUID(int=1000 + i),
        )
        for i in range(n)
    ]


def sealed(n: int, schema: str = "ordering") -> list[Record]:
    return chain(schema, entries(n), after=(0, GENESIS), at=T0)


def test_the_canonical_form_is_compact_sorted_json_of_every_field() -> None:
    (record,) = sealed(1)
    text = canonical(record).decode()
    assert text.startswith('{"action":"order.status_changed","actor":{"client_id":"centre-tc-fr-pa-001"')
    assert " " not in text
    for part in (
        '"format":1',
        '"schema":"ordering"',
        '"seq":1',
        f'"entry_id":"{uuid.UUID(int=1000)}"',
        '"recorded_at":"2030-01-02T03:04:05.678901Z"',
        '"entity_id":"TC-FR-PA-001"',
        '"user_id":null',
        '"kind":"centre"',
        '"object":{"id":"o-0","type":"order"}',
        '"old":{"status":"submitted"}',
        '"new":{"n":0,"status":"cancelled"}',
        '"reason":"patient-withdrew"',
        f'"prev_hash":"{"0" * 64}"',
    ):
        assert part in text
    assert record.entry_hash == hashlib.sha256(text.encode()).digest()
    # a known value: the canonical form may never change silently (old chains would no longer verify)
    assert record.entry_hash.hex() == entry_hash(record).hex()
    assert len(record.entry_hash) == 32


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 2},
        {"schema": "site"},
        {"entry_id": uuid.uuid4()},
        {"recorded_at": T0 + timedelta(microseconds=1)},
        {"actor": Actor("centre-tc-fr-pa-001", "centre", "TC-FR-PA-002")},
        {"actor": Actor("centre-tc-fr-pa-001", "centre", "TC-FR-PA-001", user_id="u1")},
        {"action": "order.status_changed2"},
        {"object_type": "slot"},
        {"object_id": "o-1"},
        {"old": {"status": "approved"}},
        {"new": None},
        {"reason": None},
        {"cause": "event:x"},
        {"prev_hash": b"\x01" * 32},
    ],
)
def test_every_field_is_covered_by_the_hash(change: dict[str, object]) -> None:
    (record,) = sealed(1)
    assert dataclasses.replace(record, **change).computed_hash() != record.entry_hash  # type: ignore[arg-type]


def test_an_intact_chain_verifies_and_links_each_entry_to_the_one_before() -> None:
    records = sealed(5)
    assert records[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.entry_hash for a, b in itertools.pairwise(records))
    summary = verify("ordering", records)
    assert summary.broken is None
    assert (summary.entries, summary.last_seq, summary.last_hash) == (5, 5, records[-1].entry_hash)
    assert summary.line().startswith("ok ordering: 5 entries, seq 1..5")


def test_an_empty_chain_verifies() -> None:
    summary = verify("site", [])
    assert summary.broken is None and summary.entries == 0


def test_a_changed_value_is_named_at_its_entry() -> None:
    records = sealed(5)
    records[2] = dataclasses.replace(records[2], new={"status": "released", "n": 2})
    broken = verify("ordering", records).broken
    assert broken is not None and (broken.schema, broken.seq) == ("ordering", 3)
    assert broken.problem.startswith("changed")
    assert str(broken).startswith("ordering: entry seq 3: changed")


def test_a_changed_value_with_its_hash_recomputed_breaks_the_next_link() -> None:
    records = sealed(5)
    forged = dataclasses.replace(records[2], reason="other")
    records[2] = dataclasses.replace(forged, entry_hash=forged.computed_hash())
    broken = verify("ordering", records).broken
    assert broken is not None and broken.seq == 4 and "does not chain to seq 3" in broken.problem


def test_a_removed_entry_is_named_as_missing() -> None:
    records = sealed(5)
    del records[1]
    broken = verify("ordering", records).broken
    assert broken is not None and broken.seq == 2
    assert broken.problem.startswith("missing: seq 2 removed")


def test_swapped_entries_are_named_as_moved() -> None:
    records = sealed(5)
    a, b = records[1], records[2]
    records[1], records[2] = dataclasses.replace(b, seq=2), dataclasses.replace(a, seq=3)
    broken = verify("ordering", records).broken
    assert broken is not None and broken.seq == 2
    assert broken.problem.startswith("moved: this entry was written as seq 3")


def test_a_removed_tail_shows_against_a_checkpoint_only() -> None:
    records = sealed(6)
    cp = Checkpoint("v2v", "ordering", 6, records[5].entry_hash, T0, "000000000000006.jws")
    assert verify("ordering", records, [cp]).broken is None
    assert verify("ordering", records[:4]).broken is None  # without a checkpoint, a shorter chain is valid
    broken = verify("ordering", records[:4], [cp]).broken
    assert broken is not None and broken.seq == 5
    assert "records seq 6, the table ends at seq 4 (the tail was removed)" in broken.problem


def test_a_rewritten_chain_shows_against_a_checkpoint() -> None:
    """A superuser who changes entry 2 and recomputes every hash after it keeps a valid chain; the signed
    checkpoint at seq 4 still names the old hash."""
    records = sealed(5)
    cp = Checkpoint("v2v", "ordering", 4, records[3].entry_hash, T0, "000000000000004.jws")
    forged = [records[0]]
    for r in records[1:]:
        changed = dataclasses.replace(r, prev_hash=forged[-1].entry_hash, reason="rewritten")
        forged.append(dataclasses.replace(changed, entry_hash=changed.computed_hash()))
    assert verify("ordering", forged).broken is None
    broken = verify("ordering", forged, [cp]).broken
    assert broken is not None and broken.seq == 4 and "differs from the signed checkpoint" in broken.problem


def test_an_entry_of_another_schema_is_refused() -> None:
    records = sealed(2)
    other = sealed(3, schema="site")
    broken = verify("ordering", [records[0], other[1]]).broken
    assert broken is not None and broken.seq == 2 and "belongs to schema 'site'" in broken.problem


class Colour(enum.Enum):
    RED = "red"


def test_values_become_plain_json() -> None:
    oid = uuid.uuid4()
    assert jsonable(
        {
            "id": oid,
            "day": date(2030, 1, 2),
            "at": T0,
            "amount": Decimal("1.50"),
            "colour": Colour.RED,
            "codes": {"b", "a"},
            "pair": (1, 2.5),
        }
    ) == {
        "id": str(oid),
        "day": "2030-01-02",
        "at": "2030-01-02T03:04:05.678901Z",
        "amount": "1.50",
        "colour": "red",
        "codes": ["a", "b"],
        "pair": [1, 2.5],
    }
    for bad in (float("nan"), "a\x00b", {1: "x"}, object()):
        with pytest.raises((ValueError, TypeError)):
            jsonable(bad)


def test_ids_and_codes_are_short_single_lines() -> None:
    assert short_text("reason", "qc-failed") == "qc-failed"
    assert short_text("reason", None, optional=True) is None
    for bad in ("x" * 201, "two\nlines"):
        with pytest.raises(ValueError):
            short_text("reason", bad)
    with pytest.raises(ValueError):
        short_text("action", None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text().filter(lambda s: "\x00" not in s),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8).filter(lambda s: "\x00" not in s), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(old=json_values, new=json_values)
def test_any_json_values_chain_and_verify(old: object, new: object) -> None:
    entry = Entry("x.changed", "x", "1", CENTRE, old=jsonable(old), new=jsonable(new))
    records = chain("site", [entry, entry], after=(0, GENESIS), at=T0)
    assert verify("site", records).broken is None


def test_the_memory_trail_chains_as_postgres_does_and_takes_the_actor_in_order() -> None:
    records: list[Record] = []
    trail = MemoryAuditTrail(records, schema="ordering", clock=lambda: T0)
    trail("order.submitted", "order", "o-1", new={"status": "submitted"}, reason="placed")
    trail.acting(Actor.system("order.saga"), "event:e1")
    trail("order.status_changed", "order", "o-1", old={"status": "submitted"}, new={"status": "approved"})
    trail("order.status_changed", "order", "o-1", actor=CENTRE, cause="trace:t")
    assert [(r.seq, r.actor.client_id, r.cause) for r in records] == [
        (1, "system", None),
        (2, "order.saga", "event:e1"),
        (3, "centre-tc-fr-pa-001", "trace:t"),
    ]
    assert verify("ordering", records).broken is None


async def test_a_consumers_entries_name_the_consumer_and_the_event() -> None:
    records: list[Record] = []
    handlers = AuditedHandlers[AuditedTx]("order.saga")

    @handlers.on(OrderCancelledV1)
    async def on_cancelled(tx: AuditedTx, data: OrderCancelledV1, meta: object) -> None:
        tx.audit("order.seen", "order", data.order_id, reason=data.reason)

    def make_tx(outbox: FakeOutbox) -> AuditedTx:
        return AuditedTx(None, outbox, audit=MemoryAuditTrail(records))

    uow = FakeUnitOfWork(make_tx)
    oid = uuid.uuid4()
    event = new_event(
        OrderCancelledV1(
            order_id=oid,
            coi="V2V0030000001K",
            treatment_center_id="TC-FR-PA-001",
            reason="consent_withdrawn",
            previous_status="submitted",
        )
    )
    await FakeInbox(uow, handlers).deliver(event)
    (record,) = records
    assert (record.actor, record.cause, record.object_id) == (
        Actor("order.saga", "system"),
        f"event:{event.id}",
        str(oid),
    )


def test_a_tx_without_connection_needs_a_memory_trail() -> None:
    with pytest.raises(ValueError):
        AuditedTx(None, FakeOutbox())


TEXT = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=8
)  # as jsonb takes
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


@given(
    old=JSONISH,
    new=JSONISH,
    reason=st.none() | TEXT,
    cause=st.none() | TEXT,
    user=st.none() | TEXT,
    seq=st.integers(min_value=1, max_value=2**62),
    micros=st.integers(min_value=0, max_value=10**12),
    schema=st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True),
)
def test_the_template_and_the_database_values_make_the_canonical_form(
    old: object,
    new: object,
    reason: str | None,
    cause: str | None,
    user: str | None,
    seq: int,
    micros: int,
    schema: str,
) -> None:
    # what `audit_append` hashes in the database is byte for byte what the verifier hashes
    entry = Entry(
        action="order.placed",
        object_type="order",
        object_id="o-1",
        actor=Actor("client-é", "centre", "TC-1", user),
        old=jsonable(old),
        new=jsonable(new),
        reason=reason,
        cause=cause,
    )
    at = T0 + timedelta(microseconds=micros)
    prev = hashlib.sha256(str(seq).encode()).digest()
    head, middle = template(entry)
    text = head + prev.hex() + middle + timestamp(at) + '","schema":"' + schema + '","seq":' + str(seq) + "}"
    assert text.encode() == canonical(entry.seal(schema, seq, at, prev))
    assert text.isascii()
