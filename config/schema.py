"""Stage 3: the typed shape of stack.yaml outside the pipeline (server, stores, app, reload)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from middleware.base import header_text, no_boolean_numbers

ProxyHeader = Literal[
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-by",
    "forwarded",
]


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_LISTEN_FORMS = "HOST:PORT, e.g. 127.0.0.1:8889, [::1]:8889 or localhost:8889"


def split_listen(item: str) -> tuple[str, int]:
    """``(host, port)`` of one ``listen`` entry; IPv6 hosts without their brackets.

    The host is an IPv4 address, a bracketed IPv6 address or a host name;
    anything else raises ``ValueError`` with the reason and the spelling to use.
    """
    if not isinstance(item, str):
        raise ValueError(f"listen entries are {_LISTEN_FORMS}")
    if "://" in item:
        url = urlsplit(item)
        try:
            url_port = url.port
        except ValueError:
            url_port = None
        host = f"[{url.hostname}]" if url.hostname and ":" in url.hostname else url.hostname
        raise ValueError(f"listen takes an address, not a URL; write {host or '127.0.0.1'}:{url_port or 'PORT'}")
    entries = item.split()
    if len(entries) > 1 and all(all(entry.rpartition(":")) for entry in entries):
        # a list item holding several (["${LISTEN}"] with LISTEN="a:1 b:2")
        raise ValueError(f"one address per list item: write [{', '.join(entries)}], or the addresses as one text "
                         f"without brackets (listen: {' '.join(entries)})")
    if "," in item:
        entries = [_bracketed(part.strip()) for part in item.split(",") if part.strip()]
        raise ValueError(f"one address per entry: separate them with spaces ({' '.join(entries)}) or write a list "
                         f"([{', '.join(entries)}])")
    if item.startswith("["):
        close = item.find("]")
        if close < 0:
            raise ValueError("the address opens '[' but never closes it; write it like [::1]:8889")
        host, rest = item[1:close], item[close + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"no :PORT follows the bracketed address; write it like [{host}]:8889")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"the brackets hold an IPv6 address, and {host!r} is not one") from None
    else:
        host, sep, port = item.rpartition(":")
        if not sep:
            raise ValueError(f"listen entries are {_LISTEN_FORMS}; this one has no port")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets; write [{host}]:{port}")
        if host == "*":
            raise ValueError(f"'*' is not a host here; write 0.0.0.0:{port} for every IPv4 interface, "
                             f"[::]:{port} for every IPv6 one, or list both")
        if not host:
            raise ValueError(f"no host is named; write 127.0.0.1:{port} for this machine only or "
                             f"0.0.0.0:{port} for every interface")
        _check_host(host)
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:  # ('²' is a digit to isdigit)
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _bracketed(item: str) -> str:
    """``::1:8889`` as ``[::1]:8889``: an IPv6 address, spelled as a listen entry must be."""
    host, _, port = item.rpartition(":")
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else item


def _check_host(host: str) -> None:
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
        return
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"{host!r} is neither an IP address nor a host name")


def _listen_entry(item: str) -> str:
    split_listen(item)
    return item


def _same_socket(item: str) -> tuple[str, int]:
    """What two entries must not share: the address (in one spelling) and the port."""
    host, port = split_listen(item)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return host.lower().removesuffix("."), port


def _trusted_proxy(value: str | None) -> str | None:
    if value is None or value == "*":
        return value
    try:
        return str(ipaddress.ip_address(value))  # as Waitress will see the peer: ::1, not 0:0:0:0:0:0:0:1
    except ValueError:
        pass
    what = "not a network" if "/" in value else f"and {value!r} is not one"
    raise ValueError(
        f"trusted_proxy is one IP address (or '*'), {what}: Waitress compares it as text with the peer's "
        f"address, so {value!r} would never match; for several proxies or a network, leave trusted_proxy unset "
        "and add the proxy layer right after errors, e.g. proxy: {x_for: 1, trusted_proxies: [10.0.0.0/8]}"
    )


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    _numbers = field_validator("*", mode="before")(classmethod(no_boolean_numbers))


class ReloadOptions(Strict):
    """Hot reload: SIGHUP always re-reads stack.yaml; ``watch`` also polls its mtime."""

    watch: bool = False
    #: Seconds between two looks at the file (0.01 to 3600).
    interval: float = Field(default=1.0, ge=0.01, le=3600)


class ServerOptions(Strict):
    """Waitress adjustments (validated; unknown keys refused) plus process settings."""

    listen: list[Annotated[str, AfterValidator(_listen_entry)]] = Field(default_factory=lambda: ["127.0.0.1:8889"])
    threads: int = Field(default=8, ge=1, le=512)
    connection_limit: int = Field(default=100, ge=1)
    channel_timeout: int = Field(default=120, ge=1)
    cleanup_interval: int = Field(default=30, ge=1)
    backlog: int = Field(default=1024, ge=1, le=65535)  # the kernel caps it at net.core.somaxconn anyway
    max_request_body_size: int = Field(default=1_073_741_824, ge=0)
    max_request_header_size: int = Field(default=262_144, ge=1024)
    #: One IP address (or ``*``) whose forwarding headers Waitress believes.
    trusted_proxy: Annotated[str | None, AfterValidator(_trusted_proxy)] = None
    trusted_proxy_count: int | None = Field(default=None, ge=1)
    trusted_proxy_headers: list[ProxyHeader] = Field(default_factory=list)
    #: Whether Waitress removes the forwarding headers it does not trust before any layer runs.
    #: ``None`` (auto): false when a layer reads them itself (the ``proxy`` layer, werkzeug's
    #: ``ProxyFix``) and ``trusted_proxy`` is unset, true otherwise.
    clear_untrusted_proxy_headers: bool | None = None
    log_untrusted_proxy_headers: bool = False
    url_scheme: Literal["http", "https"] = "http"
    url_prefix: str = ""
    ident: str = "wsgistack"
    #: Number of Waitress processes serving the listen addresses (1 = no fork).
    workers: int = Field(default=1, ge=1, le=64)
    #: Add ``X-Stack-Generation`` to every response (the config generation).
    generation_header: bool = False
    #: Seconds a stopping server (SIGTERM, SIGINT) gives requests in flight before closing them;
    #: ``$WSGISTACK_DRAIN_SECONDS`` overrides it.
    drain_timeout: float = Field(default=10.0, ge=0, le=3600)
    #: With workers: seconds a worker's serving loop may go without a pass before the supervisor
    #: kills it (and starts another); 0 turns the watch off.
    worker_timeout: float = Field(default=30.0, ge=0, le=3600)
    reload: ReloadOptions = Field(default_factory=ReloadOptions)

    @field_validator("reload", mode="before")
    @classmethod
    def _reload_mapping(cls, value: Any) -> Any:
        if isinstance(value, bool):  # reload: true, as other servers spell it
            raise ValueError(f"reload takes a mapping: write reload: {{watch: {str(value).lower()}}} (SIGHUP re-reads "
                             "the file either way; watch also polls it)")
        return value

    @field_validator("worker_timeout")
    @classmethod
    def _off_or_a_second(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("must be 0 (off) or at least 1 second: the serving loop passes every 0.2 s when idle, "
                             "and a busy one may take longer")
        return value

    @field_validator("ident")
    @classmethod
    def _ident_is_a_header_value(cls, value: str) -> str:
        """Waitress sends it as the ``Server`` header: a line break would start a header of its own."""
        if value and not header_text(value):
            raise ValueError("ident is sent as the Server header: printable ASCII on one line (no control characters)")
        return value

    @field_validator("listen", mode="before")
    @classmethod
    def _listen_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            if re.fullmatch(r"\s*\[.*\]\s*", value, re.S) and not _is_ipv6(value.strip()[1:-1]):
                # `[a:1, b:2]` from a variable (an entry ends in :PORT, a bare [::1] is told so below)
                entries = [part.strip().strip("'\"") for part in value.strip()[1:-1].split(",")]
                raise ValueError("a list written as text (a variable's value is never read as YAML): write the "
                                 f"addresses separated by spaces, {' '.join(entry for entry in entries if entry)}")
            return value.split()
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"listen takes {_LISTEN_FORMS}, not a bare port: write 127.0.0.1:{value} for this "
                             f"machine only or 0.0.0.0:{value} for every interface")
        if not isinstance(value, list):
            raise ValueError(f"listen takes one {_LISTEN_FORMS}, or a list of them")
        return value

    @field_validator("listen")
    @classmethod
    def _listen_once(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"listen needs at least one {_LISTEN_FORMS}")
        seen: dict[tuple[str, int], int] = {}
        for i, item in enumerate(value):
            key = _same_socket(item)
            if key in seen:
                raise ValueError(f"listen[{i}] repeats listen[{seen[key]}] ({item}): a server cannot listen on "
                                 "one address twice; remove one")
            seen[key] = i
        for i, item in enumerate(value):
            host, port = _same_socket(item)
            wildcard = "::" if ":" in host else "0.0.0.0"
            if host != wildcard and (wildcard, port) in seen:
                where = seen[(wildcard, port)]
                raise ValueError(f"listen[{i}] ({item}) is already covered by listen[{where}] ({value[where]}), "
                                 "which listens on every interface: the second socket could not be bound; "
                                 "remove one")
        return value

    @model_validator(mode="after")
    def _proxy_rules(self) -> ServerOptions:
        headers = set(self.trusted_proxy_headers)
        if "forwarded" in headers and headers - {"forwarded"}:
            raise ValueError(
                "trusted_proxy_headers may not trust both 'forwarded' and X-Forwarded-* headers; pick one scheme"
            )
        if headers and not self.trusted_proxy:
            raise ValueError("trusted_proxy_headers needs trusted_proxy (the address of the proxy to trust)")
        if self.trusted_proxy and not headers:
            raise ValueError(
                "trusted_proxy is set but trusted_proxy_headers is empty; list the headers the proxy sets, "
                "e.g. [x-forwarded-for, x-forwarded-proto]"
            )
        if self.trusted_proxy_count is not None and not self.trusted_proxy:
            raise ValueError("trusted_proxy_count needs trusted_proxy")
        if self.trusted_proxy and self.trusted_proxy != "*":
            self._proxy_can_be_a_peer(ipaddress.ip_address(self.trusted_proxy))
        return self

    def _proxy_can_be_a_peer(self, proxy: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """Waitress compares ``trusted_proxy`` with the peer's address as text, and serve.py's IPv6 sockets
        take IPv6 peers only (IPV6_V6ONLY): a proxy of the other family, or an IPv4-mapped spelling, never
        matches, and every client would share the proxy's address (one rate-limit bucket, allow_from)."""
        mapped = proxy.ipv4_mapped if isinstance(proxy, ipaddress.IPv6Address) else None
        if mapped is not None:
            raise ValueError(f"trusted_proxy {proxy} is an IPv4-mapped address, which no peer ever has here (IPv6 "
                             f"sockets take IPv6 peers only): a proxy at {mapped} reaches an IPv4 listen address "
                             f"as {mapped}; write trusted_proxy: {mapped}")
        families = self.peer_families
        if families is not None and proxy.version not in families:
            other = "IPv6" if proxy.version == 4 else "IPv4"
            raise ValueError(f"trusted_proxy {proxy} is an IPv{proxy.version} address, but every listen address "
                             f"is {other}: a proxy at {proxy} cannot connect to this server, so its forwarding "
                             f"headers would never be trusted; give the proxy's {other} address, or add an "
                             f"IPv{proxy.version} listen address")

    @property
    def peer_families(self) -> frozenset[int] | None:
        """The IP versions a peer can have (IPv6 sockets are IPv6-only); None when a host name is listed."""
        families = set()
        for item in self.listen:
            try:
                families.add(ipaddress.ip_address(split_listen(item)[0]).version)
            except ValueError:
                return None  # a host name: it may resolve to either family
        return frozenset(families)

    @property
    def loopback_only(self) -> bool:
        """True when every listen address is a loopback address."""
        for item in self.listen:
            host = item.rpartition(":")[0].strip("[]")
            if host == "localhost":
                continue
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    return False
            except ValueError:
                return False
        return True

    def clears_proxy_headers(self, *, proxy_layer: bool = False) -> bool:
        """Whether Waitress removes untrusted forwarding headers (``proxy_layer``: a layer reads them itself)."""
        if self.clear_untrusted_proxy_headers is not None:
            return self.clear_untrusted_proxy_headers
        return bool(self.trusted_proxy) or not proxy_layer

    def waitress_kwargs(self, *, proxy_layer: bool = False) -> dict[str, Any]:
        """The adjustments as Waitress takes them (``proxy_layer``: see :meth:`clears_proxy_headers`)."""
        kw: dict[str, Any] = {
            "listen": " ".join(self.listen),
            "threads": self.threads,
            "connection_limit": self.connection_limit,
            "channel_timeout": self.channel_timeout,
            "cleanup_interval": self.cleanup_interval,
            "backlog": self.backlog,
            # Waitress refuses a body (a header block) of max_request_body_size (max_request_header_size)
            # bytes or more: ours are the largest accepted
            "max_request_body_size": self.max_request_body_size + 1,
            "max_request_header_size": self.max_request_header_size + 1,
            "clear_untrusted_proxy_headers": self.clears_proxy_headers(proxy_layer=proxy_layer),
            "log_untrusted_proxy_headers": self.log_untrusted_proxy_headers,
            "url_scheme": self.url_scheme,
            "url_prefix": self.url_prefix,
            "ident": self.ident,
        }
        if self.trusted_proxy:
            kw["trusted_proxy"] = self.trusted_proxy
            kw["trusted_proxy_headers"] = set(self.trusted_proxy_headers)
            kw["trusted_proxy_count"] = self.trusted_proxy_count or 1
        return kw


class StoreSpec(Strict):
    """A named store: a URL plus backend options (timeouts, bounds)."""

    url: str
    options: dict[str, Any] = Field(default_factory=dict)


class AppSection(Strict):
    """The WSGI application at the core: a ``module:attr`` factory and its options."""

    factory: str = "app:create_app"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options", mode="before")
    @classmethod
    def _no_options(cls, value: Any) -> Any:
        return {} if value is None else value  # `options:` with every line commented out, as an empty section


class LoggingOptions(Strict):
    """How ``serve.py`` logs: the level of every logger, and ``text`` lines or one JSON object per line."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


TOP_LEVEL = ("server", "stores", "app", "pipeline", "logging")
