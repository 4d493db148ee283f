"""Pure rules of the notification service: which events go to which channel, what an alert may say,
what a subscription or a recipient must look like, and when a delivery is retried or given up.

No I/O here: no asyncpg, FastAPI, FastStream, httpx or SMTP; errors are `v2v_contracts.errors`.
"""
