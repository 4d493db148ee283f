"""Composition root of the site service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from site_service import services
from v2v_contracts import BookingConfirmedV1, SiteRegisteredV1
from v2v_servicekit import ConsumerSpec, Runtime, ServiceDefinition, get_runtime

router = APIRouter(prefix="/v1")


@router.get("/sites", tags=["sites"], summary="The manufacturing network: approvals and capacity")
async def sites(rt: Annotated[Runtime, Depends(get_runtime)]) -> list[dict[str, Any]]:
    return await services.list_sites(rt.pool)


async def _seed(rt: Runtime) -> None:
    await services.load_seed(rt.uow)


DEFINITION = ServiceDefinition(
    name="site",
    schema="site",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    consumers=[ConsumerSpec("bookings", ["scheduling"], services.handlers)],
    publishes=[SiteRegisteredV1, BookingConfirmedV1],
    on_startup=[_seed],
    description="Manufacturing sites: registry, approvals, capacity and the manufacturing plan.",
)
