"""Replicas: the harness runs two processes of every service on one database and one set of topics
(`Platform.start(..., replicas=...)`, what `V2V_REPLICAS=2` does under `make run`), each on its own port and
log; every process answers `/ready`, and an order placed at the second order replica completes its first
four hops (submitted -> slot reserved -> booking confirmed -> inbound shipment planned) while the other
replicas share the work. `Platform.url(name)` stays the first replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from v2v_harness.catalog import SERVICES
from v2v_harness.e2e import Journey, Parties, order_body
from v2v_harness.infra import Infrastructure
from v2v_harness.platform import Platform, replica_counts
from v2v_harness.provision import provision
from v2v_harness.pytest_plugin import _identity, unique

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replicated(infra: Infrastructure, state_dir: Path) -> Iterator[Platform]:
    name = unique("e2e_rep_")
    urls = asyncio.run(provision(infra.admin_url, name))
    run_dir = state_dir / name
    run_dir.mkdir(parents=True)
    platform = Platform(infra, name, namespace=name, state_dir=run_dir, issuer=_identity(state_dir).url)
    try:
        platform.start(urls, fixed_ports=False, timeout=180, replicas={s.name: 2 for s in SERVICES})
        yield platform
    finally:
        platform.stop()


def test_replica_counts_from_the_environment() -> None:
    assert replica_counts({}) == {s.name: 1 for s in SERVICES}
    counts = replica_counts({"V2V_REPLICAS": "2", "V2V_REPLICAS_SCHEDULING": "3"})
    assert counts == {**{s.name: 2 for s in SERVICES}, "scheduling": 3}
    with pytest.raises(ValueError):
        replica_counts({"V2V_REPLICAS_ORDER": "0"})


@pytest.mark.timeout(300)
async def test_two_replicas_of_every_service_run_and_an_order_completes_its_first_four_hops(
    replicated: Platform, parties: Parties
) -> None:
    processes = replicated.processes()
    assert len(processes) == 2 * len(SERVICES)
    assert len({p.port for p in processes}) == len(processes), "each replica its own port"
    assert len({p.proc.pid for p in processes}) == len(processes)
    for spec in SERVICES:
        first, second = replicated.replicas[spec.name]
        assert replicated.url(spec.name) == first.url  # the first replica is the service's URL
        assert (first.replica, second.replica) == (1, 2)
        assert second.log_path.name == f"{spec.name}-2.log"
    async with httpx.AsyncClient(timeout=5) as http:
        for svc in processes:
            assert (await http.get(f"{svc.url}/ready")).status_code == 200, svc.label

    second_order = replicated.replicas["order"][1].url
    centre = "TC-DE-BE-001"
    resp = await parties.centre(centre).post(f"{second_order}/v1/orders", json=order_body(centre))
    assert resp.status_code == 201, resp.text
    journey = Journey(parties, replicated.url, resp.json())
    order = await journey.wait_status("inbound_shipment_planned", timeout=60)
    kinds = [entry["type"] for entry in order["timeline"]]
    for hop in ("order.submitted", "scheduling.slot_reserved", "site.booking_confirmed"):
        assert any(k.startswith(hop) for k in kinds), (hop, kinds)
    # both order replicas read the same database
    for url in replicated.urls("order"):
        got = await parties.centre(centre).get(f"{url}/v1/orders/{journey.id}")
        assert got.status_code == 200 and got.json()["status"] == "inbound_shipment_planned"
    for svc in processes:
        assert svc.proc.poll() is None, f"{svc.label} exited"
