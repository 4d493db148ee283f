"""The composition root every service shares: settings → telemetry → pool → migrations → topics →
broker + consumers + relay → HTTP. A service declares what is its own in a `ServiceDefinition`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from v2v_contracts import EventData, all_topics, dead_letter_topic, topic_for
from v2v_messaging import (
    MIGRATIONS_DIR,
    ConsumerPolicy,
    EventConsumer,
    HandlerRegistry,
    KafkaSettings,
    OutboxRelay,
    Tx,
    UnitOfWork,
    ensure_topics,
    make_broker,
    notify_channel,
)
from v2v_observability import (
    configure_logging,
    configure_metrics,
    configure_tracing,
    get_logger,
    shutdown_metrics,
    shutdown_tracing,
)
from v2v_persistence import apply_migrations, create_pool, schema_of
from v2v_servicekit import problems
from v2v_servicekit.settings import ServiceSettings

log = get_logger(__name__)


@dataclass
class ConsumerSpec:
    purpose: str
    from_services: list[str] | tuple[str, ...]  # whose topics to read
    # the service's typed handlers, or a factory of them when they need the runtime's dependencies
    handlers: HandlerRegistry[Any] | Callable[[Runtime], HandlerRegistry[Any]]

    def registry(self, rt: Runtime) -> HandlerRegistry[Any]:
        return self.handlers if isinstance(self.handlers, HandlerRegistry) else self.handlers(rt)


@dataclass
class ServiceDefinition:
    name: str
    schema: str
    migrations_dir: Path
    settings_class: type[ServiceSettings] = ServiceSettings  # the service's own typed settings (config.py)
    tx_factory: Callable[[asyncpg.Connection, Any], Tx] = Tx  # its Tx: the repositories of one transaction
    routers: list[APIRouter] = field(default_factory=list)
    consumers: list[ConsumerSpec] = field(default_factory=list)
    publishes: list[type[EventData]] = field(default_factory=list)
    on_startup: list[Callable[[Runtime], Awaitable[None]]] = field(default_factory=list)
    background: list[Callable[[Runtime], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # extra readiness checks: name -> check returning None when ready, else why not (shown in /ready)
    ready_checks: dict[str, Callable[[Runtime], Awaitable[str | None]]] = field(default_factory=dict)
    description: str = ""


@dataclass
class Runtime:
    definition: ServiceDefinition
    settings: ServiceSettings
    kafka: KafkaSettings
    pool: asyncpg.Pool
    broker: KafkaBroker
    uow: UnitOfWork[Any]
    relay: OutboxRelay
    consumers: list[EventConsumer] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def topic(self, service: str) -> str:
        return topic_for(service, self.settings.topic_namespace)


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def create_app(definition: ServiceDefinition, settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or definition.settings_class()
    settings.service_name = definition.name
    configure_logging(definition.name, settings.log_level)
    tracer_provider = configure_tracing(definition.name, settings.state_dir)
    meter_provider = configure_metrics(definition.name, settings.state_dir)
    kafka = KafkaSettings(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_idempotence=settings.kafka_enable_idempotence,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        partitions=settings.kafka_partitions,
        replication_factor=settings.kafka_replication_factor,
        namespace=settings.topic_namespace,
    )
    broker = make_broker(kafka, f"v2v-{definition.name}", tracer_provider, meter_provider)
    own_topic = topic_for(definition.name, settings.topic_namespace)
    for model in definition.publishes:  # documented in the AsyncAPI schema
        broker.publisher(
            own_topic, title=f"{own_topic}:{model.TYPE}", description=model.__doc__, schema=model
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument(tracer_provider=tracer_provider)
        applied = await apply_migrations(
            settings.database_url, definition.schema, [MIGRATIONS_DIR, definition.migrations_dir]
        )
        pool = await create_pool(settings.database_url, max_size=settings.db_pool_max)
        schema = await schema_of(pool)
        if schema != definition.schema:
            raise RuntimeError(f"role's search_path schema is {schema!r}, expected {definition.schema!r}")
        await ensure_topics(kafka, all_topics(settings.topic_namespace))
        uow: UnitOfWork[Any] = UnitOfWork(pool, own_topic, notify_channel(schema), definition.tx_factory)
        relay = OutboxRelay(
            pool,
            broker,
            schema,
            own_topic,
            kafka,
            poll_interval=settings.relay_poll_interval_s,
            retention=timedelta(days=settings.outbox_retention_days),
        )
        rt = Runtime(definition, settings, kafka, pool, broker, uow, relay)
        app.state.runtime = rt
        policy = ConsumerPolicy(max_attempts=settings.consumer_max_attempts)
        for spec in definition.consumers:
            rt.consumers.append(
                EventConsumer(
                    service=definition.name,
                    purpose=spec.purpose,
                    topics=[topic_for(s, settings.topic_namespace) for s in spec.from_services],
                    handlers=spec.registry(rt),
                    uow=uow,
                    broker=broker,
                    dead_letter_topic=dead_letter_topic(definition.name, settings.topic_namespace),
                    fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
                    max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
                    session_timeout_ms=settings.kafka_session_timeout_ms,
                    heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
                    policy=policy,
                    namespace=settings.topic_namespace,
                )
            )
        for hook in definition.on_startup:
            await hook(rt)
        await broker.start()
        tasks = [asyncio.create_task(relay.run(), name="outbox-relay")]
        tasks += [
            asyncio.create_task(job(rt), name=getattr(job, "__name__", "job"))
            for job in definition.background
        ]
        log.info("service started", migrations_applied=applied, http_port=settings.http_port, topic=own_topic)
        try:
            yield
        finally:
            await relay.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            await broker.stop()
            await pool.close()
            log.info("service stopped")
            shutdown_tracing()
            shutdown_metrics()

    app = FastAPI(
        title=f"vein2vein {definition.name} service",
        description=definition.description,
        version="0.1.0",
        lifespan=lifespan,
    )
    problems.install(app)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        excluded_urls="health,ready,metrics",
    )

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", tags=["operations"], summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": definition.name}

    @app.get("/ready", tags=["operations"], summary="Readiness: database and broker reachable")
    async def ready(request: Request) -> JSONResponse:
        rt: Runtime | None = getattr(request.app.state, "runtime", None)
        checks: dict[str, str] = {}
        if rt is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        try:
            await asyncio.wait_for(rt.pool.fetchval("SELECT 1"), 2.0)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {exc.__class__.__name__}"
        try:
            ok = await rt.broker.ping(timeout=2.0)
            checks["broker"] = "ok" if ok else "unreachable"
        except Exception as exc:
            checks["broker"] = f"unreachable: {exc.__class__.__name__}"
        for name, check in definition.ready_checks.items():
            try:
                problem: str | None = await asyncio.wait_for(check(rt), 2.0)  # type: ignore[arg-type]
                checks[name] = problem or "ok"
            except Exception as exc:
                checks[name] = f"failed: {exc.__class__.__name__}"
        status = 200 if all(v == "ok" for v in checks.values()) else 503
        return JSONResponse(
            {"status": "ready" if status == 200 else "not ready", "checks": checks}, status_code=status
        )

    @app.get("/asyncapi.json", tags=["operations"], summary="AsyncAPI 3.0 schema of this service's events")
    async def asyncapi() -> JSONResponse:
        spec = AsyncAPI(
            broker, title=f"vein2vein {definition.name} events", version="0.1.0", schema_version="3.0.0"
        )
        return JSONResponse(spec.to_specification().to_jsonable())

    for router in definition.routers:
        app.include_router(router)
    return app


def run(definition: ServiceDefinition) -> None:
    import uvicorn

    settings = definition.settings_class()  # read once, here, and passed down
    app = create_app(definition, settings)
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
