"""The event catalogue and topic names: naming rules, publishers, and no patient data in contracts."""

from __future__ import annotations

import re
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from v2v_contracts import (
    EVENT_TYPES,
    MIN_PARTITIONS,
    PUBLISHERS,
    CloudEvent,
    OrderEventData,
    SiteApproval,
    all_topics,
    dead_letter_topic,
    topic_for,
)

TYPE_RE = re.compile(r"\A(?P<service>[a-z]+)\.(?P<event>[a-z][a-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\Z")

# field names that would carry patient-identifying data
PATIENT_FIELD_RE = re.compile(
    r"patient|birth|(?:^|_)(?:dob|mrn|ssn)(?:$|_)|first_?name|last_?name|given_?name|family_?name|full_?name|"
    r"surname|maiden|medical_record|social_security|insurance_(?:id|number)|address|phone|email|gender",
    re.IGNORECASE,
)


def nested_models(model: type[BaseModel]) -> set[type[BaseModel]]:
    """The model and every pydantic model reachable through its field annotations."""
    seen: set[type[BaseModel]] = set()
    todo: list[object] = [model]
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                continue
            seen.add(tp)
            todo.extend(f.annotation for f in tp.model_fields.values())
        else:
            todo.extend(typing.get_args(tp))
    return seen


ALL_MODELS = set().union(*(nested_models(m) for m in [*EVENT_TYPES.values(), CloudEvent]))


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_event_type_naming(event_type: str) -> None:
    model = EVENT_TYPES[event_type]
    assert event_type == model.TYPE
    match = TYPE_RE.match(event_type)
    assert match, f"{event_type} is not <service>.<event>.v<N>"
    assert match["service"] == model.SERVICE
    assert model.SERVICE in PUBLISHERS
    assert model.__name__.endswith(f"V{match['version']}")


def test_catalogue_is_complete() -> None:
    assert len(EVENT_TYPES) == len({m.TYPE for m in EVENT_TYPES.values()})
    # every concrete order event subclass is listed
    listed = set(EVENT_TYPES.values())
    assert {m for m in OrderEventData.__subclasses__()} <= listed


def test_models_found_for_the_patient_data_check() -> None:
    assert SiteApproval in ALL_MODELS
    assert CloudEvent in ALL_MODELS
    assert len(ALL_MODELS) >= len(EVENT_TYPES) + 2


@pytest.mark.parametrize("model", sorted(ALL_MODELS, key=lambda m: m.__name__), ids=lambda m: m.__name__)
def test_no_contract_field_is_named_like_patient_data(model: type[BaseModel]) -> None:
    offending = [name for name in model.model_fields if PATIENT_FIELD_RE.search(name)]
    assert not offending, f"{model.__name__} has patient-like fields {offending}"


@pytest.mark.parametrize(
    "event_type", sorted(t for t, m in EVENT_TYPES.items() if issubclass(m, OrderEventData))
)
def test_order_events_carry_only_opaque_references(event_type: str) -> None:
    fields = EVENT_TYPES[event_type].model_fields
    assert {"order_id", "coi", "treatment_center_id"} <= set(fields)
    assert "name" not in fields  # a name in an order event would be a person's


def test_the_patient_regex_catches_what_it_should() -> None:
    for bad in [
        "patient",
        "patient_ref",
        "patient_name",
        "date_of_birth",
        "birth_date",
        "dob",
        "first_name",
        "lastName",
        "family_name",
        "mrn",
        "recipient_dob",
        "email",
    ]:
        assert PATIENT_FIELD_RE.search(bad), bad
    for fine in ["order_id", "coi", "treatment_center_id", "site_id", "name", "subject", "timezone"]:
        assert not PATIENT_FIELD_RE.search(fine), fine


# --- topics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", PUBLISHERS)
def test_topic_naming(service: str) -> None:
    assert topic_for(service) == f"v2v.{service}"
    assert dead_letter_topic(service) == f"v2v.{service}.dlq"
    assert topic_for(service, "e2e_1a2b") == f"e2e_1a2b.v2v.{service}"
    assert dead_letter_topic(service, "e2e_1a2b") == f"e2e_1a2b.v2v.{service}.dlq"


def test_every_event_is_published_on_its_services_topic() -> None:
    for model in EVENT_TYPES.values():
        assert topic_for(model.SERVICE) in all_topics()


@given(st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z"))
def test_all_topics_under_a_namespace(namespace: str) -> None:
    topics = all_topics(namespace)
    assert len(topics) == 2 * len(PUBLISHERS) == len(set(topics))
    assert all(t.startswith(f"{namespace}.v2v.") for t in topics)
    assert sorted(t for t in topics if t.endswith(".dlq")) == sorted(
        dead_letter_topic(s, namespace) for s in PUBLISHERS
    )
    # namespaced topics never collide with the un-namespaced ones
    assert not set(topics) & set(all_topics())


def test_partitions_and_publishers() -> None:
    assert MIN_PARTITIONS >= 1
    assert set(PUBLISHERS) == {"order", "scheduling", "site", "logistics", "notification"}
