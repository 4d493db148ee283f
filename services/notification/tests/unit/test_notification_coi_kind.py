"""A chain-of-identity id or DIN whose ISO 7064 MOD 37-2 check character is `*` (one sequence number in
37 has one: V2V00, 2026, no. 19 → `V2V0026000019*`) leaves in webhooks and alerts like any other; a
malformed one does not."""

from __future__ import annotations

import json
import uuid

import pytest

from notification_service.domain.alerts import render
from notification_service.domain.payloads import conforms, webhook_payload
from v2v_contracts import CloudEvent
from v2v_contracts.coi import make_coi

STAR = make_coi("V2V00", 2026, 19)


def test_the_star_check_character_is_a_valid_coi() -> None:
    assert STAR.endswith("*")
    assert conforms("coi", STAR)
    assert conforms("coi", make_coi("V2V00", 2026, 20))
    for bad in (STAR[:-2] + "0*", STAR + "*", "V2V0026000019*\n", "<script>", "A*B"):
        assert not conforms("coi", bad), bad


@pytest.mark.parametrize("coi", [STAR, make_coi("V2V00", 2026, 20)])
def test_a_webhook_keeps_the_coi_and_din_whatever_their_check_character(coi: str) -> None:
    order_id = str(uuid.uuid4())
    event = CloudEvent(
        source="/v2v/order",
        type="order.apheresis_completed.v1",
        subject=order_id,
        coi=coi,
        data={"order_id": order_id, "coi": coi, "din": STAR, "collection": 1},
    )
    sent = json.loads(webhook_payload(event))
    assert sent["coi"] == coi
    assert sent["data"]["coi"] == coi and sent["data"]["din"] == STAR


def test_an_alert_names_the_coi_with_a_star_check_character() -> None:
    order_id = str(uuid.uuid4())
    event = CloudEvent(
        source="/v2v/order",
        type="order.failed.v1",
        subject=order_id,
        coi=STAR,
        data={"order_id": order_id, "coi": STAR, "reason": "manufacturing_failed"},
    )
    alert = render(event)
    assert STAR in alert.body and "(none)" not in alert.body
