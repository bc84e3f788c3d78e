"""An nginx reverse proxy as a baseline: ``POST /webhook/<topic>`` relayed to the same sink the
other systems call, over keep-alive upstream connections (the practical ceiling of a two-hop
relay). Runs the Debian ``nginx`` binary with its own configuration in a temporary directory;
the machine's nginx configuration and service are never used."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from fastconn.testing import free_port
from scenarios._base import Context

_CONFIG = """\
daemon off;
master_process on;
user root;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    upstream sink {{
        server {upstream};
        keepalive {keepalive};
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location /webhook/ {{
            proxy_pass http://sink{path};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /healthz {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


class RunningNginx:
    def __init__(self, ctx: Context, process: asyncio.subprocess.Process, root: Path, url: str) -> None:
        self.ctx = ctx
        self.process = process
        self.pid = process.pid
        self.root = root
        self.url = url

    async def accepted(self) -> int:
        # nginx answers only once the sink answered: every accepted event is at the sink.
        return await self.ctx.sink.count()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


async def start_nginx(ctx: Context, function_url: str, *, workers: int = 2) -> RunningNginx:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (scripts/setup.sh installs it)")
    target = urlsplit(function_url)
    root = Path(tempfile.mkdtemp(prefix="nginx-", dir=ctx.options.workdir))
    port = free_port()
    config = _CONFIG.format(
        workers=workers,
        root=root,
        upstream=target.netloc,
        path=target.path,
        keepalive=max(32, ctx.options.inflight),
        port=port,
    )
    (root / "nginx.conf").write_text(config)
    with (root / "stderr.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            binary, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log"), stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    running = RunningNginx(ctx, process, root, url)
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        return running
            if process.returncode is not None or time.monotonic() > deadline:
                await running.stop()
                raise RuntimeError(f"nginx did not start: {(root / 'error.log').read_text(errors='replace')}")
            await asyncio.sleep(0.05)
