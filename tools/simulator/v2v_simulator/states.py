"""The order and shipment states the actors react to, and the manufacturing steps (docs/lifecycle.md)."""

from __future__ import annotations

TERMINAL = frozenset({"completed", "cancelled", "failed"})
BUCKETS: dict[str, tuple[str, ...]] = {
    "booking": (
        "submitted",
        "waitlisted",
        "slot_reserved",
        "booking_confirmed",
        "rescheduling",
        "inbound_shipment_planned",
    ),
    "inbound": ("apheresis_completed", "material_in_transit"),
    "manufacturing": ("material_received", "manufacturing", "qc_pending"),
    "held": ("material_at_risk", "awaiting_physician", "on_hold"),  # QA's, a physician's, the centre's turn
    "outbound": ("released", "product_in_transit", "product_delivered", "product_received"),
    "completed": ("completed",),
    "cancelled": ("cancelled",),
    "failed": ("failed",),
}
BUCKET_OF = {status: bucket for bucket, statuses in BUCKETS.items() for status in statuses}
MATERIAL_ON_THE_WAY = frozenset({"apheresis_completed", "material_in_transit"})
IN_MANUFACTURE = frozenset({"material_received", "manufacturing", "qc_pending"})
PRODUCT_OUT = frozenset({"released", "product_in_transit", "product_delivered"})
# issue 11: lymphodepletion may start once the product's delivery is confirmed (picked up, or later)
DELIVERY_CONFIRMED = frozenset({"product_in_transit", "product_delivered", "product_received"})
SHIPMENT_LIVE = frozenset({"planned", "ready_for_pickup", "booked", "picked_up", "in_transit"})
MILESTONES = ("booked", "picked_up", "in_transit", "delivered")
STEPS = ("activation", "transduction", "expansion", "harvest", "cryopreservation")
# when each step is reported, as a fraction of the product's manufacturing days after the run starts
STEP_FRACTION = {
    "activation": 0.06,
    "transduction": 0.15,
    "expansion": 0.7,
    "harvest": 0.9,
    "cryopreservation": 1.0,
}
MES_RUNNING = frozenset(
    {"material_received", "activation", "transduction", "expansion", "harvest", "qc_pending"}
)
