"""A throw-away PostgreSQL cluster for tests and benchmarks: the server binaries' initdb/pg_ctl
(run as the ``postgres`` user when we are root: they refuse root) in a temp folder,
``wal_level = logical``, trust auth, on a free port of 127.0.0.1 with its unix socket in that
folder. The machine's own server is left alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from fastconn.testing import free_port

__all__ = ["Cluster", "pg_bindir"]


def pg_bindir() -> Path:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for path in candidates:
        if (path / "initdb").exists():
            return path
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/setup.sh")


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


class Cluster:
    def __init__(self, *, wal_level: str = "logical") -> None:
        self.bindir = pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="fastconn-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        settings = {
            "wal_level": wal_level,
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "max_replication_slots": "20",
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "50",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        self.start()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        result = subprocess.run(_as_postgres(*argv), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}\n{log}")

    def _ctl(self, *args: str) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *args
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._ctl("stop", "-m", "immediate")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    async def connect(self) -> Any:
        return await asyncpg.connect(self.dsn)

    async def execute(self, sql: str, *args: Any) -> Any:
        conn = await self.connect()
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        conn = await self.connect()
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def confirmed(self, slot: str) -> int | None:
        """The slot's confirmed_flush_lsn as an int (None: no slot)."""
        rows = await self.fetch(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint AS lsn FROM pg_replication_slots "
            "WHERE slot_name = $1",
            slot,
        )
        return int(rows[0]["lsn"]) if rows else None
