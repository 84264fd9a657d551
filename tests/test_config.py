"""Loading, validating and folding stack.yaml: the error text operators read."""

from __future__ import annotations

from typing import Any

import pytest
from webtest import TestApp

from config import ConfigError, build_from_dict, build_from_text, read_text
from config.registry import LAYERS, resolve

ECHO = 'app: {factory: "stack_support:echo_app"}\n'


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    """Every problem line for a stack.yaml text named ``stack.yaml``."""
    with pytest.raises(ConfigError) as info:
        build_from_text(text, file="stack.yaml", env=env or {})
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            ECHO + "pipeline:\n  - errors: {}\n  - corz: {}\n",
            "stack.yaml:4:5 pipeline[1]: unknown layer 'corz'; did you mean 'cors'?",
            id="unknown layer, did you mean",
        ),
        pytest.param(
            ECHO + "server:\n  thread: 4\n",
            "stack.yaml:3:3 server.thread: unknown key 'thread'; did you mean 'threads'?",
            id="unknown server key",
        ),
        pytest.param(
            ECHO + "server:\n  threads: many\n",
            "stack.yaml:3:12 server.threads: Input should be a valid integer, unable to parse string as an "
            "integer (got 'many')",
            id="bad type names the value",
        ),
        pytest.param(
            ECHO + "server:\n  drain_timeout: -1\n",
            "stack.yaml:3:18 server.drain_timeout: Input should be greater than or equal to 0 (got -1)",
            id="negative drain timeout",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {format: html}\n",
            "stack.yaml:3:22 pipeline[0].errors.format: Input should be 'envelope' or 'problem' (got 'html')",
            id="layer option literal",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {formt: problem}\n",
            "stack.yaml:3:14 pipeline[0].errors.formt: unknown key 'formt'; did you mean 'format'?",
            id="layer option typo",
        ),
        pytest.param(
            ECHO + "pipelin: []\n",
            "stack.yaml:2:1 pipelin: unknown top-level key 'pipelin'; did you mean 'pipeline'?",
            id="top-level typo",
        ),
        pytest.param(
            ECHO + "server:\n  listen: ${PORTX}\n",
            "stack.yaml:3:11 server.listen: environment variable PORTX is not set and has no default",
            id="missing env var names its line",
        ),
        pytest.param(
            ECHO + "server:\n  listen: !!python/object/apply:os.system [echo]\n",
            "stack.yaml:3:11 server.listen: the YAML tag '!!python/object/apply:os.system' is not allowed",
            id="python tags refused",
        ),
        pytest.param(
            ECHO + "server:\n  threads: 2\n  threads: 3\n",
            "stack.yaml:4:3 server.threads: duplicate key 'threads'",
            id="duplicate keys",
        ),
        pytest.param(
            ECHO + "server:\n  trusted_proxy_headers: [x-forwarded-for, forwarded]\n  trusted_proxy: 10.0.0.1\n",
            "stack.yaml:3:3 server: trusted_proxy_headers may not trust both 'forwarded' and X-Forwarded-*",
            id="two proxy-header schemes refused",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {paths: [api/*]}\n",
            "stack.yaml:3:22 pipeline[0].errors.paths[0]: paths patterns start with '/' (got 'api/*')",
            id="scope path must be absolute",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {methods: [FETCH]}\n",
            "stack.yaml:3:24 pipeline[0].errors.methods[0]: unknown HTTP method",
            id="scope method",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - nosuchmodule:Thing: {}\n",
            "stack.yaml:3:5 pipeline[0]: cannot import layer 'nosuchmodule:Thing': No module named 'nosuchmodule'",
            id="dotted path import error",
        ),
        pytest.param(
            ECHO + "stores:\n  shared: mongo://x\n",
            "stack.yaml:3:11 stores.shared: unknown store scheme 'mongo://'",
            id="unknown store scheme",
        ),
        pytest.param(
            "app: {factory: 'nope:create'}\n",
            "stack.yaml:1:16 app.factory: cannot import the app factory: No module named 'nope'",
            id="bad app factory",
        ),
        pytest.param(
            ECHO + "server: {listen: '0.0.0.0:8080'}\npipeline:\n  - errors: {debug: true}\n",
            "stack.yaml:4:5 pipeline[0]: errors: debug may be true only when the server listens on loopback only",
            id="debug refused on a public listener",
        ),
        pytest.param(
            ECHO + "pipeline: [\n",
            "stack.yaml:3:1 (top level): invalid YAML",
            id="yaml syntax error",
        ),
    ],
)
def test_error_messages(text: str, expected: str) -> None:
    lines = errors_of(text)
    assert any(line.startswith(expected) for line in lines), lines


def test_every_problem_is_reported_at_once() -> None:
    lines = errors_of(ECHO + "server:\n  thread: 4\npipeline:\n  - corz: {}\n  - errors: {format: html}\n")
    assert len(lines) == 3


def test_interpolation_with_defaults_and_escapes() -> None:
    doc = read_text("a: ${A}\nb: ${B:-fallback}\nc: $${LITERAL}\nd: x-${A}-y\ne: ${E:-}\n", env={"A": "1"})
    assert doc.data == {"a": "1", "b": "fallback", "c": "${LITERAL}", "d": "x-1-y", "e": ""}


def test_interpolated_values_are_validated_with_their_line() -> None:
    lines = errors_of(ECHO + "server:\n  threads: ${THREADS:-lots}\n")
    assert lines[0].startswith("stack.yaml:3:12 server.threads: Input should be a valid integer")


def test_registry_resolves_every_built_in() -> None:
    for name in LAYERS:
        target = resolve(name)
        assert target.__name__.endswith("Middleware"), name
        assert hasattr(target, "Options"), name


def test_fold_order_first_entry_is_outermost() -> None:
    built = build_from_text(ECHO + """
pipeline:
  - stack_support:Tag: {name: first}
  - stack_support:Tag: {name: second}
  - stack_support:Tag: {name: third}
""")
    assert TestApp(built.app).get("/x").json["layers"] == ["first", "second", "third"]


def test_default_errors_layer_is_added() -> None:
    built = build_from_text(ECHO + "pipeline: []\n")
    assert built.layers[0].implicit and built.layers[0].name == "errors"
    response = TestApp(built.app).get("/boom", status=500)
    assert response.content_type == "application/json"
    assert "secret" not in response.text


@pytest.mark.parametrize(
    ("scope", "path", "method", "applied"),
    [
        pytest.param({"paths": ["/api/*"]}, "/api/v1/search", "GET", True, id="glob matches"),
        pytest.param({"paths": ["/api/*"]}, "/other", "GET", False, id="glob misses"),
        pytest.param({"paths": ["/api/*"]}, "/API/v1", "GET", False, id="case-sensitive"),
        pytest.param({"paths": ["/api/*"], "exclude_paths": ["/api/*/health"]}, "/api/v1/health", "GET", False,
                     id="excluded"),
        pytest.param({"methods": ["POST"]}, "/api/x", "GET", False, id="method outside"),
        pytest.param({"methods": ["post"]}, "/api/x", "POST", True, id="method inside, any case"),
        pytest.param({"paths": ["/caf\u00e9/*"]}, "/caf%C3%A9/x", "GET", True, id="percent-decoded path"),
    ],
)
def test_scope(scope: dict[str, Any], path: str, method: str, applied: bool) -> None:
    built = build_from_dict({
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [{"stack_support:Tag": {"name": "scoped", **scope}}],
    })
    response = TestApp(built.app).request(path, method=method)
    assert ("scoped" in response.json["layers"]) is applied


def test_werkzeug_proxyfix_as_is() -> None:
    built = build_from_dict({
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [{"werkzeug.middleware.proxy_fix:ProxyFix": {"x_for": 1}}],
    })
    body = TestApp(built.app).get("/", headers={"X-Forwarded-For": "203.0.113.9"},
                                  extra_environ={"REMOTE_ADDR": "127.0.0.1"}).json
    assert body["remote_addr"] == "203.0.113.9"


def test_layer_spec_repr_names_position_and_scope() -> None:
    built = build_from_text(ECHO + "pipeline:\n  - stack_support:Tag: {name: a, paths: ['/api/*']}\n")
    assert repr(built.layers[1]) == "<pipeline[0] stack_support:Tag Scope(paths=['/api/*'])>"


def test_relative_var_dir_is_resolved_against_the_config_folder(tmp_path: Any) -> None:
    built = build_from_text(ECHO.replace("}", ", options: {var_dir: data}}"), base_dir=tmp_path)
    assert built.config.app.options["var_dir"] == str(tmp_path / "data")
