"""The platform: used if all five services answer, else started as a child process
(`python -m v2v_harness run --state-dir .v2v/demo`) and stopped at the end; and the demo clients
(credentials) the simulator's parties act with, from the state folder of that platform."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from v2v_harness.client import V2VClient
from v2v_harness.identity import DEFAULT_ISSUER_PORT, Credentials, issuer_of

from .config import AUTH_DIRS, DEFAULT_PORTS, DEFAULT_URLS, Config

ROOT = Path(__file__).resolve().parents[3]  # the repository: tools/simulator/v2v_simulator/ is three down


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class PlatformProcess:
    """`python -m v2v_harness run` as a child process, stopped with SIGINT at the end."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir / "harness.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.setdefault("V2V_PG_PORT", "55432")
        env.setdefault("V2V_KAFKA_PORT", "9092")
        ports = {f"{name} service": port for name, port in DEFAULT_PORTS.items()}
        ports["postgres (V2V_PG_PORT)"] = int(env["V2V_PG_PORT"])
        ports["broker (V2V_KAFKA_PORT)"] = int(env["V2V_KAFKA_PORT"])
        if not env.get("V2V_AUTH_ISSUER"):
            ports["token issuer (V2V_ISSUER_PORT)"] = int(env.get("V2V_ISSUER_PORT", DEFAULT_ISSUER_PORT))
        taken = [f"{what} port {port}" for what, port in ports.items() if port_open(port)]
        if taken:
            raise RuntimeError(
                "cannot start the platform: "
                + ", ".join(taken)
                + " already in use (a `make run` that is not ready yet, or another program). Stop it, or "
                "start the platform yourself with `make run` and run the simulator again."
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "v2v_harness", "run", "--state-dir", str(self.state_dir)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the simulator, which stops the platform itself
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def readiness(client: V2VClient, services: list[str]) -> dict[str, bool]:
    return {name: await client.ready(name) for name in services}


async def ensure_platform(cfg: Config, out: Callable[[str], None]) -> PlatformProcess | None:
    """Nothing if all five services are ready; else start the platform (default URLs only) and wait."""
    async with V2VClient(cfg.urls) as client:
        services = list(cfg.urls)
        states = await readiness(client, services)
        if all(states.values()):
            return None
        if any(states.values()):
            down = ", ".join(n for n, ok in states.items() if not ok)
            raise RuntimeError(f"the platform is only partly up: {down} not ready")
        if not cfg.start_platform:
            raise RuntimeError(f"the order service at {cfg.urls['order']} does not answer (--no-start)")
        if cfg.urls != DEFAULT_URLS:
            raise RuntimeError("the platform does not answer at the given URLs; start it yourself there")
        platform = PlatformProcess((ROOT / cfg.state_dir).resolve())
        platform.start()
        out(f"simulator: starting the platform (python -m v2v_harness run, log {platform.log_path})")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if not platform.alive():
                raise RuntimeError(f"the platform exited while starting:\n{platform.tail()}")
            states = await readiness(client, services)
            if all(states.values()):
                out("simulator: all five services are ready")
                return platform
            await asyncio.sleep(1.0)
        platform.stop()
        raise RuntimeError(f"the platform was not ready within 240 s:\n{platform.tail()}")


# ---- credentials: the demo clients of the platform's issuer ---------------------------------------------


def _resolve(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else (ROOT / candidate).resolve()


async def _accepted(credentials: Credentials) -> bool:
    """Whether the issuer gives ops a token for the keys in this folder."""
    try:
        await credentials.token(credentials.client_id("ops"))
    except (httpx.HTTPError, OSError, KeyError, ValueError):
        return False
    return True


async def find_credentials(cfg: Config, started: PlatformProcess | None) -> Credentials:
    """The demo clients to act with: `--auth-dir`'s; else those of the platform the simulator started;
    else of the first state folder (V2V_STATE_DIR, .v2v, .v2v/demo) whose keys the running issuer
    accepts. The issuer is V2V_AUTH_ISSUER if set, else the folder's issuer.json."""
    if cfg.auth_dir is not None:
        folders = [_resolve(cfg.auth_dir)]
    elif started is not None:
        folders = [started.state_dir]
    else:
        named = [os.environ["V2V_STATE_DIR"]] if os.environ.get("V2V_STATE_DIR") else []
        folders = list(dict.fromkeys(_resolve(d) for d in (*named, *AUTH_DIRS)))
    tried = []
    for folder in folders:
        try:
            issuer = os.environ.get("V2V_AUTH_ISSUER") or issuer_of(folder)
        except (OSError, ValueError, KeyError):
            tried.append(f"{folder} (no issuer.json)")
            continue
        credentials = Credentials(issuer, folder)
        if await _accepted(credentials):
            return credentials
        tried.append(f"{folder} (issuer {issuer} gives its ops client no token)")
    raise RuntimeError(
        "no demo clients to act with: " + "; ".join(tried) + ". Start the platform with `make run` (it "
        "writes .v2v/clients.json), or give --auth-dir"
    )
