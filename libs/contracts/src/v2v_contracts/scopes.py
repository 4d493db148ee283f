"""OAuth scopes of the platform's APIs, and which kind of principal gets which by default.

Every route declares one scope (`v2v_servicekit.auth.require_scope`); a client's token carries the scopes
granted to it. The tenant (which centre, carrier or site) comes from the token's `v2v_entity`.
"""

from __future__ import annotations

SCOPES: dict[str, str] = {
    "orders:read": "read orders (a centre: its own)",
    "orders:write": "place orders and act on them as the treatment centre",
    "notifications:manage": "manage a centre's webhook subscriptions and e-mail recipients",
    "shipments:read": "read shipments (a carrier: its own)",
    "shipments:report": "report courier milestones and temperature readings",
    "sites:read": "read the manufacturing network (a site: its own, in full)",
    "mes:report": "report receipt and manufacturing steps as a site's MES",
    "qc:release": "record QC dispositions and release products (manufacturer QA)",
    "quarantine:decide": "decide on quarantined products (manufacturer QA)",
    "registry:admin": "change sites' approvals, capacity and outages",
    "ops:read": "read operations data (slots, waitlist, dead letters)",
    "ops:write": "operate the platform (replay dead letters)",
}

KINDS = ("centre", "carrier", "site", "qa", "admin", "ops")
TENANT_KINDS = ("centre", "carrier", "site")  # bound to one entity

SCOPES_BY_KIND: dict[str, tuple[str, ...]] = {
    "centre": ("orders:read", "orders:write", "notifications:manage"),
    "carrier": ("shipments:read", "shipments:report"),
    "site": ("sites:read", "mes:report"),
    "qa": ("orders:read", "qc:release", "quarantine:decide", "sites:read", "shipments:read"),
    "admin": ("sites:read", "registry:admin"),
    "ops": ("ops:read", "ops:write", "orders:read", "sites:read", "shipments:read"),
}
