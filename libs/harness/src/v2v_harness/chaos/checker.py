"""The checker: invariants over what the workload recorded (its intents and acknowledged orders, the
webhooks received) and the platform's final state (read from the database as the harness's admin
connection, and each replica's `/ready`). Pure: `check(history, final)` -> one `Verdict` per invariant."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

TERMINAL = frozenset({"completed", "cancelled", "failed"})
LIVE_SLOT = frozenset({"held", "confirmed"})
UNDRIVEN_END = frozenset({"inbound_shipment_planned", "waitlisted"})  # no one acts on it from here
LANE_FREED = frozenset({"cancelled", "compromised", "delivered"})


@dataclass
class Verdict:
    name: str
    ok: bool
    detail: str = ""
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"invariant": self.name, "ok": self.ok, "detail": self.detail, "examples": self.examples}


@dataclass
class Intent:
    """One order the workload meant to place (its patient reference), and the order id of the 201 it got
    (None: never acknowledged)."""

    ref: str
    order_id: str | None


@dataclass
class FinalState:
    orders: dict[str, dict[str, Any]]  # order id -> {patient_ref, status, terminal_at (s, run clock)}
    timelines: dict[str, list[dict[str, Any]]]  # order id -> entries (status_before, status_after, type)
    slots: list[dict[str, Any]]  # order_id, status
    shipments: list[dict[str, Any]]  # order_id, leg, status, booking_id (inbound), run (outbound)
    deliveries: list[dict[str, Any]]  # subscription_id, event_id
    webhooks: list[dict[str, Any]]  # webhook_id, event_id, order_id (as received)
    dead_letters: dict[str, list[dict[str, Any]]]  # schema -> rows (consumer, event_type, error)
    ready: dict[str, int]  # process label -> /ready status (0: no answer)
    poison_sent: int = 0  # poison messages the workload injected on purpose (none by default)
    # every producer's outbox rows: id, event_id, event_type, topic, message_key, published (bool)
    published: list[dict[str, Any]] = field(default_factory=list)
    # consumer group -> {"topics": [...], "handles": [...]} (from each process's /ready)
    consumers: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # consumer group -> {event_id: processed_at (epoch s)} (every schema's inbox)
    consumed: dict[str, dict[str, float]] = field(default_factory=dict)
    # the sites' manufacturing history: booking_id, order_id, run, action
    manufacturing: list[dict[str, Any]] = field(default_factory=list)
    # when the (memory-only) broker was restarted: (start, healed), epoch seconds
    broker_losses: list[tuple[float, float]] = field(default_factory=list)


def _examples(items: list[str], n: int = 5) -> list[str]:
    return items[:n]


def check(intents: list[Intent], final: FinalState, *, deadline_s: float, settled_s: float) -> list[Verdict]:
    """`deadline_s`: seconds allowed after the last healed fault; `settled_s`: how long after it the last
    order reached its terminal state (or the wait ended)."""
    verdicts: list[Verdict] = []
    acked = [i for i in intents if i.order_id]

    # acknowledged orders lost = 0
    lost = [i.order_id or "" for i in acked if i.order_id not in final.orders]
    verdicts.append(
        Verdict(
            "acknowledged orders lost = 0",
            not lost,
            f"{len(acked)} acknowledged, {len(lost)} lost",
            _examples(lost),
        )
    )

    # one order per client intent
    by_ref = Counter(o["patient_ref"] for o in final.orders.values())
    refs = {i.ref for i in intents}
    twice = [f"{ref}: {by_ref[ref]} orders" for ref in sorted(refs) if by_ref[ref] > 1]
    unknown = [oid for oid, o in final.orders.items() if o["patient_ref"] not in refs]
    mismatch = [
        f"{i.ref}: acknowledged {i.order_id}"
        for i in acked
        if i.order_id in final.orders and final.orders[i.order_id]["patient_ref"] != i.ref
    ]
    verdicts.append(
        Verdict(
            "one order per client intent",
            not twice and not unknown and not mismatch,
            f"{len(intents)} intents, {len(final.orders)} orders, {len(twice)} intents with several, "
            f"{len(unknown)} orders of no intent",
            _examples(twice + mismatch + unknown),
        )
    )

    # every client intent acknowledged: its retries (same Idempotency-Key) got the order in the end
    unanswered = [i.ref for i in intents if not i.order_id]
    verdicts.append(
        Verdict(
            "every client intent acknowledged (retries with its Idempotency-Key)",
            not unanswered,
            f"{len(intents) - len(unanswered)}/{len(intents)} acknowledged",
            _examples([f"{ref}: {by_ref[ref]} order(s) in the database" for ref in unanswered]),
        )
    )

    # every order reaches exactly one terminal state within the deadline after the last healed fault; an
    # order whose creation was never acknowledged (indeterminate, Jepsen's "info") is not driven by the
    # workload: it must reach what the platform does on its own (booked and inbound shipment planned)
    acked_ids = {i.order_id for i in acked}
    stuck = [
        f"{oid}: {o['status']}" + ("" if oid in acked_ids else " (never acknowledged)")
        for oid, o in final.orders.items()
        if o["status"] not in TERMINAL and (oid in acked_ids or o["status"] not in UNDRIVEN_END)
    ]
    statuses = Counter(o["status"] for o in final.orders.values())
    verdicts.append(
        Verdict(
            f"every order terminal within {deadline_s:.0f} s of the last healed fault",
            not stuck and settled_s <= deadline_s,
            f"{len(final.orders) - len(stuck)}/{len(final.orders)} terminal, settled {settled_s:.0f} s after "
            f"the last heal; " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
            _examples(stuck),
        )
    )

    # no illegal transition: the status changes of an order's timeline form one chain from `submitted` to
    # its status, each change leaving the state the previous one entered (in chain order, not record
    # order: a fact that arrived early is parked and applied later), and nothing follows a terminal state
    illegal: list[str] = []
    for oid, entries in final.timelines.items():
        changes = [
            e
            for e in entries
            if e.get("status_after") is not None and e.get("status_after") != e.get("status_before")
        ]
        current: str | None = None
        while changes:
            nxt = next((e for e in changes if e.get("status_before") == current), None)
            if nxt is None:
                e = changes[0]
                illegal.append(
                    f"{oid}: {e.get('status_before')} -> {e.get('status_after')} ({e.get('event_type')}) "
                    f"never follows from the chain, which ends in {current}"
                )
                break
            if current in TERMINAL:
                illegal.append(f"{oid}: {current} -> {nxt.get('status_after')} after a terminal state")
                break
            changes.remove(nxt)
            current = nxt.get("status_after")
        order = final.orders.get(oid)
        if order is not None and not changes and current is not None and order["status"] != current:
            illegal.append(f"{oid}: status {order['status']} but its timeline ends in {current}")
    verdicts.append(
        Verdict(
            "no illegal transition (one chain per order, terminal is final)",
            not illegal,
            f"{sum(len(t) for t in final.timelines.values())} timeline entries, {len(illegal)} illegal",
            _examples(illegal),
        )
    )

    # no duplicate side effects
    dup: list[str] = []
    live = Counter(s["order_id"] for s in final.slots if s["status"] in LIVE_SLOT)
    dup += [f"slot: {oid} holds {n} live slots" for oid, n in live.items() if n > 1]
    dup += [
        f"slot: {oid} is {final.orders[oid]['status']} and still holds a live slot"
        for oid in live
        if oid in final.orders and final.orders[oid]["status"] in TERMINAL
    ]
    # one inbound leg per site booking, one outbound leg per manufacturing run (cancelled ones aside, and
    # compromised ones: an excursion ends that leg, and a recollection's new collection is manufactured as
    # run 1 again), and at most one shipment per order and leg holding the lane (not cancelled, compromised
    # or delivered)
    per_leg = Counter(
        (s["order_id"], s["leg"], s.get("booking_id") if s["leg"] == "inbound_apheresis" else s.get("run"))
        for s in final.shipments
        if s["status"] != "cancelled"
        and not (s["leg"] != "inbound_apheresis" and s["status"] == "compromised")
    )
    dup += [
        f"shipment: {oid} has {n} {leg} shipments for {key}"
        for (oid, leg, key), n in per_leg.items()
        if n > 1
    ]
    lanes = Counter((s["order_id"], s["leg"]) for s in final.shipments if s["status"] not in LANE_FREED)
    dup += [f"shipment: {oid} has {n} live {leg} shipments" for (oid, leg), n in lanes.items() if n > 1]
    per_sub = Counter((d["subscription_id"], d["event_id"]) for d in final.deliveries)
    dup += [f"delivery: event {e} {n} times to {s}" for (s, e), n in per_sub.items() if n > 1]
    ids: dict[str, set[str]] = defaultdict(set)
    for hook in final.webhooks:
        ids[hook["event_id"]].add(hook["webhook_id"])
    dup += [f"webhook: event {e} sent under {len(w)} webhook ids" for e, w in ids.items() if len(w) > 1]
    # manufacturing runs: one receipt per booking; per run one start (a remanufacture) and one QC decision
    runs = Counter(
        (m["booking_id"], m["action"], m["run"] if m["action"] != "receipt" else 0)
        for m in final.manufacturing
        if m["action"] in ("receipt", "remanufacture", "qc")
    )
    dup += [
        f"manufacturing: booking {b} has {n} {action} records"
        + (f" for run {run}" if action != "receipt" else "")
        for (b, action, run), n in runs.items()
        if n > 1
    ]
    redelivered = sum(n - 1 for n in Counter(h["webhook_id"] for h in final.webhooks).values())
    verdicts.append(
        Verdict(
            "no duplicate side effects (slots, manufacturing runs, shipments per leg, webhooks per event id)",
            not dup,
            f"{len(final.slots)} slots, {len(runs)} manufacturing records, {len(final.shipments)} shipments, "
            f"{len(final.deliveries)} "
            f"deliveries, {len(final.webhooks)} webhooks received ({redelivered} redelivered under "
            f"the same id)",
            _examples(dup),
        )
    )

    # dead letters contain poison only: the workload sends no poison, so every dead letter is a failure
    rows = [(schema, r) for schema, found in final.dead_letters.items() for r in found]
    verdicts.append(
        Verdict(
            "dead letters contain poison only",
            len(rows) <= final.poison_sent,
            f"{len(rows)} dead letters, {final.poison_sent} poison messages sent",
            _examples(
                [
                    f"{s}: {r.get('consumer')} {r.get('event_type')}: {str(r.get('error'))[:160]}"
                    for s, r in rows
                ]
            ),
        )
    )

    # every event published was consumed by every subscriber (each consumer group whose topics hold it and
    # which acts on its type has it in its inbox), and nothing is left unpublished in an outbox
    unpublished = [
        f"{r['topic']}: {r['event_type']} {r['event_id']}" for r in final.published if not r["published"]
    ]
    missed: list[str] = []
    expected = 0
    for group, sub in sorted(final.consumers.items()):
        inbox = final.consumed.get(group, {})
        topics, handles = set(sub["topics"]), set(sub["handles"])
        for r in final.published:
            if r["published"] and r["topic"] in topics and r["event_type"] in handles:
                expected += 1
                if r["event_id"] not in inbox:
                    missed.append(
                        f"{group} never consumed {r['event_type']} {r['event_id']} ({r['message_key']})"
                    )
    verdicts.append(
        Verdict(
            "every published event consumed by every subscriber",
            bool(final.consumers) and not missed and not unpublished,
            f"{len(final.published)} events written, {len(unpublished)} unpublished; {len(final.consumers)} "
            f"consumer groups, {expected - len(missed)}/{expected} deliveries consumed",
            _examples(unpublished + missed),
        )
    )

    # per order, each consumer processed a producer's events in the order they were written (outbox id).
    # One exception, reported apart: a memory-only broker that restarts loses what it held; an event of an
    # order that was published to it but not yet consumed comes back with the relay's replay, while a
    # newer event of that order published across the restart (aiokafka retries a send until the broker
    # is back) reached the new broker first. A durable, replicated broker loses nothing and needs no replay.
    disordered: list[str] = []
    by_loss = 0

    def lost_with_broker(before: dict[str, Any], after: dict[str, Any], processed_before: float) -> bool:
        published, newer = before.get("published_at"), after.get("published_at")
        if published is None or newer is None:
            return False
        return any(
            published < healed + 1 and processed_before > start and newer > start - 1
            for start, healed in final.broker_losses
        )

    for group, sub in sorted(final.consumers.items()):
        inbox = final.consumed.get(group, {})
        topics, handles = set(sub["topics"]), set(sub["handles"])
        streams: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in final.published:
            if r["topic"] in topics and r["event_type"] in handles and r["event_id"] in inbox:
                streams[(r["topic"], str(r["message_key"]))].append(r)
        for (_topic, key), stream in streams.items():
            stream.sort(key=lambda r: r["id"])
            for before, after in itertools.pairwise(stream):
                t_before, t_after = inbox[before["event_id"]], inbox[after["event_id"]]
                if t_after >= t_before:
                    continue
                if lost_with_broker(before, after, t_before):
                    by_loss += 1
                    continue
                disordered.append(
                    f"{group}, order {key}: {after['event_type']} (written after {before['event_type']}) "
                    f"processed {t_before - t_after:.3f} s before it"
                )
                break
    verdicts.append(
        Verdict(
            "per order, events processed in the order written",
            not disordered,
            f"{len(disordered)} (consumer, order) streams out of order; {by_loss} pairs inverted by a "
            f"broker restart that lost the older event (replayed after the newer one reached the new broker)",
            _examples(disordered),
        )
    )

    # every background loop alive at the end: each process ready
    down = [
        f"{label}: {status or 'no answer'}" for label, status in sorted(final.ready.items()) if status != 200
    ]
    verdicts.append(
        Verdict(
            "every process ready at the end (its loops alive)",
            not down and bool(final.ready),
            f"{len(final.ready) - len(down)}/{len(final.ready)} ready",
            _examples(down),
        )
    )
    return verdicts
