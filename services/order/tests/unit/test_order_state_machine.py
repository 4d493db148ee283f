"""The order state machine: facts from other services move an order only forward, along ALLOWED."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_service.domain.order import ALLOWED, EVENT_TARGET, Decision, OrderStatus, can_move, decide

S = OrderStatus
RANK = {status: i for i, status in enumerate(OrderStatus)}  # declaration order is the forward order
INFORMATIONAL = ["order.submitted.v1", "notification.webhook_delivery_failed.v1", "site.registered.v1"]

event_types = st.one_of(
    st.sampled_from(sorted(EVENT_TARGET)),
    st.sampled_from(INFORMATIONAL),
    st.text(max_size=30),
)
# sequences with plenty of duplicates and reorderings of the meaningful facts
fact_sequences = st.lists(event_types, max_size=25) | st.lists(
    st.sampled_from(sorted(EVENT_TARGET)), max_size=25
).flatmap(lambda xs: st.permutations(xs + xs))


def run(events: list[str], start: OrderStatus = S.SUBMITTED) -> list[tuple[OrderStatus, str, Decision]]:
    steps = []
    current = start
    for event_type in events:
        decision = decide(current, event_type)
        steps.append((current, event_type, decision))
        if decision.new_status is not None:
            current = decision.new_status
    return steps


def test_allowed_covers_every_status_and_only_points_forward() -> None:
    assert set(ALLOWED) == set(OrderStatus)
    for source, targets in ALLOWED.items():
        assert source not in targets
        for target in targets:
            assert RANK[target] > RANK[source], f"{source} -> {target} goes backwards"


def test_every_status_is_reachable_from_submitted() -> None:
    reached = {S.SUBMITTED}
    frontier = [S.SUBMITTED]
    while frontier:
        for nxt in ALLOWED[frontier.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert reached == set(OrderStatus)


def test_event_targets_are_statuses_something_can_move_to() -> None:
    reachable_targets = set().union(*ALLOWED.values())
    assert set(EVENT_TARGET.values()) <= reachable_targets


@given(fact_sequences)
def test_decide_never_produces_a_transition_outside_allowed(events: list[str]) -> None:
    for current, _event_type, decision in run(events):
        if decision.new_status is not None:
            assert decision.new_status in ALLOWED[current]
            assert can_move(current, decision.new_status)


@given(fact_sequences)
def test_statuses_only_move_forward(events: list[str]) -> None:
    visited = [S.SUBMITTED] + [d.new_status for _, _, d in run(events) if d.new_status is not None]
    ranks = [RANK[s] for s in visited]
    assert ranks == sorted(ranks)
    assert len(set(visited)) == len(visited)  # never the same status twice


@given(fact_sequences, st.sampled_from(list(OrderStatus)))
def test_a_repeated_fact_is_a_no_op(events: list[str], start: OrderStatus) -> None:
    for current, event_type, decision in run(events, start):
        if decision.new_status is not None:
            again = decide(decision.new_status, event_type)
            assert again == Decision(None, "already in this state")
        elif EVENT_TARGET.get(event_type) == current:
            assert decision.reason == "already in this state"


@given(st.lists(event_types, max_size=25))
def test_a_status_change_happens_only_for_the_fact_that_targets_it(events: list[str]) -> None:
    for _current, event_type, decision in run(events):
        if decision.new_status is not None:
            assert EVENT_TARGET[event_type] == decision.new_status
            assert decision.reason == event_type


@pytest.mark.parametrize(("status", "event_type"), list(itertools.product(OrderStatus, sorted(EVENT_TARGET))))
def test_decision_table(status: OrderStatus, event_type: str) -> None:
    target = EVENT_TARGET[event_type]
    decision = decide(status, event_type)
    if target == status:
        assert decision == Decision(None, "already in this state")
    elif target in ALLOWED[status]:
        assert decision == Decision(target, event_type)
    else:
        assert decision.new_status is None
        assert decision.reason == f"stale: order is {status.value}, cannot become {target.value}"


@pytest.mark.parametrize("event_type", [*INFORMATIONAL, "", "scheduling.slot_reserved.v2"])
def test_unknown_facts_are_informational(event_type: str) -> None:
    for status in OrderStatus:
        assert decide(status, event_type) == Decision(None, "informational")


def test_happy_path_with_and_without_waitlist() -> None:
    direct = ["scheduling.slot_reserved.v1", "site.booking_confirmed.v1", "logistics.shipment_planned.v1"]
    assert [d.new_status for _, _, d in run(direct)] == [
        S.SLOT_RESERVED,
        S.BOOKING_CONFIRMED,
        S.INBOUND_SHIPMENT_PLANNED,
    ]
    waitlisted = ["scheduling.slot_unavailable.v1", *direct]
    assert run(waitlisted)[0][2].new_status == S.WAITLISTED
    assert run(waitlisted)[-1][2].new_status == S.INBOUND_SHIPMENT_PLANNED


def test_late_slot_unavailable_after_a_reservation_is_stale() -> None:
    decision = decide(S.SLOT_RESERVED, "scheduling.slot_unavailable.v1")
    assert decision.new_status is None
    assert decision.reason.startswith("stale:")


def test_out_of_order_fact_does_not_skip_steps() -> None:
    # a booking confirmation cannot arrive for an order that never had a slot reserved
    assert decide(S.SUBMITTED, "site.booking_confirmed.v1").new_status is None
    assert decide(S.WAITLISTED, "logistics.shipment_planned.v1").new_status is None


def test_the_last_status_is_terminal() -> None:
    for event_type in EVENT_TARGET:
        assert decide(S.INBOUND_SHIPMENT_PLANNED, event_type).new_status is None
