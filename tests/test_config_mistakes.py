"""Mistakes operators make in stack.yaml: each is refused with its place, its key path and the right fix."""

from __future__ import annotations

import pytest

from config import ConfigError, build_from_text

ECHO = 'app: {factory: "stack_support:echo_app"}\n'
PROXY_KNOWN = "(known: x_for, x_proto, x_host, x_port, x_prefix, forwarded, trusted_proxies, allowed_hosts)"
PROXYFIX = "werkzeug.middleware.proxy_fix:ProxyFix"


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    """Every problem line for a stack.yaml text named ``stack.yaml``."""
    with pytest.raises(ConfigError) as info:
        build_from_text(text, file="stack.yaml", env=env or {})
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(("key", "meant"), [
    pytest.param("x_forwarded_for", "x_for", id="x_forwarded_for"),
    pytest.param("x_forwarded_proto", "x_proto", id="x_forwarded_proto"),
    pytest.param("x_forwarded_host", "x_host", id="x_forwarded_host"),
    pytest.param("x_forwarded_port", "x_port", id="x_forwarded_port"),
    pytest.param("x_forwarded_prefix", "x_prefix", id="x_forwarded_prefix"),
    pytest.param("X-Forwarded-For", "x_for", id="the header's own spelling"),
    pytest.param("x_forwarded", "x_for", id="x_forwarded"),
])
def test_an_x_forwarded_option_is_never_taken_for_forwarded(key: str, meant: str) -> None:
    """``forwarded`` reads RFC 7239 Forwarded, which a proxy that sets X-Forwarded-For passes on from
    the client: following a hint to it would let any client choose its address."""
    assert errors_of(ECHO + f"pipeline:\n  - proxy: {{{key}: 1}}\n") == [
        f"stack.yaml:3:13 pipeline[0].proxy.{key}: unknown key {key!r}; did you mean {meant!r}? {PROXY_KNOWN}"]


@pytest.mark.parametrize(("key", "hint"), [
    pytest.param("x_forwarded_for", "; did you mean 'x_for'?", id="x_forwarded_for"),
    pytest.param("x_forwarded_server", "", id="a header with no option: no hint"),
])
def test_an_x_forwarded_option_of_werkzeugs_proxyfix(key: str, hint: str) -> None:
    assert errors_of(ECHO + f"pipeline:\n  - {PROXYFIX}: {{{key}: 1}}\n") == [
        f"stack.yaml:3:46 pipeline[0].{PROXYFIX}.{key}: unknown option {key!r} for {PROXYFIX}{hint} "
        "(known: x_for, x_proto, x_host, x_port, x_prefix)"]


def test_an_unknown_x_forwarded_header_gets_no_hint_to_forwarded() -> None:
    assert errors_of(ECHO + "pipeline:\n  - proxy: {x_forwarded_server: 1}\n") == [
        f"stack.yaml:3:13 pipeline[0].proxy.x_forwarded_server: unknown key 'x_forwarded_server' {PROXY_KNOWN}"]
