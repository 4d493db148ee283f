"""Webhook delivery under faults, for real: Postgres (the notification schema, all migrations), real HTTP
receivers on 127.0.0.1, and the service's own background jobs (`webhook_dispatcher`, `webhook_listener`)
run under the runtime's Supervisor as the service runs them.

- One dead endpoint (connection refused, or answering 5xx) with 10,000 deliveries pending costs the others
  nothing: a new order's webhook reaches a live centre's endpoint within 1 s.
- The breaker parks a failing endpoint (its deliveries are not attempted), probes it with one delivery
  after a cool-down that grows, and a success closes it; the centre sees it on its subscription and in
  the delivery log. A retry carries the same `webhook-id`.
- A dispatcher paused past its lease records nothing once another has taken the delivery over.
- A database call that fails once restarts the loop (counted) and loses or repeats nothing.
- After a Postgres restart the LISTEN is re-established: a webhook queued afterwards goes out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

import notification_service
from notification_service.adapters.repository import NotificationTx, tx_factory
from notification_service.adapters.secret_box import DEV_KEY, SecretBox
from notification_service.adapters.webhooks import WebhookSender
from notification_service.config import NotificationSettings
from notification_service.domain.delivery import DeliveryPolicy, Outcome, WebhookDelivery
from notification_service.domain.urls import UrlPolicy
from notification_service.service_layer import commands, dispatch
from notification_service.service_layer.dispatch import (
    WebhookDispatcher,
    webhook_dispatcher,
    webhook_listener,
)
from notification_service.service_layer.handlers import handlers
from v2v_audit.service import migrate as audit_migrate
from v2v_contracts import CloudEvent, OrderSubmittedV1, new_event
from v2v_harness import pytest_plugin
from v2v_harness.e2e import eventually
from v2v_harness.postgres import LocalPostgres
from v2v_harness.processes import free_port
from v2v_harness.provision import provision
from v2v_messaging import MIGRATIONS_DIR, Supervisor, UnitOfWork, current_heartbeat, notify_channel
from v2v_persistence import apply_migrations, create_pool

pytestmark = pytest.mark.integration

MIGRATIONS = Path(notification_service.__file__).parent / "migrations"
BOX = SecretBox(DEV_KEY)
DEV = UrlPolicy(allow_loopback=True)
LIVE, DEAD = "TC-DE-BE-001", "TC-FR-PA-001"


# ---- a receiver that answers as told and records every post ---------------------------------------------


@dataclass
class Post:
    path: str
    webhook_id: str
    status: int
    at: float


class Receiver:
    """HTTP on 127.0.0.1; `status[path]` is the answer there (204 by default). Records every post."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.posts: list[Post] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    status = receiver.status.get(self.path, 204)
                    receiver.posts.append(Post(self.path, self.headers["webhook-id"], status, time.time()))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return None

        server_class = type(
            "Server", (ThreadingHTTPServer,), {"request_queue_size": 256, "daemon_threads": True}
        )
        self.server = server_class(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str, status: int | None = None) -> list[Post]:
        with self._lock:
            return [p for p in self.posts if p.path == path and (status is None or p.status == status)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.stop()


# ---- the service's jobs, as the runtime runs them -------------------------------------------------------


@dataclass
class Service:
    pool: asyncpg.Pool
    uow: Any  # UnitOfWork[NotificationTx], or a wrapper of it
    settings: NotificationSettings
    supervisor: Supervisor = field(
        default_factory=lambda: Supervisor(backoff_initial_s=0.1, backoff_max_s=1.0)
    )
    rt: Any = None

    def start(self) -> None:
        self.rt = SimpleNamespace(
            pool=self.pool,
            uow=self.uow,
            settings=self.settings,
            extras={},
            definition=SimpleNamespace(schema="notification"),
            heartbeat=current_heartbeat,
        )
        for job in (webhook_dispatcher, webhook_listener):  # as `v2v_servicekit.runtime` spawns them
            self.supervisor.spawn(job.__name__, _as_loop(job, self.rt))

    @property
    def dispatcher(self) -> WebhookDispatcher:
        found = self.rt.extras["dispatcher"]
        assert isinstance(found, WebhookDispatcher)
        return found

    async def stop(self) -> None:
        await self.supervisor.stop()

    def listening(self) -> bool:
        found = self.rt.extras.get("webhook_listener")
        return found is not None and bool(found.listening)

    def restarts(self, loop: str) -> int:
        return self.supervisor.health()[loop].restarts


def _as_loop(job: Callable[[Any], Any], rt: Any) -> Callable[[Any], Any]:
    async def loop(_heartbeat: Any) -> None:
        await job(rt)

    return loop


def settings(**kw: Any) -> NotificationSettings:
    return NotificationSettings(
        notification_insecure_dev_key=True,
        webhook_allow_loopback=True,
        webhook_timeout_s=2.0,
        background_stall_after_s=8.0,  # the listener probes its connection every 2 s
        **kw,
    )


async def migrated_pool(url: str, owner_url: str) -> asyncpg.Pool:
    await apply_migrations(owner_url, "notification", [MIGRATIONS_DIR, MIGRATIONS])
    await audit_migrate(owner_url, "notification")  # the audit trail (v2v_audit), as the service applies it
    return await create_pool(url, max_size=8)


def unit_of_work(pool: asyncpg.Pool) -> UnitOfWork[NotificationTx]:
    return UnitOfWork(pool, "t.v2v.notification", notify_channel("notification"), tx_factory)


@pytest.fixture
async def pool(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    found = await migrated_pool(test_db.urls["notification"], test_db.owner_urls["notification"])
    try:
        yield found
    finally:
        await found.close()


def submitted(centre: str) -> CloudEvent:
    return new_event(
        OrderSubmittedV1(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000042-K",
            treatment_center_id=centre,
            product_code="TISA-CEL",
            order_type="commercial",
            regulator="EMA",
            country="DE",
            region="EU",
            requested_apheresis_date=date(2030, 1, 15),
        )
    )


async def subscribe(uow: Any, centre: str, url: str) -> uuid.UUID:
    sub, _secret = await commands.subscribe(
        uow, BOX, DEV, treatment_center_id=centre, url=url, event_types=None
    )
    return sub.subscription_id


async def consume(uow: Any, event: CloudEvent) -> None:
    """As the consumer does: the deliveries queued, the dispatcher woken on commit (NOTIFY)."""
    async with uow.begin() as tx:
        await handlers.dispatch(tx, event)


async def backlog(pool: asyncpg.Pool, subscription_id: uuid.UUID, centre: str, n: int) -> None:
    """`n` deliveries pending for an hour, each of its own order (as after a load test)."""
    await pool.execute(
        """INSERT INTO deliveries (delivery_id, subscription_id, event_id, event_type, order_id, coi,
                                   treatment_center_id, payload, status, created_at, next_attempt_at)
           SELECT gen_random_uuid(), $1, gen_random_uuid(), 'order.submitted.v1', gen_random_uuid(),
                  'V2V00-26-000042-K', $2, $3, 'pending', now() - interval '1 hour' + g * interval '1 ms',
                  now() - interval '1 hour' + g * interval '1 ms'
           FROM generate_series(1, $4::int) g""",
        subscription_id,
        centre,
        submitted(centre).to_json(),
        n,
    )


async def endpoint(pool: asyncpg.Pool, subscription_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM webhook_endpoints WHERE subscription_id = $1", subscription_id)
    assert row is not None
    return row


async def arrival_s(receiver: Receiver, path: str, uow: Any, event: CloudEvent) -> float:
    """Seconds from the event's consumption to its webhook's arrival at `path`."""
    before = len(receiver.on(path, 204))
    started = time.time()
    await consume(uow, event)
    await eventually(lambda: len(receiver.on(path, 204)) > before, 10, interval=0.005, what="the webhook")
    return receiver.on(path, 204)[-1].at - started


# ---- one dead endpoint costs the others nothing ----------------------------------------------------------


@pytest.mark.parametrize("dead", ["connection_refused", "http_5xx"])
async def test_a_new_orders_webhook_reaches_a_live_endpoint_within_a_second_past_a_dead_ones_backlog(
    pool: asyncpg.Pool, receiver: Receiver, dead: str
) -> None:
    uow = unit_of_work(pool)
    if dead == "http_5xx":
        receiver.status["/dead"] = 500
        dead_url = receiver.url("/dead")
    else:
        dead_url = f"http://127.0.0.1:{free_port()}/dead"  # nothing listens there
    dead_sub = await subscribe(uow, DEAD, dead_url)
    await subscribe(uow, LIVE, receiver.url("/live"))
    await backlog(pool, dead_sub, DEAD, 10_000)
    service = Service(pool, uow, settings(webhook_breaker_cooldown_s=60.0))
    service.start()
    try:
        # at once, while the dead endpoint's first attempts fail
        assert await arrival_s(receiver, "/live", uow, submitted(LIVE)) < 1.0

        async def parked() -> bool:
            return (await endpoint(pool, dead_sub))["state"] == "parked"

        await eventually(parked, 10, what="the dead endpoint to be parked")
        for _ in range(5):  # and steadily after
            assert await arrival_s(receiver, "/live", uow, submitted(LIVE)) < 1.0
        # the dead one cost a few attempts, not 10,000: the rest wait, none of their attempts used up
        attempted = await pool.fetchval(
            "SELECT count(*) FROM delivery_attempts a JOIN deliveries d USING (delivery_id) "
            "WHERE d.subscription_id = $1",
            dead_sub,
        )
        assert 5 <= attempted <= 5 + 4  # the breaker's threshold, plus those in flight when it tripped
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM deliveries WHERE subscription_id = $1 AND status = 'pending'", dead_sub
            )
            == 10_000
        )
        assert {r["error"] for r in await pool.fetch("SELECT DISTINCT error FROM delivery_attempts")} <= {
            dead,
            None,
        }
        assert service.supervisor.problems() == {}
    finally:
        await service.stop()


async def test_a_new_event_is_not_starved_behind_a_catch_up_to_its_own_endpoint(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    uow = unit_of_work(pool)
    sub = await subscribe(uow, LIVE, receiver.url("/live"))
    await backlog(pool, sub, LIVE, 1_000)  # queued while the service was down (a cold restart's catch-up)
    service = Service(pool, uow, settings())
    service.start()
    try:
        await eventually(lambda: len(receiver.on("/live")) > 50, 20, what="the catch-up under way")
        for _ in range(3):  # each new event goes out while the catch-up goes on, not after it
            assert await arrival_s(receiver, "/live", uow, submitted(LIVE)) < 1.0
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM deliveries WHERE subscription_id = $1 AND status = 'pending'", sub
            )
            > 0
        )
        await eventually(lambda: len(receiver.on("/live")) == 1_003, 60, what="the catch-up done")
    finally:
        await service.stop()


# ---- the breaker, for real -----------------------------------------------------------------------------


async def test_the_breaker_parks_probes_and_closes_and_the_centre_sees_it(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    uow = unit_of_work(pool)
    receiver.status["/hook"] = 503
    sub = await subscribe(uow, LIVE, receiver.url("/hook"))
    service = Service(
        pool,
        uow,
        settings(
            webhook_breaker_failures=3,
            webhook_breaker_cooldown_s=1.0,
            webhook_endpoint_concurrency=2,
            webhook_backoff_base_s=0.05,
            webhook_backoff_max_s=0.1,
            webhook_max_attempts=100,
        ),
    )
    events = [submitted(LIVE) for _ in range(4)]
    for event in events:
        await consume(uow, event)
    service.start()
    try:

        async def state() -> str:
            return str((await endpoint(pool, sub))["state"])

        await eventually(lambda: receiver.on("/hook"), 10, what="the first attempts")
        await eventually(lambda: _is(state, "parked"), 10, what="the endpoint to be parked")
        parked_at, tried = time.time(), len(receiver.on("/hook"))
        assert 3 <= tried <= 4  # its threshold (plus one in flight)
        seen = await commands.get_subscription(uow, sub, LIVE)
        assert (seen.endpoint.state, seen.endpoint.consecutive_failures) == ("parked", tried)
        (first_until,) = [seen.endpoint.parked_until]
        log = await commands.list_deliveries(uow, tenant=LIVE, subscription_id=sub)
        assert {(d["endpoint_state"], d["parked_until"]) for d in log} == {("parked", first_until)}

        await asyncio.sleep(0.6)  # parked: nothing is attempted
        assert len(receiver.on("/hook")) == tried
        await eventually(lambda: len(receiver.on("/hook")) == tried + 1, 5, what="one probe")
        assert time.time() - parked_at >= 0.9
        await eventually(lambda: _is(state, "parked"), 5, what="the failed probe to park it again")
        again = await endpoint(pool, sub)
        assert again["parks"] == 2 and again["parked_until"] > first_until
        await asyncio.sleep(1.2)  # twice as long now: still only that one probe
        assert len(receiver.on("/hook")) == tried + 1

        receiver.status["/hook"] = 204  # the endpoint is back: the next probe succeeds, the rest follow
        await eventually(lambda: len(receiver.on("/hook", 204)) == len(events), 10, what="all delivered")
        # the receiver has answered; the dispatcher records the verdicts after the answers arrive (a batch
        # per transaction), so the recorded state is awaited, not read at once
        await eventually(lambda: _is(state, "open"), 10, what="the endpoint to be open again")

        async def recorded() -> set[str]:
            rows = await pool.fetch("SELECT status FROM deliveries WHERE subscription_id = $1", sub)
            return {r["status"] for r in rows}

        await eventually(lambda: _has(recorded, {"delivered"}), 10, what="every delivery recorded")
        assert (await endpoint(pool, sub))["consecutive_failures"] == 0
        # every retry of a delivery carried the same webhook-id (the event's), each delivered once
        ids = {f"msg_{e.id}" for e in events}
        assert {p.webhook_id for p in receiver.on("/hook")} == ids
        assert sorted(p.webhook_id for p in receiver.on("/hook", 204)) == sorted(ids)
    finally:
        await service.stop()


async def _is(state: Callable[[], Any], wanted: str) -> bool:
    return bool(await state() == wanted)


async def _has(values: Callable[[], Any], wanted: set[str]) -> bool:
    return bool(await values() == wanted)


async def _all_delivered(outcomes: Callable[[], Any]) -> bool:
    return {status for status, _ in await outcomes()} == {"delivered"}


# ---- a late recorder changes nothing -------------------------------------------------------------------


class Gated:
    """The real sender, held at a gate first (as a process paused by SIGSTOP, past its lease)."""

    def __init__(self, inner: WebhookSender, *, send: bool) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.at_gate = asyncio.Event()
        self.send_after = send

    async def send(self, delivery: WebhookDelivery) -> Outcome:
        self.at_gate.set()
        await self.gate.wait()
        if self.send_after:
            return await self.inner.send(delivery)
        return Outcome(None, "timeout")

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("late", ["delivered_again", "failed_for_good"])
async def test_an_attempt_recorded_past_its_lease_changes_nothing(
    pool: asyncpg.Pool, receiver: Receiver, late: str
) -> None:
    uow = unit_of_work(pool)
    sub = await subscribe(uow, LIVE, receiver.url("/hook"))
    event = submitted(LIVE)
    await consume(uow, event)
    once = DeliveryPolicy(max_attempts=1, timeout_s=2.0)  # a failure recorded would dead-letter it
    paused_sender = Gated(WebhookSender(2.0, BOX, DEV), send=late == "delivered_again")
    paused = WebhookDispatcher(uow, paused_sender, once, lease=timedelta(seconds=1))
    other = WebhookDispatcher(uow, WebhookSender(2.0, BOX, DEV), once)
    try:
        assert await paused.pump() == 1
        await paused_sender.at_gate.wait()
        await asyncio.sleep(1.2)  # its lease runs out
        assert await other.dispatch_due() == 1  # taken over, and delivered
        before = await pool.fetchrow("SELECT * FROM deliveries WHERE subscription_id = $1", sub)
        assert before is not None and (before["status"], before["attempts"]) == ("delivered", 1)
        endpoint_before = await endpoint(pool, sub)

        paused_sender.gate.set()  # it wakes up and records what it did
        await paused.drain()
        assert await paused.pump(lease_more=False) == 0
        assert paused.stats.superseded == 1 and paused.stats.recorded == 0

        assert await pool.fetchrow("SELECT * FROM deliveries WHERE subscription_id = $1", sub) == before
        attempts = await pool.fetch("SELECT attempt, status_code, error FROM delivery_attempts")
        assert [tuple(a) for a in attempts] == [(1, 204, None)]  # the other's attempt only
        assert await endpoint(pool, sub) == endpoint_before
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0  # no webhook_delivery_failed
        posts = receiver.on("/hook")
        if late == "delivered_again":  # the late copy carries the same webhook-id: the receiver drops it
            assert [p.webhook_id for p in posts] == [f"msg_{event.id}"] * 2
        else:
            assert [p.webhook_id for p in posts] == [f"msg_{event.id}"]
    finally:
        await paused.aclose()
        await other.aclose()


# ---- the loops' own supervision ------------------------------------------------------------------------


class FailingOnce:
    """The real unit of work, whose next transaction (or read) fails once, as a database call does."""

    def __init__(self, inner: UnitOfWork[NotificationTx]) -> None:
        self.inner = inner
        self.fail_begin = 0
        self.fail_read = 0

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[NotificationTx]:
        if self.fail_begin:
            self.fail_begin -= 1
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle")
        async with self.inner.begin() as tx:
            yield tx

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[NotificationTx]:
        if self.fail_read:
            self.fail_read -= 1
            raise asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command")
        async with self.inner.read() as tx:
            yield tx


async def test_a_dispatcher_whose_database_call_fails_once_keeps_delivering(
    pool: asyncpg.Pool, receiver: Receiver
) -> None:
    uow = FailingOnce(unit_of_work(pool))
    sub = await subscribe(uow, LIVE, receiver.url("/hook"))
    service = Service(pool, uow, settings())
    service.start()
    try:
        assert await arrival_s(receiver, "/hook", uow, submitted(LIVE)) < 1.0

        # the transaction that records an attempt (and leases the next) fails once
        uow.fail_begin = 1
        await consume(uow.inner, submitted(LIVE))
        await eventually(lambda: service.restarts("webhook_dispatcher") == 1, 5, what="a restart")
        await eventually(lambda: len(receiver.on("/hook")) == 2, 5, what="the second webhook")

        # the look at the queue between passes fails once (it used to sit outside any error handling)
        await eventually(lambda: service.dispatcher.in_flight == 0, 5, what="nothing in flight")
        uow.fail_read = 1
        assert await arrival_s(receiver, "/hook", uow.inner, submitted(LIVE)) < 2.0
        await eventually(lambda: service.restarts("webhook_dispatcher") == 2, 10, what="a second restart")

        # ... and a terminated backend (the listener's too): each loop is started again
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE usename = current_user AND pid <> pg_backend_pid()"
        )
        await eventually(lambda: service.restarts("webhook_listener") >= 1, 10, what="the listener's restart")
        await eventually(service.listening, 10, what="LISTEN again")
        assert await arrival_s(receiver, "/hook", uow.inner, submitted(LIVE)) < 2.0

        async def outcomes() -> list[tuple[str, int]]:
            rows = await pool.fetch("SELECT status, attempts FROM deliveries WHERE subscription_id = $1", sub)
            return [(r["status"], r["attempts"]) for r in rows]

        # (the last webhook may arrive a moment before its attempt is recorded)
        await eventually(lambda: _all_delivered(outcomes), 5, what="every attempt recorded")
        assert await outcomes() == [("delivered", 1)] * 4  # nothing lost, nothing attempted twice
        assert len(receiver.on("/hook")) == 4
        await eventually(lambda: service.supervisor.problems() == {}, 5, what="every loop healthy")
    finally:
        await service.stop()


@pytest.fixture
def own_postgres(state_dir: Path) -> Iterator[LocalPostgres]:
    """A Postgres of this test's own, which it can restart."""
    pg = LocalPostgres(state_dir / f"pg-{uuid.uuid4().hex[:6]}", free_port(), durable=False)
    pg.start(state_dir / "logs" / f"postgres-{pg.port}.log")
    try:
        yield pg
    finally:
        pg.stop()


async def test_the_webhook_listener_listens_again_after_a_postgres_restart(
    own_postgres: LocalPostgres, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no polling to speak of: only a NOTIFY can explain a prompt delivery
    monkeypatch.setattr(dispatch, "IDLE_WAIT_S", 120.0)
    urls = await provision(own_postgres.admin_url, "v2v_listen_notification")
    pool = await migrated_pool(urls["notification"], urls.owner_urls["notification"])
    uow = unit_of_work(pool)
    service = Service(pool, uow, settings())

    async def consume_when_up(event: CloudEvent) -> None:
        deadline = time.monotonic() + 20
        while True:  # the pool's connections died with the server: the first tries may fail
            try:
                await consume(uow, event)
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    try:
        await subscribe(uow, LIVE, receiver.url("/hook"))
        service.start()
        await eventually(service.listening, 10, what="the listener")
        await asyncio.sleep(0.5)  # the dispatcher now waits for a NOTIFY (or 120 s)
        assert await arrival_s(receiver, "/hook", uow, submitted(LIVE)) < 2.0

        await asyncio.to_thread(own_postgres.stop)
        await asyncio.to_thread(
            own_postgres.start, own_postgres.data_dir.parent / f"pg-{own_postgres.port}-2.log"
        )
        await eventually(lambda: service.restarts("webhook_listener") >= 1, 20, what="the lost LISTEN")
        await eventually(service.listening, 20, what="LISTEN to be re-established")
        await asyncio.sleep(1.0)  # the pass the reconnection woke is over: the dispatcher waits again

        before = len(receiver.on("/hook"))
        started = time.monotonic()
        await consume_when_up(submitted(LIVE))
        await eventually(lambda: len(receiver.on("/hook")) > before, 5, what="the webhook after the restart")
        assert time.monotonic() - started < 5
        await eventually(lambda: service.supervisor.problems() == {}, 10, what="every loop healthy")
    finally:
        await service.stop()
        await pool.close()


# ---- a consumer's batch queues its deliveries in one statement -------------------------------------------


async def test_a_batch_of_events_queues_its_deliveries_in_one_statement_in_event_order(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events of one transaction (a consumer's batch) have their deliveries written together right
    before COMMIT: one statement for all of them, each matching subscription's in the order the events
    came (`seq`, which keeps an order's webhooks in order); a transaction rolled back queues nothing."""
    uow = unit_of_work(pool)
    live = await subscribe(uow, LIVE, "http://127.0.0.1:9/a")
    other = await subscribe(uow, LIVE, "http://127.0.0.1:9/b")
    await subscribe(uow, DEAD, "http://127.0.0.1:9/c")  # another centre's: none of these events
    events = [submitted(LIVE) for _ in range(3)]

    statements: list[str] = []
    execute = asyncpg.Connection.execute

    async def counting(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if "INSERT INTO deliveries" in query:
            statements.append(query)
        return await execute(self, query, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(asyncpg.Connection, "execute", counting)
        async with uow.begin() as tx:
            for event in events:
                await handlers.dispatch(tx, event)
    assert len(statements) == 1

    rows = await pool.fetch("SELECT subscription_id, event_id FROM deliveries ORDER BY seq")
    for sub in (live, other):
        assert [r["event_id"] for r in rows if r["subscription_id"] == sub] == [e.id for e in events]
    assert len(rows) == 6

    with contextlib.suppress(RuntimeError):
        async with uow.begin() as tx:
            await handlers.dispatch(tx, submitted(LIVE))
            raise RuntimeError("rolled back")
    assert await pool.fetchval("SELECT count(*) FROM deliveries") == 6
