"""vein2vein simulator: plays hospitals, couriers and site manufacturing systems through the public APIs.

    PYTHONPATH=tools/simulator python -m v2v_simulator --orders 200 --exceptions 0.2 --seed 7
    (or: make demo ORDERS=200 EXCEPTIONS=0.2)

N orders are placed at the certified treatment centres for (centre, product, use) combinations that some
site approves, spread over the sites where they land by those sites' capacity (`plan`). Each order is one
asyncio task (`orders.OrderActor`) that hands the turn, in turn, to the hospital (`hospitals`: apheresis,
lymphodepletion, product receipt, infusion), the courier (`couriers`: milestones and temperature readings
of the inbound and outbound shipments) and the site (`sites`: the MES's receipt, manufacturing steps and
QC; QA's decision on a quarantined product; the registry's outage) whenever the order reaches the state
where that actor acts, and waits for the platform's reaction in between (`tracker`). A fraction of the
orders gets one exception (cancellation, rejected material, temperature excursions, OOS, failed
manufacture, a moved apheresis date, a site outage; see `plan.EXCEPTION_WEIGHTS`). A few deliberate
mistakes (lymphodepletion before release, a mistyped COI check character) must be refused; they are
counted apart from errors.

Every party acts with its own credentials, as a hospital integration would: each treatment centre as its
demo client (placing and acting on its own orders), each courier as the carrier a shipment names
(`carrier_id`), each site's MES as that site's client, QC dispositions and quarantine decisions as the
manufacturer's QA (`qa`), the outage as the registry admin (`admin`), and the simulator's own reads
(catalogue, order tracking, shipments, slots) as `ops`. Tokens come from the platform's issuer by the
real client-credentials exchange (`v2v_harness.identity.Credentials`) for the demo clients of the state
folder the platform was started with (`--auth-dir`, else the one whose keys the running issuer accepts:
`.v2v` of `make run`, or `.v2v/demo` of a platform the simulator started). Reasons are the platform's
codes; patient references carry the run's id (`--run-id`, random by default), and each order is placed
with one Idempotency-Key, sent again on every retry.

Time is compressed (`clock`): a simulated clock starts now and runs `--day-seconds` real seconds per
simulated day. Every action waits for its simulated moment, which the order's case file keeps (and the
report uses: vein-to-vein days are simulated days), but the platform is told the real time: it refuses
reported times outside [now - 30 days, now + 5 min], so the optional times (`at`, `received_at`,
`completed_at`, `decided_at`) are left out and the courier's required ones (`occurred_at`, `measured_at`)
are now. Requested apheresis dates lie in the booking window (tomorrow .. today + 180 days). The platform
lives in real time: a recollection's new apheresis date is computed by the order service from the real
date, so the simulator never collects before the simulated moment of the failure plus the product's
recollection lead time.

Every call goes through the typed client shared with the test harness (`v2v_harness.client.V2VClient`),
one per party over one shared connection pool, counted and retried by `api.Api` (a 429 is waited out). If
the order service does not answer on the default ports, the platform is started as a child process
(`python -m v2v_harness run --state-dir .v2v/demo`) and stopped at the end (`platform`). The summary is
printed by `report`: predicted vs simulated vein-to-vein days per product and per lane (the centre's
market → the site that made the product) with the p90 prediction error, and the rules every order must
obey, checked over the run (`rules`: every order terminal, LD only after release and confirmed delivery,
infusion inside the window, fresh material started in time).

Exit status: 0 when every order reached a terminal state (completed, cancelled, failed), no rule was
broken and no error (unexpected HTTP 5xx or 4xx, order stuck, timeout) happened; 1 otherwise; 2 when the
platform could not be reached or started.
"""

from __future__ import annotations

from .api import Api, OrderAbort
from .clock import SimClock
from .config import DEFAULT_URLS, SERVICES, Config, parse_args
from .hospitals import mistype_check_character
from .plan import EXCEPTION_WEIGHTS, Combo, OrderPlan, Plan, feasible_combos, make_plan
from .report import Stats, group_errors, percentile, reactions_of, utilisation
from .simulation import Simulator, cli, main

__all__ = [
    "DEFAULT_URLS",
    "EXCEPTION_WEIGHTS",
    "SERVICES",
    "Api",
    "Combo",
    "Config",
    "OrderAbort",
    "OrderPlan",
    "Plan",
    "SimClock",
    "Simulator",
    "Stats",
    "cli",
    "feasible_combos",
    "group_errors",
    "main",
    "make_plan",
    "mistype_check_character",
    "parse_args",
    "percentile",
    "reactions_of",
    "utilisation",
]
