"""What every part of the bench shares: a workspace, the stacks' environment, a private Redis.

The workspace is one temporary directory: the app's ``var_dir`` (users and
the local search index, built once and shared by every stack and server),
the access log, the server logs and the private Redis server's directory.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FULL_YAML = ROOT / "bench" / "full.yaml"
DEFAULT_YAML = ROOT / "stack.yaml"

#: Secrets for the bench only (32+ characters, as the layers insist).
SESSION_SECRET = "bench-session-secret-0123456789abcdef"
JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
#: So high that the limiters count every request but never refuse one.
RATE_LIMIT = "1000000/minute"
CACHE_TTL = 60
ORIGIN = "http://localhost:3000"
#: The client a trusted proxy on loopback reports (the proxy layer and ProxyFix apply it).
FORWARDED_FOR = "203.0.113.7"
USER = ("bench", "bench-password-0123456789")
#: Headers of a browser request from the app's origin, through a proxy on loopback.
BROWSER_HEADERS = {
    "Origin": ORIGIN,
    "User-Agent": "wsgistack-bench/1.0",
    "Accept": "application/json",
    "X-Forwarded-For": FORWARDED_FOR,
    "X-Forwarded-Proto": "http",
}
PACKAGES = ("flask", "werkzeug", "waitress", "redis", "limits", "pydantic", "prometheus_client", "PyJWT",
            "Flask-Cors", "Flask-Session", "Flask-Limiter", "Flask-Caching", "cachelib")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A private redis-server on a free port, stopped by :meth:`stop`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10, self.proc)

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Workspace:
    """The temporary directory of one bench run and what lives in it."""

    path: Path
    redis: RedisServer | None = None

    @classmethod
    def create(cls) -> Workspace:
        return cls(Path(tempfile.mkdtemp(prefix="wsgistack-bench-")))

    @property
    def var_dir(self) -> Path:
        return self.path / "var"

    @property
    def redis_url(self) -> str | None:
        return self.redis.url if self.redis is not None else None

    def env(self, redis: bool = False, **extra: str) -> dict[str, str]:
        """The environment a stack.yaml of the bench is read with."""
        env = {
            "SESSION_SECRET": SESSION_SECRET,
            "JWT_SECRET": JWT_SECRET,
            "WSGISTACK_VAR_DIR": str(self.var_dir),
            "WSGISTACK_RATE_LIMIT": RATE_LIMIT,
        }
        if redis:
            if self.redis_url is None:
                raise RuntimeError("no Redis server in this run")
            env["REDIS_URL"] = self.redis_url
        env.update(extra)
        return env

    def start_redis(self) -> None:
        self.redis = RedisServer(self.path / "redis")
        self.redis.start()

    def close(self, keep: bool = False) -> None:
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if not keep:
            shutil.rmtree(self.path, ignore_errors=True)


def access_logging(workspace: Path) -> None:
    """Configure logging exactly as ``serve.py`` does, with files in place of stdout and stderr.

    The in-process stacks then pay for their access lines what a served stack
    pays: serve.py's own handlers and formats, only the streams differ.
    """
    import serve

    serve._setup_logging("INFO")
    targets = {"wsgistack.access": workspace / "access.log", "": workspace / "inproc.log"}
    for name, path in targets.items():
        for handler in logging.getLogger(name or None).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(open(path, "a", encoding="utf-8"))  # noqa: SIM115 - lives as long as the run


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cores (nproc)": str(os.cpu_count()),
        "CPU": model,
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "OS": f"{platform.system()} {platform.release()}",
        "load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    info["packages"] = ", ".join(versions)
    info["redis-server"] = _version_of(["redis-server", "--version"], lambda out: out.split()[2].removeprefix("v="))
    info["wrk"] = _version_of(["wrk", "--version"], lambda out: out.split()[1])
    return info


def _version_of(command: list[str], pick: Any) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        return str(pick(out.stdout + out.stderr))
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"
