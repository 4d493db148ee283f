"""Every telemetry name the platform emits, in one module: span attributes, metric names, meters and
tracers. Code refers to these constants, never to string literals; dashboards and alerts can rely on them.
"""

from __future__ import annotations

# ---- span attributes (and log fields where the same fact is logged) ---------------------------------
ORDER_ID = "v2v.order_id"
COI = "v2v.coi"
LINK = "v2v.link"  # on a span link: why the spans are linked
LINK_ORDER_ORIGIN = "order_origin"  # ... to the first trace of the order
ACTION = "v2v.action"  # a hospital or QA action
SITE_ID = "v2v.site_id"
STEP = "v2v.step"
DISPOSITION = "v2v.disposition"
MILESTONE = "v2v.milestone"
TEMPERATURE_C = "v2v.temperature_c"
EVENT_TYPE = "v2v.event_type"
ATTEMPT = "v2v.attempt"
SUBSCRIPTION_ID = "v2v.subscription_id"
RECIPIENT_ID = "v2v.recipient_id"
SMTP_REPLY_CODE = "v2v.smtp.reply_code"
CONSUMER_OUTCOME = "v2v.consumer.outcome"  # what the inbox said of the record: processed / duplicate
CONSUMER_BATCH = "v2v.consumer.batch"  # records committed in the same transaction as this one
# a span event: the record's effects were rolled back with its batch (it is processed again alone)
EVENT_BATCH_ROLLED_BACK = "v2v.consumer.batch_rolled_back"

# ---- meters and tracers ------------------------------------------------------------------------------
METER_MESSAGING = "v2v.messaging"
METER_NOTIFICATION = "v2v.notification"
TRACER_LATER_INPUT = "v2v.later_input"
TRACER_CUSTODY = "v2v.logistics.custody"

# ---- metrics ---------------------------------------------------------------------------------------
CONSUMER_EVENTS = "v2v.consumer.events"
CONSUMER_HANDLER_DURATION = "v2v.consumer.handler.duration"
CONSUMER_DEAD_LETTERS = "v2v.consumer.dead_letters"
CONSUMER_LAG = "v2v.consumer.lag"
CONSUMER_BROKER_RESETS = "v2v.consumer.broker_resets"  # a broker found to have forgotten what was read
OUTBOX_PUBLISHED = "v2v.outbox.published"
OUTBOX_PUBLISH_LAG = "v2v.outbox.publish_lag"
OUTBOX_BACKLOG = "v2v.outbox.backlog"
OUTBOX_OLDEST_PENDING_AGE = "v2v.outbox.oldest_pending_age"
OUTBOX_DEAD_LETTERS = "v2v.outbox.dead_letters"  # rows the broker refused, moved to dead_letters
OUTBOX_REPLAYED = "v2v.outbox.replayed"  # retained rows published again to a broker that lost them
OUTBOX_BROKER_RESETS = "v2v.outbox.broker_resets"  # a broker found to have lost topics or records
BACKGROUND_RESTARTS = "v2v.background.restarts"  # a supervised background loop crashed and restarted
WEBHOOK_DELIVERIES = "v2v.webhook.deliveries"
WEBHOOK_DURATION = "v2v.webhook.duration"
EMAIL_DELIVERIES = "v2v.email.deliveries"
EMAIL_DURATION = "v2v.email.duration"
