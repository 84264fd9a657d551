"""Stage 3: the typed shape of stack.yaml outside the pipeline (server, stores, app, reload)."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ProxyHeader = Literal[
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-by",
    "forwarded",
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReloadOptions(Strict):
    """Hot reload: SIGHUP always re-reads stack.yaml; ``watch`` also polls its mtime."""

    watch: bool = False
    interval: float = Field(default=1.0, gt=0)


class ServerOptions(Strict):
    """Waitress adjustments (validated; unknown keys refused) plus process settings."""

    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:8889"])
    threads: int = Field(default=8, ge=1, le=512)
    connection_limit: int = Field(default=100, ge=1)
    channel_timeout: int = Field(default=120, ge=1)
    cleanup_interval: int = Field(default=30, ge=1)
    backlog: int = Field(default=1024, ge=1)
    max_request_body_size: int = Field(default=1_073_741_824, ge=0)
    max_request_header_size: int = Field(default=262_144, ge=1024)
    trusted_proxy: str | None = None
    trusted_proxy_count: int | None = Field(default=None, ge=1)
    trusted_proxy_headers: list[ProxyHeader] = Field(default_factory=list)
    clear_untrusted_proxy_headers: bool = True
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
    reload: ReloadOptions = Field(default_factory=ReloadOptions)

    @field_validator("listen", mode="before")
    @classmethod
    def _listen_list(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

    @field_validator("listen")
    @classmethod
    def _listen_form(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("listen needs at least one HOST:PORT")
        for item in value:
            _, sep, port = item.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"listen entries are HOST:PORT, e.g. 127.0.0.1:8889 or [::1]:8889; {item!r} is not")
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
        return self

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

    def waitress_kwargs(self) -> dict[str, Any]:
        """The adjustments as Waitress takes them."""
        kw: dict[str, Any] = {
            "listen": " ".join(self.listen),
            "threads": self.threads,
            "connection_limit": self.connection_limit,
            "channel_timeout": self.channel_timeout,
            "cleanup_interval": self.cleanup_interval,
            "backlog": self.backlog,
            "max_request_body_size": self.max_request_body_size,
            "max_request_header_size": self.max_request_header_size,
            "clear_untrusted_proxy_headers": self.clear_untrusted_proxy_headers,
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


class LoggingOptions(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


TOP_LEVEL = ("server", "stores", "app", "pipeline", "logging")
