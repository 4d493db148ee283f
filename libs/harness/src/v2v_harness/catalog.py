"""The five services as the harness knows them (one list for every tool: v2v_contracts.services)."""

from v2v_contracts.services import BY_NAME, SERVICES, ServiceSpec

__all__ = ["BY_NAME", "SERVICES", "ServiceSpec"]
