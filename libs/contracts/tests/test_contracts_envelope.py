"""The CloudEvents 1.0 envelope (structured JSON mode)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from v2v_contracts import (
    CONTENT_TYPE,
    CloudEvent,
    OrderSubmittedV1,
    SiteApproval,
    SiteRegisteredV1,
    SlotReservedV1,
    new_event,
    parse_data,
    source_for,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
aware_times = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.timezones()
)
events = st.builds(
    CloudEvent,
    id=st.uuids(),
    source=st.sampled_from(["order", "scheduling", "site"]).map(source_for),
    type=st.from_regex(r"\A[a-z]+\.[a-z_]+\.v[1-9]\Z"),
    subject=st.none() | st.uuids().map(str),
    time=aware_times,
    coi=st.none() | st.just("G123498654321H"),
    data=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)


def order_submitted() -> OrderSubmittedV1:
    return OrderSubmittedV1(
        order_id=uuid.uuid4(),
        coi="G123498654321H",
        treatment_center_id="TC-DE-BE-001",
        product_code="TISA-CEL",
        order_type="commercial",
        regulator="EMA",
        country="DE",
        region="europe",
        requested_apheresis_date=date(2026, 6, 1),
    )


def site_registered() -> SiteRegisteredV1:
    return SiteRegisteredV1(
        site_id="CH-STEIN",
        name="Stein, Switzerland",
        country="CH",
        region="europe",
        timezone="Europe/Zurich",
        operator="own",
        active=True,
        approvals=[SiteApproval(regulator="EMA", use="commercial", product_code="TISA-CEL")],
        daily_capacity={"TISA-CEL": 4},
    )


@given(events)
def test_round_trip_through_json(event: CloudEvent) -> None:
    again = CloudEvent.from_json(event.to_json())
    assert again == event
    assert CloudEvent.from_json(event.to_json().decode()) == event


@given(events)
def test_required_attributes_are_present_and_time_is_utc(event: CloudEvent) -> None:
    doc = json.loads(event.to_json())
    assert doc["specversion"] == "1.0"
    assert uuid.UUID(doc["id"]) == event.id
    assert doc["source"] and doc["type"]
    assert doc["datacontenttype"] == "application/json"
    sent = datetime.fromisoformat(doc["time"])
    assert sent.utcoffset() == timedelta(0)
    assert sent == event.time
    assert event.time.tzinfo == UTC
    # optional attributes are left out rather than sent as null
    assert None not in doc.values()


@given(aware_times)
def test_time_is_normalised_to_utc_keeping_the_instant(when: datetime) -> None:
    event = CloudEvent(source="/v2v/order", type="order.submitted.v1", time=when, data={})
    # same instant (compared as timestamps: PEP 495 makes inter-zone == False for ambiguous local times)
    assert event.time.timestamp() == when.timestamp()
    assert event.time.utcoffset() == timedelta(0)


def test_defaults() -> None:
    before = datetime.now(UTC)
    event = CloudEvent(source="/v2v/order", type="order.submitted.v1", data={})
    assert event.specversion == "1.0"
    assert isinstance(event.id, uuid.UUID)
    assert before <= event.time <= datetime.now(UTC)
    assert event.datacontenttype == "application/json"
    assert event.id != CloudEvent(source="/v2v/order", type="order.submitted.v1", data={}).id
    assert CONTENT_TYPE.startswith("application/cloudevents+json")


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        CloudEvent(source="/v2v/order", type="order.submitted.v1", time=datetime(2026, 1, 1), data={})
    raw = json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "/v2v/order",
            "type": "order.submitted.v1",
            "time": "2026-01-01T00:00:00",
            "datacontenttype": "application/json",
            "data": {},
        }
    )
    with pytest.raises(ValidationError):
        CloudEvent.from_json(raw)


@pytest.mark.parametrize("missing", ["source", "type", "data"])
def test_required_attributes_cannot_be_left_out(missing: str) -> None:
    fields = {"source": "/v2v/order", "type": "order.submitted.v1", "data": {}}
    del fields[missing]
    with pytest.raises(ValidationError):
        CloudEvent(**fields)


@pytest.mark.parametrize(("attr", "value"), [("specversion", "0.3"), ("datacontenttype", "text/plain")])
def test_fixed_attributes_cannot_be_changed(attr: str, value: str) -> None:
    with pytest.raises(ValidationError):
        CloudEvent(source="/v2v/order", type="order.submitted.v1", data={}, **{attr: value})


def test_extension_attributes_survive_the_round_trip() -> None:
    event = CloudEvent(source="/v2v/order", type="order.submitted.v1", data={}, traceparent="00-abc-def-01")
    again = CloudEvent.from_json(event.to_json())
    assert again.model_extra == {"traceparent": "00-abc-def-01"}


def test_events_are_immutable() -> None:
    event = CloudEvent(source="/v2v/order", type="order.submitted.v1", data={})
    with pytest.raises(ValidationError):
        event.type = "other"  # type: ignore[misc]


# --- new_event / parse_data ---------------------------------------------------------------------------


def test_new_event_for_an_order_event_sets_subject_and_coi() -> None:
    data = order_submitted()
    event = new_event(data)
    assert event.subject == str(data.order_id)
    assert event.coi == data.coi
    assert event.type == "order.submitted.v1"
    assert event.source == "/v2v/order"
    assert event.service == "order"
    assert event.data == json.loads(data.model_dump_json())
    assert parse_data(CloudEvent.from_json(event.to_json()), OrderSubmittedV1) == data


def test_new_event_for_a_site_event_has_no_coi() -> None:
    data = site_registered()
    event = new_event(data, subject=data.site_id)
    assert event.subject == "CH-STEIN"
    assert event.coi is None
    assert "coi" not in json.loads(event.to_json())
    assert event.source == "/v2v/site"
    assert parse_data(event, SiteRegisteredV1) == data
    assert new_event(data).subject is None


def test_parse_data_refuses_the_wrong_type() -> None:
    event = new_event(order_submitted())
    with pytest.raises(ValueError, match=r"is not scheduling\.slot_reserved\.v1"):
        parse_data(event, SlotReservedV1)


def test_new_event_ids_are_unique_and_time_is_utc() -> None:
    data = order_submitted()
    a, b = new_event(data), new_event(data)
    assert a.id != b.id
    assert a.time.tzinfo == UTC


def test_other_time_zones_become_utc() -> None:
    event = CloudEvent(
        source="/v2v/order",
        type="order.submitted.v1",
        data={},
        time=datetime(2026, 1, 1, 9, 0, tzinfo=timezone(timedelta(hours=9))),
    )
    assert event.time == datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    assert json.loads(event.to_json())["time"] in {"2026-01-01T00:00:00Z", "2026-01-01T00:00:00+00:00"}
