"""One dead endpoint costs the others nothing, and an attempt is recorded only by its lease's holder — on
in-memory repositories, with fake senders:

- the circuit breaker (`domain.endpoints`): parked after consecutive failures, probed with one delivery
  after a cool-down that grows, opened by a success; failures on this side do not count;
- scheduling per endpoint: a bounded number of an endpoint's deliveries in flight, endpoints taking turns,
  a parked endpoint's deliveries not attempted (nor their attempts used up), a new event not behind a
  backlog;
- fencing: a dispatcher paused past its lease records nothing once another has taken the delivery over;
- the loop: it never waits for a slow attempt, beats, and a database call that fails once (under the
  runtime's Supervisor) restarts it without losing or repeating an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from notification_service.adapters.memory import MemoryStore, Row, fake_unit_of_work
from notification_service.adapters.repository import NotificationTx
from notification_service.adapters.secret_box import DEV_KEY, SecretBox
from notification_service.domain.delivery import Delivery, DeliveryPolicy, Outcome
from notification_service.domain.endpoints import (
    BreakerPolicy,
    EndpointHealth,
    after_attempts,
    counts_against_endpoint,
)
from notification_service.domain.urls import UrlPolicy
from notification_service.service_layer import commands
from notification_service.service_layer.dispatch import WebhookDispatcher
from notification_service.service_layer.handlers import handlers
from v2v_contracts import CloudEvent, OrderSubmittedV1, new_event
from v2v_messaging import Supervisor
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork

BOX = SecretBox(DEV_KEY)
POLICY = DeliveryPolicy(max_attempts=8, backoff_base_s=10.0, backoff_max_s=300.0, batch=10)
BREAKER = BreakerPolicy(failures=3, cooldown_s=30.0, cooldown_max_s=100.0, per_endpoint=2)
OK = Outcome(204)
DOWN = Outcome(None, "connection_refused")
T0 = datetime(2030, 1, 1, tzinfo=UTC)


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
            requested_apheresis_date=datetime(2030, 1, 15).date(),
        )
    )


class Endpoints:
    """A sender whose answer depends on the endpoint (by URL): scripted, or OK."""

    def __init__(self) -> None:
        self.answers: dict[str, Outcome] = {}
        self.sent: list[Delivery] = []
        self.delay: dict[str, float] = {}

    async def send(self, delivery: Any) -> Outcome:
        self.sent.append(delivery)
        await asyncio.sleep(self.delay.get(delivery.url, 0.0))
        return self.answers.get(delivery.url, OK)

    def to(self, url: str) -> list[Delivery]:
        return [d for d in self.sent if getattr(d, "url", None) == url]

    async def aclose(self) -> None:
        return None


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(now=T0)


@pytest.fixture
def uow(store: MemoryStore) -> FakeUnitOfWork[Any]:
    return fake_unit_of_work(store)


@pytest.fixture
def inbox(uow: FakeUnitOfWork[Any]) -> FakeInbox[Any]:
    return FakeInbox(uow, handlers)


async def subscribe(uow: FakeUnitOfWork[Any], centre: str) -> tuple[uuid.UUID, str]:
    sub, _ = await commands.subscribe(
        uow,
        BOX,
        UrlPolicy(),
        treatment_center_id=centre,
        url=f"https://{centre.lower()}.example/hook",
        event_types=None,
    )
    return sub.subscription_id, sub.url


def rows_to(store: MemoryStore, sub: uuid.UUID) -> list[Row]:
    return [r for r in store.deliveries("webhook") if r.target_id == sub]


# ---- the breaker, as a rule ---------------------------------------------------------------------------


def test_consecutive_failures_park_an_endpoint_and_a_success_in_between_resets_them() -> None:
    health = EndpointHealth()
    d = [uuid.uuid4() for _ in range(6)]
    health = after_attempts(BREAKER, health, [(d[0], DOWN), (d[1], DOWN)], T0)
    assert (health.state, health.consecutive_failures) == ("open", 2)
    health = after_attempts(BREAKER, health, [(d[2], OK)], T0)
    assert health == EndpointHealth()
    health = after_attempts(BREAKER, health, [(d[3], DOWN), (d[4], DOWN), (d[5], DOWN)], T0)
    assert health == EndpointHealth("parked", 3, 1, T0 + timedelta(seconds=30))


def test_a_failed_probe_parks_for_longer_up_to_the_longest_and_a_success_opens() -> None:
    parked = EndpointHealth("parked", 3, 1, T0 + timedelta(seconds=30))
    waits = []
    for _ in range(4):
        probe = uuid.uuid4()
        probing = EndpointHealth("probing", parked.consecutive_failures, parked.parks, T0, probe)
        parked = after_attempts(BREAKER, probing, [(probe, Outcome(503, "http_5xx"))], T0)
        assert parked.state == "parked" and parked.parked_until is not None
        waits.append((parked.parked_until - T0).total_seconds())
    assert waits == [60.0, 100.0, 100.0, 100.0]  # doubled, then capped
    probe = uuid.uuid4()
    probing = EndpointHealth("probing", 7, parked.parks, T0, probe)
    assert after_attempts(BREAKER, probing, [(probe, OK)], T0) == EndpointHealth()


def test_an_older_attempts_failure_while_probing_does_not_park_or_end_the_probe() -> None:
    probe = uuid.uuid4()
    probing = EndpointHealth("probing", 3, 1, T0 + timedelta(seconds=60), probe)
    after = after_attempts(BREAKER, probing, [(uuid.uuid4(), DOWN)], T0)
    assert after == EndpointHealth("probing", 4, 1, T0 + timedelta(seconds=60), probe)


@pytest.mark.parametrize("category", ["blocked_address", "signing_secret_unavailable", "internal_error"])
def test_failures_on_this_side_say_nothing_about_the_endpoint(category: str) -> None:
    outcome = Outcome(None, category)
    assert not counts_against_endpoint(outcome)
    health = after_attempts(BREAKER, EndpointHealth(), [(uuid.uuid4(), outcome)] * 10, T0)
    assert health == EndpointHealth()
    probe = uuid.uuid4()  # a probe that failed on this side: probed again after the same wait
    probing = EndpointHealth("probing", 3, 2, T0, probe)
    assert after_attempts(BREAKER, probing, [(probe, outcome)], T0) == EndpointHealth(
        "parked", 3, 2, T0 + timedelta(seconds=60), None
    )


@given(
    st.lists(
        st.sampled_from([OK, DOWN, Outcome(500, "http_5xx"), Outcome(None, "internal_error")]), max_size=40
    )
)
def test_the_breaker_is_open_exactly_when_fewer_than_the_threshold_failed_since_a_success(
    outcomes: list[Outcome],
) -> None:
    health = EndpointHealth()
    for outcome in outcomes:  # one attempt at a time, as an open endpoint sees them
        if health.state != "open":
            break
        health = after_attempts(BREAKER, health, [(uuid.uuid4(), outcome)], T0)
    counted = 0
    for outcome in outcomes:
        if outcome.ok:
            counted = 0
        elif counts_against_endpoint(outcome):
            counted += 1
            if counted >= BREAKER.failures:
                break
    assert (health.state == "parked") == (counted >= BREAKER.failures)


def test_a_cool_down_is_bounded_for_any_number_of_parkings() -> None:
    assert BREAKER.cooldown(1) == timedelta(seconds=30)
    assert BREAKER.cooldown(10_000) == timedelta(seconds=100)
    with pytest.raises(ValueError):
        BreakerPolicy(failures=0)
    with pytest.raises(ValueError):
        BreakerPolicy(cooldown_s=10.0, cooldown_max_s=5.0)


# ---- scheduling per endpoint --------------------------------------------------------------------------


async def test_a_dead_endpoint_with_a_backlog_delays_nobody_and_is_parked(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    dead, dead_url = await subscribe(uow, "TC-DEAD-001")
    live, live_url = await subscribe(uow, "TC-LIVE-001")
    await inbox.deliver(*(submitted("TC-DEAD-001") for _ in range(200)))
    store.advance(60)  # an old backlog
    await inbox.deliver(submitted("TC-LIVE-001"))
    sender = Endpoints()
    sender.answers[dead_url] = DOWN
    hooks = WebhookDispatcher(uow, sender, POLICY, breaker=BREAKER)

    assert await hooks.dispatch_due() == 3  # the dead one's 2 (its bound), the live one's 1
    assert len(sender.to(live_url)) == 1
    assert [r.status for r in rows_to(store, live)] == ["delivered"]

    store.make_due()
    await hooks.dispatch_due()  # its third consecutive failure parks it
    assert store.endpoints[dead].state == "parked"
    assert store.endpoints[dead].parked_until == store.now + timedelta(seconds=30)
    tried = len(sender.to(dead_url))
    assert tried == 4

    await inbox.deliver(submitted("TC-LIVE-001"))
    store.make_due()
    assert await hooks.dispatch_due() == 1  # parked: none of its 200 deliveries is attempted
    assert len(sender.to(dead_url)) == tried
    assert len(sender.to(live_url)) == 2
    waiting = [r for r in rows_to(store, dead) if r.status == "pending"]
    assert len(waiting) == 200  # nothing dead-lettered while parked ...
    assert sum(r.attempts for r in waiting) == tried  # ... nor any attempt used up


async def test_a_parked_endpoint_is_probed_with_one_delivery_and_a_success_drains_its_backlog(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub, url = await subscribe(uow, "TC-DE-BE-001")
    await inbox.deliver(*(submitted("TC-DE-BE-001") for _ in range(8)))
    sender = Endpoints()
    sender.answers[url] = DOWN
    hooks = WebhookDispatcher(uow, sender, POLICY, breaker=BREAKER)
    while store.endpoints.get(sub, EndpointHealth()).state == "open":
        store.make_due()
        await hooks.dispatch_due()
    store.make_due()
    assert await hooks.dispatch_due() == 0  # parked
    assert await hooks.until_next_due() == 5.0  # nothing to do before its cool-down (the idle wait)

    store.advance(30)  # cool-down over: one probe, which fails
    store.make_due()
    assert await hooks.dispatch_due() == 1
    health = store.endpoints[sub]
    assert (health.state, health.parks) == ("parked", 2)
    assert health.parked_until == store.now + timedelta(seconds=60)  # twice as long
    store.advance(30)
    store.make_due()
    assert await hooks.dispatch_due() == 0

    store.advance(30)
    sender.answers[url] = OK  # the endpoint is back: the probe succeeds
    assert await hooks.dispatch_due() == 1
    assert store.endpoints[sub] == EndpointHealth()
    store.make_due()
    while await hooks.dispatch_due():  # the backlog drains, two at a time
        store.make_due()
    assert {r.status for r in rows_to(store, sub)} == {"delivered"}


async def test_a_probe_in_flight_is_the_only_one_and_its_lease_ending_allows_another(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub, _ = await subscribe(uow, "TC-DE-BE-001")
    await inbox.deliver(*(submitted("TC-DE-BE-001") for _ in range(3)))
    store.endpoints[sub] = EndpointHealth("parked", 3, 1, store.now)
    lease = timedelta(seconds=60)
    async with uow.begin() as tx:  # a replica takes the probe, and dies
        (probe,) = await tx.webhooks.claim_due(10, lease, per_target=2)
        assert await tx.webhooks.claim_due(10, lease, per_target=2) == []
    assert store.endpoints[sub].state == "probing"
    assert store.endpoints[sub].probe_delivery_id == probe.delivery_id
    store.advance(61)
    async with uow.begin() as tx:
        (again,) = await tx.webhooks.claim_due(10, lease, per_target=2)
    assert store.endpoints[sub].probe_delivery_id == again.delivery_id


async def test_a_new_event_is_not_behind_an_endpoints_backlog(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    _sub, _ = await subscribe(uow, "TC-DE-BE-001")
    await inbox.deliver(*(submitted("TC-DE-BE-001") for _ in range(50)))  # a catch-up
    store.advance(120)
    new = submitted("TC-DE-BE-001")
    await inbox.deliver(new)
    sender = Endpoints()
    hooks = WebhookDispatcher(uow, sender, POLICY, breaker=BREAKER)
    assert await hooks.dispatch_due() == 2
    assert new.id in {d.event_id for d in sender.sent}  # the newest, and the oldest of the backlog


async def test_an_orders_next_webhook_waits_for_its_previous_one_to_be_recorded(
    uow: FakeUnitOfWork[Any], store: MemoryStore
) -> None:
    _sub, _ = await subscribe(uow, "TC-DE-BE-001")
    first = submitted("TC-DE-BE-001")
    second = new_event(OrderSubmittedV1.model_validate(first.data))
    inbox = FakeInbox(uow, handlers)
    await inbox.deliver(first)
    lease = timedelta(seconds=60)
    async with uow.begin() as tx:
        (leased,) = await tx.webhooks.claim_due(10, lease, per_target=4)
    await inbox.deliver(second)
    async with uow.begin() as tx:  # its lane is busy: not leased alongside (another replica would race)
        assert await tx.webhooks.claim_due(10, lease, per_target=4) == []
        assert await tx.webhooks.seconds_until_next_due(per_target=4) is None
    assert leased.event_id == first.id


# ---- fencing -------------------------------------------------------------------------------------------


async def test_an_attempt_recorded_after_its_lease_was_taken_over_changes_nothing(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub, _url = await subscribe(uow, "TC-DE-BE-001")
    await inbox.deliver(submitted("TC-DE-BE-001"))
    gate = asyncio.Event()

    class Paused(Endpoints):
        async def send(self, delivery: Any) -> Outcome:
            await gate.wait()  # paused (SIGSTOP, a long GC) past the lease
            return Outcome(None, "timeout")

    paused = WebhookDispatcher(uow, Paused(), POLICY, breaker=BREAKER)
    assert await paused.pump() == 1
    await asyncio.sleep(0)
    store.advance(paused.lease.total_seconds() + 1)
    other = WebhookDispatcher(uow, Endpoints(), POLICY, breaker=BREAKER)
    assert await other.dispatch_due() == 1  # the lease ran out: another takes it over, and delivers
    (row,) = rows_to(store, sub)
    before = (row.status, row.attempts, list(row.attempt_log), store.endpoints.get(sub))

    gate.set()
    await paused.drain()
    await paused.pump(lease_more=False)
    (row,) = rows_to(store, sub)
    assert (row.status, row.attempts, list(row.attempt_log), store.endpoints.get(sub)) == before
    assert (row.status, row.attempts) == ("delivered", 1)
    assert paused.stats.superseded == 1 and paused.stats.recorded == 0
    assert uow.committed == []  # no webhook_delivery_failed either


async def test_each_lease_has_its_own_token(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await subscribe(uow, "TC-DE-BE-001")
    await inbox.deliver(submitted("TC-DE-BE-001"))
    async with uow.begin() as tx:
        (first,) = await tx.webhooks.claim_due(10, timedelta(seconds=1))
    store.advance(2)
    async with uow.begin() as tx:
        (second,) = await tx.webhooks.claim_due(10, timedelta(seconds=1))
    assert first.delivery_id == second.delivery_id
    assert None not in (first.lease_token, second.lease_token)
    assert first.lease_token != second.lease_token


# ---- the loop ------------------------------------------------------------------------------------------


class FlakyUow:
    """A unit of work whose next `fail` transactions (or reads) fail, as a database call would."""

    def __init__(self, inner: FakeUnitOfWork[NotificationTx]) -> None:
        self.inner = inner
        self.fail_begin = 0
        self.fail_read = 0
        self.failed = 0

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[NotificationTx]:
        if self.fail_begin:
            self.fail_begin -= 1
            self.failed += 1
            raise ConnectionResetError("the database went away")
        async with self.inner.begin() as tx:
            yield tx

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[NotificationTx]:
        if self.fail_read:
            self.fail_read -= 1
            self.failed += 1
            raise ConnectionResetError("the database went away")
        async with self.inner.read() as tx:
            yield tx


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("not met in time")
        await asyncio.sleep(0.01)


async def test_a_slow_endpoint_holds_only_its_own_attempts(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    _slow, slow_url = await subscribe(uow, "TC-SLOW-001")
    live, _live_url = await subscribe(uow, "TC-LIVE-001")
    sender = Endpoints()
    sender.delay[slow_url] = 30.0  # a receiver that never answers in time
    await inbox.deliver(*(submitted("TC-SLOW-001") for _ in range(5)))
    hooks = WebhookDispatcher(uow, sender, POLICY, breaker=BREAKER)
    wake = asyncio.Event()
    supervisor = Supervisor(backoff_initial_s=0.01, backoff_max_s=0.05)
    supervisor.spawn("webhook_dispatcher", lambda hb: hooks.run(wake, hb))
    try:
        await eventually(lambda: len(sender.to(slow_url)) == 2)
        for n in range(3):  # while the slow endpoint's attempts hang, the live one's go through
            await inbox.deliver(submitted("TC-LIVE-001"))
            wake.set()
            await eventually(lambda n=n: sum(r.status == "delivered" for r in rows_to(store, live)) > n)
        assert len(sender.to(slow_url)) == 2  # its bound: no more of its deliveries in flight
    finally:
        await supervisor.stop()
        await hooks.shutdown(grace_s=0.01)


async def test_a_database_call_that_fails_once_restarts_the_loop_and_loses_nothing(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub, url = await subscribe(uow, "TC-DE-BE-001")
    flaky = FlakyUow(uow)
    sender = Endpoints()
    sender.delay[url] = 0.05
    hooks = WebhookDispatcher(flaky, sender, POLICY, breaker=BreakerPolicy(per_endpoint=8))
    wake = asyncio.Event()
    supervisor = Supervisor(backoff_initial_s=0.01, backoff_max_s=0.05)
    supervisor.spawn("webhook_dispatcher", lambda hb: hooks.run(wake, hb))
    try:
        await inbox.deliver(*(submitted("TC-DE-BE-001") for _ in range(5)))
        wake.set()
        await eventually(lambda: hooks.in_flight == 5)
        flaky.fail_begin = 1  # the transaction recording them fails
        await eventually(lambda: supervisor.health()["webhook_dispatcher"].restarts == 1)
        await eventually(lambda: {r.status for r in rows_to(store, sub)} == {"delivered"})

        flaky.fail_read = 1  # the look at the queue between passes (it used to sit outside any handling)
        await inbox.deliver(submitted("TC-DE-BE-001"))
        wake.set()
        await eventually(lambda: supervisor.health()["webhook_dispatcher"].restarts == 2)
        await inbox.deliver(submitted("TC-DE-BE-001"))
        wake.set()
        await eventually(lambda: len([r for r in rows_to(store, sub) if r.status == "delivered"]) == 7)
        assert flaky.failed == 2
        assert len(sender.sent) == 7  # each attempted once: nothing lost, nothing twice
        assert all(len(r.attempt_log) == 1 for r in rows_to(store, sub))
        assert supervisor.problems() == {}
    finally:
        await supervisor.stop()
        await hooks.shutdown(grace_s=0.01)


async def test_the_loop_beats_while_it_waits_and_while_attempts_are_in_flight(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from notification_service.service_layer import dispatch

    monkeypatch.setattr(dispatch, "IDLE_WAIT_S", 0.05)
    _, url = await subscribe(uow, "TC-DE-BE-001")
    sender = Endpoints()
    sender.delay[url] = 10.0
    await inbox.deliver(submitted("TC-DE-BE-001"))
    hooks = WebhookDispatcher(uow, sender, POLICY, breaker=BREAKER)
    supervisor = Supervisor(stall_after_s=0.5)
    heartbeat = supervisor.spawn("webhook_dispatcher", lambda hb: hooks.run(asyncio.Event(), hb))
    try:
        await eventually(lambda: len(sender.sent) == 1)
        beats = heartbeat.beats
        await asyncio.sleep(0.8)  # the attempt hangs; the loop does not
        assert heartbeat.beats > beats + 5
        assert supervisor.problems() == {}
    finally:
        await supervisor.stop()
        await hooks.shutdown(grace_s=0.01)


async def test_a_loop_that_stops_beating_is_reported_stuck(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await subscribe(uow, "TC-DE-BE-001")
    hang = asyncio.Event()

    class Hanging(FlakyUow):
        @contextlib.asynccontextmanager
        async def begin(self) -> AsyncIterator[NotificationTx]:
            await hang.wait()  # a database call that never returns
            async with self.inner.begin() as tx:
                yield tx

    hooks = WebhookDispatcher(Hanging(uow), Endpoints(), POLICY, breaker=BREAKER)
    supervisor = Supervisor(stall_after_s=0.2)
    heartbeat = supervisor.spawn("webhook_dispatcher", lambda hb: hooks.run(asyncio.Event(), hb))
    heartbeat.beat()  # it promised to beat
    try:
        await asyncio.sleep(0.4)
        assert supervisor.problems()["webhook_dispatcher"].startswith("stuck")
    finally:
        hang.set()
        await supervisor.stop()


def test_the_service_runs_each_channels_dispatcher_and_listener_under_the_runtimes_supervisor() -> None:
    from notification_service.app import DEFINITION

    assert [job.__name__ for job in DEFINITION.background] == [
        "webhook_dispatcher",
        "webhook_listener",
        "email_dispatcher",
        "email_listener",
        "audit_checkpoints",  # the audit trail's signed checkpoints (v2v_audit.service)
    ]


async def test_at_shutdown_an_attempt_that_finishes_in_time_is_recorded_and_the_sender_closed(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    from types import SimpleNamespace

    from notification_service.config import NotificationSettings
    from notification_service.service_layer.dispatch import webhook_dispatcher
    from v2v_messaging import current_heartbeat

    sub, url = await subscribe(uow, "TC-DE-BE-001")
    await inbox.deliver(submitted("TC-DE-BE-001"))
    closed = asyncio.Event()

    class Slowish(Endpoints):
        async def aclose(self) -> None:
            closed.set()

    sender = Slowish()
    sender.delay[url] = 0.3
    hooks = WebhookDispatcher(uow, sender, POLICY, breaker=BREAKER)
    rt = SimpleNamespace(
        pool=None,
        uow=uow,
        settings=NotificationSettings(notification_insecure_dev_key=True),
        extras={"dispatcher": hooks},  # made once, kept across the runs of its loop
        definition=SimpleNamespace(schema="notification"),
        heartbeat=current_heartbeat,
    )
    supervisor = Supervisor()

    async def loop(_hb: Any) -> None:
        await webhook_dispatcher(rt)  # type: ignore[arg-type]

    supervisor.spawn("webhook_dispatcher", loop)
    await eventually(lambda: len(sender.sent) == 1)
    await supervisor.stop(timeout=5.0)  # the service stops while the attempt is in flight
    (row,) = rows_to(store, sub)
    assert (row.status, row.attempts) == ("delivered", 1)
    assert closed.is_set()


def test_the_lease_covers_an_endpoints_attempts_one_after_another_unless_set() -> None:
    from notification_service.config import NotificationSettings
    from notification_service.service_layer.dispatch import lease_for

    default = NotificationSettings(notification_insecure_dev_key=True)
    assert default.webhook_lease is None
    policy, breaker = default.webhook_policy, default.breaker_policy
    # four deliveries of one lane, each bounded by 3 x 5 s + 1 s, leased together
    assert lease_for(policy, breaker.per_endpoint) == timedelta(seconds=4 * 16 + 10)
    assert lease_for(DeliveryPolicy(timeout_s=1.0)) == timedelta(seconds=60)  # never below a minute
    short = NotificationSettings(notification_insecure_dev_key=True, webhook_lease_s=5)
    assert short.webhook_lease == timedelta(seconds=5)  # (a chaos run's pause outlasts it)
