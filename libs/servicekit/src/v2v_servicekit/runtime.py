"""The composition root every service shares: settings → telemetry → pool → migrations → topics →
broker + consumers + relay → HTTP. A service declares what is its own in a `ServiceDefinition`.

The outbox relay, its LISTEN connection and every `ServiceDefinition.background` job run under a
`Supervisor`: a loop that crashes is logged, counted and started again with backoff, and `/ready`
answers 503 naming a loop that is dead (waiting to restart) or stuck (no heartbeat for
`background_stall_after_s`). A background job keeps the signature `async def job(rt) -> None`; it may
call `rt.heartbeat().beat()` to opt into stuck detection. Every service also serves the dead-letter
operations API (`/v1/dead-letters`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel

from v2v_contracts import EventData, all_topics, dead_letter_topic, topic_for
from v2v_contracts.errors import Conflict, NotFound, Unavailable
from v2v_messaging import (
    MIGRATIONS_DIR,
    ConsumerPolicy,
    DeadLetter,
    DeadLetters,
    EventConsumer,
    HandlerRegistry,
    Heartbeat,
    KafkaSettings,
    OutboxRelay,
    Supervisor,
    Tx,
    UnitOfWork,
    current_heartbeat,
    ensure_topics,
    is_transient,
    make_broker,
    notify_channel,
    refused_by_broker,
)
from v2v_observability import (
    TelemetrySettings,
    configure_logging,
    configure_metrics,
    configure_tracing,
    get_logger,
    instrument_asyncpg,
    shutdown_metrics,
    shutdown_tracing,
)
from v2v_persistence import DbTimeouts, apply_migrations, create_pool, schema_of
from v2v_servicekit import edge, gcpolicy, problems, signatures
from v2v_servicekit.auth import Principal, TokenVerifier, document_scopes, public, require_scope
from v2v_servicekit.idempotency import MIGRATIONS_DIR as EDGE_DIR  # servicekit's tables (idempotency keys)
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
    supervisor: Supervisor = field(default_factory=Supervisor)

    def topic(self, service: str) -> str:
        return topic_for(service, self.settings.topic_namespace)

    def heartbeat(self) -> Heartbeat:
        """The heartbeat of the supervised loop calling this (`rt.heartbeat().beat()` on progress)."""
        return current_heartbeat()

    @property
    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.pool)


def get_runtime(request: Request) -> Runtime:
    """The service's runtime, for code that has the request (a route's body, a handler of its own)."""
    return request.app.state.runtime  # type: ignore[no-any-return]


async def current_runtime(request: Request) -> Runtime:
    """The runtime as a route's dependency: `Annotated[Runtime, Depends(current_runtime)]`.

    `async def` so that FastAPI calls it on the event loop: a plain `def` dependency (`get_runtime`) is
    run in a worker thread for every request (anyio's thread pool: a hand-off and a wake-up each way),
    which cost the order service 3.6 % of its CPU under load for an attribute read."""
    return get_runtime(request)


def create_app(definition: ServiceDefinition, settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or definition.settings_class()
    settings.service_name = definition.name
    configure_logging(definition.name, settings.log_level)
    tracer_provider = configure_tracing(definition.name, settings.state_dir)
    meter_provider = configure_metrics(definition.name, settings.state_dir)
    kafka = settings.kafka_settings()  # incl. the SASL principal (V2V_KAFKA_SECURITY_PROTOCOL, ...)
    broker = make_broker(kafka, f"v2v-{definition.name}", tracer_provider, meter_provider)
    own_topic = topic_for(definition.name, settings.topic_namespace)
    for model in definition.publishes:  # documented in the AsyncAPI schema
        broker.publisher(
            own_topic, title=f"{own_topic}:{model.TYPE}", description=model.__doc__, schema=model
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        instrument_asyncpg(tracer_provider, TelemetrySettings.from_env().statement_min_ms)
        applied = await apply_migrations(
            settings.migration_database_url or settings.database_url,
            definition.schema,
            [MIGRATIONS_DIR, EDGE_DIR, definition.migrations_dir],
        )
        timeouts = DbTimeouts(
            statement_ms=settings.db_statement_timeout_ms,
            lock_ms=settings.db_lock_timeout_ms,
            idle_in_transaction_ms=settings.db_idle_in_transaction_timeout_ms,
        )
        pool = await create_pool(settings.database_url, max_size=settings.db_pool_max, timeouts=timeouts)
        schema = await schema_of(pool)
        if schema != definition.schema:
            raise RuntimeError(f"role's search_path schema is {schema!r}, expected {definition.schema!r}")
        topics = all_topics(settings.topic_namespace)
        await ensure_topics(kafka, topics)
        uow: UnitOfWork[Any] = UnitOfWork(
            pool,
            own_topic,
            notify_channel(schema),
            definition.tx_factory,
            max_event_bytes=settings.outbox_max_event_bytes,
        )
        relay = OutboxRelay(
            pool,
            broker,
            schema,
            own_topic,
            kafka,
            batch_size=settings.relay_batch_size,
            poll_interval=settings.relay_poll_interval_s,
            retention=timedelta(days=settings.outbox_retention_days),
            replay_batch_size=settings.relay_replay_batch_size,
            broker_check_interval=settings.relay_broker_check_interval_s,
            lease_ttl=settings.relay_lease_ttl_s,
            publish_timeout=settings.relay_publish_timeout_s,
            topics=topics,  # all of the namespace's, dead-letter topics too: recreated on a fresh broker
        )
        uow.attach_relay(relay)  # while it leads, commits wake it in-process (no NOTIFY)
        supervisor = Supervisor(
            backoff_initial_s=settings.background_restart_initial_s,
            backoff_max_s=settings.background_restart_max_s,
            stall_after_s=settings.background_stall_after_s,
        )
        rt = Runtime(definition, settings, kafka, pool, broker, uow, relay, supervisor=supervisor)
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
                    fetch_min_bytes=settings.kafka_fetch_min_bytes,
                    max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
                    session_timeout_ms=settings.kafka_session_timeout_ms,
                    heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
                    policy=policy,
                    namespace=settings.topic_namespace,
                    batch_max=settings.consumer_batch_max,
                )
            )
        for hook in definition.on_startup:
            await hook(rt)
        await broker.start()
        supervisor.spawn("outbox-relay", relay.run, beats=True)
        probe_every = min(5.0, settings.background_stall_after_s / 4)  # beats well inside the stall limit

        async def listener(heartbeat: Heartbeat) -> None:
            await relay.listen(heartbeat, probe_every=probe_every)

        supervisor.spawn("outbox-listener", listener, beats=True)
        for job in definition.background:
            supervisor.spawn(_loop_name(job, supervisor), _as_loop(job, rt))
        thresholds = gcpolicy.apply(freeze=settings.gc_freeze, young_threshold=settings.gc_young_threshold)
        log.info(
            "service started",
            migrations_applied=applied,
            http_port=settings.http_port,
            topic=own_topic,
            gc_thresholds=list(thresholds),
        )
        try:
            yield
        finally:
            await relay.stop()
            await supervisor.stop(timeout=5.0)
            await relay.release()  # another replica takes over at once
            await broker.stop()
            await pool.close()
            log.info(
                "service stopped",
                gc_collections=gcpolicy.STATS.collections,
                gc_seconds=round(gcpolicy.STATS.seconds, 3),
            )
            shutdown_tracing()
            shutdown_metrics()

    app = FastAPI(
        title=f"vein2vein {definition.name} service",
        description=definition.description,
        version="0.1.0",
        lifespan=lifespan,
    )
    problems.install(app)
    signatures.install(app)  # signature refusals: problem+json with the step-up challenge
    if settings.auth_issuer:
        app.state.token_verifier = TokenVerifier(settings.auth_issuer, settings.auth_audience)
    edge.install(app, settings)  # body limit, rate limit, hostile JSON, Idempotency-Key (runtime pool)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        excluded_urls="health,ready,metrics",
        # no span per ASGI message ("POST /v1/orders http receive", "... http send" x2): the request's
        # SERVER span already has its status, size and duration; they were 3 of every request's 4 spans
        exclude_spans=["receive", "send"],
    )

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        include_in_schema=False,
        dependencies=[public()],
    )
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", tags=["operations"], summary="Liveness", dependencies=[public()])
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": definition.name}

    @app.get(
        "/ready",
        tags=["operations"],
        summary="Readiness: database and broker reachable",
        dependencies=[public()],
    )
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
        for loop_name, loop_problem in rt.supervisor.problems().items():  # only the unhealthy ones
            checks[f"loop:{loop_name}"] = loop_problem
        status = 200 if all(v == "ok" for v in checks.values()) else 503
        loops = {name: health.as_dict() for name, health in rt.supervisor.health().items()}
        # what this process consumes (group, topics, the event types it acts on): an SRE (and the chaos
        # checker) can tell which events each consumer must have processed
        consumers = [
            {"group": c.group_id, "topics": list(c.topics), "handles": c.handlers.types} for c in rt.consumers
        ]
        return JSONResponse(
            {
                "status": "ready" if status == 200 else "not ready",
                "checks": checks,
                "loops": loops,
                "consumers": consumers,
            },
            status_code=status,
        )

    @app.get(
        "/asyncapi.json",
        tags=["operations"],
        summary="AsyncAPI 3.0 schema of this service's events",
        dependencies=[public()],
    )
    async def asyncapi() -> JSONResponse:
        spec = AsyncAPI(
            broker, title=f"vein2vein {definition.name} events", version="0.1.0", schema_version="3.0.0"
        )
        return JSONResponse(spec.to_specification().to_jsonable())

    app.include_router(operations_router)
    for router in definition.routers:
        app.include_router(router)
    document_scopes(app)
    return app


def _loop_name(job: Callable[..., Any], supervisor: Supervisor) -> str:
    base = getattr(job, "__name__", "job")
    name, n = base, 1
    while name in supervisor.loops:
        n += 1
        name = f"{base}-{n}"
    return name


def _as_loop(job: Callable[[Runtime], Coroutine[Any, Any, None]], rt: Runtime) -> Callable[[Heartbeat], Any]:
    async def loop(_heartbeat: Heartbeat) -> None:  # the job reads it with rt.heartbeat() if it wants
        await job(rt)

    return loop


# ---- operations: dead letters ------------------------------------------------------------------------

operations_router = APIRouter(tags=["operations"])
MAX_DEAD_LETTERS_PAGE = 200


class DeadLetterOut(BaseModel):
    id: int
    consumer: str  # consumer group, or "outbox-relay" for an outbox row the broker refused
    topic: str
    partition: int | None
    offset: int | None
    event_id: str | None
    event_type: str | None
    size_bytes: int
    error: str
    attempts: int
    occurrences: int
    dead_lettered_at: str
    replayed_at: str | None
    replays: int

    @classmethod
    def of(cls, d: DeadLetter) -> DeadLetterOut:
        return cls(
            id=d.id,
            consumer=d.consumer,
            topic=d.topic,
            partition=d.kafka_partition,
            offset=d.kafka_offset,
            event_id=str(d.event_id) if d.event_id else None,
            event_type=d.event_type,
            size_bytes=len(d.payload),
            error=d.error,
            attempts=d.attempts,
            occurrences=d.occurrences,
            dead_lettered_at=d.dead_lettered_at.isoformat(),
            replayed_at=d.replayed_at.isoformat() if d.replayed_at else None,
            replays=d.replays,
        )


class DeadLetterDetailOut(DeadLetterOut):
    key: str | None
    headers: dict[str, str]
    message: str  # the raw message as text (invalid UTF-8 replaced)

    @classmethod
    def detail(cls, d: DeadLetter) -> DeadLetterDetailOut:
        return cls(
            **DeadLetterOut.of(d).model_dump(),
            key=d.message_key.decode(errors="replace") if d.message_key is not None else None,
            headers=d.replay_headers(),
            message=d.payload.decode(errors="replace"),
        )


@operations_router.get(
    "/v1/dead-letters",
    summary="Dead letters of this service, newest first",
    response_model=list[DeadLetterOut],
)
async def list_dead_letters(
    request: Request,
    _principal: Principal = require_scope("ops:read"),
    limit: int = Query(50, ge=1, le=MAX_DEAD_LETTERS_PAGE),
    before: int | None = Query(None, ge=1, le=2**63 - 1, description="only ids below this one (paging)"),
) -> list[DeadLetterOut]:
    letters = await get_runtime(request).dead_letters.list(limit=limit, before_id=before)
    return [DeadLetterOut.of(d) for d in letters]


@operations_router.get(
    "/v1/dead-letters/{dead_letter_id}",
    summary="One dead letter, with its raw message and headers",
    response_model=DeadLetterDetailOut,
)
async def get_dead_letter(
    request: Request,
    dead_letter_id: int = PathParam(ge=1, le=2**63 - 1),
    _principal: Principal = require_scope("ops:read"),
) -> DeadLetterDetailOut:
    letter = await get_runtime(request).dead_letters.get(dead_letter_id)
    if letter is None:
        raise NotFound("Dead letter", dead_letter_id)
    return DeadLetterDetailOut.detail(letter)


@operations_router.post(
    "/v1/dead-letters/{dead_letter_id}/replay",
    summary="Publish a dead letter's raw message again to its original topic",
    response_model=DeadLetterOut,
    status_code=202,
)
async def replay_dead_letter(
    request: Request,
    dead_letter_id: int = PathParam(ge=1, le=2**63 - 1),
    _principal: Principal = require_scope("ops:write"),
) -> DeadLetterOut:
    """The consumers of the topic see the message again; their inboxes drop what they had processed,
    and a message that failed was never recorded there, so it is processed afresh."""
    rt = get_runtime(request)
    try:
        letter = await rt.dead_letters.replay(dead_letter_id, rt.broker)
    except Exception as exc:
        if refused_by_broker(exc):
            raise Conflict("dead_letter", "the broker refuses this message") from None
        if is_transient(exc):
            raise Unavailable("the broker or the database is unavailable; try again") from None
        raise
    if letter is None:
        raise NotFound("Dead letter", dead_letter_id)
    log.info(
        "dead letter replayed", dead_letter_id=dead_letter_id, topic=letter.topic, replays=letter.replays
    )
    return DeadLetterOut.of(letter)


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
        loop="auto",  # uvloop (a dependency of this kit): less CPU per socket operation than asyncio's
    )
