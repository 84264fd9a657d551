"""Forwarding headers under a real Waitress: what the proxy layer sees, and what `explain` says it sees.

Waitress removes X-Forwarded-* and Forwarded headers it does not trust
(``clear_untrusted_proxy_headers``) before any layer runs.  With a layer that
reads them itself and no ``server.trusted_proxy``, serve.py must leave them in
place, and ``explain`` must model exactly what the served stack does.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port

import serve

ROOT = Path(__file__).resolve().parent.parent
ECHO = 'app: {factory: "stack_support:echo_app"}\n'

#: A header-reading layer serve.py does not know: Waitress clears the headers before it (the default).
FORWARDED_LAYER = '''
def ReadsForwardedFor(app):
    def layer(environ, start_response):
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded:
            environ["REMOTE_ADDR"] = forwarded.split(",")[-1].strip()
        return app(environ, start_response)
    return layer
'''

PROXY_LAYER = "pipeline:\n  - errors: {}\n  - proxy: {x_for: 1, x_proto: 1, trusted_proxies: [127.0.0.1/32]}\n"
#: name -> (lines added under ``server:``, the pipeline)
CONFIGS = {
    "proxy layer": ("", PROXY_LAYER),
    "proxy layer, headers kept explicitly": ("  clear_untrusted_proxy_headers: false\n", PROXY_LAYER),
    "werkzeug ProxyFix": ("", "pipeline:\n  - errors: {}\n"
                              "  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 1, x_proto: 1}\n"),
    "Waitress trusts the proxy": ("  trusted_proxy: 127.0.0.1\n"
                                  "  trusted_proxy_headers: [x-forwarded-for, x-forwarded-proto]\n",
                                  "pipeline:\n  - errors: {}\n"),
    "a layer serve.py does not know": ("", "pipeline:\n  - errors: {}\n  - forwarded_layer:ReadsForwardedFor: {}\n"),
    "Waitress trusts the proxy, one request a minute": (
        "  trusted_proxy: 127.0.0.1\n  trusted_proxy_headers: [x-forwarded-for]\n",
        "pipeline:\n  - errors: {}\n  - ratelimit: {limits: [1/minute]}\n"),
    "Waitress trusts the proxy and so does the proxy layer, one request a minute": (
        "  trusted_proxy: 127.0.0.1\n  trusted_proxy_headers: [x-forwarded-for]\n",
        "pipeline:\n  - errors: {}\n  - proxy: {x_for: 1}\n  - ratelimit: {limits: [1/minute]}\n"),
}
FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, Path]]:
    """serve.py serving ``CONFIGS[request.param]`` on a free port; yields (port, config path)."""
    (tmp_path / "forwarded_layer.py").write_text(FORWARDED_LAYER)
    port = free_port()
    server, pipeline = CONFIGS[request.param]
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + f"server:\n  listen: 127.0.0.1:{port}\n  threads: 2\n{server}{pipeline}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(tmp_path)])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_for_port(port)
        except TimeoutError:
            proc.kill()
            raise AssertionError(proc.communicate(timeout=10)[1]) from None
        yield port, path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def get_json(port: int, headers: dict[str, str], source: str) -> dict[str, str]:
    """GET /x from a chosen loopback source address, so the server sees that peer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    conn.request("GET", "/x", headers=headers)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body  # type: ignore[no-any-return]


def explained(path: Path, headers: dict[str, str], peer: str) -> dict[str, str]:
    """The client address and scheme `serve.py explain` reports for the same request."""
    lines, status = serve.explain(str(path), "GET", "/x", [f"{k}: {v}" for k, v in headers.items()], peer)
    assert status == 200, lines
    found = {}
    for line in lines:
        if line.startswith("  client address: "):
            found["client"] = line.split(": ", 1)[1]
        elif line.startswith("  scheme: "):
            found["scheme"] = line.split(": ", 1)[1].split(",")[0]
    return found


@pytest.mark.parametrize(
    ("served", "source", "client", "scheme"),
    [
        pytest.param("proxy layer", "127.0.0.1", "203.0.113.7", "https", id="proxy layer: the forwarded client"),
        pytest.param("proxy layer", "127.0.0.2", "127.0.0.2", "http", id="proxy layer: untrusted peer ignored"),
        pytest.param("proxy layer, headers kept explicitly", "127.0.0.1", "203.0.113.7", "https",
                     id="clear_untrusted_proxy_headers: false, as bench/full.yaml"),
        pytest.param("werkzeug ProxyFix", "127.0.0.1", "203.0.113.7", "https", id="werkzeug's ProxyFix"),
        pytest.param("Waitress trusts the proxy", "127.0.0.1", "203.0.113.7", "https", id="Waitress trusted_proxy"),
        pytest.param("Waitress trusts the proxy", "127.0.0.2", "127.0.0.2", "http",
                     id="Waitress trusted_proxy: untrusted peer"),
        pytest.param("a layer serve.py does not know", "127.0.0.1", "127.0.0.1", "http",
                     id="unknown layer: Waitress clears the headers first"),
    ],
    indirect=["served"],
)
def test_served_and_explained_alike(served: tuple[int, Path], monkeypatch: pytest.MonkeyPatch, source: str,
                                    client: str, scheme: str) -> None:
    port, path = served
    body = get_json(port, FORWARDED, source)
    assert (body["client_ip"] or body["remote_addr"], body["scheme"]) == (client, scheme)
    monkeypatch.syspath_prepend(str(path.parent))
    assert explained(path, FORWARDED, source) == {"client": client, "scheme": scheme}


def test_check_says_ok_for_the_proxy_layer_under_waitress(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + PROXY_LAYER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "check"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"{path}: ok\n")


@pytest.mark.parametrize(
    ("server", "pipeline", "clears"),
    [
        pytest.param({}, [], True, id="no proxy layer: Waitress clears"),
        pytest.param({}, [{"proxy": {"x_for": 1}}], False, id="proxy layer: left to it"),
        pytest.param({"trusted_proxy": "10.0.0.1", "trusted_proxy_headers": ["x-forwarded-for"]},
                     [{"proxy": {"x_for": 1}}], True, id="Waitress trusts a proxy itself: it clears the rest"),
        pytest.param({"clear_untrusted_proxy_headers": False}, [], False, id="explicit false"),
    ],
)
def test_clear_untrusted_proxy_headers_auto(server: dict[str, object], pipeline: list[object], clears: bool) -> None:
    from config import build_from_dict

    built = build_from_dict({"app": {"factory": "stack_support:echo_app"}, "server": server, "pipeline": pipeline})
    try:
        assert built.config.clears_proxy_headers is clears
        assert built.config.waitress_kwargs()["clear_untrusted_proxy_headers"] is clears
    finally:
        built.close()


@pytest.mark.parametrize("served", [
    "Waitress trusts the proxy, one request a minute",
    # (`check` warns about both; the layer must still not make the clients one)
    "Waitress trusts the proxy and so does the proxy layer, one request a minute",
], indirect=True)
def test_ipv4_mapped_clients_of_a_dual_stack_proxy_are_each_their_own(served: tuple[int, Path]) -> None:
    """nginx on a dual-stack socket forwards IPv4 clients as ::ffff:a.b.c.d; Waitress splits that as if it
    ended in a port (REMOTE_ADDR "::ffff"), which made every such client one rate-limit bucket."""
    port, _ = served

    def status(client: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/x", headers={"X-Forwarded-For": client})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, json.loads(body)["client_ip"] if response.status == 200 else ""

    assert status("::ffff:192.0.2.2") == (200, "::ffff:192.0.2.2")
    assert status("::ffff:192.0.2.2")[0] == 429
    assert status("::ffff:198.51.100.7") == (200, "::ffff:198.51.100.7")  # another client, its own bucket
