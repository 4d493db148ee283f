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
