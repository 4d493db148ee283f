"""A poll's records are handed over merged by timestamp, each partition's in offset order (unit)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from v2v_messaging.consumer import in_time_order


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int | None


def test_an_order_s_facts_from_two_topics_come_in_the_order_they_were_written() -> None:
    # the fetcher buffered the site topic's partition first: its booking confirmation (t=30) would be
    # handed over before the slot reservation (t=20) it follows
    site = [Rec("site", 0, 7, 30), Rec("site", 0, 8, 50)]
    scheduling = [Rec("scheduling", 2, 4, 10), Rec("scheduling", 2, 5, 20), Rec("scheduling", 2, 6, 40)]
    merged = in_time_order([site, scheduling])
    assert [(r.topic, r.offset) for r in merged] == [
        ("scheduling", 4),
        ("scheduling", 5),
        ("site", 7),
        ("scheduling", 6),
        ("site", 8),
    ]


def test_a_partition_keeps_its_offset_order_even_when_its_timestamps_go_back() -> None:
    # two replicas' relays with skewed clocks write one partition: offsets, not clocks, order it
    skewed = [Rec("order", 0, 1, 100), Rec("order", 0, 2, 5), Rec("order", 0, 3, 6)]
    other = [Rec("site", 1, 9, 50)]
    merged = in_time_order([skewed, other])
    assert [r.offset for r in merged if r.topic == "order"] == [1, 2, 3]
    assert len(merged) == 4


def test_empty_and_single_partitions_pass_through() -> None:
    assert in_time_order([]) == ()
    assert in_time_order([[], []]) == ()
    one = [Rec("order", 0, 1, None), Rec("order", 0, 2, 1)]
    assert in_time_order([[], one]) == tuple(one)


@given(
    st.lists(
        st.lists(st.one_of(st.none(), st.integers(min_value=-5, max_value=50)), max_size=8),
        max_size=5,
    )
)
def test_merge_is_a_permutation_that_keeps_every_partition_s_order(stamps: list[list[int | None]]) -> None:
    partitions = [
        [Rec("t", p, offset, stamp) for offset, stamp in enumerate(column)] for p, column in enumerate(stamps)
    ]
    merged = in_time_order(partitions)
    assert sorted(merged, key=lambda r: (r.partition, r.offset)) == [r for part in partitions for r in part]
    for p, part in enumerate(partitions):
        assert [r for r in merged if r.partition == p] == part
