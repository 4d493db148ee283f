"""The site service's settings: read once at start-up by `v2v_servicekit.run()` (`rt.settings`)."""

from __future__ import annotations

from v2v_servicekit.settings import ServiceSettings


class SiteSettings(ServiceSettings):
    """The V2V_* settings every service reads (database, broker, HTTP, telemetry); the site service has
    none of its own. Its seed (`seed/sites.yaml`) is packaged data, read at start-up; product facts come
    from the shared catalogue (`v2v_contracts.reference`)."""
