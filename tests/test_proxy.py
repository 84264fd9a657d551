"""The proxy layer: trusted peers, hop counts, RFC 7239 Forwarded, allowed_hosts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from pydantic import ValidationError
from webtest import TestApp

from middleware.base import CLIENT_IP, TRACE, Context, client_ip
from middleware.errors import ErrorsMiddleware
from middleware.proxy import ORIG, ProxyMiddleware, ProxyOptions, derive_client

KEYS = ("REMOTE_ADDR", "wsgi.url_scheme", "HTTP_HOST", "SERVER_PORT", "SCRIPT_NAME")


def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer with what the layer left in environ."""
    body = {key: environ.get(key) for key in KEYS}
    body["client_ip"] = client_ip(environ)
    body["stored_client_ip"] = environ.get(CLIENT_IP)
    body["orig"] = environ.get(ORIG)
    body["derived"] = derive_client(environ)
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def make(**options: Any) -> TestApp:
    """errors -> proxy -> echo, built from keyword options."""
    proxy = ProxyMiddleware(echo, ProxyOptions(**options), Context())
    return TestApp(ErrorsMiddleware(proxy, ErrorsMiddleware.Options(), Context()))


def call(app: TestApp, headers: dict[str, str], peer: str = "127.0.0.1", status: int = 200,
         **environ: Any) -> Any:
    """One GET from ``peer`` with ``headers``."""
    extra = {"REMOTE_ADDR": peer, "HTTP_HOST": "internal:8080", "SERVER_NAME": "internal",
             "SERVER_PORT": "8080", **environ}
    return app.get("/", headers=headers, extra_environ=extra, status=status)


ORIGINAL = {"REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "HTTP_HOST": "internal:8080",
            "SERVER_PORT": "8080", "SCRIPT_NAME": ""}
XFF = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
ALL_X = {"x_for": 1, "x_proto": 1, "x_host": 1, "x_port": 1, "x_prefix": 1}


@pytest.mark.parametrize(("options", "request_headers", "peer", "expected"), [
    pytest.param({}, XFF, "127.0.0.1", {}, id="hop counts default to 0: nothing trusted"),
    pytest.param({"x_for": 1}, XFF, "127.0.0.1", {"REMOTE_ADDR": "203.0.113.9"}, id="x_for 1, rightmost"),
    pytest.param({"x_for": 2}, XFF, "127.0.0.1", {"REMOTE_ADDR": "198.51.100.7"}, id="x_for 2"),
    pytest.param({"x_for": 3}, XFF, "127.0.0.1", {}, id="fewer values than hops: ignored"),
    pytest.param({"x_for": 1}, XFF, "192.0.2.1", {"REMOTE_ADDR": "192.0.2.1"},
                 id="untrusted peer: headers ignored"),
    pytest.param({"x_for": 1}, XFF, "::1", {"REMOTE_ADDR": "203.0.113.9"}, id="ipv6 loopback peer"),
    pytest.param({"x_for": 1}, XFF, "::ffff:127.0.0.1", {"REMOTE_ADDR": "203.0.113.9"},
                 id="ipv4-mapped peer"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "not-an-ip"}, "127.0.0.1", {}, id="invalid address"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "203.0.113.9:4711"}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="address with port"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "[2001:db8::1]:4711"}, "127.0.0.1",
                 {"REMOTE_ADDR": "2001:db8::1"}, id="bracketed ipv6 with port"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "2001:db8::1"}, "127.0.0.1",
                 {"REMOTE_ADDR": "2001:db8::1"}, id="bare ipv6 (what nginx's $proxy_add_x_forwarded_for writes)"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "198.51.100.7, 2001:db8::1"}, "127.0.0.1",
                 {"REMOTE_ADDR": "2001:db8::1"}, id="bare ipv6 appended to a client's entry"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "[2001:db8::1]"}, "127.0.0.1",
                 {"REMOTE_ADDR": "2001:db8::1"}, id="bracketed ipv6 without port"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "::ffff:203.0.113.9"}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="ipv4-mapped client (a dual-stack proxy): its ipv4 address"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "[::ffff:203.0.113.9]:4711"}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="bracketed ipv4-mapped client with port"),
    pytest.param({"x_for": 1, "trusted_proxies": ["10.0.0.0/8"]}, XFF, "10.1.2.3",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="custom network"),
    pytest.param({"x_for": 1, "trusted_proxies": ["10.0.0.0/8"]}, XFF, "127.0.0.1", {},
                 id="custom network replaces the loopback default"),
    pytest.param({"x_for": 1, "trusted_proxies": ["::ffff:127.0.0.1"]}, XFF, "::ffff:127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="an ipv4-mapped entry: its mapped peer"),
    pytest.param({"x_for": 1, "trusted_proxies": ["::ffff:10.0.0.0/120"]}, XFF, "10.0.0.5",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="an ipv4-mapped network: a plain ipv4 peer in it"),
    pytest.param({"x_for": 1, "trusted_proxies": ["::ffff:10.0.0.0/120"]}, XFF, "10.0.1.5",
                 {"REMOTE_ADDR": "10.0.1.5"}, id="an ipv4-mapped network: a peer outside it"),
    pytest.param({"x_proto": 1}, {"X-Forwarded-Proto": "https"}, "127.0.0.1",
                 {"wsgi.url_scheme": "https"}, id="proto"),
    pytest.param({"x_proto": 1}, {"X-Forwarded-Proto": "HTTPS"}, "127.0.0.1",
                 {"wsgi.url_scheme": "https"}, id="proto in capitals"),
    pytest.param({"x_proto": 1}, {"X-Forwarded-Proto": "javascript"}, "127.0.0.1", {},
                 id="proto other than http(s) ignored"),
    # Traefik forwards a WebSocket handshake with the WebSocket scheme: ws is http, wss is https (RFC 6455 §3).
    pytest.param({"x_proto": 1}, {"X-Forwarded-Proto": "wss"}, "127.0.0.1",
                 {"wsgi.url_scheme": "https"}, id="proto wss: a handshake over TLS is https"),
    pytest.param({"x_proto": 1, "x_host": 1}, {"X-Forwarded-Proto": "wss", "X-Forwarded-Host": "api.example.org"},
                 "127.0.0.1", {"wsgi.url_scheme": "https", "HTTP_HOST": "api.example.org", "SERVER_PORT": "443"},
                 id="proto wss and host: the port of https"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=203.0.113.9;proto=wss"}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9", "wsgi.url_scheme": "https"}, id="Forwarded proto wss: https"),
    pytest.param({"x_host": 1}, {"X-Forwarded-Host": "api.example.org"}, "127.0.0.1",
                 {"HTTP_HOST": "api.example.org", "SERVER_PORT": "80"}, id="host"),
    pytest.param({"x_host": 1, "x_proto": 1},
                 {"X-Forwarded-Host": "api.example.org", "X-Forwarded-Proto": "https"}, "127.0.0.1",
                 {"HTTP_HOST": "api.example.org", "SERVER_PORT": "443", "wsgi.url_scheme": "https"},
                 id="host and proto"),
    pytest.param({"x_host": 1}, {"X-Forwarded-Host": "api.example.org:8443"}, "127.0.0.1",
                 {"HTTP_HOST": "api.example.org:8443", "SERVER_PORT": "8443"}, id="host with port"),
    pytest.param({"x_host": 1}, {"X-Forwarded-Host": "api.example.org:0"}, "127.0.0.1", {},
                 id="host with port 0 ignored, as X-Forwarded-Port 0 is"),
    pytest.param({"x_host": 1}, {"X-Forwarded-Host": "api.example.org:65536"}, "127.0.0.1", {},
                 id="host with port 65536 ignored"),
    pytest.param({"x_host": 1}, {"X-Forwarded-Host": "api.example.org:99999"}, "127.0.0.1", {},
                 id="host with a port out of range ignored"),
    pytest.param({"x_host": 1, "x_proto": 1},
                 {"X-Forwarded-Host": "api.example.org:0443", "X-Forwarded-Proto": "https"}, "127.0.0.1",
                 {"HTTP_HOST": "api.example.org", "SERVER_PORT": "443", "wsgi.url_scheme": "https"},
                 id="host with a leading-zero port: the same port, the scheme's default left out"),
    pytest.param({"forwarded": 1}, {"Forwarded": 'host="[2001:db8::1]:08080"'}, "127.0.0.1",
                 {"HTTP_HOST": "[2001:db8::1]:8080", "SERVER_PORT": "8080"}, id="Forwarded host, ipv6 and port"),
    pytest.param({"x_host": 1}, {"X-Forwarded-Host": "evil.example/path"}, "127.0.0.1", {},
                 id="host that is not a host ignored"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "9443"}, "127.0.0.1",
                 {"HTTP_HOST": "internal:9443", "SERVER_PORT": "9443"}, id="port"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "99999"}, "127.0.0.1", {}, id="port out of range"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "0"}, "127.0.0.1", {}, id="port 0 ignored"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "65536"}, "127.0.0.1", {}, id="port 65536 ignored"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "\u00b2"}, "127.0.0.1", {},
                 id="a superscript digit (byte 0xb2) ignored, not a 500"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "44\u00b3"}, "127.0.0.1", {},
                 id="a port ending in a superscript digit ignored"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "443"}, "127.0.0.1",
                 {"HTTP_HOST": "internal:443", "SERVER_PORT": "443"},
                 id="port 443 over http is no default: it stays in the host"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "1"}, "127.0.0.1",
                 {"HTTP_HOST": "internal:1", "SERVER_PORT": "1"}, id="port 1"),
    pytest.param({"x_port": 1}, {"X-Forwarded-Port": "65535"}, "127.0.0.1",
                 {"HTTP_HOST": "internal:65535", "SERVER_PORT": "65535"}, id="port 65535"),
    pytest.param({"x_port": 1, "x_proto": 1}, {"X-Forwarded-Port": "0443", "X-Forwarded-Proto": "https"},
                 "127.0.0.1", {"HTTP_HOST": "internal", "SERVER_PORT": "443", "wsgi.url_scheme": "https"},
                 id="port with a leading zero is the same port: the scheme's default, left out of the host"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/app/"}, "127.0.0.1",
                 {"SCRIPT_NAME": "/app"}, id="prefix"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "app"}, "127.0.0.1", {},
                 id="relative prefix ignored"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/\\evil.example"}, "127.0.0.1", {},
                 id="a backslash prefix ignored (browsers read /\\ as //: a redirect off-site)"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "//evil.example"}, "127.0.0.1", {},
                 id="a prefix starting // ignored (url_for gives //evil.example/…: a redirect off-site)"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/\t/evil.example"}, "127.0.0.1", {},
                 id="a prefix with a tab ignored (werkzeug and browsers drop it: //evil.example)"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/ /evil.example"}, "127.0.0.1", {},
                 id="a prefix with a space ignored"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/app?next=x"}, "127.0.0.1", {},
                 id="a prefix with a query ignored"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/app#x"}, "127.0.0.1", {},
                 id="a prefix with a fragment ignored"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/caf\u00e9"}, "127.0.0.1", {},
                 id="a prefix with a byte outside ASCII ignored"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/my-app/v1.2/~u/a%20b/x:y@z;p=1!$&'()*+="},
                 "127.0.0.1", {"SCRIPT_NAME": "/my-app/v1.2/~u/a%20b/x:y@z;p=1!$&'()*+="},
                 id="a prefix of every character a path segment may have"),
    pytest.param({"x_prefix": 1}, {"X-Forwarded-Prefix": "/"}, "127.0.0.1", {"SCRIPT_NAME": ""},
                 id="prefix / is the root"),
    pytest.param(ALL_X, {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
                         "X-Forwarded-Host": "api.example.org", "X-Forwarded-Port": "443",
                         "X-Forwarded-Prefix": "/v"}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9", "wsgi.url_scheme": "https", "HTTP_HOST": "api.example.org",
                  "SERVER_PORT": "443", "SCRIPT_NAME": "/v"}, id="every X-Forwarded header"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=203.0.113.9;proto=https;host=api.example.org"},
                 "127.0.0.1", {"REMOTE_ADDR": "203.0.113.9", "wsgi.url_scheme": "https",
                               "HTTP_HOST": "api.example.org", "SERVER_PORT": "443"}, id="Forwarded"),
    pytest.param({"forwarded": 1}, {"Forwarded": 'For="[2001:db8:cafe::17]:4711"'}, "127.0.0.1",
                 {"REMOTE_ADDR": "2001:db8:cafe::17"}, id="Forwarded, quoted ipv6 with port"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=198.51.100.7, for=203.0.113.9;proto=https"},
                 "127.0.0.1", {"REMOTE_ADDR": "203.0.113.9", "wsgi.url_scheme": "https"},
                 id="Forwarded 1, rightmost element"),
    pytest.param({"forwarded": 2}, {"Forwarded": "for=198.51.100.7, for=203.0.113.9;proto=https"},
                 "127.0.0.1", {"REMOTE_ADDR": "198.51.100.7"}, id="Forwarded 2"),
    pytest.param({"x_for": 1}, {"X-Forwarded-For": '", 203.0.113.9'}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="a client's unclosed quote cannot hide the proxy's entry"),
    pytest.param({"forwarded": 1}, {"Forwarded": 'for=198.51.100.7;x=", for=203.0.113.9'}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="Forwarded: unclosed quote left of the proxy's element"),
    pytest.param({"forwarded": 2}, {"Forwarded": 'for=198.51.100.7;x=", for=203.0.113.9'}, "127.0.0.1",
                 {}, id="Forwarded 2: the asked-for element is broken, ignored"),
    pytest.param({"forwarded": 1}, {"Forwarded": 'for=198.51.100.7, for="[2001:db8::1]:80";x="a,b"'},
                 "127.0.0.1", {"REMOTE_ADDR": "2001:db8::1"}, id="Forwarded: comma inside quotes"),
    pytest.param({"forwarded": 1}, {"Forwarded": 'for=203.0.113.9;x="a,b";proto=https'}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9", "wsgi.url_scheme": "https"},
                 id="Forwarded: a quoted comma between the element's own pairs"),
    pytest.param({"forwarded": 1}, {"Forwarded": 'for=203.0.113.9;x="a\\",b";proto=https'}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9", "wsgi.url_scheme": "https"},
                 id="Forwarded: an escaped quote neither opens nor closes a quoted string"),
    pytest.param({"forwarded": 1}, {"Forwarded": 'for=198.51.100.7, for=203.0.113.9;x="a\\\\";proto=https'},
                 "127.0.0.1", {"REMOTE_ADDR": "203.0.113.9", "wsgi.url_scheme": "https"},
                 id="Forwarded: an escaped backslash before a closing quote leaves the quote closing"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=203.0.113.9;prefix=/app;port=8443"}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="Forwarded has no prefix or port parameter: ignored"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=unknown"}, "127.0.0.1", {},
                 id="Forwarded unknown ignored"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=_hidden;proto=https"}, "127.0.0.1",
                 {"wsgi.url_scheme": "https"}, id="Forwarded obfuscated for ignored"),
    # RFC 7239 §4: a parameter occurs once per element.  A second one is text the proxy copied in (nginx's
    # "for=$remote_addr;host=$host" with a Host of "a;for=198.51.100.7"): the element is malformed, ignored.
    pytest.param({"forwarded": 1}, {"Forwarded": "for=203.0.113.9;host=a.example;for=198.51.100.7;proto=https"},
                 "127.0.0.1", {}, id="Forwarded: a parameter twice in the element, the element ignored"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=203.0.113.9;proto=https;Proto=http"}, "127.0.0.1", {},
                 id="Forwarded: a parameter twice in another case, the element ignored"),
    pytest.param({"forwarded": 1}, {"Forwarded": 'for=203.0.113.9;host="a";for=198.51.100.7;x=""'},
                 "127.0.0.1", {}, id="Forwarded: a quoted value closed early and a second for, the element ignored"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=198.51.100.7;for=192.0.2.1, for=203.0.113.9"},
                 "127.0.0.1", {"REMOTE_ADDR": "203.0.113.9"},
                 id="Forwarded: a parameter twice in an element left of the one asked for"),
    pytest.param({"forwarded": 1}, {"X-Forwarded-For": "203.0.113.9"}, "127.0.0.1", {},
                 id="Forwarded trusted: X-Forwarded-For ignored"),
    pytest.param({"x_for": 1}, {"Forwarded": "for=203.0.113.9"}, "127.0.0.1", {},
                 id="X-Forwarded trusted: Forwarded ignored"),
    pytest.param({"forwarded": 1}, {"Forwarded": "for=203.0.113.9"}, "192.0.2.1",
                 {"REMOTE_ADDR": "192.0.2.1"}, id="Forwarded from untrusted peer"),
    # Headers a client can grow within the header limits, which once cost seconds (quadratic work):
    pytest.param({"x_for": 1}, {"X-Forwarded-For": "," * 64_000 + '"'}, "127.0.0.1", {},
                 id="64,000 commas and a quote: read from the right once"),
    pytest.param({"x_for": 2}, {"X-Forwarded-For": '"' + "," * 64_000 + '", 203.0.113.9'}, "127.0.0.1", {},
                 id="a quoted element of 64,000 commas"),
    pytest.param({"forwarded": 1}, {"Forwarded": "a" * 64_000 + ";for=203.0.113.9"}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="64,000 token characters before a pair"),
    pytest.param({"forwarded": 1}, {"Forwarded": "a" + " " * 64_000 + "b;for=203.0.113.9"}, "127.0.0.1",
                 {"REMOTE_ADDR": "203.0.113.9"}, id="64,000 spaces inside the element"),
])
def test_forwarding(options: dict[str, Any], request_headers: dict[str, str], peer: str,
                    expected: dict[str, str]) -> None:
    body = call(make(**options), request_headers, peer=peer).json
    want = {**ORIGINAL, "REMOTE_ADDR": peer, **expected}
    assert {key: body[key] for key in KEYS} == want
    assert body["client_ip"] == body["stored_client_ip"] == want["REMOTE_ADDR"]
    assert body["orig"] == {**ORIGINAL, "REMOTE_ADDR": peer}


@pytest.mark.parametrize(("header", "value", "scheme", "expected"), [
    pytest.param("X-Forwarded-Proto", "ws", "https", "http", id="ws over an https hop"),
    pytest.param("X-Forwarded-Proto", "wss", "http", "https", id="wss over an http hop"),
    pytest.param("Forwarded", "proto=ws", "https", "http", id="Forwarded ws over an https hop"),
    pytest.param("X-Forwarded-Proto", "wsx", "https", "https", id="another scheme: the hop's own"),
])
def test_a_websocket_scheme_is_the_scheme_of_its_handshake(header: str, value: str, scheme: str,
                                                          expected: str) -> None:
    """Traefik forwards a WebSocket handshake with ws or wss: the handshake is an HTTP or an HTTPS request."""
    app = make(x_proto=1) if header == "X-Forwarded-Proto" else make(forwarded=1)
    environ: dict[str, Any] = {"wsgi.url_scheme": scheme}
    assert call(app, {header: value}, **environ).json["wsgi.url_scheme"] == expected


@pytest.mark.parametrize("element", [
    pytest.param("a=b" + " " * 64_000 + "x;for=203.0.113.9", id="64,000 spaces inside an unquoted value"),
    pytest.param("for=203.0.113.9;a=b" + " \t" * 32_000 + "x", id="spaces and tabs inside the last value"),
    pytest.param("for=203.0.113.9;a=b" + " " * 64_000, id="64,000 spaces after the last value"),
])
def test_a_forwarded_element_is_read_in_linear_time(element: str) -> None:
    """A value with a long run of spaces inside once took ~16 s of CPU per request (the parameter pattern
    retried the spaces after each one); within Waitress's header limit, minutes."""
    app = make(forwarded=1)
    started = time.perf_counter()
    assert call(app, {"Forwarded": element}).json["client_ip"] == "203.0.113.9"
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(("trusted", "peer", "port", "client"), [
    pytest.param(("unix",), "", "", "203.0.113.9", id="gunicorn on a Unix socket: no address"),
    pytest.param(("unix",), "localhost", "None", "203.0.113.9", id="Waitress on a Unix socket"),
    pytest.param(("127.0.0.1/32",), "", "", "", id="a Unix socket not trusted"),
    pytest.param(("unix",), "localhost", "40000", "localhost", id="a TCP peer named localhost is not a socket"),
    pytest.param(("unix",), "192.0.2.1", "40000", "192.0.2.1", id="unix trusts no address"),
])
def test_a_proxy_on_a_unix_socket(trusted: tuple[str, ...], peer: str, port: str, client: str) -> None:
    """nginx -> gunicorn over a Unix socket: the peer has no address for a network to hold."""
    body = call(make(x_for=1, trusted_proxies=trusted), {"X-Forwarded-For": "203.0.113.9"}, peer=peer,
                REMOTE_PORT=port).json
    assert body["client_ip"] == client


@pytest.mark.parametrize(("peer", "port", "client"), [
    pytest.param("::ffff", "192.0.2.2", "::ffff:192.0.2.2",
                 id="an ipv4-mapped client Waitress split at its last colon"),
    pytest.param("192.0.2.2", "40000", "192.0.2.2", id="a plain peer with its port"),
])
def test_an_untrusted_peer_is_read_as_client_ip_reads_it(peer: str, port: str, client: str) -> None:
    """Under Waitress's own trusted_proxy (which `check` warns about beside this layer) REMOTE_ADDR is the
    client Waitress took from X-Forwarded-For: the layer must not make every ipv4-mapped client one address."""
    body = call(make(x_for=1), XFF, peer=peer, REMOTE_PORT=port).json
    assert body["client_ip"] == body["stored_client_ip"] == client
    assert body["REMOTE_ADDR"] == peer


@pytest.mark.parametrize(("peer", "client"), [
    pytest.param("192.0.2.1", "192.0.2.1", id="untrusted peer"),
    pytest.param("127.0.0.1", "203.0.113.9", id="trusted peer"),
])
def test_a_client_ip_already_in_environ_is_not_taken_for_the_layers(peer: str, client: str) -> None:
    stored: dict[str, Any] = {CLIENT_IP: "198.51.100.66"}
    body = call(make(x_for=1), {"X-Forwarded-For": "203.0.113.9"}, peer=peer, **stored).json
    assert body["client_ip"] == body["stored_client_ip"] == client


def test_a_forwarded_port_joins_the_host_header_name_not_the_server_name() -> None:
    body = call(make(x_port=1), {"X-Forwarded-Port": "9443"}, HTTP_HOST="public.example:8080").json
    assert (body["HTTP_HOST"], body["SERVER_PORT"]) == ("public.example:9443", "9443")


def test_derive_client_summarises_the_rewrite() -> None:
    body = call(make(x_for=1, x_proto=1), {"X-Forwarded-For": "203.0.113.9",
                                           "X-Forwarded-Proto": "https"}).json
    assert body["derived"] == {
        "client_ip": "203.0.113.9", "peer": "127.0.0.1", "scheme": "https",
        "host": "internal:8080", "port": "8080", "script_name": "",
        "rewritten": ["REMOTE_ADDR", "wsgi.url_scheme"]}


def test_derive_client_without_the_layer() -> None:
    environ = {"REMOTE_ADDR": "192.0.2.1", "wsgi.url_scheme": "http", "HTTP_HOST": "h"}
    assert derive_client(environ)["client_ip"] == "192.0.2.1"
    assert derive_client(environ)["rewritten"] == []


def test_trace_notes() -> None:
    app = make(x_for=1)
    trace: list[tuple[str, str]] = []
    traced: dict[str, Any] = {TRACE: trace}
    call(app, XFF, **traced)
    call(app, XFF, peer="192.0.2.1", **traced)
    assert trace == [("proxy", "peer 127.0.0.1 is trusted; applied for"),
                     ("proxy", "peer 192.0.2.1 is not in trusted_proxies; headers ignored")]


# --- allowed_hosts -----------------------------------------------------------------------

@pytest.mark.parametrize(("options", "request_headers", "peer", "status"), [
    pytest.param({"allowed_hosts": ["api.example.org"]}, {"Host": "api.example.org"}, "127.0.0.1", 200,
                 id="listed"),
    pytest.param({"allowed_hosts": ["api.example.org"]}, {"Host": "API.Example.org:8080"}, "127.0.0.1",
                 200, id="case and port ignored"),
    pytest.param({"allowed_hosts": ["api.example.org"]}, {"Host": "api.example.org."}, "127.0.0.1",
                 200, id="trailing dot"),
    pytest.param({"allowed_hosts": ["api.example.org"]}, {"Host": "evil.example"}, "127.0.0.1", 400,
                 id="other host"),
    pytest.param({"allowed_hosts": ["api.example.org"]}, {"Host": "api.example.org.evil.example"},
                 "127.0.0.1", 400, id="suffix trick"),
    pytest.param({"allowed_hosts": ["*.example.org"]}, {"Host": "a.example.org"}, "127.0.0.1", 200,
                 id="wildcard subdomain"),
    pytest.param({"allowed_hosts": ["*.example.org"]}, {"Host": "example.org"}, "127.0.0.1", 400,
                 id="wildcard, bare domain"),
    pytest.param({"allowed_hosts": ["*.example.org"]}, {"Host": "evilexample.org"}, "127.0.0.1", 400,
                 id="wildcard, glued prefix"),
    pytest.param({"allowed_hosts": ["*.example.org"]}, {"Host": ".example.org"}, "127.0.0.1", 400,
                 id="wildcard, empty label"),
    pytest.param({"allowed_hosts": ["*.example.org"]}, {"Host": "evil.example/x.example.org"}, "127.0.0.1",
                 400, id="wildcard, not a host name"),
    pytest.param({"allowed_hosts": ["api.example.org"]}, {"Host": "api.example.org:x@evil.example"},
                 "127.0.0.1", 400, id="userinfo trick"),
    pytest.param({"allowed_hosts": ["*"]}, {"Host": "anything.example"}, "127.0.0.1", 200, id="star"),
    pytest.param({"allowed_hosts": ["::1"]}, {"Host": "[::1]:8889"}, "127.0.0.1", 200, id="IPv6 given bare"),
    pytest.param({"allowed_hosts": ["[::1]"]}, {"Host": "[0:0::1]"}, "127.0.0.1", 200,
                 id="IPv6 in another spelling"),
    pytest.param({"allowed_hosts": ["2001:DB8::10"]}, {"Host": "[2001:db8:0::10]:443"}, "127.0.0.1", 200,
                 id="IPv6, case and zeros"),
    pytest.param({"allowed_hosts": ["::1"]}, {"Host": "[::2]"}, "127.0.0.1", 400, id="another IPv6 address"),
    pytest.param({"allowed_hosts": ["api.example.org"], "x_host": 1},
                 {"Host": "api.example.org", "X-Forwarded-Host": "evil.example"}, "127.0.0.1", 400,
                 id="trusted X-Forwarded-Host is checked"),
    pytest.param({"allowed_hosts": ["api.example.org"], "x_host": 1},
                 {"Host": "api.example.org", "X-Forwarded-Host": "evil.example"}, "192.0.2.1", 200,
                 id="untrusted X-Forwarded-Host is ignored"),
    pytest.param({"allowed_hosts": ["api.example.org"], "x_host": 1},
                 {"Host": "internal", "X-Forwarded-Host": "api.example.org"}, "127.0.0.1", 200,
                 id="trusted X-Forwarded-Host replaces Host"),
])
def test_allowed_hosts(options: dict[str, Any], request_headers: dict[str, str], peer: str,
                       status: int) -> None:
    response = call(make(**options), request_headers, peer=peer, status=status)
    if status == 400:
        assert response.json["error"]["message"] == (
            "The request's host is not one this server answers for (allowed_hosts).")
        assert response.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("target", "status"), [
    pytest.param("http://evil.example/x", 400, id="absolute form naming another host"),
    pytest.param("http://evil.example:8080/x?q=1", 400, id="absolute form with a port and query"),
    pytest.param("https://API.example.org/x", 200, id="absolute form naming an allowed host"),
    pytest.param("/x", 200, id="origin form"),
    pytest.param("*", 200, id="asterisk form (OPTIONS *): no host of its own"),
    pytest.param("api.example.org:443", 200, id="authority form (CONNECT): no URL"),
])
@pytest.mark.parametrize("key", ["REQUEST_URI", "RAW_URI"])  # Waitress's, gunicorn's
def test_allowed_hosts_checks_the_host_an_absolute_target_names(target: str, status: int, key: str) -> None:
    """RFC 9112 §3.2.2: the target's authority becomes the host (the validation layer makes it HTTP_HOST)."""
    app = make(allowed_hosts=["api.example.org"])
    app.get("/x", headers={"Host": "api.example.org"}, status=status,
            extra_environ={"REMOTE_ADDR": "192.0.2.1", key: target})


def test_allowed_hosts_checks_the_host_header_beside_an_allowed_absolute_target() -> None:
    """Without the validation layer further in, the app reads Host: it must be allowed too."""
    app = make(allowed_hosts=["api.example.org"])
    app.get("/x", headers={"Host": "evil.example"}, status=400,
            extra_environ={"REMOTE_ADDR": "192.0.2.1", "REQUEST_URI": "http://api.example.org/x"})


@pytest.mark.parametrize(("server_name", "status"), [
    pytest.param("internal", 200, id="an allowed server name"),
    pytest.param("evil.example", 400, id="another server name"),
])
def test_allowed_hosts_without_host_header_uses_server_name(server_name: str, status: int) -> None:
    app = make(allowed_hosts=["internal"])
    response = app.get("/", extra_environ={"REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": server_name,
                                           "HTTP_HOST": ""}, status=status)
    if status == 400:
        assert response.json["error"]["message"] == (
            "The request's host is not one this server answers for (allowed_hosts).")


# --- options refused ---------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"forwarded": 1, "x_for": 1},
                 "forwarded may not be combined with x_for, x_proto, x_host, x_port or x_prefix",
                 id="two header schemes"),
    pytest.param({"forwarded": 1, "x_prefix": 1}, "forwarded may not be combined", id="forwarded and prefix"),
    pytest.param({"forwarded": 2, "x_proto": 1}, "forwarded may not be combined", id="forwarded and proto"),
    pytest.param({"forwarded": 1, "x_host": 2}, "forwarded may not be combined", id="forwarded and host"),
    pytest.param({"forwarded": 1, "x_port": 1}, "forwarded may not be combined", id="forwarded and port"),
    pytest.param({"trusted_proxies": ["10.0.0.1/8"]},
                 "trusted_proxies entry '10.0.0.1/8' is not an address or CIDR network, nor 'unix' "
                 "(10.0.0.1/8 has host bits set)", id="host bits"),
    pytest.param({"trusted_proxies": ["proxy.internal"]},
                 "trusted_proxies entry 'proxy.internal' is not an address or CIDR network",
                 id="host name"),
    pytest.param({"allowed_hosts": ["https://api.example.org/x"]},
                 "allowed_hosts entry 'https://api.example.org/x' is not a host name: write ops.example.org, "
                 "*.example.org or '*' (no scheme, port or path)", id="a URL in allowed_hosts: it would never match"),
    pytest.param({"allowed_hosts": ["api.example.org:8443"]},
                 "allowed_hosts entry 'api.example.org:8443' is not a host name", id="a port in allowed_hosts"),
    pytest.param({"x_for": -1}, "greater than or equal to 0", id="negative hops"),
    pytest.param({"x_forwarded_for": 1}, "Extra inputs are not permitted", id="unknown key"),
])
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        ProxyOptions(**options)
    assert message in str(info.value)


def test_single_address_is_a_network() -> None:
    app = make(x_for=1, trusted_proxies=["192.0.2.10"])
    assert call(app, XFF, peer="192.0.2.10").json["REMOTE_ADDR"] == "203.0.113.9"
    assert call(app, XFF, peer="192.0.2.11").json["REMOTE_ADDR"] == "192.0.2.11"


# --- through stack.yaml ------------------------------------------------------------------

def test_yaml_refuses_two_schemes(make_stack: Callable[..., Any]) -> None:
    from config import ConfigError

    with pytest.raises(ConfigError) as info:
        make_stack("pipeline:\n  - proxy: {forwarded: 1, x_for: 1}\n")
    assert "forwarded may not be combined with x_for" in str(info.value)
