"""A typed client of the five services' public HTTP APIs, shared by the simulator and the e2e journey driver.

    async with V2VClient({"order": "http://127.0.0.1:8001", ...}) as api:
        order = (await api.place_order(order_body)).expect(201)
        await api.apheresis(order["order_id"], order["coi"])

Every method sends one request and returns an `ApiResponse` (status, parsed JSON body, headers): it never
raises for an HTTP status (use `.expect(...)`, `.raise_for_status()` or `.ok`), only for transport errors
(`httpx.TransportError`). Base URLs are looked up per service (a mapping or a callable, e.g.
`Platform.url`). Headers can be added per call (`headers={"Idempotency-Key": ...}`) and for every call
by a provider that is given the service name (sync or async, e.g. an OAuth bearer token per audience);
an `httpx.Auth` can be given as well.

Every route needs a bearer token (`v2v_contracts.scopes`), and the tenant comes from the token. Several
parties (a centre, a carrier, a site's MES, QA, ...) share one connection pool by giving each its own
`V2VClient` over the same httpx client, with its own header provider:

    http = httpx.AsyncClient()
    centre = V2VClient(urls, client=http, header_provider=lambda s: creds.headers("centre-tc-de-be-001"))
    qa = V2VClient(urls, client=http, header_provider=lambda s: creds.headers("qa"))

Reasons are codes (the services' enumerations; free text only as the order service's optional `note`).
`with_idempotency_key(key)` is the same client sending one `Idempotency-Key` with each POST, so that the
retries of one logical request carry the same key (`place_order` always sends one).
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

import httpx
from httpx._client import UseClientDefault

SERVICES = ("order", "scheduling", "site", "logistics", "notification")

Urls = Mapping[str, str] | Callable[[str], str]
"""Base URL per service name: a mapping, or a lookup such as `Platform.url`."""
HeaderProvider = Callable[[str], Mapping[str, str] | Awaitable[Mapping[str, str]]]
"""Extra headers for every request to a service (given its name), e.g. `Authorization`."""
Moment = str | datetime
Day = str | date
Params = Mapping[str, Any]

OrderAction = Literal[
    "cancel",
    "apheresis-date",
    "apheresis",
    "lymphodepletion",
    "product-receipt",
    "infusion",
    "quarantine-decision",
    "disposition",
    "physician-decision",
    "hold",
    "resume",
    "material-disposition",
]
Milestone = Literal["booked", "picked_up", "in_transit", "delivered"]
Disposition = Literal["passed", "out_of_specification", "failed"]
"""QC dispositions; a lot is released by signature (`release`, `import_certification`), not by QC."""


class ApiError(Exception):
    """An answer with a status the caller did not expect."""

    def __init__(self, response: ApiResponse, expected: Iterable[int] = ()) -> None:
        self.response = response
        self.expected = tuple(expected)
        wanted = "/".join(map(str, self.expected)) or "2xx"
        super().__init__(
            f"{response.method} {response.path}: {response.status} (expected {wanted}) {response.text[:300]}"
        )


@dataclass(frozen=True)
class ApiResponse:
    """One answer: the status, the body (parsed JSON; the text if it is not JSON; None if empty), the
    headers, and what was asked (service, method, path without the base URL)."""

    status: int
    body: Any
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    service: str = ""
    method: str = ""
    path: str = ""
    raw: httpx.Response | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, resp: httpx.Response, service: str, method: str, path: str) -> ApiResponse:
        return cls(resp.status_code, parse_body(resp), resp.headers, service, method, path, resp)

    @property
    def ok(self) -> bool:
        """2xx."""
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        if self.raw is not None:
            return self.raw.text
        return "" if self.body is None else str(self.body)

    @property
    def content(self) -> bytes:
        return self.raw.content if self.raw is not None else self.text.encode()

    @property
    def is_problem(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/problem+json")

    @property
    def detail(self) -> str:
        """The problem's `detail` (or the text of the body), for messages."""
        if isinstance(self.body, dict) and "detail" in self.body:
            return str(self.body["detail"])
        return self.text

    def expect(self, *statuses: int) -> Any:
        """The body if the status is one of `statuses` (any 2xx when none are given); else ApiError."""
        if (self.status in statuses) if statuses else self.ok:
            return self.body
        raise ApiError(self, statuses)

    def raise_for_status(self) -> ApiResponse:
        """httpx's `raise_for_status` (HTTPStatusError for 4xx/5xx); the response itself otherwise."""
        if self.raw is not None:
            self.raw.raise_for_status()
        elif not self.ok:
            raise ApiError(self)
        return self


def parse_body(resp: httpx.Response) -> Any:
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        return resp.text


def _moment(value: Moment) -> str:
    return value.isoformat() if isinstance(value, datetime) else value


def _day(value: Day) -> str:
    return value.isoformat() if isinstance(value, date) else value


def _params(**values: Any) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, date) else v for k, v in values.items() if v is not None}


class V2VClient:
    """One typed method per public endpoint of the five services; see the module's doc."""

    def __init__(
        self,
        urls: Urls,
        *,
        client: httpx.AsyncClient | None = None,
        header_provider: HeaderProvider | None = None,
        auth: httpx.Auth | None = None,
        timeout: httpx.Timeout | float | None = 30.0,
        limits: httpx.Limits | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`client`: an httpx client to use (and not close); else one is made from timeout/limits/
        transport, and closed by `aclose`."""
        self._urls = urls
        self._header_provider = header_provider
        self._auth = auth
        self._idempotency_key: str | None = None
        self._owned = client is None
        if client is None:
            client = httpx.AsyncClient(
                timeout=timeout, limits=limits or httpx.Limits(), transport=transport, auth=auth
            )
        self.http = client

    async def __aenter__(self) -> V2VClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self.http.aclose()

    def with_idempotency_key(self, key: str) -> V2VClient:
        """This client (same URLs, headers, auth and connection pool; not owning the pool) sending `key` as
        the `Idempotency-Key` of every POST that has none of its own: one logical request, retried."""
        bound = V2VClient(
            self._urls, client=self.http, header_provider=self._header_provider, auth=self._auth
        )
        bound._idempotency_key = key
        return bound

    def base_url(self, service: str) -> str:
        url = self._urls(service) if callable(self._urls) else self._urls[service]
        return url.rstrip("/")

    async def _headers(self, service: str, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self._header_provider is not None:
            provided = self._header_provider(service)
            if inspect.isawaitable(provided):
                provided = await provided
            headers.update(provided)
        if extra:
            headers.update(extra)
        return headers

    # -- generic -----------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        service: str,
        path: str,
        *,
        json: Any = None,
        params: Params | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | UseClientDefault | None = httpx.USE_CLIENT_DEFAULT,
    ) -> ApiResponse:
        """One request to `service` (`path` after its base URL). Raises only httpx.TransportError."""
        sent = await self._headers(service, headers)
        if (
            self._idempotency_key is not None
            and method.upper() == "POST"
            and not any(k.lower() == "idempotency-key" for k in sent)
        ):
            sent["Idempotency-Key"] = self._idempotency_key
        resp = await self.http.request(
            method,
            self.base_url(service) + path,
            json=json,
            params=dict(params) if params is not None else None,
            headers=sent or None,
            timeout=timeout,
            auth=self._auth if self._auth is not None and not self._owned else httpx.USE_CLIENT_DEFAULT,
        )
        return ApiResponse.of(resp, service, method, path)

    async def get(
        self,
        service: str,
        path: str,
        *,
        params: Params | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        return await self.request("GET", service, path, params=params, headers=headers)

    async def post(
        self, service: str, path: str, body: Any = None, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        return await self.request("POST", service, path, json=body, headers=headers)

    async def patch(
        self, service: str, path: str, body: Any = None, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        return await self.request("PATCH", service, path, json=body, headers=headers)

    async def delete(
        self, service: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        return await self.request("DELETE", service, path, headers=headers)

    async def ready(self, service: str, timeout: float = 3.0) -> bool:
        """Whether the service answers `GET /ready` with 200 (False on any HTTP error)."""
        try:
            resp = await self.request("GET", service, "/ready", timeout=timeout)
        except httpx.HTTPError:
            return False
        return resp.status == 200

    # -- order service: orders and catalogue ------------------------------------------------------------

    async def place_order(
        self,
        body: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/orders (201): treatment_center_id, product_code, order_type, patient_ref,
        requested_apheresis_date (tomorrow .. today + 180 days). The service requires an
        `Idempotency-Key`: pass the same one when you retry (a replay answers with the first answer);
        without one, the key this client is bound to (`with_idempotency_key`), else a fresh one per call.
        The centre is the caller's (from its token): `treatment_center_id` may repeat it or be left out."""
        extra = dict(headers or {})
        if idempotency_key is not None:
            extra["Idempotency-Key"] = idempotency_key
        elif not any(k.lower() == "idempotency-key" for k in extra):
            extra["Idempotency-Key"] = self._idempotency_key or str(uuid.uuid4())
        return await self.post("order", "/v1/orders", dict(body), headers=extra)

    async def get_order(self, order_id: str, *, headers: Mapping[str, str] | None = None) -> ApiResponse:
        """GET /v1/orders/{id}: status, slot, run, predicted dates and the timeline."""
        return await self.get("order", f"/v1/orders/{order_id}", headers=headers)

    async def list_orders(
        self,
        *,
        limit: int | None = None,
        offset: int | None = None,
        treatment_center_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """GET /v1/orders: a page {items, total, limit, offset, next_offset} (limit 1..200). A centre
        lists its own orders only; QA and ops every centre's (or one's, with `treatment_center_id`)."""
        params = _params(treatment_center_id=treatment_center_id, limit=limit, offset=offset)
        return await self.get("order", "/v1/orders", params=params, headers=headers)

    async def treatment_centers(self, *, headers: Mapping[str, str] | None = None) -> ApiResponse:
        return await self.get("order", "/v1/treatment-centers", headers=headers)

    async def products(self, *, headers: Mapping[str, str] | None = None) -> ApiResponse:
        return await self.get("order", "/v1/products", headers=headers)

    # -- order service: hospital and QA actions ---------------------------------------------------------

    async def order_action(
        self,
        order_id: str,
        action: OrderAction | str,
        body: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/orders/{id}/{action}: any hospital or QA action by name."""
        return await self.post("order", f"/v1/orders/{order_id}/{action}", dict(body or {}), headers=headers)

    async def cancel(
        self,
        order_id: str,
        reason_code: str,
        note: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """Cancel (POST /v1/orders/{id}/cancel): a reason code (patient_deceased, consent_withdrawn, ...,
        other) and an optional free-text note that stays in the order service."""
        body = _params(reason_code=reason_code, note=note)
        return await self.order_action(order_id, "cancel", body, headers=headers)

    async def reschedule(
        self,
        order_id: str,
        requested_apheresis_date: Day,
        reason_code: str,
        note: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """Move the apheresis date (POST /v1/orders/{id}/apheresis-date) with a reason code
        (patient_unwell, centre_capacity, ..., other) and an optional note."""
        body = {
            "requested_apheresis_date": _day(requested_apheresis_date),
            **_params(reason_code=reason_code, note=note),
        }
        return await self.order_action(order_id, "apheresis-date", body, headers=headers)

    async def _identity_checked(
        self,
        order_id: str,
        action: OrderAction,
        coi: str,
        at: Moment | None,
        headers: Mapping[str, str] | None,
        lot: str | None = None,
    ) -> ApiResponse:
        body: dict[str, Any] = {"coi": coi}
        if at is not None:
            body["at"] = _moment(at)
        if lot is not None:
            body["lot"] = lot
        return await self.order_action(order_id, action, body, headers=headers)

    async def apheresis(
        self, order_id: str, coi: str, at: Moment | None = None, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        """As the centre: apheresis done, COI checked. Here and in lymphodepletion, product receipt and
        infusion, `at` (default now) must lie within [now - 30 days, now + 5 min]."""
        return await self._identity_checked(order_id, "apheresis", coi, at, headers)

    async def lymphodepletion(
        self,
        order_id: str,
        at: Moment | None = None,
        *,
        indication: str | None = None,
        weight_kg: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """As the centre: the lymphodepleting regimen started (`at`, default now: its day starts the
        regimen). Only once the product is released and its delivery confirmed (the courier booked or
        picked it up); an order that names no indication names it here (`indication`, with the `weight_kg`
        its dose may need). Infusion is then allowed inside the window the answer shows
        (`treatment.infusion_window`)."""
        body: dict[str, Any] = {} if at is None else {"at": _moment(at)}
        if indication is not None:
            body["indication"] = indication
        if weight_kg is not None:
            body["weight_kg"] = weight_kg
        return await self.order_action(order_id, "lymphodepletion", body, headers=headers)

    async def hold(
        self,
        order_id: str,
        reason_code: str,
        note: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """As the centre: put the patient's journey on hold for a reason code (patient_unwell,
        disease_progression, patient_ineligible, payer_denied, payer_pending, consent_withdrawn,
        patient_unavailable, physician_decision, other); the note stays in the order service."""
        body = _params(reason_code=reason_code, note=note)
        return await self.order_action(order_id, "hold", body, headers=headers)

    async def resume(
        self,
        order_id: str,
        reason_code: str,
        note: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """As the centre: resume a held journey (patient_cleared, eligibility_confirmed, payer_approved,
        consent_confirmed, physician_decision, other)."""
        body = _params(reason_code=reason_code, note=note)
        return await self.order_action(order_id, "resume", body, headers=headers)

    async def material_disposition(
        self,
        order_id: str,
        material: Literal["apheresis_material", "product"],
        outcome: Literal["destroyed", "returned"],
        reason_code: str,
        *,
        document_reference: str | None = None,
        at: Moment | None = None,
        note: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """As the centre, once the order ended (cancelled or failed): what was done with the material or
        product it left (`end_material` of the order), for a reason code (order_cancelled, order_failed,
        patient_deceased, expired, other)."""
        body: dict[str, Any] = {"material": material, "outcome": outcome, "reason_code": reason_code}
        body.update(_params(document_reference=document_reference, note=note))
        if at is not None:
            body["at"] = _moment(at)
        return await self.order_action(order_id, "material-disposition", body, headers=headers)

    async def product_receipt(
        self,
        order_id: str,
        coi: str,
        at: Moment | None = None,
        *,
        lot: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """As the centre: the product received, its label's COI and lot checked (the lot is required once
        the order knows it: `lot` of the order view)."""
        return await self._identity_checked(order_id, "product-receipt", coi, at, headers, lot)

    async def infusion(
        self,
        order_id: str,
        coi: str,
        at: Moment | None = None,
        *,
        lot: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        return await self._identity_checked(order_id, "infusion", coi, at, headers, lot)

    async def disposition(
        self,
        order_id: str,
        outcome: Literal["release", "release_on_physician_request", "reject"],
        reason_code: str,
        document_reference: str,
        note: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """As the manufacturer's QA, signed (`headers` with the signing token of a QA user): the
        disposition of material at risk (an OOS product, an excursion, material held at receipt)."""
        body = {
            "outcome": outcome,
            "document_reference": document_reference,
            **_params(reason_code=reason_code, note=note),
        }
        return await self.order_action(order_id, "disposition", body, headers=headers)

    async def physician_decision(
        self,
        order_id: str,
        accept: bool,
        reason_code: str | None = None,
        note: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """As the centre, signed by its physician: accept or decline an out-of-specification product QA
        released on physician request."""
        body = {"accept": accept, **_params(reason_code=reason_code, note=note)}
        return await self.order_action(order_id, "physician-decision", body, headers=headers)

    async def quarantine_decision(
        self,
        order_id: str,
        decision: Literal["release", "reject"],
        reason_code: str,
        note: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """As the manufacturer's QA: release (within_stability_data, excursion_not_confirmed,
        assessed_acceptable, other) or reject (outside_stability_data, integrity_compromised,
        insufficient_data, other)."""
        body = {"decision": decision, **_params(reason_code=reason_code, note=note)}
        return await self.order_action(order_id, "quarantine-decision", body, headers=headers)

    # -- scheduling -------------------------------------------------------------------------------------

    async def slots(
        self,
        *,
        order_id: str | None = None,
        status: Iterable[str] | None = None,
        product_code: str | None = None,
        site_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """GET /v1/slots (`ops:read`), filtered; a page (limit 1..200, offset 0..10 000)."""
        params = _params(
            order_id=order_id,
            status=list(status) if status is not None else None,
            product_code=product_code,
            site_id=site_id,
            limit=limit,
            offset=offset,
        )
        return await self.get("scheduling", "/v1/slots", params=params, headers=headers)

    async def waitlist(
        self,
        *,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """GET /v1/waitlist (`ops:read`): a page, in booking order."""
        params = _params(limit=limit, offset=offset)
        return await self.get("scheduling", "/v1/waitlist", params=params, headers=headers)

    # -- site: registry ---------------------------------------------------------------------------------

    async def sites(
        self,
        *,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """GET /v1/sites (`sites:read`; a site's MES sees its own site only): a page."""
        params = _params(limit=limit, offset=offset)
        return await self.get("site", "/v1/sites", params=params, headers=headers)

    async def site(self, site_id: str, *, headers: Mapping[str, str] | None = None) -> ApiResponse:
        return await self.get("site", f"/v1/sites/{site_id}", headers=headers)

    async def patch_site(
        self,
        site_id: str,
        *,
        daily_capacity: Mapping[str, int] | None = None,
        active: bool | None = None,
        approvals: list[Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """PATCH /v1/sites/{id} (`registry:admin`): only what is given changes (approvals replace the
        whole list)."""
        body: dict[str, Any] = {}
        if daily_capacity is not None:
            body["daily_capacity"] = dict(daily_capacity)
        if active is not None:
            body["active"] = active
        if approvals is not None:
            body["approvals"] = [dict(a) for a in approvals]
        return await self.patch("site", f"/v1/sites/{site_id}", body, headers=headers)

    async def add_outage(
        self,
        site_id: str,
        start_date: Day,
        end_date: Day,
        reason: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/sites/{id}/outages (201; `registry:admin`; end_date inclusive): {...,
        affected_booking_ids}. `reason` is an `OutageReason` code (maintenance, equipment_failure,
        contamination, utilities, staffing, regulatory_hold, other)."""
        body = {"start_date": _day(start_date), "end_date": _day(end_date), "reason": reason}
        return await self.post("site", f"/v1/sites/{site_id}/outages", body, headers=headers)

    # -- site: MES --------------------------------------------------------------------------------------

    async def site_receipt(
        self,
        site_id: str,
        order_id: str,
        coi: str,
        accepted: bool = True,
        *,
        din: str | None = None,
        reason: str | None = None,
        reference: str | None = None,
        received_at: Moment | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/sites/{id}/receipts (`mes:report`, the site's own MES): the apheresis material
        accepted, or refused with a `ReceiptRejection` code (damaged_container, temperature_excursion,
        label_mismatch, insufficient_volume, documentation_missing, other); a refused bag is held until
        QA's disposition. `din`: the bag's donation identification number (required once the order
        service issued one); `reference`: the site's own document (an opaque id, never free text);
        `received_at`: within the last 30 days (default now)."""
        body: dict[str, Any] = {"order_id": order_id, "coi": coi, "accepted": accepted}
        if din is not None:
            body["din"] = din
        if reason is not None:
            body["reason"] = reason
        if received_at is not None:
            body["received_at"] = _moment(received_at)
        if reference is not None:
            body["reference"] = reference
        return await self.post("site", f"/v1/sites/{site_id}/receipts", body, headers=headers)

    async def manufacturing_step(
        self,
        site_id: str,
        order_id: str,
        step: str,
        *,
        completed_at: Moment | None = None,
        failed: bool = False,
        reason: str | None = None,
        reference: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/sites/{id}/manufacturing/{order}/steps (`mes:report`, the site's own MES): a step
        completed, or failed with a `StepFailure` code (contamination, equipment_failure,
        insufficient_cell_growth, transduction_failure, process_deviation, utilities, other)."""
        body: dict[str, Any] = {"step": step}
        if completed_at is not None:
            body["completed_at"] = _moment(completed_at)
        if failed:
            body["failed"] = True
        if reason is not None:
            body["reason"] = reason
        if reference is not None:
            body["reference"] = reference
        return await self.post(
            "site", f"/v1/sites/{site_id}/manufacturing/{order_id}/steps", body, headers=headers
        )

    async def qc(
        self,
        site_id: str,
        order_id: str,
        disposition: Disposition | str,
        *,
        reason: str | None = None,
        results: Mapping[str, Any] | None = None,
        coa_reference: str | None = None,
        reference: str | None = None,
        decided_at: Moment | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/sites/{id}/manufacturing/{order}/qc (`qc:release`, the manufacturer's QA): passed
        (with `results`, e.g. {"viability_pct": 92.5, "sterility": "negative"}, and the certificate of
        analysis `coa_reference`: the lot then waits for its signed release), or out_of_specification /
        failed with a `QcFinding` code (sterility, endotoxin, mycoplasma, viability, potency, dose,
        identity, purity, vector_copy_number, replication_competent_virus, other)."""
        body: dict[str, Any] = {"disposition": disposition}
        if reason is not None:
            body["reason"] = reason
        if results is not None:
            body["results"] = dict(results)
        if coa_reference is not None:
            body["coa_reference"] = coa_reference
        if decided_at is not None:
            body["decided_at"] = _moment(decided_at)
        if reference is not None:
            body["reference"] = reference
        return await self.post(
            "site", f"/v1/sites/{site_id}/manufacturing/{order_id}/qc", body, headers=headers
        )

    async def release(
        self,
        site_id: str,
        order_id: str,
        *,
        reference: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/sites/{id}/manufacturing/{order}/release (`qc:release` + an electronic signature in
        `V2V-Signature-Token`, given in `headers`): the quality unit's release (US) or a QP's
        certification (EU) of the lot, by a signer of the batch-release site the approval names (the
        manufacturing view's `release.required` says who)."""
        body: dict[str, Any] = {} if reference is None else {"reference": reference}
        return await self.post(
            "site", f"/v1/sites/{site_id}/manufacturing/{order_id}/release", body, headers=headers
        )

    async def import_certification(
        self,
        batch_release_site_id: str,
        order_id: str,
        *,
        reference: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/sites/{batch release site}/manufacturing/{order}/import-certification (`qc:release` +
        a signature): the import certification of a lot made outside its market."""
        body: dict[str, Any] = {} if reference is None else {"reference": reference}
        path = f"/v1/sites/{batch_release_site_id}/manufacturing/{order_id}/import-certification"
        return await self.post("site", path, body, headers=headers)

    async def manufacturing(
        self, site_id: str, order_id: str, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        """GET /v1/sites/{id}/manufacturing/{order} (`sites:read`): state, run, steps completed."""
        return await self.get("site", f"/v1/sites/{site_id}/manufacturing/{order_id}", headers=headers)

    # -- logistics --------------------------------------------------------------------------------------

    async def shipments(
        self,
        *,
        order_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """GET /v1/shipments (`shipments:read`): a page of the shipments the caller may see (a carrier its
        own, QA and ops all). Each names its `carrier_id`, the courier that reports on it."""
        params = _params(order_id=order_id, limit=limit, offset=offset)
        return await self.get("logistics", "/v1/shipments", params=params, headers=headers)

    async def shipment(self, shipment_id: str, *, headers: Mapping[str, str] | None = None) -> ApiResponse:
        """GET /v1/shipments/{id}, with its status history."""
        return await self.get("logistics", f"/v1/shipments/{shipment_id}", headers=headers)

    async def milestone(
        self,
        shipment_id: str,
        milestone: Milestone | str,
        *,
        occurred_at: Moment,
        location: str,
        handled_by: str,
        coi: str,
        received_from: str | None = None,
        temperature_c: float | None = None,
        din: str | None = None,
        lot: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """Courier API: POST /v1/shipments/{id}/milestones (201; `shipments:report`, the shipment's
        carrier). `occurred_at` within [now - 30 days, now + 5 min]; location, handled_by and
        received_from are opaque codes. `din` (inbound) / `lot` (outbound): the label's second id, required
        once logistics knows the shipment's (it shows them on GET /v1/shipments/{id})."""
        body: dict[str, Any] = {
            "milestone": milestone,
            "occurred_at": _moment(occurred_at),
            "location": location,
            "handled_by": handled_by,
            "coi": coi,
        }
        if received_from is not None:
            body["received_from"] = received_from
        if temperature_c is not None:
            body["temperature_c"] = temperature_c
        if din is not None:
            body["din"] = din
        if lot is not None:
            body["lot"] = lot
        return await self.post("logistics", f"/v1/shipments/{shipment_id}/milestones", body, headers=headers)

    async def custody(
        self,
        shipment_id: str,
        *,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """GET /v1/shipments/{id}/custody: a page of the chain of custody."""
        params = _params(limit=limit, offset=offset)
        return await self.get(
            "logistics", f"/v1/shipments/{shipment_id}/custody", params=params, headers=headers
        )

    async def temperature_reading(
        self,
        shipment_id: str,
        reading_c: float,
        *,
        measured_at: Moment,
        coi: str | None = None,
        logger_download: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """Courier API: POST /v1/shipments/{id}/temperature (201; `shipments:report`): {..., in_range,
        minutes_outside, excursion_published}. `measured_at` within [now - 30 days, now + 5 min] and after
        the shipment's pickup; live readings in transit, `logger_download` ones after delivery."""
        body: dict[str, Any] = {"reading_c": reading_c, "measured_at": _moment(measured_at)}
        if coi is not None:
            body["coi"] = coi
        if logger_download:
            body["logger_download"] = True
        return await self.post("logistics", f"/v1/shipments/{shipment_id}/temperature", body, headers=headers)

    async def temperature_readings(
        self,
        shipment_id: str,
        *,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """GET /v1/shipments/{id}/temperature: a page of the readings, in measurement order."""
        params = _params(limit=limit, offset=offset)
        return await self.get(
            "logistics", f"/v1/shipments/{shipment_id}/temperature", params=params, headers=headers
        )

    # -- notification -----------------------------------------------------------------------------------

    async def subscribe(
        self,
        treatment_center_id: str | None,
        url: str,
        event_types: list[str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/subscriptions (201): a Standard Webhooks endpoint; every event type when None. The
        platform generates the signing secret: it is the body's `secret`, shown this once. The centre
        comes from the token; `treatment_center_id` may repeat it (None leaves it out)."""
        body: dict[str, Any] = {"url": url}
        if treatment_center_id is not None:
            body["treatment_center_id"] = treatment_center_id
        if event_types is not None:
            body["event_types"] = event_types
        return await self.post("notification", "/v1/subscriptions", body, headers=headers)

    async def rotate_secret(
        self, subscription_id: str, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        """POST /v1/subscriptions/{id}/rotate-secret (200): a new `secret` (shown this once); the replaced
        one keeps signing, as a second signature, until `previous_secret_expires_at`."""
        return await self.post(
            "notification", f"/v1/subscriptions/{subscription_id}/rotate-secret", headers=headers
        )

    async def subscriptions(
        self,
        *,
        treatment_center_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        params = _params(treatment_center_id=treatment_center_id, limit=limit, offset=offset)
        return await self.get("notification", "/v1/subscriptions", params=params, headers=headers)

    async def subscription(
        self, subscription_id: str, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        return await self.get("notification", f"/v1/subscriptions/{subscription_id}", headers=headers)

    async def event_types(self, *, headers: Mapping[str, str] | None = None) -> ApiResponse:
        return await self.get("notification", "/v1/event-types", headers=headers)

    async def add_email_recipient(
        self,
        treatment_center_id: str | None,
        email: str,
        event_types: list[str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """POST /v1/email-recipients (201; 409 if the address already gets the centre's alerts). The centre
        comes from the token; `treatment_center_id` may repeat it (None leaves it out)."""
        body: dict[str, Any] = {"email": email}
        if treatment_center_id is not None:
            body["treatment_center_id"] = treatment_center_id
        if event_types is not None:
            body["event_types"] = event_types
        return await self.post("notification", "/v1/email-recipients", body, headers=headers)

    async def email_recipients(
        self,
        *,
        treatment_center_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        params = _params(treatment_center_id=treatment_center_id, limit=limit, offset=offset)
        return await self.get("notification", "/v1/email-recipients", params=params, headers=headers)

    async def email_recipient(
        self, recipient_id: str, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        return await self.get("notification", f"/v1/email-recipients/{recipient_id}", headers=headers)

    async def remove_email_recipient(
        self, recipient_id: str, *, headers: Mapping[str, str] | None = None
    ) -> ApiResponse:
        """DELETE /v1/email-recipients/{id} (204)."""
        return await self.delete("notification", f"/v1/email-recipients/{recipient_id}", headers=headers)

    async def deliveries(
        self,
        *,
        treatment_center_id: str | None = None,
        order_id: str | None = None,
        channel: Literal["webhook", "email"] | None = None,
        subscription_id: str | None = None,
        recipient_id: str | None = None,
        status: Literal["pending", "delivered", "failed", "cancelled"] | None = None,
        limit: int | None = None,
        offset: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> ApiResponse:
        """GET /v1/deliveries: the delivery log of both channels (the caller's centre's), newest first;
        `limit` at most 200. Each entry's `last_outcome` is `delivered` or a failure category."""
        params = _params(
            treatment_center_id=treatment_center_id,
            order_id=order_id,
            channel=channel,
            subscription_id=subscription_id,
            recipient_id=recipient_id,
            status=status,
            limit=limit,
            offset=offset,
        )
        return await self.get("notification", "/v1/deliveries", params=params, headers=headers)

    async def delivery(self, delivery_id: str, *, headers: Mapping[str, str] | None = None) -> ApiResponse:
        """GET /v1/deliveries/{id}, with every attempt (`attempt_log[].outcome`)."""
        return await self.get("notification", f"/v1/deliveries/{delivery_id}", headers=headers)
