"""The command line: `Config` and `parse_args`."""

from __future__ import annotations

import argparse
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

SERVICES = ("order", "scheduling", "site", "logistics", "notification")
DEFAULT_PORTS = {"order": 8001, "scheduling": 8002, "site": 8003, "logistics": 8004, "notification": 8005}
DEFAULT_URLS = {name: f"http://127.0.0.1:{port}" for name, port in DEFAULT_PORTS.items()}
# where the demo clients of a running platform are: `make run`'s state folder, then the simulator's own
AUTH_DIRS = (".v2v", ".v2v/demo")


def new_run_id() -> str:
    """A short id of one run: in the patient references, so that runs never share a patient."""
    return uuid.uuid4().hex[:8].upper()


@dataclass
class Config:
    orders: int = 200
    exceptions: float = 0.2
    seed: int = 2020
    urls: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_URLS))
    concurrency: int = 20
    timeout_s: float = 600.0
    day_seconds: float = 0.2
    stall_s: float = 90.0
    poll_s: float = 0.5
    progress_s: float = 2.0
    start_platform: bool = True
    state_dir: str = ".v2v/demo"
    auth_dir: str | None = None  # the demo clients' state folder (None: found, see `credentials`)
    run_id: str = field(default_factory=new_run_id)
    # exception kinds left out of the plan (`make chaos` leaves out `persistent_oos`: a journey of up to six
    # manufacturing runs, about 170 simulated days, does not fit a ten-minute run)
    without: tuple[str, ...] = ()


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="python -m v2v_simulator",
        description="Play hospitals, couriers and site MES for N orders through the public APIs.",
    )
    p.add_argument("--orders", type=int, default=200, help="number of orders (default 200)")
    p.add_argument("--exceptions", type=float, default=0.2, help="share of orders with an exception (0-1)")
    p.add_argument("--seed", type=int, default=2020, help="random seed (same seed, same plan)")
    for name in SERVICES:
        p.add_argument(f"--base-url-{name}", default=DEFAULT_URLS[name], help=f"{name} service base URL")
    p.add_argument("--concurrency", type=int, default=20, help="HTTP requests in flight at most (default 20)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="give up after this many real seconds")
    p.add_argument("--day-seconds", type=float, default=0.2, help="real seconds per simulated day")
    p.add_argument(
        "--stall-s", type=float, default=90.0, help="an order waiting this long for the platform is stuck"
    )
    p.add_argument("--poll-s", type=float, default=0.5, help="how often order statuses are read")
    p.add_argument("--progress-s", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--no-start", action="store_true", help="never start the platform, fail if it is down")
    p.add_argument("--state-dir", default=".v2v/demo", help="state folder of a platform the simulator starts")
    p.add_argument(
        "--auth-dir",
        default=None,
        help="state folder with the platform's issuer.json, clients.json and clients/ (default: the one "
        "whose demo clients the running platform's issuer knows, .v2v or .v2v/demo)",
    )
    p.add_argument("--run-id", default=None, help="id of this run in patient references (default random)")
    a = p.parse_args(argv)
    if a.orders < 1:
        p.error("--orders must be at least 1")
    if not 0.0 <= a.exceptions <= 1.0:
        p.error("--exceptions must be between 0 and 1")
    if a.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if a.day_seconds < 0:
        p.error("--day-seconds must be 0 or more")
    if a.run_id is not None and not re.fullmatch(r"[A-Za-z0-9]{1,16}", a.run_id):
        p.error("--run-id must be 1 to 16 letters or digits")
    return Config(
        orders=a.orders,
        exceptions=a.exceptions,
        seed=a.seed,
        urls={name: getattr(a, f"base_url_{name}").rstrip("/") for name in SERVICES},
        concurrency=a.concurrency,
        timeout_s=a.timeout_s,
        day_seconds=a.day_seconds,
        stall_s=a.stall_s,
        poll_s=a.poll_s,
        progress_s=a.progress_s,
        start_platform=not a.no_start,
        state_dir=a.state_dir,
        auth_dir=a.auth_dir,
        run_id=a.run_id or new_run_id(),
    )
