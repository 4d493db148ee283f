"""`python -m v2v_harness run` (what `make run` calls), `token CLIENT_ID` (a bearer token of a demo client),
`clients` (the demo clients), `users` (the demo signing users), `sign-token CLIENT_ID USER_ID` (a signing
token: the user's password from stdin or a prompt), `provision`, `receive` and `chaos` (what `make chaos`
calls)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from v2v_harness.catalog import SERVICES
from v2v_harness.identity import DEFAULT_ISSUER_PORT, Credentials, issuer_of, start_identity
from v2v_harness.infra import Infrastructure, start_infrastructure
from v2v_harness.platform import Platform, RunningService, tail
from v2v_harness.provision import provision
from v2v_harness.supervise import Child, ProcessSupervisor

DEFAULT_STATE = Path(os.environ.get("V2V_STATE_DIR", ".v2v"))


def _run(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    print(f"vein2vein: state folder {state_dir}", flush=True)
    infra = start_infrastructure(
        state_dir,
        durable=True,
        pg_port=int(os.environ.get("V2V_PG_PORT", "55432")),
        kafka_port=int(os.environ.get("V2V_KAFKA_PORT", "9092")),
    )
    identity = None
    issuer = os.environ.get("V2V_AUTH_ISSUER")
    if not issuer:  # the local authorization server and one demo client per centre, carrier, site, ...
        identity = start_identity(state_dir, port=int(os.environ.get("V2V_ISSUER_PORT", DEFAULT_ISSUER_PORT)))
        issuer = identity.url
    namespace = os.environ.get("V2V_TOPIC_NAMESPACE", "")
    platform = Platform(infra, args.database, namespace, state_dir, issuer=issuer)
    try:
        print(f"vein2vein: {infra.describe()}", flush=True)
        if identity is not None:
            print(
                f"vein2vein: token issuer {issuer}; demo clients in {state_dir / 'clients.json'} "
                "(a token: .venv/bin/python -m v2v_harness token CLIENT_ID)",
                flush=True,
            )
            print(
                f"vein2vein: demo signing users in {state_dir / 'users.json'}, their passwords in "
                f"{state_dir / 'users.secrets.json'} (0600); a signing token: "
                ".venv/bin/python -m v2v_harness sign-token CLIENT_ID USER_ID",
                flush=True,
            )
        urls = asyncio.run(provision(infra.admin_url, args.database))
        # the services' well-known ports (8001..8005); V2V_FIXED_PORTS=false picks free ones (printed below)
        fixed = os.environ.get("V2V_FIXED_PORTS", "true").strip().lower() not in ("0", "false", "no")
        platform.start(urls, fixed_ports=fixed, timeout=90)
        print("vein2vein: all five services are ready", flush=True)
        for spec in SERVICES:
            for svc in platform.replicas.get(spec.name) or [platform.services[spec.name]]:
                print(f"  {svc.label:<13} {svc.url}  (docs {svc.url}/docs, log {svc.log_path})", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        supervisor = ProcessSupervisor(_children(infra, platform))
        while not stopping:
            supervisor.check()
            time.sleep(0.5)
        return 0
    except Exception as exc:
        print(f"vein2vein: {exc}", file=sys.stderr)
        return 1
    finally:
        print("vein2vein: stopping services, broker and database", flush=True)
        platform.stop()
        infra.close()
        if identity is not None:
            identity.stop()
        print("vein2vein: stopped", flush=True)


def _children(infra: Infrastructure, platform: Platform) -> list[Child]:
    """What `make run` keeps alive: each service process, the embedded broker and Postgres."""
    children: list[Child] = []
    logs = infra.log_dir or Path(".")
    if infra.postgres is not None:
        pg = infra.postgres

        def pg_restart() -> None:
            pg.proc = None
            pg.start(logs / "postgres.log")

        children.append(Child("postgres", lambda: pg.proc is not None and pg.proc.poll() is None, pg_restart))
    if infra.tansu is not None:
        tansu = infra.tansu

        def tansu_restart() -> None:
            tansu.proc = None
            tansu.start(logs / "tansu.log")  # memory-only: the relays notice and replay their outboxes

        def tansu_exit() -> str:
            code = tansu.proc.returncode if tansu.proc is not None else None
            return f"exited ({code})"

        children.append(
            Child(
                "broker",
                lambda: tansu.proc is not None and tansu.proc.poll() is None,
                tansu_restart,
                tansu_exit,
            )
        )
    for svc in platform.processes():  # every replica is a child of its own

        def describe(svc: RunningService = svc) -> str:
            return f"exited ({svc.proc.returncode}); last lines:\n{tail(svc.log_path, 10)}\n"

        children.append(
            Child(
                svc.label,
                lambda svc=svc: svc.proc.poll() is None,  # type: ignore[misc]
                lambda svc=svc: platform.restart_service(svc.spec.name, svc.replica),  # type: ignore[misc]
                describe,
            )
        )
    return children


def _issuer_and_client(args: argparse.Namespace) -> tuple[str, Path] | int:
    """The issuer and state folder of a demo client named on the command line, or the exit code (2) after
    saying what is missing."""
    state_dir = Path(args.state_dir)
    try:
        issuer = os.environ.get("V2V_AUTH_ISSUER") or issuer_of(state_dir)
    except OSError:
        print(f"no issuer in {state_dir}: start the platform first (make run)", file=sys.stderr)
        return 2
    if not (state_dir / "clients" / f"{args.client_id}.jwk.json").exists():
        known = ", ".join(c.client_id for c in Credentials(issuer, state_dir).clients())
        print(f"unknown client {args.client_id!r}; demo clients: {known}", file=sys.stderr)
        return 2
    return issuer, state_dir


def _token(args: argparse.Namespace) -> int:
    """Print an access token of a demo client, obtained by the real client-credentials exchange."""
    import httpx

    from v2v_harness.issuer import fetch_token

    found = _issuer_and_client(args)
    if isinstance(found, int):
        return found
    issuer, state_dir = found
    try:
        answer = fetch_token(issuer, state_dir, args.client_id, args.scope)
    except httpx.HTTPError as exc:
        print(f"token request failed: {exc}", file=sys.stderr)
        return 1
    print(answer["access_token"])
    return 0


def _sign_token(args: argparse.Namespace) -> int:
    """Print a signing token: the user's id and password (stdin, or a prompt on a terminal) exchanged by a
    demo client at the issuer (the password grant with the client's signed assertion)."""
    import getpass

    import httpx

    from v2v_harness.issuer import TokenError, fetch_signing_token

    found = _issuer_and_client(args)
    if isinstance(found, int):
        return found
    issuer, state_dir = found
    if sys.stdin.isatty():
        password = getpass.getpass(f"password of {args.user_id}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("no password given (stdin or the prompt)", file=sys.stderr)
        return 2
    try:
        token = fetch_signing_token(issuer, state_dir, args.client_id, args.user_id, password)
    except TokenError as exc:
        print(f"refused: {exc.error} ({exc.reason or '-'}): {exc.description}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"token request failed: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _users(args: argparse.Namespace) -> int:
    """List the demo signing users (public facts only; passwords stay in users.secrets.json)."""
    from v2v_harness.issuer import read_users

    state_dir = Path(args.state_dir)
    try:
        users = read_users(state_dir)
    except OSError:
        print(f"no users in {state_dir}: start the platform first (make run)", file=sys.stderr)
        return 2
    for u in users:
        print(f"{u.user_id:<28} {u.org_kind:<7} {u.org_id:<20} {','.join(u.roles):<18} {u.name}")
    return 0


def _clients(args: argparse.Namespace) -> int:
    """List the demo clients (public facts only; private keys stay in their files)."""
    state_dir = Path(args.state_dir)
    try:
        clients = Credentials("", state_dir).clients()
    except OSError:
        print(f"no clients in {state_dir}: start the platform first (make run)", file=sys.stderr)
        return 2
    for c in clients:
        print(f"{c.client_id:<28} {c.kind:<8} {c.entity_id or '-':<20} {' '.join(c.scopes)}")
    return 0


def _provision(args: argparse.Namespace) -> int:
    admin = os.environ.get("V2V_DATABASE_URL")
    if not admin:
        print("set V2V_DATABASE_URL to a URL that may create roles and databases", file=sys.stderr)
        return 2
    urls = asyncio.run(provision(admin, args.database))
    for name in urls:
        print(f"provisioned schema and role for {name}")
    return 0


def _receive(args: argparse.Namespace) -> int:
    """A webhook receiver to try the platform by hand: prints each webhook, verified if a secret is given."""
    import json

    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from v2v_harness.receiver import WebhookReceiver

    receiver = WebhookReceiver(port=args.port).start()
    print(f"receiving webhooks on {receiver.url('/')} (Ctrl-C stops)", flush=True)
    seen = 0
    try:
        while True:
            time.sleep(0.2)
            for hook in receiver.received[seen:]:
                seen += 1
                verdict = "unverified"
                if args.secret:
                    try:
                        Webhook(args.secret).verify(hook.body, hook.headers)
                        verdict = "signature ok"
                    except WebhookVerificationError as exc:
                        verdict = f"SIGNATURE INVALID ({exc})"
                event = json.loads(hook.body)
                print(
                    f"{hook.headers.get('webhook-id')} {event.get('type')} order={event.get('subject')} "
                    f"coi={event.get('coi')} [{verdict}]",
                    flush=True,
                )
    except KeyboardInterrupt:
        return 0
    finally:
        receiver.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m v2v_harness")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start Postgres, the broker and the five services")
    run.add_argument("--state-dir", default=str(DEFAULT_STATE))
    run.add_argument("--database", default=os.environ.get("V2V_DATABASE_NAME", "v2v"))
    prov = sub.add_parser("provision", help="create the database, schemas and roles (idempotent)")
    prov.add_argument("--database", default=os.environ.get("V2V_DATABASE_NAME", "v2v"))
    rec = sub.add_parser("receive", help="print webhooks sent to 127.0.0.1:PORT (for trying it by hand)")
    rec.add_argument("--port", type=int, default=9000)
    rec.add_argument("--secret", default=None, help="whsec_... to verify signatures")
    tok = sub.add_parser("token", help="print an access token of a demo client (client credentials)")
    tok.add_argument("client_id", help="e.g. centre-tc-de-be-001 (see `clients`)")
    tok.add_argument("--scope", default=None, help="ask for fewer scopes (space-separated)")
    tok.add_argument("--state-dir", default=str(DEFAULT_STATE))
    cli = sub.add_parser("clients", help="list the demo clients: id, kind, entity, scopes")
    cli.add_argument("--state-dir", default=str(DEFAULT_STATE))
    sig = sub.add_parser(
        "sign-token",
        help="print a signing token: a user's id and password (stdin or prompt) exchanged by a client",
    )
    sig.add_argument("client_id", help="the system collecting the signature, e.g. qa (see `clients`)")
    sig.add_argument("user_id", help="the signing user, e.g. qp.de-leipzig-izi (see `users`)")
    sig.add_argument("--state-dir", default=str(DEFAULT_STATE))
    usr = sub.add_parser("users", help="list the demo signing users: id, organisation, roles, name")
    usr.add_argument("--state-dir", default=str(DEFAULT_STATE))
    sub.add_parser(
        "chaos",
        help="two replicas of every service under a seeded nemesis, a workload and a checker (--help)",
        add_help=False,
    )
    if len(sys.argv) > 1 and sys.argv[1] == "chaos":  # its own options: v2v_harness.chaos.runner
        from v2v_harness.chaos.runner import main as chaos_main

        return chaos_main(sys.argv[2:])
    args = parser.parse_args()
    commands = {
        "run": _run,
        "provision": _provision,
        "receive": _receive,
        "token": _token,
        "clients": _clients,
        "sign-token": _sign_token,
        "users": _users,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
