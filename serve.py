"""wsgistack's command line: serve, check, layers, explain, users, cache.

    python serve.py [-c stack.yaml] serve            # the default command
    python serve.py [-c stack.yaml] check            # exit 0 clean, 1 warnings, 2 errors
    python serve.py layers                           # built-in layers and their options
    python serve.py [-c stack.yaml] explain GET /api/v1/search?q=x -H 'Origin: https://a.example' --peer 10.0.0.1
    python serve.py [-c stack.yaml] users add alice --role admin
    python serve.py [-c stack.yaml] cache purge '/api/v1/search*'

The module-level ``app`` lets any WSGI server host the same stack
(``gunicorn serve:app``); it reads ``$WSGISTACK_CONFIG`` (default
``stack.yaml``) on the first request.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from config import ConfigError, LayerSpec, Problem, build_from_file, check, read_file
from config.build import parse
from config.live import LiveStack
from config.registry import LAYERS, resolve

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("wsgistack")
DEFAULT_CONFIG = "stack.yaml"


def _print_problems(problems: Iterable[Problem], stream: Any = None) -> None:
    for problem in problems:
        print(problem, file=stream or sys.stderr)


def _setup_logging(level: str = "INFO") -> None:
    from middleware.request_id import RequestIdLogFilter

    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    access = logging.getLogger("wsgistack.access")  # already one JSON line per request: print it as is
    plain = logging.StreamHandler(sys.stdout)
    plain.setFormatter(logging.Formatter("%(message)s"))
    access.handlers[:] = [plain]
    access.propagate = False


# ---------------------------------------------------------------- serve


def _bind(listen: Sequence[str], backlog: int) -> list[socket.socket]:
    """Bind the listening sockets once, so forked workers can share them."""
    sockets = []
    for item in listen:
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        for family, kind, proto, _, addr in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sockets.append(sock)
            break
    return sockets


def _run_waitress(live: LiveStack, sockets: list[socket.socket]) -> None:
    """Serve ``live`` on pre-bound sockets until SIGTERM/SIGINT; SIGHUP reloads."""
    from waitress.server import create_server

    server_opts = live.current.config.server
    kwargs = server_opts.waitress_kwargs()
    kwargs.pop("listen")
    kwargs.pop("backlog")
    server = create_server(live, sockets=sockets, **kwargs)

    def reload(signum: int, frame: Any) -> None:
        threading.Thread(target=live.reload, name="wsgistack-reload", daemon=True).start()

    def stop(signum: int, frame: Any) -> None:
        server.close()
        raise SystemExit(0)

    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if server_opts.reload.watch:
        live.watch(server_opts.reload.interval)
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        live.current.close()


def _supervise(live: LiveStack, sockets: list[socket.socket], workers: int) -> int:
    """Fork ``workers`` Waitress processes on shared sockets; restart the ones that die."""
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                _run_waitress(live, sockets)
            finally:
                os._exit(0)
        children[pid] = slot

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for slot in range(workers):
        spawn(slot)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("supervising %d workers: %s", workers, ", ".join(map(str, children)))
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        slot = children.pop(pid, -1)
        if slot >= 0 and not stopping:
            log.warning("worker %d exited with status %d; starting a new one", pid, status)
            time.sleep(0.1)
            spawn(slot)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        live = LiveStack(args.config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        print(f"{args.config}: refusing to start with an invalid configuration", file=sys.stderr)
        return 2
    _print_problems(live.current.warnings)
    server = live.current.config.server
    try:
        sockets = _bind(server.listen, server.backlog)
    except OSError as exc:
        print(f"cannot listen on {' '.join(server.listen)}: {exc}", file=sys.stderr)
        return 2
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        log.info("serving on http://%s:%s (generation %d, %d worker(s))",
                 f"[{host}]" if ":" in host else host, port, live.generation, server.workers)
    if server.workers > 1:
        return _supervise(live, sockets, server.workers)
    _run_waitress(live, sockets)
    return 0


# ---------------------------------------------------------------- check, layers


def cmd_check(args: argparse.Namespace) -> int:
    problems = check(args.config)
    _print_problems(problems, sys.stdout)
    if any(p.severity == "error" for p in problems):
        return 2
    if problems:
        return 1
    print(f"{args.config}: ok")
    return 0


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if inspect.isclass(annotation) else None
    return text or str(annotation).replace("typing.", "")


def cmd_layers(args: argparse.Namespace) -> int:
    from pydantic_core import PydanticUndefined

    for name in LAYERS:
        try:
            target = resolve(name)
        except (ImportError, AttributeError) as exc:
            print(f"{name}: cannot import ({exc})\n")
            continue
        doc = (inspect.getdoc(inspect.getmodule(target)) or "").split("\n\n")[0].replace("\n", " ")
        print(f"{name}  ({LAYERS[name]})\n    {doc}")
        model = getattr(target, "Options", None)
        for field_name, info in (model.model_fields.items() if model else ()):
            default: Any = info.default
            if default is PydanticUndefined:
                default = info.default_factory() if info.default_factory else "(required)"
            line = f"    {field_name}: {_type_name(info.annotation)} = {default!r}"
            if info.description:
                line += f"\n        {info.description.strip().splitlines()[0]}"
            print(line)
        print("    paths, exclude_paths, methods: scope (any layer)\n")
    return 0


# ---------------------------------------------------------------- explain


def _waitress_view(built: Any, app: Any) -> Any:
    """Apply Waitress's own proxy-header handling, as the real server would."""
    server = built.config.server
    if not server.trusted_proxy:
        return app
    from waitress.proxy_headers import proxy_headers_middleware

    return proxy_headers_middleware(
        app,
        trusted_proxy=server.trusted_proxy,
        trusted_proxy_count=server.trusted_proxy_count or 1,
        trusted_proxy_headers=set(server.trusted_proxy_headers),
        clear_untrusted=server.clear_untrusted_proxy_headers,
    )


def explain(config_path: str, method: str, target: str, headers: Sequence[str] = (), peer: str = "127.0.0.1",
            body: bytes = b"") -> tuple[list[str], int]:
    """Run one request in-process with tracing; return printable lines and the status."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    from middleware.base import CLIENT_IP, TRACE

    built = build_from_file(config_path, trace=True)
    path, _, query = target.partition("?")
    header_pairs = []
    for raw in headers:
        name, sep, value = raw.partition(":")
        if not sep:
            raise ValueError(f"headers are written 'Name: value'; {raw!r} is not")
        header_pairs.append((name.strip(), value.strip()))
    builder = EnvironBuilder(path=path, query_string=query, method=method.upper(), headers=header_pairs,
                             data=body or None, environ_base={"REMOTE_ADDR": peer})
    environ = builder.get_environ()
    trace: list[tuple[str, str]] = []
    environ[TRACE] = trace
    seen: list[Any] = []

    def capture(env: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(env)
        return built.app(env, start_response)

    app_iter, status, response_headers = run_wsgi_app(_waitress_view(built, capture), environ, buffered=True)
    body_out = b"".join(app_iter)
    lines = [f"{method.upper()} {target} from {peer}"]
    decisions: dict[str, list[str]] = {}
    for layer, decision in trace:
        decisions.setdefault(layer, []).append(decision)
    for spec in built.layers:
        label = spec.label
        said = decisions.pop(label, [])
        state = "applied" if "entered" in said else ("skipped" if said else "not reached")
        extra = [d for d in said if d != "entered"]
        where = "default" if spec.implicit else f"[{spec.index}]"
        lines.append(f"  {where:>8} {label:<12} {state}{': ' + '; '.join(extra) if extra else ''}")
    inner = seen[0] if seen else environ
    lines.append(f"  client address: {inner.get(CLIENT_IP) or inner.get('REMOTE_ADDR')}")
    lines.append(f"  scheme: {inner.get('wsgi.url_scheme')}, host: {inner.get('HTTP_HOST')}")
    lines.append(f"status: {status}")
    lines.extend(f"  {k}: {v}" for k, v in response_headers.items())
    preview = body_out[:400].decode("utf-8", "replace")
    lines.append(f"body ({len(body_out)} bytes): {preview}")
    built.close()
    return lines, int(status.split()[0])


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        lines, _ = explain(args.config, args.method, args.path, args.header, args.peer,
                           (args.data or "").encode())
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------- users, cache


def _app_option(config_path: str, name: str, default: str) -> str:
    data = read_file(config_path).data or {}
    options = (data.get("app") or {}).get("options") or {}
    base = os.path.dirname(os.path.abspath(config_path))
    var_dir = os.path.join(base, options.get("var_dir", "var"))
    value = options.get(name) or os.path.join(var_dir, default)
    return str(value if os.path.isabs(value) else os.path.join(base, value))


def cmd_users(args: argparse.Namespace) -> int:
    from app.users import users_cli

    try:
        db_path = _app_option(args.config, "users_db", "users.sqlite3")
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    return int(users_cli(list(args.rest), db_path))


def cmd_cache(args: argparse.Namespace) -> int:
    from middleware.cache import CacheMiddleware, purge

    from config.build import make_stores

    try:
        config = parse(read_file(args.config))
        specs: list[LayerSpec] = [s for s in config.pipeline if s.target is CacheMiddleware]
        if not specs:
            print(f"{args.config}: the pipeline has no cache layer", file=sys.stderr)
            return 2
        stores = make_stores(config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return 2
    total = 0
    for spec in specs:
        store = stores[spec.options.store]
        total += purge(store, args.pattern, prefix=spec.options.key_prefix)
    print(f"purged {total} cached response(s) matching {args.pattern!r}")
    return 0


# ---------------------------------------------------------------- entry points


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="wsgistack: a configuration-driven WSGI stack")
    p.add_argument("-c", "--config", default=os.environ.get("WSGISTACK_CONFIG", DEFAULT_CONFIG),
                   help="path to stack.yaml (default: $WSGISTACK_CONFIG or stack.yaml)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the stack with Waitress (default)")
    sub.add_parser("check", help="validate and lint; exit 0 clean, 1 warnings, 2 errors")
    sub.add_parser("layers", help="list built-in layers and their options")
    ex = sub.add_parser("explain", help="run one request in-process and show each layer's decision")
    ex.add_argument("method")
    ex.add_argument("path")
    ex.add_argument("-H", "--header", action="append", default=[], help="'Name: value' (repeatable)")
    ex.add_argument("--peer", default="127.0.0.1", help="the connecting address (default 127.0.0.1)")
    ex.add_argument("-d", "--data", help="request body")
    us = sub.add_parser("users", help="manage login users: add, list, remove, set-role")
    us.add_argument("rest", nargs=argparse.REMAINDER)
    ca = sub.add_parser("cache", help="cache maintenance")
    ca_sub = ca.add_subparsers(dest="cache_command", required=True)
    purge = ca_sub.add_parser("purge", help="delete cached responses whose path matches a glob")
    purge.add_argument("pattern")
    return p


COMMANDS = {
    "serve": cmd_serve,
    "check": cmd_check,
    "layers": cmd_layers,
    "explain": cmd_explain,
    "users": cmd_users,
    "cache": cmd_cache,
}


def load_dotenv(path: str) -> None:
    """Read ``NAME=value`` lines from ``path`` into the environment, never overriding what is set."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        os.environ.setdefault(name.strip().removeprefix("export "), value.strip().strip("'\""))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    load_dotenv(os.path.join(os.path.dirname(os.path.abspath(args.config)), ".env"))
    _setup_logging(os.environ.get("WSGISTACK_LOG_LEVEL", "INFO"))
    return COMMANDS[args.command or "serve"](args)


class _LazyStack:
    """The module-level ``app``: builds ``$WSGISTACK_CONFIG`` on the first request."""

    def __init__(self) -> None:
        self._live: LiveStack | None = None
        self._lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        live = self._live
        if live is None:
            with self._lock:
                if self._live is None:
                    path = os.environ.get("WSGISTACK_CONFIG", DEFAULT_CONFIG)
                    load_dotenv(os.path.join(os.path.dirname(os.path.abspath(path)), ".env"))
                    self._live = LiveStack(path)
                live = self._live
        return live(environ, start_response)


app = _LazyStack()

if __name__ == "__main__":
    sys.exit(main())
