"""Trust forwarding headers from known proxies: client address, scheme, host, prefix.

Behind a reverse proxy the peer address is the proxy's, not the client's.
This layer reads ``X-Forwarded-For/-Proto/-Host/-Port/-Prefix`` (each with its
own hop count, like werkzeug's ``ProxyFix``) or RFC 7239 ``Forwarded`` — never
both — but only when the peer (``REMOTE_ADDR``) is in ``trusted_proxies``.
From any other peer the headers are ignored, so a client cannot pick its own
address.  It sets ``environ["wsgistack.client_ip"]`` for every later layer,
rewrites ``REMOTE_ADDR``, ``wsgi.url_scheme``, ``HTTP_HOST``, ``SERVER_PORT``
and ``SCRIPT_NAME``, and keeps the originals in ``environ["wsgistack.proxy.orig"]``.
With ``allowed_hosts`` it refuses requests for other hosts with 400.

Under Waitress with one proxy at a known address, Waitress's own
``trusted_proxy``, ``trusted_proxy_count`` and ``trusted_proxy_headers``
settings do the job before any layer runs.  Use this layer for several proxies
or a network of them, per-header hop counts, ``allowed_hosts``, or another
server (gunicorn, uWSGI); ``serve.py`` then leaves the forwarding headers to it
(``server.clear_untrusted_proxy_headers`` is off by default when the pipeline
has this layer and no ``trusted_proxy``).  It must be the outermost layer
after ``errors``, so every other layer sees the real client.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field, field_validator, model_validator

from .base import (
    CLIENT_IP,
    HOST_PORT,
    LONGEST_ADDRESS,
    TRACE,
    Context,
    HostList,
    LayerOptions,
    client_ip,
    host_name,
    host_names,
    network,
    note,
    refuse,
    split_host,
    target_authority,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

ORIG = "wsgistack.proxy.orig"
# A pair starts only where no token character or space is before it: without the look-behind, findall
# tried every position inside a long run of them, and a header of 32,000 letters took seconds (ReDoS).
# An unquoted value is runs of non-space joined by spaces, so the spaces after it are left to the \s* that
# follows in one way only: as a lazy [^;]*?, every character it took again ran \s* over the rest of a
# run of spaces inside the value, and 64,000 of them took 16 seconds.
_PAIR = re.compile(r'(?<![!#$%&\'*+.^_`|~0-9A-Za-z\s-])\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*'
                   r'("(?:[^"\\]|\\.)*"|[^;\s]*(?:\s+[^;\s]+)*)\s*(?:;|$)')
_DEFAULT_PORTS = {"http": "80", "https": "443"}
#: The scheme a forwarded ``proto`` names, as ``wsgi.url_scheme`` says it.  Traefik forwards a WebSocket
#: handshake with ``ws`` or ``wss`` (RFC 6455 §3): an HTTP request over TCP or over TLS.
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
#: An absolute path of RFC 3986 characters that does not start with ``//``: ``SCRIPT_NAME`` begins the URLs the
#: app builds, and ``//evil.example`` (or ``/\t/evil.example``, a tab browsers and werkzeug drop) would make a
#: redirect to ``url_for(…)`` leave the site; a backslash reads as ``/`` in browsers, ``?``/``#`` end the path.
_PREFIX = re.compile(r"/(?:[A-Za-z0-9._~!$&'()*+,;=:@%-][A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?")
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _trusted_proxy(entry: str) -> str:
    """One ``trusted_proxies`` entry, checked on its own: each bad one is reported at its place in the list."""
    if entry != UNIX:
        try:
            ipaddress.ip_network(entry)
        except ValueError as exc:
            raise ValueError(f"trusted_proxies entry {entry!r} is not an address or "
                             f"CIDR network, nor 'unix' ({exc})") from None
    return entry


TrustedProxy = Annotated[str, AfterValidator(_trusted_proxy)]


class ProxyOptions(LayerOptions):
    """Options of the ``proxy`` layer (see :class:`ProxyMiddleware`)."""

    x_for: int = Field(default=0, ge=0)
    x_proto: int = Field(default=0, ge=0)
    x_host: int = Field(default=0, ge=0)
    x_port: int = Field(default=0, ge=0)
    x_prefix: int = Field(default=0, ge=0)
    forwarded: int = Field(default=0, ge=0)
    trusted_proxies: tuple[TrustedProxy, ...] = ("127.0.0.1/32", "::1/128")
    allowed_hosts: tuple[str, ...] = ()

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return host_names(value, "allowed_hosts")  # (one that is no host name would never match: a typo)

    @model_validator(mode="after")
    def _one_scheme(self) -> ProxyOptions:
        if self.forwarded and any((self.x_for, self.x_proto, self.x_host, self.x_port, self.x_prefix)):
            raise ValueError(
                "forwarded may not be combined with x_for, x_proto, x_host, x_port or x_prefix: "
                "trust the one header scheme your proxy sets (a client can forge the other)")
        return self


#: The ``trusted_proxies`` entry for a proxy that connects over a Unix socket.
UNIX = "unix"


class ProxyMiddleware:
    """Apply forwarding headers from trusted proxies and check the host.

    Options:
      ``x_for``, ``x_proto``, ``x_host``, ``x_port``, ``x_prefix``: how many
      proxies set that ``X-Forwarded-*`` header; the value is taken that many
      entries from the right (0, the default, ignores the header).
      ``forwarded``: the same for RFC 7239 ``Forwarded`` (``for``, ``proto``,
      ``host``); refused together with any ``x_*``.
      ``trusted_proxies``: CIDRs of the peers whose headers count (default
      loopback only); ``unix`` trusts a peer on a Unix socket (no address).
      ``allowed_hosts``: host names (``api.example.org``,
      ``*.example.org`` for subdomains, ``*`` for any) or IP addresses
      (``::1`` or ``[::1]``, in any spelling) the request's host,
      port aside, must be one of; empty allows any.  Invalid values are
      ignored, as if the header were absent.

    Usage::

        opts = ProxyMiddleware.Options(x_for=1, x_proto=1, trusted_proxies=("10.0.0.0/8",))
        app = ProxyMiddleware(app, opts, Context())
    """

    Options = ProxyOptions

    def __init__(self, app: WSGIApplication, options: ProxyOptions, context: Context) -> None:
        self.app = app
        self.options = options
        self.networks: tuple[_Network, ...] = tuple(network(n) for n in options.trusted_proxies if n != UNIX)
        #: A proxy on a Unix socket: the peer has no address (gunicorn gives "", Waitress "localhost"
        #: with no port), so it can only be trusted by name.
        self.unix = UNIX in options.trusted_proxies
        self.trusted = lru_cache(maxsize=4096)(self._trusted)
        self.x_headers = [(hops, key) for hops, key in (
            (options.x_for, "HTTP_X_FORWARDED_FOR"), (options.x_proto, "HTTP_X_FORWARDED_PROTO"),
            (options.x_host, "HTTP_X_FORWARDED_HOST"), (options.x_port, "HTTP_X_FORWARDED_PORT"),
            (options.x_prefix, "HTTP_X_FORWARDED_PREFIX")) if hops]
        self.allowed_hosts = HostList(options.allowed_hosts) if options.allowed_hosts else None

    def _trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def derive(self, environ: WSGIEnvironment) -> dict[str, str]:
        """What the trusted headers say: ``{"for", "proto", "host", "port", "prefix"}`` (valid ones)."""
        found: dict[str, str] = {}
        if self.options.forwarded:
            element = _nth_from_right(environ.get("HTTP_FORWARDED"), self.options.forwarded)
            found_pairs = [(k.lower(), v) for k, v in _PAIR.findall(element or "")]
            pairs = dict(found_pairs)
            if len(pairs) < len(found_pairs):
                # RFC 7239 §4: a parameter occurs once per element.  A second is text the proxy copied in (a
                # Host of "a;for=198.51.100.7" in "for=$remote_addr;host=$host"), and the last one the client's.
                pairs = {}
            for key in ("for", "proto", "host"):
                if key in pairs:
                    value = pairs[key]
                    found[key] = value[1:-1].replace('\\"', '"') if value[:1] == '"' else value
        else:
            for hops, key in self.x_headers:
                value = _nth_from_right(environ.get(key), hops)
                if value:
                    found[key[17:].lower()] = value
        checked: dict[str, str] = {}
        if not found:
            return checked
        if "for" in found and (ip := _address(found["for"])) is not None:
            checked["for"] = ip
        if "proto" in found and (proto := _SCHEMES.get(found["proto"].lower())) is not None:
            checked["proto"] = proto
        if "host" in found and (match := HOST_PORT.fullmatch(found["host"])):
            name, port = match.groups()  # a port as X-Forwarded-Port's: 1-65535, one spelling
            if port is None:
                checked["host"] = name
            elif 0 < int(port) < 65536:
                checked["host"] = f"{name}:{int(port)}"
        # (isdigit() alone takes "²", a latin-1 byte a header can carry, which int() refuses.)
        if "port" in found and found["port"].isascii() and found["port"].isdigit() \
                and 0 < int(found["port"]) < 65536:
            checked["port"] = str(int(found["port"]))
        if "prefix" in found and _PREFIX.fullmatch(prefix := found["prefix"]):
            checked["prefix"] = prefix.rstrip("/")
        return checked

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        get = environ.get
        peer = get("REMOTE_ADDR") or ""
        environ.pop(CLIENT_IP, None)
        environ[ORIG] = {"REMOTE_ADDR": get("REMOTE_ADDR"), "wsgi.url_scheme": get("wsgi.url_scheme"),
                         "HTTP_HOST": get("HTTP_HOST"), "SERVER_PORT": get("SERVER_PORT"),
                         "SCRIPT_NAME": get("SCRIPT_NAME")}
        trusted = len(peer) <= LONGEST_ADDRESS and self.trusted(peer)  # (longer text is no address: not cached)
        if trusted or (self.unix and peer in ("", "localhost") and not str(get("REMOTE_PORT") or "").isdigit()):
            found = self.derive(environ)
            if "for" in found:
                environ["REMOTE_ADDR"] = environ[CLIENT_IP] = found["for"]
            if "proto" in found:
                environ["wsgi.url_scheme"] = found["proto"]
            host = found.get("host")
            port = found.get("port")
            if host is not None or port is not None:
                host = host or get("HTTP_HOST") or get("SERVER_NAME", "")
                name, _, own_port = split_host(host)
                port = port or own_port or _DEFAULT_PORTS.get(environ["wsgi.url_scheme"], "80")
                environ["SERVER_PORT"] = port
                default = port == _DEFAULT_PORTS.get(environ["wsgi.url_scheme"])
                environ["HTTP_HOST"] = name if default else f"{name}:{port}"
            if "prefix" in found:
                environ["SCRIPT_NAME"] = found["prefix"]
            if TRACE in environ:
                note(environ, "proxy", f"peer {peer} is trusted; applied {', '.join(found) or 'nothing'}")
        elif TRACE in environ:
            note(environ, "proxy", f"peer {peer} is not in trusted_proxies; headers ignored")
        # Else the peer, read as client_ip() reads it: Waitress's own trusted_proxy splits an IPv4-mapped
        # client (::ffff:192.0.2.7) at its last colon, and "::ffff" would be every such client's address.
        client_ip(environ)
        if self.allowed_hosts is not None:
            host = get("HTTP_HOST") or get("SERVER_NAME", "")
            # An absolute-form target's authority becomes the host further in (RFC 9112 §3.2.2): both must do.
            authority = target_authority(get("REQUEST_URI") or get("RAW_URI"))
            for name in (host,) if authority is None else (host, authority):
                if not HOST_PORT.fullmatch(name) or not self.allowed_hosts.allow(host_name(name)):
                    note(environ, "proxy", "host is not in allowed_hosts")
                    raise refuse(400, "The request's host is not one this server answers for "
                                      "(allowed_hosts).")
        return self.app(environ, start_response)


def derive_client(environ: WSGIEnvironment) -> dict[str, Any]:
    """Summarise who the request is from after the proxy layer ran (for ``serve.py explain``)."""
    orig = environ.get(ORIG) or {}
    return {
        "client_ip": environ.get(CLIENT_IP) or environ.get("REMOTE_ADDR") or "",
        "peer": orig.get("REMOTE_ADDR", environ.get("REMOTE_ADDR")),
        "scheme": environ.get("wsgi.url_scheme"),
        "host": environ.get("HTTP_HOST") or environ.get("SERVER_NAME"),
        "port": environ.get("SERVER_PORT"),
        "script_name": environ.get("SCRIPT_NAME", ""),
        "rewritten": sorted(k for k, v in orig.items() if environ.get(k) != v),
    }


def _nth_from_right(value: str | None, hops: int) -> str | None:
    """The ``hops``-th element of a comma-separated header, counted from the right (1 = last).

    Elements are read from the right, where the trusted proxies appended
    theirs, so nothing a client wrote further left (an unclosed quote, say)
    can swallow them.  A comma inside a quoted string does not split.
    """
    if not value:
        return None
    if '"' not in value:
        items = value.split(",")
        return items[-hops].strip() if len(items) >= hops else None
    pieces = value.split(",")
    found = 0
    while pieces:
        parts = [pieces.pop()]
        quotes = _quotes(parts[0])
        while quotes % 2 and pieces:  # a comma inside quotes: the piece before it belongs to this element
            parts.append(pieces.pop())
            quotes += _quotes(parts[-1])  # (counted per piece: recounting the joined text was quadratic)
        if quotes % 2:
            return None  # an unbalanced quote left of the elements asked for
        found += 1
        if found == hops:
            return ",".join(reversed(parts)).strip()
    return None


def _quotes(text: str) -> int:
    """How many double quotes in ``text`` open or close a quoted string (``\\"`` does neither, ``\\\\"`` does)."""
    if "\\" not in text:
        return text.count('"')
    count, escaped = 0, False
    for char in text:  # (only for an element with a backslash in it: rare)
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            count += 1
    return count


def _address(value: str) -> str | None:
    """A valid IP address from ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]`` or ``[::1]:80``.

    An IPv4-mapped IPv6 address (``::ffff:203.0.113.9``, what a dual-stack proxy may
    write) is its IPv4 address, as the peer's is: one client, one address in logs and keys.
    Text longer than any address (``LONGEST_ADDRESS``: a zone longer than an interface name
    too) is none, refused before the cache, which thus holds at most 4096 short texts.
    """
    return None if len(value) > LONGEST_ADDRESS else _parsed_address(value)


@lru_cache(maxsize=4096)
def _parsed_address(value: str) -> str | None:
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address)
