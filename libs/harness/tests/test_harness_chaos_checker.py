"""The chaos checker on hand-made histories: each invariant holds on a clean one and fails on its fault."""

from __future__ import annotations

import copy
from typing import Any

from v2v_harness.chaos.checker import FinalState, Intent, Verdict, check

CHAIN = [
    (None, "submitted"),
    ("submitted", "slot_reserved"),
    ("slot_reserved", "booking_confirmed"),
    ("booking_confirmed", "inbound_shipment_planned"),
    ("inbound_shipment_planned", "cancelled"),
]


def timeline(chain: list[tuple[str | None, str]]) -> list[dict[str, Any]]:
    return [{"status_before": b, "status_after": a, "event_type": f"x.{a}.v1"} for b, a in chain]


def clean() -> tuple[list[Intent], FinalState]:
    intents = [Intent("REF-1", "o1")]
    final = FinalState(
        orders={"o1": {"patient_ref": "REF-1", "status": "cancelled"}},
        timelines={"o1": timeline(CHAIN)},
        slots=[{"order_id": "o1", "status": "released"}],
        shipments=[
            {
                "order_id": "o1",
                "leg": "inbound_apheresis",
                "status": "cancelled",
                "booking_id": "b1",
                "run": None,
            }
        ],
        deliveries=[{"subscription_id": "s1", "event_id": "e1"}],
        webhooks=[{"webhook_id": "w1", "event_id": "e1"}, {"webhook_id": "w1", "event_id": "e1"}],
        dead_letters={"order": []},
        ready={"order": 200, "order-2": 200},
        published=[
            {
                "id": 1,
                "event_id": "e1",
                "event_type": "order.submitted.v1",
                "topic": "v2v.order",
                "message_key": "o1",
                "published": True,
            },
            {
                "id": 2,
                "event_id": "e2",
                "event_type": "order.cancelled.v1",
                "topic": "v2v.order",
                "message_key": "o1",
                "published": True,
            },
            {
                "id": 3,
                "event_id": "e3",
                "event_type": "order.noted.v1",
                "topic": "v2v.order",
                "message_key": "o1",
                "published": True,
            },  # no one acts on it
            {
                "id": 1,
                "event_id": "e4",
                "event_type": "scheduling.slot_reserved.v1",
                "topic": "v2v.scheduling",
                "message_key": "o1",
                "published": True,
            },
        ],
        consumers={
            "scheduling.events": {
                "topics": ["v2v.order"],
                "handles": ["order.cancelled.v1", "order.submitted.v1"],
            },
            "order.saga": {"topics": ["v2v.scheduling"], "handles": ["scheduling.slot_reserved.v1"]},
        },
        consumed={"scheduling.events": {"e1": 10.0, "e2": 11.0}, "order.saga": {"e4": 10.5}},
        manufacturing=[
            {"booking_id": "b1", "order_id": "o1", "run": 1, "action": "receipt"},
            {"booking_id": "b1", "order_id": "o1", "run": 1, "action": "qc"},
            {"booking_id": "b1", "order_id": "o1", "run": 2, "action": "remanufacture"},
            {"booking_id": "b1", "order_id": "o1", "run": 2, "action": "qc"},
        ],
    )
    return intents, final


def verdicts(intents: list[Intent], final: FinalState, settled_s: float = 3.0) -> dict[str, Verdict]:
    found = check(intents, final, deadline_s=120, settled_s=settled_s)
    return {v.name.split(" (")[0]: v for v in found}


def failing(intents: list[Intent], final: FinalState, settled_s: float = 3.0) -> set[str]:
    return {name for name, v in verdicts(intents, final, settled_s).items() if not v.ok}


def test_a_clean_history_passes_every_invariant() -> None:
    intents, final = clean()
    assert failing(intents, final) == set()
    assert "1 redelivered under the same id" in verdicts(intents, final)["no duplicate side effects"].detail


def test_a_lost_acknowledged_order_fails() -> None:
    intents, final = clean()
    intents.append(Intent("REF-3", "o3"))
    assert failing(intents, final) == {"acknowledged orders lost = 0"}


def test_two_orders_for_one_intent_fail() -> None:
    intents, final = clean()
    final.orders["o9"] = {"patient_ref": "REF-1", "status": "cancelled"}
    assert "one order per client intent" in failing(intents, final)


def test_an_open_order_or_a_late_settle_fails() -> None:
    intents, final = clean()
    late = failing(intents, final, settled_s=130)
    assert late == {"every order terminal within 120 s of the last healed fault"}
    final.orders["o1"]["status"] = "manufacturing"
    assert "every order terminal within 120 s of the last healed fault" in failing(intents, final)


def test_transitions_chain_in_chain_order_not_record_order() -> None:
    intents, final = clean()
    parked = copy.deepcopy(CHAIN)
    parked[2], parked[3] = parked[3], parked[2]  # a fact applied after being parked is recorded first
    final.timelines["o1"] = timeline(parked)
    assert failing(intents, final) == set()


def test_an_illegal_transition_or_one_after_a_terminal_state_fails() -> None:
    intents, final = clean()
    final.timelines["o1"] = timeline([*CHAIN[:2], ("booking_confirmed", "inbound_shipment_planned")])
    assert "no illegal transition" in failing(intents, final)
    final.timelines["o1"] = timeline([*CHAIN, ("cancelled", "manufacturing")])
    assert "no illegal transition" in failing(intents, final)


def test_duplicate_side_effects_fail() -> None:
    for change in (
        lambda f: f.slots.extend([{"order_id": "o1", "status": "held"}] * 2),
        lambda f: f.shipments.extend(
            [
                {
                    "order_id": "o1",
                    "leg": "outbound_product",
                    "status": "delivered",
                    "booking_id": None,
                    "run": 1,
                }
            ]
            * 2
        ),
        lambda f: f.deliveries.append({"subscription_id": "s1", "event_id": "e1"}),
        lambda f: f.webhooks.append({"webhook_id": "w2", "event_id": "e1"}),
        lambda f: f.manufacturing.append({"booking_id": "b1", "order_id": "o1", "run": 2, "action": "qc"}),
        lambda f: f.manufacturing.append(
            {"booking_id": "b1", "order_id": "o1", "run": 2, "action": "remanufacture"}
        ),
        lambda f: f.manufacturing.append(
            {"booking_id": "b1", "order_id": "o1", "run": 3, "action": "receipt"}
        ),
    ):
        intents, final = clean()
        change(final)
        assert failing(intents, final) == {"no duplicate side effects"}


def test_a_dead_letter_without_poison_or_a_process_not_ready_fails() -> None:
    intents, final = clean()
    final.dead_letters["order"].append({"consumer": "order.saga", "event_type": "x", "error": "connection"})
    assert failing(intents, final) == {"dead letters contain poison only"}
    intents, final = clean()
    final.ready["order-2"] = 503
    assert failing(intents, final) == {"every process ready at the end"}


def test_an_unacknowledged_intent_fails_and_its_order_need_only_reach_what_the_platform_does_alone() -> None:
    intents, final = clean()
    intents.append(Intent("REF-2", None))
    final.orders["o2"] = {"patient_ref": "REF-2", "status": "inbound_shipment_planned"}
    assert failing(intents, final) == {"every client intent acknowledged"}
    final.orders["o2"]["status"] = "slot_reserved"
    assert "every order terminal within 120 s of the last healed fault" in failing(intents, final)


def test_an_event_a_subscriber_never_consumed_or_one_never_published_fails() -> None:
    intents, final = clean()
    del final.consumed["scheduling.events"]["e2"]
    found = verdicts(intents, final)["every published event consumed by every subscriber"]
    assert not found.ok and "scheduling.events never consumed order.cancelled.v1 e2 (o1)" in found.examples
    assert failing(intents, final) == {"every published event consumed by every subscriber"}
    intents, final = clean()
    final.published[3]["published"] = False
    assert failing(intents, final) == {"every published event consumed by every subscriber"}
    intents, final = clean()
    final.consumers = {}  # nothing known about the subscribers proves nothing
    assert failing(intents, final) == {"every published event consumed by every subscriber"}


def test_events_of_one_order_processed_out_of_their_written_order_fail() -> None:
    intents, final = clean()
    final.consumed["scheduling.events"] = {"e1": 12.0, "e2": 11.0}  # the cancellation before the submission
    found = verdicts(intents, final)["per order, events processed in the order written"]
    assert not found.ok and found.examples[0].startswith("scheduling.events, order o1: order.cancelled.v1")
    assert failing(intents, final) == {"per order, events processed in the order written"}


def test_a_compromised_outbound_leg_and_the_recollections_run_1_are_not_duplicates() -> None:
    intents, final = clean()
    leg = {"order_id": "o1", "leg": "outbound_product", "booking_id": None, "run": 1}
    final.shipments += [{**leg, "status": "compromised"}, {**leg, "status": "delivered"}]
    assert failing(intents, final) == set()
    final.shipments.append({**leg, "status": "delivered"})
    assert failing(intents, final) == {"no duplicate side effects"}


def test_the_workload_comes_in_waves_spread_over_the_first_third_of_the_nemesis() -> None:
    from v2v_harness.chaos.runner import ChaosConfig

    assert ChaosConfig(orders=300, seconds=600).wave_plan() == [
        (0.0, 75),
        (45.0, 75),
        (90.0, 75),
        (135.0, 75),
    ]
    assert ChaosConfig(orders=8, seconds=60).wave_plan() == [(0.0, 8)]  # the short run: one wave
    assert ChaosConfig(orders=101, seconds=100).wave_plan() == [(0.0, 51), (15.0, 50)]
    assert ChaosConfig(orders=3, seconds=100, waves=5).wave_plan() == [(0.0, 1), (10.0, 1), (20.0, 1)]


def test_an_order_inverted_by_a_broker_restart_that_lost_the_older_event_is_reported_apart() -> None:
    intents, final = clean()
    # e1 published at 5 (old broker), not consumed before the restart at 8..9; e2 published at 8.5 to the
    # new broker and consumed at 9; e1 came back with the replay and was consumed at 12
    final.published[0]["published_at"], final.published[1]["published_at"] = 5.0, 8.5
    final.consumed["scheduling.events"] = {"e1": 12.0, "e2": 9.0}
    final.broker_losses = [(8.0, 9.0)]
    found = verdicts(intents, final)["per order, events processed in the order written"]
    assert found.ok and "1 pairs inverted by a broker restart" in found.detail
    final.broker_losses = [(20.0, 21.0)]  # a restart later explains nothing
    assert failing(intents, final) == {"per order, events processed in the order written"}
    final.broker_losses = [(8.0, 9.0)]
    final.published[0]["published_at"] = 12.5  # published after the restart: nothing was lost
    assert failing(intents, final) == {"per order, events processed in the order written"}
