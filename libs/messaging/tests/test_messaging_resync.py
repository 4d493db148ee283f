"""Unit tests (no I/O): when a consumer decides that the broker forgot what it had read, and what it
does then. A fake Kafka consumer and a fake broker stand in for aiokafka and Tansu; the integration
tests in tests/integration/test_faults_broker.py run the same over a real Tansu that restarts."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata
from faststream.kafka import KafkaBroker

from v2v_contracts import dead_letter_topic, topic_for
from v2v_messaging import EventConsumer, HandlerRegistry
from v2v_messaging import consumer as consumer_module
from v2v_messaging.resync import (
    BrokerProbe,
    PartitionCheck,
    PartitionState,
    RecordMark,
    loss_reason,
)

TOPIC = topic_for("site")
T0, T1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


def check(
    position: int | None,
    high: int | None,
    *,
    seen: RecordMark | None = None,
    found: RecordMark | None = None,
    log_start: int | None = 0,
) -> PartitionCheck:
    return PartitionCheck(TOPIC, 0, position, high, log_start=log_start, seen=seen, found=found)


# ---- the decision -------------------------------------------------------------------------------------


def test_a_broker_that_holds_what_was_read_forgot_nothing() -> None:
    mark = RecordMark(41, 1_000)
    assert (
        loss_reason([check(42, 50, seen=mark, found=mark)], cluster_id_before="c", cluster_id_now="c") is None
    )
    assert (
        loss_reason([check(42, 42, seen=mark, found=mark)], cluster_id_before="c", cluster_id_now="c") is None
    )
    assert loss_reason([check(0, 0)], cluster_id_before=None, cluster_id_now="c") is None  # a first look


def test_a_position_past_the_end_of_the_log_means_the_broker_forgot() -> None:
    # a re-join brought back offsets committed on the old broker; Tansu would answer fetches there
    # with nothing, and the consumer would skip what the replay puts below them
    reason = loss_reason([check(42, 7)], cluster_id_before="c", cluster_id_now="c")
    assert reason is not None and "ends at 7, below the position 42" in reason


def test_another_record_at_an_offset_read_before_means_the_broker_forgot() -> None:
    # the replay (and new rows) filled the partition past the old position: only the record itself
    # tells; a replayed record is written anew, with a new timestamp
    reason = loss_reason(
        [check(42, 60, seen=RecordMark(41, 1_000), found=RecordMark(41, 2_000))],
        cluster_id_before="c",
        cluster_id_now="c",
    )
    assert reason is not None and "another record at 41" in reason


def test_a_record_read_before_that_is_gone_means_the_broker_forgot() -> None:
    gone = loss_reason(
        [check(None, 30, seen=RecordMark(41, 1_000))], cluster_id_before=None, cluster_id_now=None
    )
    assert gone is not None and "ends at 30" in gone
    hole = loss_reason(
        [check(None, 60, seen=RecordMark(41, 1_000), found=None)], cluster_id_before=None, cluster_id_now=None
    )
    assert hole is not None and "no longer holds the record read at 41" in hole


def test_a_record_removed_by_retention_is_no_loss() -> None:
    old = check(900, 1_000, seen=RecordMark(41, 1_000), found=None, log_start=500)
    assert loss_reason([old], cluster_id_before="c", cluster_id_now="c") is None


def test_a_new_cluster_id_means_the_broker_forgot() -> None:
    reason = loss_reason([check(3, 10)], cluster_id_before="old", cluster_id_now="new")
    assert reason is not None and "cluster id old is now new" in reason


def test_what_the_broker_did_not_say_is_no_evidence() -> None:
    assert (
        loss_reason([check(42, None, seen=RecordMark(41, 1))], cluster_id_before="c", cluster_id_now=None)
        is None
    )


# ---- what the consumer does ---------------------------------------------------------------------------


@dataclass
class FakeBroker:
    """What the broker holds: per partition, its records (offset -> timestamp) and where its log starts."""

    cluster_id: str = "tansu_cluster"
    records: dict[TopicPartition, dict[int, int]] = field(default_factory=dict)
    log_start: dict[TopicPartition, int] = field(default_factory=dict)
    answers: bool = True  # False: the probe learns nothing (unreachable)
    probes: int = 0

    def end(self, tp: TopicPartition) -> int:
        return max(self.records.get(tp, {}), default=-1) + 1

    async def probe(
        self, _factory: Any, targets: dict[TopicPartition, int | None], **_kw: Any
    ) -> BrokerProbe:
        self.probes += 1
        result = BrokerProbe(partitions={tp: PartitionState() for tp in targets})
        if not self.answers:
            return result
        result.cluster_id = self.cluster_id
        for tp, target in targets.items():
            held = self.records.get(tp, {})
            found = RecordMark(target, held[target]) if target is not None and target in held else None
            result.partitions[tp] = PartitionState(self.end(tp), self.log_start.get(tp, 0), found, True)
        return result


class FakeKafkaConsumer:
    """The little of AIOKafkaConsumer the check uses."""

    def __init__(self, broker: FakeBroker, positions: dict[TopicPartition, int]) -> None:
        self.broker = broker
        self.positions = dict(positions)
        self.high: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self.paused_during_probe: set[TopicPartition] | None = None
        self.commits: list[dict[TopicPartition, OffsetAndMetadata]] = []
        self.seeks: list[tuple[TopicPartition, ...]] = []
        self.poll_commits = 0  # commits of the positions after a poll (no explicit offsets)
        self.handed_back: list[tuple[TopicPartition, int]] = []  # seeks back to a record to read again

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused -= set(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    async def position(self, tp: TopicPartition) -> int:
        self.paused_during_probe = set(self._paused)
        return self.positions[tp]

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.high.get(tp)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {tp.partition for tp in self.positions if tp.topic == topic} or None

    async def seek_to_beginning(self, *tps: TopicPartition) -> bool:
        self.seeks.append(tps)
        for tp in tps:
            self.positions[tp] = self.broker.log_start.get(tp, 0)
        return True

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata] | None = None) -> None:
        if offsets is None:
            self.poll_commits += 1
        else:
            self.commits.append(dict(offsets))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.handed_back.append((tp, offset))


def make_consumer(
    monkeypatch: pytest.MonkeyPatch, broker: FakeBroker, positions: dict[TopicPartition, int]
) -> tuple[EventConsumer, FakeKafkaConsumer]:
    monkeypatch.setattr(consumer_module, "probe_broker", broker.probe)
    consumer = EventConsumer(
        service="order",
        purpose="unit",
        topics=[TOPIC],
        handlers=HandlerRegistry[Any](),
        uow=object(),  # type: ignore[arg-type]
        broker=KafkaBroker("127.0.0.1:9", logger=None),  # never connected
        dead_letter_topic=dead_letter_topic("order"),
        fetch_max_wait_ms=20,
    )
    fake = FakeKafkaConsumer(broker, positions)
    consumer.subscriber.consumer = fake  # type: ignore[assignment]
    return consumer, fake


def record_at(tp: TopicPartition, offset: int, timestamp: int) -> Any:
    return SimpleNamespace(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=timestamp,
        headers=(),
        value=b"",
        key=None,
    )


async def read(consumer: EventConsumer, tp: TopicPartition, offset: int, timestamp: int) -> None:
    """The consumer takes a record (a poll of one; nothing to apply here)."""

    async def nothing(_item: Any) -> None:
        return None

    consumer._prepare = nothing  # type: ignore[method-assign]
    await consumer._consume_records([record_at(tp, offset, timestamp)])


async def test_a_broker_that_kept_everything_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = FakeBroker(records={T0: {0: 10, 1: 11}, T1: {0: 20}})
    consumer, fake = make_consumer(monkeypatch, broker, {T0: 2, T1: 1})
    await read(consumer, T0, 1, 11)
    await read(consumer, T1, 0, 20)

    assert await consumer.check_broker("assignment") is None
    assert fake.seeks == [] and fake.commits == []
    assert fake.paused_during_probe == {T0, T1}, "nothing is read while the positions are checked"
    assert fake.paused() == set()
    assert consumer.stats.broker_resets == 0


async def test_a_restarted_broker_with_the_replay_past_the_old_positions_is_read_again_from_the_beginning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the old broker: T0 held 3 records, T1 one. The fresh one got the replay (and new rows first),
    # numbered from 0, past the old positions: the positions alone look fine.
    broker = FakeBroker(records={T0: {0: 10, 1: 11, 2: 12}, T1: {0: 20}})
    consumer, fake = make_consumer(monkeypatch, broker, {T0: 3, T1: 1})
    for offset in range(3):
        await read(consumer, T0, offset, 10 + offset)
    await read(consumer, T1, 0, 20)
    broker.records = {T0: {n: 100 + n for n in range(8)}, T1: {n: 200 + n for n in range(5)}}

    reason = await consumer.check_broker("assignment")

    assert reason is not None and "another record at 2" in reason
    assert fake.seeks == [(T0, T1)], "every assigned partition, from the beginning of what the broker holds"
    assert fake.positions == {T0: 0, T1: 0}
    assert fake.commits == [{T0: OffsetAndMetadata(0, ""), T1: OffsetAndMetadata(0, "")}], (
        "the old positions committed on the fresh broker are overwritten"
    )
    assert consumer.stats.broker_resets == 1
    assert fake.paused() == set()
    # what it had read belongs to the old broker: the next check compares with what it reads now
    assert await consumer.check_broker("assignment") is None
    assert consumer.stats.broker_resets == 1


async def test_offsets_committed_on_the_old_broker_past_the_new_end_are_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a freshly started process (it remembers no record) gets offsets a stale commit left behind
    broker = FakeBroker(records={T0: {0: 100, 1: 101}, T1: {}})
    consumer, fake = make_consumer(monkeypatch, broker, {T0: 40, T1: 0})
    reason = await consumer.check_broker("assignment")
    assert reason is not None and "ends at 2, below the position 40" in reason
    assert fake.positions == {T0: 0, T1: 0}


async def test_a_new_cluster_id_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = FakeBroker(cluster_id="first", records={T0: {0: 1}})
    consumer, fake = make_consumer(monkeypatch, broker, {T0: 1})
    assert await consumer.check_broker("assignment") is None  # remembers the cluster id
    broker.cluster_id = "second"
    reason = await consumer.check_broker("assignment")
    assert reason is not None and "cluster id first is now second" in reason
    assert fake.seeks == [(T0,)]


async def test_partitions_it_read_from_are_read_again_when_the_broker_cannot_be_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker(records={T0: {0: 1}}, answers=False)
    consumer, fake = make_consumer(monkeypatch, broker, {T0: 1, T1: 0})
    assert await consumer.check_broker("assignment") is None, "nothing read yet: nothing to lose"
    await read(consumer, T0, 0, 1)
    reason = await consumer.check_broker("assignment")
    assert reason is not None and "could not check" in reason
    assert fake.seeks == [(T0, T1)]


async def test_a_record_removed_by_retention_is_no_reason_to_start_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker(records={T0: {n: n for n in range(500, 600)}}, log_start={T0: 500})
    consumer, fake = make_consumer(monkeypatch, broker, {T0: 550})
    await read(consumer, T0, 41, 41)
    assert await consumer.check_broker("assignment") is None
    assert fake.seeks == []


async def test_the_watch_checks_when_a_partition_ends_below_the_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker(records={T0: {0: 1, 1: 2}})
    consumer, fake = make_consumer(monkeypatch, broker, {T0: 2})
    await read(consumer, T0, 1, 2)
    fake.high[T0] = 2
    await consumer._watch_once(fake)  # type: ignore[arg-type]
    assert broker.probes == 0, "the end of the log is where the consumer is: nothing to check"

    broker.records = {T0: {0: 50}}  # the broker restarted; its fetches now end at 1
    fake.high[T0] = 1
    await consumer._watch_once(fake)  # type: ignore[arg-type]
    assert broker.probes == 1
    assert fake.seeks == [(T0,)] and consumer.stats.broker_resets == 1


async def test_a_record_read_before_the_broker_forgot_is_not_handed_back_at_its_old_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker(records={T0: {0: 1}})
    consumer, fake = make_consumer(monkeypatch, broker, {T0: 1})
    record = record_at(T0, 57, 1)

    async def fails(_item: Any) -> None:
        raise ConnectionError("database unavailable")

    consumer._prepare = fails  # type: ignore[method-assign]
    await consumer._consume_records([record])  # handed back (sought back to its offset): redelivered
    assert fake.handed_back == [(T0, 57)] and fake.poll_commits == 0

    async def fails_after_a_reset(_item: Any) -> None:
        consumer._resets += 1  # the broker forgot meanwhile; the consumer started again from 0
        raise ConnectionError("database unavailable")

    consumer._prepare = fails_after_a_reset  # type: ignore[method-assign]
    # not handed back: a seek to 57 would skip what the fresh broker holds below it; it comes again
    await consumer._consume_records([record])
    assert fake.handed_back == [(T0, 57)] and fake.poll_commits == 0


async def test_a_batch_commits_about_its_last_records_order_not_the_last_record_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The COMMIT of a batch is a child of its last record's span: it is about that record's order, even
    when the poll's last record (settled outside the batch: another order's event of a type the consumer
    ignores) bound another order meanwhile."""
    import uuid

    from v2v_contracts import CloudEvent
    from v2v_contracts.coi import make_coi
    from v2v_observability import bind_order, current_order

    order_a, order_b = uuid.uuid4(), uuid.uuid4()
    coi_a, coi_b = make_coi("W1234", 2026, 1), make_coi("W1234", 2026, 2)
    handled = CloudEvent(source="/v2v/site", type="site.it.v1", data={"order_id": str(order_a)}, coi=coi_a)
    seen_at_commit: list[tuple[str | None, str | None]] = []

    class Transaction:
        tx = object()
        first_status = "INSERT 0 1"  # the first record's inbox row, sent with the BEGIN
        begun_together = True

        async def commit(self, final: str | None = None) -> None:
            seen_at_commit.append(current_order())

        async def rollback(self) -> None:
            raise AssertionError("not rolled back")

    class Uow:
        async def start(self, first: str | None = None) -> Transaction:
            return Transaction()

    broker = FakeBroker(records={T0: {0: 10, 1: 11}})
    consumer, _fake = make_consumer(monkeypatch, broker, {T0: 0})
    consumer.uow = Uow()  # type: ignore[assignment]

    async def prepare(item: Any) -> CloudEvent | None:
        if item.record.offset == 0:
            bind_order(order_a, coi_a)
            return handled
        bind_order(order_b, coi_b)  # another order's event, of a type this consumer ignores
        return None

    async def apply(_tx: Any, _event: CloudEvent, _record: Any, recorded: str | None = None) -> str:
        return "processed"

    consumer._prepare = prepare  # type: ignore[method-assign]
    consumer._apply = apply  # type: ignore[method-assign]
    await consumer._consume_records([record_at(T0, 0, 10), record_at(T0, 1, 11)])

    assert seen_at_commit == [(str(order_a), coi_a)]
    assert consumer.stats.processed == 1
