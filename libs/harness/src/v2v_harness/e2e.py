from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from v2v_harness.client import ApiResponse, V2VClient

if TYPE_CHECKING:
    from v2v_harness.identity import Credentials

T = TypeVar("T")


class Parties:
    """The people and systems that call the platform, each an httpx client with its own demo client's
    bearer token: `parties.centre("TC-DE-BE-001")`, `.carrier(id)`, `.site(id)`, `.qa`, `.admin`, `.ops`.
    One httpx client per party, made on first use and closed by `aclose`. Like a well-behaved integration,
    each POST without an `Idempotency-Key` gets a fresh one (the idempotency tests use their own
    clients to send none)."""

    def __init__(
        self, credentials: Credentials, timeout: float = 15.0, limits: httpx.Limits | None = None
    ) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.limits = limits or httpx.Limits()  # e.g. a short keep-alive for bursts of requests
        self._clients: dict[tuple[str, str | None], httpx.AsyncClient] = {}

    def client(self, kind: str, entity_id: str | None = None) -> httpx.AsyncClient:
        key = (kind, entity_id)
        if key not in self._clients:
            kw: dict[str, Any] = {
                "timeout": self.timeout,
                "limits": self.limits,
                "event_hooks": {"request": [_idempotency_key]},
            }
            self._clients[key] = (
                httpx.AsyncClient(**kw)
                if kind == "anonymous"
                else self.credentials.client(kind, entity_id, **kw)
            )
        return self._clients[key]

    def centre(self, centre_id: str) -> httpx.AsyncClient:
        return self.client("centre", centre_id)

    def carrier(self, carrier_id: str) -> httpx.AsyncClient:
        return self.client("carrier", carrier_id)

    def site(self, site_id: str) -> httpx.AsyncClient:
        return self.client("site", site_id)

    @property
    def qa(self) -> httpx.AsyncClient:
        return self.client("qa")

    @property
    def admin(self) -> httpx.AsyncClient:
        return self.client("admin")

    @property
    def ops(self) -> httpx.AsyncClient:
        return self.client("ops")

    @property
    def anonymous(self) -> httpx.AsyncClient:
        return self.client("anonymous")  # no token at all

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


async def _idempotency_key(request: httpx.Request) -> None:
    if request.method == "POST" and "idempotency-key" not in request.headers:
        request.headers["Idempotency-Key"] = str(uuid.uuid4())


def new_secret() -> str:
    """A random Standard Webhooks secret (the platform makes its own: this one is for a wrong-secret
    check, or a random path)."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def order_body(
    centre: str = "TC-DE-BE-001",
    product: str = "TISA-CEL",
    days_ahead: int = 14,
    patient_ref: str | None = None,
    indication: str | None = None,
    weight_kg: float | None = None,
) -> dict[str, Any]:
    """A valid order body; the patient reference is unique per call unless given (a second open order
    for the same centre, patient and product is refused). `indication` (and the `weight_kg` its dose may
    need) only when given: an order may name it with its first lymphodepletion instead."""
    body: dict[str, Any] = {
        "treatment_center_id": centre,
        "product_code": product,
        "order_type": "commercial",
        "patient_ref": patient_ref or f"PAT-E2E-{uuid.uuid4().hex[:12]}",
        "requested_apheresis_date": (date.today() + timedelta(days=days_ahead)).isoformat(),
    }
    if indication is not None:
        body["indication"] = indication
    if weight_kg is not None:
        body["weight_kg"] = weight_kg
    return body


async def eventually(
    check: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")


async def subscribe(
    client: httpx.AsyncClient,
    notification_url: str,
    centre: str | None,
    url: str,
    event_types: list[str] | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Subscribe `url` (as the centre of the token in `headers`, or of the client's auth); the returned
    subscription carries the platform-generated signing `secret` (shown this once)."""
    api = V2VClient({"notification": notification_url}, client=client)
    resp = await api.subscribe(centre, url, event_types, headers=headers)
    assert resp.status == 201, resp.text
    body = dict(resp.body)
    assert str(body.get("secret", "")).startswith("whsec_"), "the subscription carries its signing secret"
    return body


def _checked(resp: ApiResponse, expect: int | None) -> dict[str, Any]:
    """The body as a dict ({} if empty) after checking the status: `expect`, or any 2xx when None."""
    ok = resp.status == expect if expect is not None else resp.ok
    assert ok, f"{resp.path}: {resp.status} {resp.text}"
    return dict(resp.body) if resp.content else {}


class Journey:
    """Drives one order through the public APIs as the people who would: the order's treatment centre,
    the courier of each shipment, the manufacturing site's MES and the manufacturer's QA, each with its
    own credentials (`Parties`). Reads that no party of the journey may make alone (the shipments of an
    order, the slots) are made by ops."""

    def __init__(self, parties: Parties, urls: Callable[[str], str], order: dict[str, Any]) -> None:
        self.parties = parties
        self.url = urls
        self.centre_id = str(order["treatment_center_id"])
        self.client = parties.centre(self.centre_id)
        self.api = V2VClient(urls, client=self.client)  # as the centre
        self.ops = V2VClient(urls, client=parties.ops)
        self.qa = V2VClient(urls, client=parties.qa)
        self.order = order
        self.id = order["order_id"]
        self.coi = order["coi"]
        self.din: str | None = None  # the DIN of the latest collection (the apheresis answer shows it)
        self.lot: str | None = None  # the released lot (for receipt at the centre and infusion)

    def as_site(self, site_id: str) -> V2VClient:
        return V2VClient(self.url, client=self.parties.site(site_id))

    def as_carrier(self, shipment: dict[str, Any]) -> V2VClient:
        return V2VClient(self.url, client=self.parties.carrier(str(shipment["carrier_id"])))

    async def get(self) -> dict[str, Any]:
        resp = await self.api.get_order(self.id)
        resp.raise_for_status()
        return dict(resp.body)

    async def wait_status(self, *statuses: str, timeout: float = 15) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            body = await self.get()
            return body if body["status"] in statuses else None

        return dict(await eventually(check, timeout=timeout, what=f"order {self.id} in {statuses}"))

    async def shipment(self, leg: str, *, live: bool = True, timeout: float = 15) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            resp = await self.ops.shipments(order_id=self.id)
            ships = [s for s in resp.body if s["leg"] == leg and (not live or s["status"] != "cancelled")]
            return ships[-1] if ships else None

        return dict(await eventually(check, timeout=timeout, what=f"{leg} shipment of {self.id}"))

    async def post(
        self, service: str, path: str, body: dict[str, Any], expect: int | None = None
    ) -> dict[str, Any]:
        """POST and check the status: `expect`, or any 2xx when None."""
        return _checked(await self.api.post(service, path, body), expect)

    async def hospital(
        self, action: str, body: dict[str, Any] | None = None, expect: int = 200
    ) -> dict[str, Any]:
        """An action on the order as the centre. Receipt and infusion present the released lot beside the
        COI (the label's pair) unless `body` says otherwise."""
        body = dict(body or {})
        if action in ("product-receipt", "infusion") and "lot" not in body and self.lot:
            body["lot"] = self.lot
        answer = _checked(await self.api.order_action(self.id, action, body), expect)
        if action == "apheresis":
            self.din = din_of(answer) or self.din
        return answer

    async def lymphodepletion(
        self,
        *,
        days_ago: float = 7,
        indication: str | None = None,
        weight_kg: float | None = None,
        expect: int = 200,
    ) -> dict[str, Any]:
        """As the centre: the LD regimen started `days_ago` days ago (7: an infusion today is inside every
        window of the catalogue: regimen 3-4 days, then 2 days at least, 4 at most for cilta-cel). The
        gates apply (the product released and its delivery confirmed). An order that names no indication
        names one here: `indication`, else the product's first (with `weight_kg`, else 70 kg, where its
        dose needs the weight)."""
        order = await self.get()
        body: dict[str, Any] = {"at": now_iso(-days_ago * 24 * 60)}
        if not (order.get("treatment") or {}).get("indication"):
            products = (await self.api.products()).expect(200)
            facts = next(p for p in products if p["code"] == order["product_code"]).get("treatment")
            if facts:
                code = indication or sorted(facts["indications"])[0]
                body["indication"] = code
                if facts["indications"][code]["weight_required"]:
                    body["weight_kg"] = weight_kg or 70.0
        return await self.hospital("lymphodepletion", body, expect)

    async def dispose(
        self,
        outcome: str,
        reason_code: str,
        *,
        site_id: str | None = None,
        user_id: str | None = None,
        expect: int = 200,
    ) -> dict[str, Any]:
        """As the manufacturer's QA, signed by the QA reviewer of the order's site (`qa.<site>`) or
        `user_id`: the disposition of material at risk (release, release_on_physician_request, reject)."""
        credentials = self.parties.credentials
        if user_id is None:
            site = site_id or str((await self.get())["site_id"])
            user_id = credentials.user_id("qa_reviewer", site)
        headers = await credentials.signature_headers(credentials.client_id("qa"), user_id)
        reference = f"QA-{self.id[:8].upper()}"
        resp = await self.qa.disposition(self.id, outcome, reason_code, reference, headers=headers)  # type: ignore[arg-type]
        return _checked(resp, expect)

    async def physician(
        self, accept: bool, reason_code: str | None = None, expect: int = 200
    ) -> dict[str, Any]:
        """As the centre, signed by its physician (`phys.<centre>`): accept or decline an
        out-of-specification product released on physician request."""
        credentials = self.parties.credentials
        user_id = credentials.user_id("physician", self.centre_id)
        headers = await credentials.signature_headers(
            credentials.client_id("centre", self.centre_id), user_id
        )
        resp = await self.api.physician_decision(self.id, accept, reason_code, headers=headers)
        return _checked(resp, expect)

    async def courier(
        self,
        shipment: dict[str, Any],
        *milestones: str,
        temperature_c: float | None = None,
        minutes_ago: float = 0,
    ) -> None:
        """As the shipment's carrier: each milestone, now (or `minutes_ago`: a logger's readings since a
        pickup that long ago can then span an excursion's tolerance)."""
        courier = self.as_carrier(shipment)
        inbound = shipment["leg"] == "inbound_apheresis"
        for milestone in milestones:
            # the label's second id: the collection's DIN (inbound) or the lot (outbound) -- as the
            # journey saw it (the apheresis answer, the release), else as logistics shows it
            current = _checked(await self.ops.shipment(str(shipment["shipment_id"])), None)
            if inbound and self.din:
                current["din"] = self.din
            if not inbound and self.lot:
                current["lot"] = self.lot
            resp = await courier.milestone(
                shipment["shipment_id"],
                milestone,
                occurred_at=now_iso(-minutes_ago),
                location="HUB-1",
                handled_by="courier-42",
                coi=self.coi,
                temperature_c=temperature_c,
                din=current.get("din") if inbound else None,
                lot=None if inbound else current.get("lot"),
            )
            _checked(resp, None)

    async def temperature(
        self, shipment: dict[str, Any], reading_c: float, *, minutes_ago: float = 0
    ) -> dict[str, Any]:
        resp = await self.as_carrier(shipment).temperature_reading(
            shipment["shipment_id"], reading_c, measured_at=now_iso(-minutes_ago), coi=self.coi
        )
        return _checked(resp, None)

    async def excursion(self, shipment: dict[str, Any], reading_c: float, minutes: float) -> dict[str, Any]:
        """The logger's readings at `reading_c` over the last `minutes` (three of them: `minutes` ago, half
        that, now): time outside the limit of that length in all. The pickup must lie before. Returns the
        answer that published the excursion (the product's tolerance exceeded), else the last one."""
        answer: dict[str, Any] = {}
        for ago in (minutes, minutes / 2, 0):
            answer = await self.temperature(shipment, reading_c, minutes_ago=ago)
            if answer.get("excursion_published"):
                break
        return answer

    async def receipt(self, site_id: str, accepted: bool = True, reason: str | None = None) -> dict[str, Any]:
        """As the site's MES: the bag received (or refused), once the site knows of the collection it is
        from (the manufacturing view's `collection` and `expected_din`): the site refuses a receipt before
        that with a plain 409, as an MES would read the view before scanning the bag."""
        site = self.as_site(site_id)

        async def learned() -> dict[str, Any] | None:
            resp = await site.manufacturing(site_id, self.id)
            view = dict(resp.body) if resp.ok else {}
            return view if site_knows_the_bag(view, self.din) else None

        await eventually(learned, timeout=15, what=f"the site knowing the collection (DIN {self.din})")
        resp = await site.site_receipt(
            site_id, self.id, self.coi, accepted, din=self.din, reason=reason or None
        )
        return _checked(resp, None)

    async def steps(self, site_id: str, *steps: str, expect: int | None = None) -> None:
        for step in steps:
            resp = await self.as_site(site_id).manufacturing_step(
                site_id, self.id, step, completed_at=now_iso()
            )
            _checked(resp, expect)

    async def step_failed(self, site_id: str, step: str, reason: str) -> dict[str, Any]:
        """As the site's MES: a step of the current run failed, for a `StepFailure` code."""
        resp = await self.as_site(site_id).manufacturing_step(
            site_id, self.id, step, completed_at=now_iso(), failed=True, reason=reason
        )
        return _checked(resp, None)

    async def qc(self, site_id: str, disposition: str, reason: str | None = None) -> dict[str, Any]:
        """As the manufacturer's QA: a QC disposition (a `QcFinding` code unless passed). `released`
        means as it is done since issue 10: QC passed (results and certificate of analysis), then the
        release signed by the demo users the site names (`sign_release`)."""
        if disposition == "released":
            await self.qc_passed(site_id)
            return await self.sign_release(site_id)
        return _checked(await self.qa.qc(site_id, self.id, disposition, reason=reason or None), None)

    async def qc_passed(self, site_id: str) -> dict[str, Any]:
        """As QA: QC passed, with a results summary and a certificate-of-analysis reference."""
        resp = await self.qa.qc(
            site_id, self.id, "passed", results=DEMO_QC_RESULTS, coa_reference=f"COA-{self.id[:8].upper()}"
        )
        return _checked(resp, None)

    async def sign_release(self, site_id: str, *, user_id: str | None = None) -> dict[str, Any]:
        """As QA, collecting each signature the lot still needs (`release.required` of the manufacturing
        view: the quality unit's release or a QP's certification, and an import certification for a lot
        made outside its market) from the demo user with that role at that site (`qu.<site>` /
        `qp.<site>`), each with a fresh signing token (user id + password re-entered). `user_id`: sign
        as this user instead (to see a refusal). Returns the last answer (the released lot)."""
        credentials = self.parties.credentials
        qa_client = credentials.client_id("qa")
        view = _checked(await self.qa.manufacturing(site_id, self.id), None)
        answer = view
        for req in (view.get("release") or {}).get("required") or []:
            if req["signed"]:
                continue
            signer = user_id or credentials.user_id(req["role"], req["site_id"])
            headers = await credentials.signature_headers(qa_client, signer)
            if req["meaning"] == "import-certification":
                resp = await self.qa.import_certification(req["site_id"], self.id, headers=headers)
            else:
                resp = await self.qa.release(site_id, self.id, headers=headers)
            answer = _checked(resp, None)
        if answer.get("state") == "released":
            self.lot = answer.get("lot") or self.lot
        return answer

    async def up_to_material_received(self) -> str:
        """Slot, booking, inbound shipment, apheresis, courier, receipt: returns the site id."""
        order = await self.wait_status("inbound_shipment_planned")
        site_id = str(order["site_id"])
        inbound = await self.shipment("inbound_apheresis")
        await self.hospital("apheresis", {"coi": self.coi})
        await self.courier(inbound, "picked_up", "in_transit", "delivered")
        await self.wait_status("material_in_transit", "material_received")
        await self.receipt(site_id)
        await self.wait_status("material_received")
        return site_id


MANUFACTURING_STEPS = ("activation", "transduction", "expansion", "harvest", "cryopreservation")
# a QC results summary that passes (illustrative figures; numbers and codes only)
DEMO_QC_RESULTS: dict[str, Any] = {
    "viability_pct": 92.5,
    "car_positive_pct": 31.0,
    "vcn_per_cell": 1.9,
    "sterility": "negative",
    "mycoplasma": "negative",
    "endotoxin_eu_ml": 0.2,
}


def din_of(answer: dict[str, Any]) -> str | None:
    """The DIN an apheresis answer shows (`din`, or the latest of `collections`), if any."""
    din = answer.get("din")
    if isinstance(din, str):
        return din
    collections = answer.get("collections")
    if isinstance(collections, list) and collections and isinstance(collections[-1], dict):
        found = collections[-1].get("din")
        return found if isinstance(found, str) else None
    return None


def site_knows_the_bag(view: dict[str, Any], din: str | None) -> bool:
    """Whether a site's manufacturing view shows it knows of the collection a bag of DIN `din` is from
    (None: a bag whose DIN is not known): before that the site refuses the bag's receipt (409)."""
    return view.get("collection") is not None and (din is None or view.get("expected_din") == din)


def now_iso(minutes: float = 0) -> str:
    """Now, or `minutes` from now (negative: ago), as ISO 8601 with the time zone."""
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()
