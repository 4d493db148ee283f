"""Through `create_app`, in a service process of its own (real Postgres and broker):

- a background job whose database call fails is restarted by the supervisor, and `/ready` answers 503
  naming a loop that is dead (crashed, waiting for its restart), 200 again once it runs;
- dead letters: a message the consumer gives up on is listed by `GET /v1/dead-letters` (newest first)
  and shown by `GET /v1/dead-letters/{id}`; `POST /v1/dead-letters/{id}/replay` publishes it again to its
  original topic and, once the cause is fixed, the consumer processes it (once). These are operations
  routes: ops reads them (`ops:read`) and replays (`ops:write`) with its own token from the test session's
  issuer; no token is 401, a token without the scope (a centre's, QA's) is 403.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from v2v_contracts import CloudEvent, topic_for
from v2v_harness.identity import Credentials
from v2v_harness.infra import Infrastructure
from v2v_harness.issuer import IssuerProcess
from v2v_harness.platform import tail
from v2v_harness.processes import free_port, spawn, stop
from v2v_harness.provision import drop_database, provision, with_database

pytestmark = pytest.mark.integration

SERVICE_SCRIPT = """
import asyncio
import os
from pathlib import Path

from v2v_contracts import EventData
from v2v_messaging import EventMeta, HandlerRegistry, Tx
from v2v_servicekit import ConsumerSpec, Runtime, ServiceDefinition, run


class FaultProbeV1(EventData):
    TYPE = "scheduling.fault_probe.v1"
    SERVICE = "scheduling"
    n: int


handlers = HandlerRegistry[Tx]()


@handlers.on(FaultProbeV1)
async def handle(tx: Tx, data: FaultProbeV1, meta: EventMeta) -> None:
    if await tx.conn.fetchval("SELECT refuse FROM it_switch"):
        raise ValueError(f"probe {data.n} refused")
    await tx.conn.execute("INSERT INTO it_effects (event_id, n) VALUES ($1, $2)", meta.id, data.n)


async def flaky_job(rt: Runtime) -> None:
    runs = await rt.pool.fetchval("UPDATE it_switch SET job_runs = job_runs + 1 RETURNING job_runs")
    if runs == 1:
        await rt.pool.execute("SELECT * FROM it_not_there_yet")  # its database call fails, once
    while True:
        rt.heartbeat().beat()
        if await rt.pool.fetchval("SELECT job_crash FROM it_switch"):
            raise RuntimeError("told to crash")
        await asyncio.sleep(0.1)


DEFINITION = ServiceDefinition(
    name="order",
    schema="ordering",
    migrations_dir=Path(os.environ["IT_MIGRATIONS"]),
    consumers=[ConsumerSpec("faults", ["scheduling"], handlers)],
    background=[flaky_job],
)

if __name__ == "__main__":
    run(DEFINITION)
"""

MIGRATION = """
CREATE TABLE it_switch (refuse boolean NOT NULL, job_crash boolean NOT NULL, job_runs int NOT NULL);
INSERT INTO it_switch VALUES (false, false, 0);
CREATE TABLE it_effects (event_id uuid PRIMARY KEY, n int NOT NULL);
"""

PROBE_TYPE = "scheduling.fault_probe.v1"


@dataclass
class FaultService:
    url: str
    db_url: str  # the admin's, on the service's database
    namespace: str
    bootstrap: str
    log_path: Path

    async def switch(self, **values: Any) -> None:
        conn = await asyncpg.connect(self.db_url)
        try:
            for column, value in values.items():
                await conn.execute(f"UPDATE ordering.it_switch SET {column} = $1", value)
        finally:
            await conn.close()

    async def fetchval(self, sql: str) -> Any:
        conn = await asyncpg.connect(self.db_url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def fault_service(infra: Infrastructure, state_dir: Path, issuer: IssuerProcess) -> Iterator[FaultService]:
    run_dir = state_dir / f"fault-service-{uuid.uuid4().hex[:6]}"
    (run_dir / "migrations").mkdir(parents=True)
    (run_dir / "migrations" / "0001.it-faults.sql").write_text(MIGRATION)
    script = run_dir / "fault_service.py"
    script.write_text(SERVICE_SCRIPT)
    database = f"faults_{uuid.uuid4().hex[:8]}"
    urls = asyncio.run(provision(infra.admin_url, database))
    namespace = f"it{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "IT_MIGRATIONS": str(run_dir / "migrations"),
            "V2V_DATABASE_URL": urls["order"],
            "V2V_MIGRATION_DATABASE_URL": urls.owner_urls["order"],
            "V2V_KAFKA_BOOTSTRAP_SERVERS": infra.bootstrap_servers,
            "V2V_KAFKA_ENABLE_IDEMPOTENCE": "true" if infra.kafka_idempotence else "false",
            "V2V_KAFKA_FETCH_MAX_WAIT_MS": str(infra.kafka_fetch_max_wait_ms),
            "V2V_KAFKA_SESSION_TIMEOUT_MS": str(infra.kafka_session_timeout_ms),
            "V2V_KAFKA_HEARTBEAT_INTERVAL_MS": str(max(250, infra.kafka_session_timeout_ms // 4)),
            "V2V_TOPIC_NAMESPACE": namespace,
            "V2V_HTTP_HOST": "127.0.0.1",
            "V2V_HTTP_PORT": str(port),
            "V2V_AUTH_ISSUER": issuer.url,  # the test session's issuer: the ops client's tokens
            "V2V_CONSUMER_MAX_ATTEMPTS": "2",
            "V2V_BACKGROUND_RESTART_INITIAL_S": "2.0",  # long enough to see the loop dead in /ready
            "V2V_BACKGROUND_RESTART_MAX_S": "2.0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = run_dir / "service.log"
    proc = spawn([sys.executable, str(script)], env=env, log_path=log_path)
    service = FaultService(
        f"http://127.0.0.1:{port}",
        with_database(infra.admin_url, database),
        namespace,
        infra.bootstrap_servers,
        log_path,
    )
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(timeout=2.0) as client:
            while True:
                assert proc.poll() is None, f"the service exited:\n{tail(log_path)}"
                try:
                    if client.get(service.url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"the service did not start:\n{tail(log_path)}"
                time.sleep(0.2)
        yield service
    finally:
        stop(proc)
        asyncio.run(drop_database(infra.admin_url, database))


async def poll(check: Any, timeout: float, what: str, service: FaultService) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{tail(service.log_path)}")
        await asyncio.sleep(0.1)


async def test_a_crashed_background_loop_is_restarted_and_ready_names_it_while_dead(
    fault_service: FaultService,
) -> None:
    svc = fault_service
    async with httpx.AsyncClient(base_url=svc.url, timeout=5) as client:
        # its first run failed on a database call; the supervisor ran it again
        await poll(lambda: svc.fetchval("SELECT job_runs >= 2 FROM ordering.it_switch"), 30, "a restart", svc)

        async def ready() -> bool:
            return (await client.get("/ready")).status_code == 200

        await poll(ready, 30, "/ready once the loop runs again", svc)
        metrics = (await client.get("/metrics")).text
        restarts = re.search(r'v2v_background_restarts_total\{[^}]*loop="flaky_job"[^}]*\} (\S+)', metrics)
        assert restarts and float(restarts.group(1)) >= 1, metrics

        await svc.switch(job_crash=True)

        async def dead() -> Any:
            answer = await client.get("/ready")
            return answer if answer.status_code == 503 else None

        answer = await poll(dead, 15, "/ready to name the dead loop", svc)
        checks = answer.json()["checks"]
        assert checks["loop:flaky_job"].startswith("dead: RuntimeError: told to crash")
        assert checks["database"] == "ok" and checks["broker"] == "ok"
        assert "loop:outbox-relay" not in checks and "loop:outbox-listener" not in checks
        loops = answer.json()["loops"]  # every loop's health, for operators
        assert set(loops) == {"outbox-relay", "outbox-listener", "flaky_job"}
        assert loops["flaky_job"]["state"] == "backoff" and loops["flaky_job"]["restarts"] >= 2
        assert loops["outbox-relay"]["state"] == "running" and loops["outbox-relay"]["problem"] is None
        # and what it consumes: each consumer group, its topics and the event types it acts on
        consumers = answer.json()["consumers"]
        assert consumers and all(c["group"] and c["topics"] for c in consumers), consumers
        assert any(PROBE_TYPE in c["handles"] for c in consumers), consumers

        await svc.switch(job_crash=False)
        await poll(ready, 15, "/ready once the loop runs again", svc)
        assert (await client.get("/ready")).json()["checks"] == {"database": "ok", "broker": "ok"}


async def test_dead_letters_are_listed_and_replayed_through_the_api(
    fault_service: FaultService, credentials: Credentials
) -> None:
    svc = fault_service
    topic = topic_for("scheduling", svc.namespace)
    event = CloudEvent(source="/v2v/scheduling", type=PROBE_TYPE, subject="order-DL", data={"n": 7})
    await svc.switch(refuse=True)
    producer = AIOKafkaProducer(bootstrap_servers=svc.bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, event.to_json(), key=b"order-DL")
        await producer.send_and_wait(topic, b"{not json", key=b"order-DL")  # newer, and not an event
    finally:
        await producer.stop()

    ops = credentials.auth_for("ops")  # operations: ops:read and ops:write
    async with httpx.AsyncClient(base_url=svc.url, timeout=10, auth=ops) as client:

        async def two_dead_letters() -> Any:
            answer = await client.get("/v1/dead-letters")
            assert answer.status_code == 200, answer.text
            items = answer.json()
            return items if len(items) >= 2 else None

        items = await poll(two_dead_letters, 60, "two dead letters", svc)
        garbage, probe = items  # newest first
        assert garbage["event_id"] is None and garbage["error"].startswith("not a CloudEvent")
        assert probe["event_id"] == str(event.id) and probe["event_type"] == PROBE_TYPE
        assert probe["consumer"] == f"{svc.namespace}.order.faults"
        assert (probe["topic"], probe["partition"], probe["offset"]) == (topic, sent.partition, sent.offset)
        assert "probe 7 refused" in probe["error"] and probe["attempts"] == 2
        assert probe["replayed_at"] is None and probe["replays"] == 0
        assert [i["id"] for i in (await client.get("/v1/dead-letters", params={"limit": 1})).json()] == [
            garbage["id"]
        ]
        older = (await client.get("/v1/dead-letters", params={"before": garbage["id"]})).json()
        assert [i["id"] for i in older] == [probe["id"]]
        assert (await client.get("/v1/dead-letters", params={"limit": 0})).status_code == 422

        detail = (await client.get(f"/v1/dead-letters/{probe['id']}")).json()
        assert detail["message"] == event.to_json().decode() and detail["key"] == "order-DL"
        missing = await client.get("/v1/dead-letters/999999")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        assert (await client.post("/v1/dead-letters/999999/replay")).status_code == 404

        # operations routes: nobody else reads or replays them (and a refusal replays nothing)
        replay = f"/v1/dead-letters/{probe['id']}/replay"
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as anonymous:
            for answer in (await anonymous.get("/v1/dead-letters"), await anonymous.post(replay)):
                assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
        centre = credentials.auth_for("centre", "TC-DE-BE-001")
        async with httpx.AsyncClient(base_url=svc.url, timeout=10, auth=centre) as hospital:
            assert (await hospital.get("/v1/dead-letters")).status_code == 403
            assert (await hospital.post(replay)).status_code == 403
        async with httpx.AsyncClient(base_url=svc.url, timeout=10, auth=credentials.auth_for("qa")) as qa:
            assert (await qa.post(replay)).status_code == 403
        assert (await client.get(f"/v1/dead-letters/{probe['id']}")).json()["replays"] == 0

        await svc.switch(refuse=False)  # the cause is fixed
        replayed = await client.post(f"/v1/dead-letters/{probe['id']}/replay")
        assert replayed.status_code == 202, replayed.text
        assert replayed.json()["replays"] == 1 and replayed.json()["replayed_at"] is not None

        await poll(
            lambda: svc.fetchval(f"SELECT n FROM ordering.it_effects WHERE event_id = '{event.id}'"),
            30,
            "the replayed message to be processed",
            svc,
        )
        await asyncio.sleep(0.5)
        assert await svc.fetchval("SELECT count(*) FROM ordering.it_effects") == 1
        # a second replay reaches the consumer again, whose inbox drops it
        assert (await client.post(f"/v1/dead-letters/{probe['id']}/replay")).status_code == 202
        await asyncio.sleep(1.0)
        assert await svc.fetchval("SELECT count(*) FROM ordering.it_effects") == 1
        listed = {i["id"]: i for i in (await client.get("/v1/dead-letters")).json()}
        assert listed[probe["id"]]["replays"] == 2

        spec = (await client.get("/openapi.json")).json()
        assert spec["paths"]["/v1/dead-letters/{dead_letter_id}/replay"]["post"]["tags"] == ["operations"]
