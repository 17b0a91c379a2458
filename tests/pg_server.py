"""A throw-away PostgreSQL server for tests: ``initdb`` into a temporary folder, listening only on
127.0.0.1 (a free port) and on a unix socket in that folder, trust authentication, stopped and
deleted at the end. Uses Debian's ``postgresql`` package (binaries under /usr/lib/postgresql/<v>/bin)
or any ``initdb``/``pg_ctl`` on PATH; installs nothing.

PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` user (which the
Debian package creates), in a folder that user owns: pytest's own temporary folders are private to
root.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

SERVER_USER = "postgres"  # under root; the superuser inside the server is named the same
START_TIMEOUT_S = 60


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: the newest Debian version, else PATH."""
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name)) or (0,)

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def missing_requirements() -> list[str]:
    """What this machine lacks to run the server and talk to it; empty when everything is there."""
    missing = []
    bindir = find_bindir()
    if bindir is None or not all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
        missing.append("the PostgreSQL server binaries (initdb, pg_ctl, postgres; Debian: apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            missing.append(f"a non-root user {SERVER_USER!r} to run the server as (PostgreSQL refuses root; the "
                           f"Debian package creates it)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing.append("the Python driver psycopg (pip install 'psycopg[binary]', part of the dev extras)")
    return missing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """``start()`` / ``stop()``; ``url(database)`` for SQLAlchemy (and so Optuna), ``create_database``."""

    def __init__(self, base: Path | None = None) -> None:
        bindir = find_bindir()
        assert bindir is not None, "no PostgreSQL binaries; check missing_requirements() first"
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        # A folder of its own, owned by the server's user (under root pytest's folders are root's alone).
        self.root = Path(tempfile.mkdtemp(prefix="pg-", dir=None if self.as_root else base))
        self.data, self.socket_dir, self.log = self.root / "data", self.root / "socket", self.root / "server.log"
        self.user = SERVER_USER if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        self.port = 0

    def _run(self, *command: str, check: bool = True, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        kwargs: dict[str, Any] = {}
        if self.as_root:
            entry = pwd.getpwnam(SERVER_USER)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        result = subprocess.run([str(self.bindir / command[0]), *command[1:]], capture_output=True, text=True,
                                timeout=timeout, cwd=self.root, env={**os.environ, "LC_ALL": "C"}, **kwargs)
        if check and result.returncode != 0:
            log = self.log.read_text() if self.log.is_file() else ""
            raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
                               f"\n--- server log ---\n{log}")
        return result

    def start(self) -> "PostgresServer":
        self.socket_dir.mkdir()
        if self.as_root:
            entry = pwd.getpwnam(SERVER_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "--pgdata", str(self.data), "--username", self.user, "--auth", "trust",
                  "--encoding", "UTF8", "--no-sync")
        for attempt in range(3):  # the free port can be taken between the probe and the server's bind
            self.port = _free_port()
            # Durability buys nothing in a throw-away server: no fsync makes every commit cheap.
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.socket_dir} "
                       f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
            started = self._run("pg_ctl", "--pgdata", str(self.data), "--log", str(self.log), "--options", options,
                                "--wait", f"--timeout={START_TIMEOUT_S}", "start", check=attempt == 2)
            if started.returncode == 0:
                return self
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "--pgdata", str(self.data), "--mode", "fast", "--wait", "stop", check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        # The driver named: SQLAlchemy before 2.1 would pick psycopg2 for a bare postgresql://.
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``condition()`` until it returns something truthy; fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
