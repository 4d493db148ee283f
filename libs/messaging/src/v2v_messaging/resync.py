"""A consumer's check that the broker it reads from still holds what it read.

A broker can forget: the local Tansu keeps nothing across a restart, and any broker can lose a topic.
Relays notice and replay the outbox, so the records come back, but numbered from 0 again (and spread
over partitions again). A consumer must not carry the positions it had on the old broker over to the
new one: it would skip every replayed or new record below them. It may carry them without knowing:

- its group is gone with the broker, so it joins again; meanwhile a handler that finishes commits the
  old positions, and a broker takes such a commit (no generation, or a member it is just re-admitting)
  for a group with no members. The join completes and the consumer resumes from those positions;
- Tansu answers a fetch past the end of a partition with nothing, not OFFSET_OUT_OF_RANGE, so a
  consumer ahead of the log waits there, silently, and skips what comes in below it.

So at every (re)assignment, before it reads, and whenever a partition's end falls below its position,
the consumer compares the broker with what it knows (`loss_reason`): the cluster id; each partition's
end of log (from a fetch: Tansu's ListOffsets(latest) lags behind batched records) against its
position; and the last record it took from each partition (offset and timestamp), which must still be
there. A broker that forgot makes it start again from the beginning of what the broker holds; its inbox
drops what it had processed. `probe_broker` gathers what the broker says, with a client of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError
from aiokafka.protocol.metadata import MetadataRequest


@dataclass(frozen=True)
class RecordMark:
    """Which record sat at an offset: a broker that numbers a different record there has forgotten."""

    offset: int
    timestamp: int  # as the broker returned it (ms); a replayed record is written anew, with a new one


@dataclass(frozen=True)
class PartitionCheck:
    """What the consumer knows of one assigned partition, and what the broker now says of it."""

    topic: str
    partition: int
    position: int | None  # the next offset the consumer reads (after a re-join: the committed one)
    high_watermark: int | None  # the offset the broker gives its next record (None: not known)
    log_start: int | None = None  # the first offset the broker still holds (None: not known)
    seen: RecordMark | None = None  # the last record this consumer took from the partition
    found: RecordMark | None = None  # what the broker holds at `seen.offset` (None: nothing)


def loss_reason(
    checks: Iterable[PartitionCheck], *, cluster_id_before: str | None, cluster_id_now: str | None
) -> str | None:
    """Why the broker must have forgotten what this consumer read (None: no sign that it did).

    Unknown values are no evidence either way; a record gone below the start of the log is retention,
    not loss."""
    reasons: list[str] = []
    if cluster_id_before and cluster_id_now and cluster_id_before != cluster_id_now:
        reasons.append(f"cluster id {cluster_id_before} is now {cluster_id_now}")
    for c in checks:
        name = f"{c.topic}[{c.partition}]"
        high = c.high_watermark
        if high is None:
            continue
        if c.position is not None and c.position > high:
            reasons.append(f"{name} ends at {high}, below the position {c.position}")
            continue
        seen = c.seen
        if seen is None:
            continue
        if seen.offset >= high:
            reasons.append(f"{name} ends at {high}: the record read at {seen.offset} is gone")
        elif c.found is None:
            if c.log_start is not None and seen.offset < c.log_start:
                continue  # removed by retention
            reasons.append(f"{name} no longer holds the record read at {seen.offset}")
        elif c.found != seen:
            reasons.append(
                f"{name} holds another record at {seen.offset} (written at {c.found.timestamp}, "
                f"the one read had {seen.timestamp})"
            )
    return "; ".join(reasons) if reasons else None


@dataclass
class PartitionState:
    """What the broker said of one partition."""

    high_watermark: int | None = None
    log_start: int | None = None
    found: RecordMark | None = None
    decided: bool = False  # the probe learnt all it looked for


@dataclass
class BrokerProbe:
    cluster_id: str | None = None
    partitions: dict[TopicPartition, PartitionState] = field(default_factory=dict)

    def undecided(self) -> list[TopicPartition]:
        return [tp for tp, s in self.partitions.items() if not s.decided]


async def probe_broker(
    make_consumer: Callable[..., AIOKafkaConsumer],
    targets: dict[TopicPartition, int | None],
    *,
    timeout: float = 10.0,
) -> BrokerProbe:
    """Ask the broker, with a client of its own (no group), for its cluster id and, per partition, the
    end of its log (from a fetch) and the record at the target offset (None: the end of the log only).

    `make_consumer` builds an `AIOKafkaConsumer` with the connection settings of the consumer checked
    (bootstrap servers, security). What the probe could not learn in `timeout` stays unknown."""
    result = BrokerProbe(partitions={tp: PartitionState() for tp in targets})
    if not targets:
        return result
    probe = make_consumer(
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none",  # an offset out of range is an answer here, not a reason to move
        fetch_max_wait_ms=50,
        request_timeout_ms=max(1000, int(timeout * 1000)),
    )
    try:
        async with asyncio.timeout(timeout):
            await probe.start()
            result.cluster_id = await _cluster_id(probe)
            tps = list(targets)
            probe.assign(tps)
            starts = await probe.beginning_offsets(tps)
            for tp, target in targets.items():
                state = result.partitions[tp]
                state.log_start = starts.get(tp)
                if target is None:
                    await probe.seek_to_beginning(tp)  # any fetch tells the end of the log
                elif state.log_start is not None and target < state.log_start:
                    state.high_watermark = (await probe.end_offsets([tp])).get(tp)
                    state.decided = True  # gone by retention (on Tansu the start is always 0)
                    probe.pause(tp)
                else:
                    probe.seek(tp, target)
            while result.undecided():
                await _fetch_once(probe, targets, result)
    except (TimeoutError, KafkaError, OSError):
        pass  # what is not known stays unknown
    finally:
        with contextlib.suppress(Exception):
            await probe.stop()
    return result


async def _fetch_once(
    probe: AIOKafkaConsumer, targets: dict[TopicPartition, int | None], result: BrokerProbe
) -> None:
    try:
        batches = await probe.getmany(timeout_ms=200)
    except OffsetOutOfRangeError as exc:  # Apache Kafka, for an offset past the end (Tansu says nothing)
        out = [tp for tp in exc.args[0] if tp in result.partitions] if exc.args else []
        ends = await probe.end_offsets(out) if out else {}
        for tp in out:
            state = result.partitions[tp]
            state.high_watermark = ends.get(tp)
            state.decided = True
            probe.pause(tp)
        return
    for tp, records in batches.items():
        state = result.partitions[tp]
        target = targets[tp]
        if target is not None and records and not state.decided:
            first = records[0]  # past the target: nothing there (a gap is no record either)
            state.found = RecordMark(first.offset, first.timestamp) if first.offset == target else None
            state.decided = True
    for tp, state in result.partitions.items():
        high = probe.highwater(tp)  # from the fetch responses: Tansu's is right, its ListOffsets lags
        if high is not None:
            state.high_watermark = high
            target = targets[tp]
            if target is None or target >= high:
                state.decided = True  # nothing to look for, or nothing there to find
        if state.decided and tp not in probe.paused():
            probe.pause(tp)


async def _cluster_id(probe: AIOKafkaConsumer) -> str | None:
    client: Any = probe._client  # aiokafka keeps no cluster id: ask for it (a request naming no topic)
    with contextlib.suppress(KafkaError, OSError, KeyError, TypeError):
        node = client.get_random_node()
        response = await client.send(node if node is not None else "bootstrap", MetadataRequest([]))
        cluster_id = response.to_object().get("cluster_id")
        return str(cluster_id) if cluster_id else None
    return None
