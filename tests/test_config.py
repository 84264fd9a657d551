"""Loading, validating and folding stack.yaml: the error text operators read."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp

from config import ConfigError, build_from_dict, build_from_text, check, read_text
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
            ECHO + "server:\n  channel_timeout: 60s\n",
            "stack.yaml:3:20 server.channel_timeout: Input should be a valid integer, unable to parse string as an "
            "integer; write a plain number, without a unit (seconds: 60, not 60s or 1m) (got '60s')",
            id="a number with a unit",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - versioning: {supported: [v1], default: v1, deprecated: {v1: {deprecation: "
                   "2020-01-01, sunset: next-year}}}\n",
            "stack.yaml:3:99 pipeline[0].versioning.deprecated.v1.sunset: Input should be a valid datetime or date, "
            "input is too short (got 'next-year')",
            id="a value no member of a union takes: one problem, at its key",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - ratelimit: {limits: [1/second], key: {a: 1}}\n",
            "stack.yaml:3:42 pipeline[0].ratelimit.key: Input should be a valid string or list",
            id="a union of a string and a list",
        ),
        pytest.param(
            ECHO + "server:\n  drain_timeout: -1\n",
            "stack.yaml:3:18 server.drain_timeout: Input should be greater than or equal to 0 (got -1)",
            id="negative drain timeout",
        ),
        pytest.param(
            ECHO + "server:\n  worker_timeout: 0.5\n",
            "stack.yaml:3:19 server.worker_timeout: must be 0 (off) or at least 1 second: the serving loop passes "
            "every 0.2 s when idle, and a busy one may take longer (got 0.5)",
            id="worker timeout under a second",
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
            "stack.yaml:4:3 server.threads: duplicate key 'threads' (first at line 3): remove one, or merge them",
            id="duplicate keys",
        ),
        pytest.param(
            ECHO + "server:\n\tthreads: 2\n",
            "stack.yaml:3:1 (top level): invalid YAML: found character '\\t' that cannot start any token; YAML "
            "indents with spaces only: replace the tab with spaces",
            id="a tab",
        ),
        pytest.param(
            ECHO + "server:\n  listen: 127.0.0.1:8000\n threads: 8\n",
            "stack.yaml:4:2 (top level): invalid YAML: expected <block end>, but found '<block mapping start>' "
            "(while parsing a block mapping at line 1, column 1)",
            id="a key indented less than its siblings",
        ),
        pytest.param(
            ECHO + "server:\n  trusted_proxy_headers: [x-forwarded-for, forwarded]\n  trusted_proxy: 10.0.0.1\n",
            "stack.yaml:3:26 server.trusted_proxy_headers: trusted_proxy_headers may not trust both 'forwarded' and "
            "X-Forwarded-*",
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
            "stack.yaml:3:5 pipeline[0]: cannot import layer 'nosuchmodule:Thing': No module named 'nosuchmodule': "
            f"it is not installed in this Python ({sys.executable}) and not in a folder on its path; install it, "
            "or add the folder that holds it to PYTHONPATH",
            id="dotted path import error",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - werkzeug.middleware.proxyfix:ProxyFix: {x_for: 1}\n",
            "stack.yaml:3:5 pipeline[0]: cannot import layer 'werkzeug.middleware.proxyfix:ProxyFix': No module named "
            "'werkzeug.middleware.proxyfix': 'werkzeug.middleware' has no submodule 'proxyfix'; did you mean "
            "'werkzeug.middleware.proxy_fix'?",
            id="a misspelt submodule of an installed package",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - werkzeug.midleware.proxy_fix:ProxyFix: {x_for: 1}\n",
            "stack.yaml:3:5 pipeline[0]: cannot import layer 'werkzeug.midleware.proxy_fix:ProxyFix': No module named "
            "'werkzeug.midleware': 'werkzeug' has no submodule 'midleware'; did you mean "
            "'werkzeug.middleware.proxy_fix'?",
            id="a misspelt package between",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - werkzeug.middleware.zzqq:Thing: {}\n",
            "stack.yaml:3:5 pipeline[0]: cannot import layer 'werkzeug.middleware.zzqq:Thing': No module named "
            "'werkzeug.middleware.zzqq': 'werkzeug.middleware' has no submodule 'zzqq'",
            id="a submodule that nothing is close to",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_suport:Visits: {}\n",
            "stack.yaml:3:5 pipeline[0]: cannot import layer 'stack_suport:Visits': No module named 'stack_suport'; "
            "did you mean 'stack_support'?",
            id="a misspelt module beside others on the path",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - middleware.cors:CorsMiddlewar: {}\n",
            "stack.yaml:3:5 pipeline[0]: cannot import layer 'middleware.cors:CorsMiddlewar': 'middleware.cors' has "
            "no attribute 'CorsMiddlewar'; did you mean 'CORSMiddleware'?",
            id="a misspelt class",
        ),
        pytest.param(
            ECHO + "stores:\n  shared: mongo://x\n",
            "stack.yaml:3:11 stores.shared: unknown store scheme 'mongo://'",
            id="unknown store scheme",
        ),
        pytest.param(
            ECHO + "stores:\n  shared: mem://x\n",
            "stack.yaml:3:11 stores.shared: unknown store scheme 'mem://'; did you mean 'memory://'? (known: "
            "memory://, redis://, rediss://, unix://, redis+sentinel://) (got 'mem://x')",
            id="a misspelt store scheme",
        ),
        pytest.param(
            ECHO + "stores:\n  shared: 'reddis://:hunter2pw@cache:6379/0'\n",
            "stack.yaml:3:11 stores.shared: unknown store scheme 'reddis://'; did you mean 'redis://'? (known: "
            "memory://, redis://, rediss://, unix://, redis+sentinel://) (got 'reddis://:***@cache:6379/0')",
            id="a misspelt store scheme, its password masked",
        ),
        pytest.param(
            ECHO + "stores:\n  shared: 'redis:/:hunter2pw@cache:6379/0'\n",
            "stack.yaml:3:11 stores.shared: store URL 'redis:***@cache:6379/0' has no scheme; write it redis:// "
            "(a colon and two slashes) (known: memory://, redis://, rediss://, unix://, redis+sentinel://)",
            id="a scheme without its two slashes",
        ),
        pytest.param(
            "app: {factory: 'nope:create'}\n",
            "stack.yaml:1:16 app.factory: cannot import the app factory: No module named 'nope'",
            id="bad app factory",
        ),
        pytest.param(
            ECHO + "server: {listen: '0.0.0.0:8080'}\npipeline:\n  - errors: {debug: true}\n",
            "stack.yaml:4:21 pipeline[0].errors.debug: debug may be true only when the server listens on loopback "
            "only, with no proxy forwarding remote clients to it (server.trusted_proxy, a proxy layer) (got True)",
            id="debug refused on a public listener",
        ),
        pytest.param(
            ECHO + "server: {trusted_proxy: 127.0.0.1, trusted_proxy_headers: [x-forwarded-for]}\n"
            "pipeline:\n  - errors: {debug: true}\n",
            "stack.yaml:4:21 pipeline[0].errors.debug: debug may be true only when the server listens on loopback "
            "only, with no proxy",
            id="debug refused behind a trusted proxy on loopback",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {debug: true}\n  - proxy: {x_for: 1}\n",
            "stack.yaml:3:21 pipeline[0].errors.debug: debug may be true only when the server listens on loopback "
            "only, with no proxy",
            id="debug refused with a proxy layer",
        ),
        pytest.param(
            ECHO + "server:\n  reload: {watch: true, interval: .inf}\n",
            "stack.yaml:3:35 server.reload.interval: Input should be less than or equal to 3600 (got inf)",
            id="a poll interval the watcher cannot sleep",
        ),
        pytest.param(
            ECHO + "pipeline: [\n",
            "stack.yaml:3:1 (top level): invalid YAML",
            id="yaml syntax error",
        ),
        pytest.param(
            ECHO + "base: &b {threads: 4}\nserver:\n  <<: *b\n",
            "stack.yaml:4:3 server: YAML merge keys (<<) are not supported; repeat the settings, or quote '<<' if "
            "it is meant as a key",
            id="a merge key",
        ),
        pytest.param(
            ECHO + "server: {threads: yes}\n",
            "stack.yaml:2:19 server.threads: a number is needed, not a boolean (YAML reads yes, no, on, off, true "
            "and false as booleans) (got True)",
            id="a boolean where the server wants a number",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {}\n  - cors: {origins: ['http://a.example'], max_age: on}\n",
            "stack.yaml:4:52 pipeline[1].cors.max_age: a number is needed, not a boolean (YAML reads yes, no, on, "
            "off, true and false as booleans) (got True)",
            id="a boolean where a layer wants a number",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {}\n  - metrics: {buckets: [yes, 2]}\n",
            "stack.yaml:4:24 pipeline[1].metrics.buckets: numbers are needed, not booleans (YAML reads yes, no, on, "
            "off, true and false as booleans)",
            id="booleans among numbers",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {}\n  - cors: {origins: ['http://a.example'], on: 1}\n",
            "stack.yaml:4:43 pipeline[1].cors.on: the key 'on' is read by YAML as the boolean true; write it in "
            "quotes, \"on\", to mean the word",
            id="a key YAML reads as a boolean",
        ),
        pytest.param(
            ECHO + "server: {threads: 2024-13-45}\n",
            "stack.yaml:2:19 server.threads: cannot read the value '2024-13-45' as !!timestamp: month must be in "
            "1..12; quote it to keep it as text",
            id="a value YAML cannot read",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {}\nx: " + "[" * 100 + "]" * 100 + "\n",
            "stack.yaml:4:68 x[0][0][0]: holds values nested more than 64 levels deep; a stack.yaml needs a few levels",
            id="nested deeper than anything a stack needs",
        ),
        pytest.param(
            ECHO + "x: " + "[" * 5000 + "]" * 5000 + "\n",
            "stack.yaml (top level): invalid YAML: nested too deeply",
            id="nested deeper than the YAML reader can follow",
        ),
    ],
)
def test_error_messages(text: str, expected: str) -> None:
    lines = errors_of(text)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(ECHO + "pipeline:\n  - health: {degraded_status: 99}\n",
                 "stack.yaml:3:31 pipeline[0].health.degraded_status: degraded_status must be an HTTP status "
                 "from 200 to 599, got 99", id="message ends with the value"),
    pytest.param(ECHO + "pipeline:\n  - versioning: {supported: [v1], prefix: /api/}\n",
                 "stack.yaml:3:43 pipeline[0].versioning.prefix: prefix must start with '/' and not end with one "
                 "(got '/api/')", id="message quotes the value in parentheses"),
])
def test_a_value_the_message_shows_is_not_repeated(text: str, expected: str) -> None:
    assert expected in errors_of(text)


@pytest.mark.parametrize("text", [
    "pipeline:\n  - versioning: {supported: [v1], default: v1, deprecated: {v1: {deprecation: 2020-01-01, "
    "sunset: next-year}}}\n",
    "pipeline:\n  - ratelimit: {limits: [1/second], key: {a: 1}}\n",
], ids=["dates", "string or list"])
def test_a_union_value_is_one_problem(text: str) -> None:
    assert len(errors_of(ECHO + text)) == 1


def test_every_problem_is_reported_at_once() -> None:
    lines = errors_of(ECHO + "server:\n  thread: 4\npipeline:\n  - corz: {}\n  - errors: {format: html}\n")
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("stores:\n  shared: ${REDIS_URL}\n",
                     "stack.yaml:3:11 stores.shared: store URL '' has no scheme (known: memory://, redis://, "
                     "rediss://, unix://, redis+sentinel://) (from ${REDIS_URL}, which is set but empty) (got '')",
                     id="the value itself"),
        pytest.param("pipeline:\n  - auth: {secret: '${JWT_SECRET}'}\n",
                     "stack.yaml:3:11 pipeline[0].auth: auth needs secret (HS256) or public_keys, jwks_file or "
                     "private_key (RS256/ES256) (secret comes from ${JWT_SECRET}, which is set but empty)",
                     id="a problem of the mapping it is in"),
        pytest.param("stores:\n  a: &url ${REDIS_URL}\n  shared: *url\n",
                     "stack.yaml:3:6 stores.shared: store URL '' has no scheme (known: memory://, redis://, "
                     "rediss://, unix://, redis+sentinel://) (from ${REDIS_URL}, which is set but empty) (got '')",
                     id="an alias of it"),
    ],
)
def test_a_variable_set_to_nothing_is_named(text: str, expected: str) -> None:
    assert expected in errors_of(ECHO + text, {"REDIS_URL": "", "JWT_SECRET": ""})


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        pytest.param("pipeline:\n  - auth: {secret: $JWT_SECRET}\n", {},
                     "stack.yaml:3:20 pipeline[0].auth.secret: $JWT_SECRET is not read from the environment (only "
                     "${JWT_SECRET} is): write ${JWT_SECRET}",
                     id="a secret that would be its own name"),
        pytest.param("server:\n  listen: $LISTEN\n", {},
                     "stack.yaml:3:11 server.listen: $LISTEN is not read from the environment (only ${LISTEN} is): "
                     "write ${LISTEN}, or $$LISTEN for the text $LISTEN", id="a whole value"),
        pytest.param("server:\n  listen: 127.0.0.1:$PORT\n", {"PORT": "8000"},
                     "stack.yaml:3:11 server.listen: $PORT is not read from the environment (only ${PORT} is): "
                     "write ${PORT}, or $$PORT for the text $PORT", id="a variable that is set"),
        pytest.param("pipeline:\n  - session: {secret_key: '${SESSION_SECRET}'}\n", {},
                     "stack.yaml:3:27 pipeline[0].session.secret_key: environment variable SESSION_SECRET is not set "
                     "and has no default: set it in the environment or in the .env file beside the configuration "
                     "(make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))')",
                     id="a missing secret: no default to write"),
        pytest.param("server:\n  listen: ${LISTEN}\n", {},
                     "stack.yaml:3:11 server.listen: environment variable LISTEN is not set and has no default: set "
                     "it in the environment or in the .env file beside the configuration, or write ${LISTEN:-default}",
                     id="a missing variable"),
    ],
)
def test_environment_variables_spelt_as_the_shell_does(text: str, env: dict[str, str], expected: str) -> None:
    assert expected in errors_of(ECHO + text, env)


def test_a_dollar_that_names_no_variable_is_text() -> None:
    doc = read_text("a: pa$word\nb: ^/admin$\nc: $$5\nd: US$ 5\ne: x$$PATH y\nf: $$abc\ng: ${NOPE:-pa$$word}\n",
                    env={"PATH": "/bin"})
    assert doc.data == {"a": "pa$word", "b": "^/admin$", "c": "$5", "d": "US$ 5", "e": "x$PATH y", "f": "$abc",
                        "g": "pa$word"}


def test_interpolation_with_defaults_and_escapes() -> None:
    doc = read_text("a: ${A}\nb: ${B:-fallback}\nc: $${LITERAL}\nd: x-${A}-y\ne: ${E:-}\nf: ${F:-fallback}\n"
                    "g: x${F}y\n", env={"A": "1", "F": ""})
    # ${F:-…} of a variable set but empty is its default, as in the shell and Compose; ${F} is the empty text
    assert doc.data == {"a": "1", "b": "fallback", "c": "${LITERAL}", "d": "x-1-y", "e": "", "f": "fallback",
                        "g": "xy"}


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


@pytest.mark.parametrize(("method", "status"), [
    ("GET", 401), ("HEAD", 401), ("POST", 401), ("PUT", 200), ("OPTIONS", 200),
])
def test_a_scope_listing_get_covers_head(method: str, status: int) -> None:
    """The router answers HEAD with the GET view: a layer scoped to GET must not let HEAD past it."""
    built = build_from_dict({
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [{"auth": {"secret": "s" * 40, "default": "required", "methods": ["GET", "POST"]}}],
    })
    assert TestApp(built.app).request("/api/v1/config", method=method, expect_errors=True).status_int == status


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


def test_a_linked_stack_file_keeps_its_state_beside_the_link(tmp_path: Path) -> None:
    """A Kubernetes ConfigMap: stack.yaml -> ..data/stack.yaml, ..data -> ..2026_a, swapped on every update."""
    import serve
    from config import build_from_file
    from config.live import LiveStack

    real = tmp_path / "..2026_a"
    real.mkdir()
    (real / "stack.yaml").write_text(ECHO.replace("}", ", options: {var_dir: var}}") +
                                     "pipeline:\n  - access_log: {file: access.log}\n")
    (tmp_path / "..data").symlink_to("..2026_a")
    (tmp_path / "stack.yaml").symlink_to("..data/stack.yaml")
    built = build_from_file(tmp_path / "stack.yaml")
    built.close()
    assert built.config.app.options["var_dir"] == str(tmp_path / "var")
    assert (tmp_path / "access.log").exists() and not (real / "access.log").exists()
    (tmp_path / "access.log").unlink()
    assert check(tmp_path / "stack.yaml") == []  # check builds it as serve does
    assert (tmp_path / "access.log").exists() and not (real / "access.log").exists()
    (tmp_path / "access.log").unlink()
    served = LiveStack(tmp_path / "stack.yaml")  # what serve and serve:app build
    served.close()
    assert served.current.config.app.options["var_dir"] == str(tmp_path / "var")
    assert (tmp_path / "access.log").exists() and not (real / "access.log").exists()
    # the users command writes the database the server reads
    assert serve._app_option(str(tmp_path / "stack.yaml"), "users_db", "users.sqlite3") == \
        str(tmp_path / "var" / "users.sqlite3")


# ---------------------------------------------------------------- refused, with the place and the fix


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            ECHO + "pipeline:\n  - request_id:\n      header: ${ID_HEADER-X-Trace-Id}\n",
            "stack.yaml:4:15 pipeline[0].request_id.header: '${ID_HEADER-X-Trace-Id}' is not an interpolation "
            "stack.yaml understands; write ${ID_HEADER:-X-Trace-Id} (the forms are ${NAME} and ${NAME:-default}; "
            "$$ writes a literal $)",
            id="${VAR-default}",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - auth: {secret: '${JWT_SECRET:fallback}'}\n",
            "stack.yaml:3:20 pipeline[0].auth.secret: '${JWT_SECRET:…}' is not an interpolation stack.yaml "
            "understands; write ${JWT_SECRET:-…} (the forms are ${NAME} and ${NAME:-default}; $$ writes a "
            "literal $)",
            id="${VAR:default} of a secret: its default not shown",
        ),
        pytest.param(
            ECHO + "server: {ident: 'x-${NAME'}\n",
            "stack.yaml:2:17 server.ident: '${NAME' opens ${ but never closes it (the forms are ${NAME} and "
            "${NAME:-default}; $$ writes a literal $)",
            id="unclosed ${",
        ),
        pytest.param(
            ECHO + "server: {ident: '${A:-${B}}'}\n",
            "stack.yaml:2:17 server.ident: '${A:-${B}': a default may not contain another ${...}; write the default "
            "as plain text",
            id="nested default",
        ),
        pytest.param(
            "",
            "stack.yaml:1:1 (top level): the file has no settings (it is empty or only comments); a stack needs at "
            "least a pipeline, e.g. pipeline: [errors: {}] (the shipped stack.yaml is a commented example)",
            id="empty file",
        ),
        pytest.param(
            "# nothing but a comment\n\n",
            "stack.yaml:1:1 (top level): the file has no settings (it is empty or only comments)",
            id="comments only",
        ),
        pytest.param(
            ECHO + "server: &s {listen: '127.0.0.1:8889', reload: *s}\n",
            "stack.yaml:2:39 server.reload: this alias refers to a value that contains it (a YAML alias loop); "
            "repeat the settings instead",
            id="self-referencing alias",
        ),
        pytest.param(
            ECHO + "app_note: 2024-13-45\n",
            "stack.yaml:2:11 app_note: cannot read the value '2024-13-45' as !!timestamp: month must be in 1..12; "
            "quote it to keep it as text",
            id="impossible date",
        ),
        pytest.param(
            ECHO + "server: {listen: '*:18005'}\n",
            "stack.yaml:2:18 server.listen[0]: '*' is not a host here; write 0.0.0.0:18005 for every IPv4 "
            "interface, [::]:18005 for every IPv6 one, or list both (got '*:18005')",
            id="listen on *",
        ),
        pytest.param(
            ECHO + "server: {listen: '[::1:18005'}\n",
            "stack.yaml:2:18 server.listen[0]: the address opens '[' but never closes it; write it like "
            "[::1]:8889 (got '[::1:18005')",
            id="listen, unclosed bracket",
        ),
        pytest.param(
            ECHO + "server: {listen: '::1:18005'}\n",
            "stack.yaml:2:18 server.listen[0]: an IPv6 address needs brackets; write [::1]:18005 (got '::1:18005')",
            id="listen, IPv6 without brackets",
        ),
        pytest.param(
            ECHO + "server: {listen: '127.0.0.1:8889,127.0.0.1:8890'}\n",
            "stack.yaml:2:18 server.listen[0]: one address per entry: separate them with spaces (127.0.0.1:8889 "
            "127.0.0.1:8890) or write a list ([127.0.0.1:8889, 127.0.0.1:8890])",
            id="listen, two addresses with a comma",
        ),
        pytest.param(
            ECHO + "server: {listen: 'http://127.0.0.1:8889/'}\n",
            "stack.yaml:2:18 server.listen[0]: listen takes an address, not a URL; write 127.0.0.1:8889",
            id="listen, a URL",
        ),
        pytest.param(
            ECHO + "server: {listen: 'http://localhost'}\n",
            "stack.yaml:2:18 server.listen[0]: listen takes an address, not a URL; write localhost:PORT",
            id="listen, a URL without a port",
        ),
        pytest.param(
            ECHO + "server: {listen: 'http://[::1]:8080/app'}\n",
            "stack.yaml:2:18 server.listen[0]: listen takes an address, not a URL; write [::1]:8080",
            id="listen, a URL with a path",
        ),
        pytest.param(
            ECHO + "server: {listen: '127.0.0.1:8889,::1:8889'}\n",
            "stack.yaml:2:18 server.listen[0]: one address per entry: separate them with spaces (127.0.0.1:8889 "
            "[::1]:8889) or write a list ([127.0.0.1:8889, [::1]:8889])",
            id="listen, a comma before an IPv6 address",
        ),
        pytest.param(
            ECHO + "server:\n  listen: ['127.0.0.1:18005', '127.0.0.1:18005']\n",
            "stack.yaml:3:31 server.listen[1]: listen[1] repeats listen[0] (127.0.0.1:18005): a server cannot "
            "listen on one address twice; remove one (got '127.0.0.1:18005')",
            id="listen twice",
        ),
        pytest.param(
            ECHO + "server:\n  listen: ['0.0.0.0:18005', '127.0.0.1:18005']\n",
            "stack.yaml:3:29 server.listen[1]: listen[1] (127.0.0.1:18005) is already covered by listen[0] "
            "(0.0.0.0:18005), which listens on every interface",
            id="listen inside a wildcard",
        ),
        pytest.param(
            ECHO + "server:\n  listen: ['127.0.0.1:18005', 'localhost:18005']\n",
            "stack.yaml:3:31 server.listen[1]: listen[1] (localhost:18005) is the same address as listen[0] "
            "(127.0.0.1:18005): 127.0.0.1 port 18005; remove one (got 'localhost:18005')",
            id="listen twice, once by name",
        ),
        pytest.param(
            ECHO + "server: {listen: 8889}\n",
            "stack.yaml:2:18 server.listen: listen takes HOST:PORT, e.g. 127.0.0.1:8889, [::1]:8889 or "
            "localhost:8889, not a bare port: write 127.0.0.1:8889 for this machine only or 0.0.0.0:8889 for every "
            "interface (got 8889)",
            id="listen, a bare port",
        ),
        pytest.param(
            ECHO + "server: {listen: '999.1.1.1:80'}\n",
            "stack.yaml:2:18 server.listen[0]: '999.1.1.1' is not an IPv4 address (got '999.1.1.1:80')",
            id="listen, impossible address",
        ),
        pytest.param(
            ECHO + "server: {listen: 'no-such-host.invalid:80'}\n",
            "stack.yaml:2:18 server.listen[0]: cannot resolve the host 'no-such-host.invalid': ",
            id="listen, unknown host",
        ),
        pytest.param(
            ECHO + "server:\n  trusted_proxy: 10.0.0.0/8\n  trusted_proxy_headers: [x-forwarded-for]\n",
            "stack.yaml:3:18 server.trusted_proxy: trusted_proxy is one IP address (or '*'), not a network: "
            "Waitress compares it as text with the peer's address, so '10.0.0.0/8' would never match; for several "
            "proxies or a network, leave trusted_proxy unset and add the proxy layer right after errors, e.g. "
            "proxy: {x_for: 1, trusted_proxies: [10.0.0.0/8]} (got '10.0.0.0/8')",
            id="trusted_proxy, a network",
        ),
        pytest.param(
            ECHO + "server:\n  trusted_proxy: proxy.internal\n  trusted_proxy_headers: [x-forwarded-for]\n",
            "stack.yaml:3:18 server.trusted_proxy: trusted_proxy is one IP address (or '*'), and 'proxy.internal' "
            "is not one: Waitress compares it as text with the peer's address",
            id="trusted_proxy, a host name",
        ),
        pytest.param(
            ECHO + "server:\n  listen: '[::1]:8889'\n  trusted_proxy: 127.0.0.1\n"
                   "  trusted_proxy_headers: [x-forwarded-for]\n",
            "stack.yaml:4:18 server.trusted_proxy: trusted_proxy 127.0.0.1 is an IPv4 address, but every listen "
            "address is IPv6: a proxy at 127.0.0.1 cannot connect to this server, so its forwarding headers would "
            "never be trusted; give the proxy's IPv6 address, or add an IPv4 listen address",
            id="trusted_proxy of a family no listen address takes",
        ),
        pytest.param(
            ECHO + "server:\n  listen: ['127.0.0.1:8889', '[::1]:8889']\n  trusted_proxy: '::ffff:127.0.0.1'\n"
                   "  trusted_proxy_headers: [x-forwarded-for]\n",
            "stack.yaml:4:18 server.trusted_proxy: trusted_proxy ::ffff:7f00:1 is an IPv4-mapped address, which no "
            "peer ever has here (IPv6 sockets take IPv6 peers only): a proxy at 127.0.0.1 reaches an IPv4 listen "
            "address as 127.0.0.1; write trusted_proxy: 127.0.0.1",
            id="trusted_proxy, IPv4-mapped",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {}\n  - auth: {secret: short}\n",
            "stack.yaml:4:20 pipeline[1].auth.secret: secret must be at least 32 bytes for HS256 (it has 5); make "
            "one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'",
            id="a rule between fields, at the field it names (a secret is never shown)",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - versioning:\n      supported: [v1, v2]\n      default: v3\n",
            "stack.yaml:5:16 pipeline[0].versioning.default: default 'v3' is not in supported (v1, v2) (got 'v3')",
            id="versioning default, at default",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - cors: {origins: ['*'], allow_credentials: true}\n",
            "stack.yaml:3:47 pipeline[0].cors.allow_credentials: allow_credentials may not be true when origins "
            "contains '*'; list the origins instead (got True)",
            id="cors credentials with *, at allow_credentials",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - ratelimit:\n      limits: ['10/second', '10/fortnight']\n",
            "stack.yaml:4:29 pipeline[0].ratelimit.limits[1]: '10/fortnight' is not a rate limit; write it like "
            "'10/second' or '100 per minute' (units: second, minute, hour, day, month, year) (got '10/fortnight')",
            id="the bad item of a list",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors:{}\n",
            "stack.yaml:3:5 pipeline[0]: 'errors:{}' is read as one name: YAML needs a space after the colon; "
            "write - errors: {}",
            id="no space after the layer's colon",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - errors: {format:problem}\n",
            "stack.yaml:3:14 pipeline[0].errors.format:problem: unknown key 'format:problem'; YAML needs a space "
            "after the colon: write format: problem",
            id="no space after an option's colon",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_fr: 1}\n",
            "stack.yaml:3:46 pipeline[0].werkzeug.middleware.proxy_fix:ProxyFix.x_fr: unknown option 'x_fr' for "
            "werkzeug.middleware.proxy_fix:ProxyFix; did you mean 'x_for'? (known: x_for, x_proto, x_host, x_port, "
            "x_prefix)",
            id="a factory's keyword arguments",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - ratelimit: {limits: ['4/minute', '4 per 1 minute']}\n",
            "stack.yaml:3:38 pipeline[0].ratelimit.limits[1]: '4 per 1 minute' repeats the limit '4/minute': the "
            "same limit twice counts each request twice (halving it); write it once",
            id="one limit written twice",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support:returns_none: {}\n",
            "stack.yaml:3:5 pipeline[0]: stack_support:returns_none: the factory returned NoneType None, not a WSGI "
            "application (a callable taking environ and start_response)",
            id="a factory that returns nothing",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support:filter_factory: {}\n",
            "stack.yaml:3:5 pipeline[0]: stack_support:filter_factory: the factory returned "
            "filter_factory.<locals>.filt(app: 'Any') -> 'Any', which cannot be called as layer(environ, "
            "start_response); a Paste Deploy filter_factory(global_conf, **local_conf) is not a middleware factory",
            id="a Paste Deploy filter factory",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support:filter_factory: {a: 1, application: x}\n",
            "stack.yaml:3:5 pipeline[0]: stack_support:filter_factory: the factory returned filter_factory.<locals>."
            "filt(app: 'Any') -> 'Any', which cannot be called",
            id="a factory's result at fault, not an option its message happens to name ('a', 'application')",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support:MethodsLayer: {methods: [GET, POST]}\n",
            "stack.yaml:3:34 pipeline[0].stack_support:MethodsLayer.methods: 'methods' here scopes the layer (paths, "
            "exclude_paths and methods are the builder's), but stack_support:MethodsLayer also takes a 'methods' "
            "argument, which stack.yaml cannot set",
            id="a factory argument named like a scope key",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - validation: {deny_patterns: {'${PARAM:-q}': ['<script']}}\n",
            "stack.yaml:3:34 pipeline[0].validation.deny_patterns.${PARAM:-q}: the key '${PARAM:-q}' holds a ${…}, "
            "but keys are not interpolated (only values are): write the key itself",
            id="an interpolation in a key",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support:PlainOptionsLayer: {level: 2}\n",
            "stack.yaml:3:38 pipeline[0].stack_support:PlainOptionsLayer: stack_support:PlainOptionsLayer takes "
            "(app, options, context), as the built-in layers do, so it needs their Options: a class attribute "
            "Options that subclasses middleware.base.LayerOptions (it has Options, not a LayerOptions)",
            id="the layer contract with a plain pydantic model",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support:NoOptionsLayer: {}\n",
            "stack.yaml:3:35 pipeline[0].stack_support:NoOptionsLayer: stack_support:NoOptionsLayer takes "
            "(app, options, context), as the built-in layers do, so it needs their Options: a class attribute "
            "Options that subclasses middleware.base.LayerOptions (it has none)",
            id="the layer contract without Options",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support:AnnounceLayer: {methods: [GET, POST]}\n",
            "stack.yaml:3:35 pipeline[0].stack_support:AnnounceLayer.methods: 'methods' here scopes the layer (paths, "
            "exclude_paths and methods are the builder's), but stack_support:AnnounceLayer's Options also has a "
            "'methods' field, which stack.yaml cannot set: rename the field",
            id="an Options field named like a scope key",
        ),
        pytest.param(
            "app: {factory: 'stack_support:app_returning_text'}\npipeline:\n  - errors: {}\n",
            "stack.yaml:1:16 app.factory: the factory returned str '/srv/app', not a WSGI application (a callable "
            "taking environ and start_response) (got 'stack_support:app_returning_text')",
            id="an app factory that returns no WSGI app",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: many}\n",
            "stack.yaml:3:53 pipeline[0].werkzeug.middleware.proxy_fix:ProxyFix.x_for: "
            "werkzeug.middleware.proxy_fix:ProxyFix takes x_for: int (input should be a valid integer, unable to "
            "parse string as an integer) (got 'many')",
            id="a factory's type hints",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: no}\n",
            "stack.yaml:3:53 pipeline[0].werkzeug.middleware.proxy_fix:ProxyFix.x_for: "
            "werkzeug.middleware.proxy_fix:ProxyFix takes x_for: int (a number is needed, not a boolean: YAML reads "
            "yes, no, on, off, true and false as booleans) (got False)",
            id="a boolean for a factory's number",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support:NOT_A_LAYER: {}\n",
            "stack.yaml:3:5 pipeline[0]: 'stack_support:NOT_A_LAYER' is not a WSGI middleware class or factory: "
            "it is tuple ()",
            id="a layer that is not callable",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - headers:{hsts_max_age: 5}\n",
            "stack.yaml:3:28 pipeline[0].headers:{hsts_max_age: layer options must be a mapping; write a space "
            "after the colon: `- headers: {hsts_max_age…` (got '5}')",
            id="no space after the colon",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - stack_support.layers: Tag\n",
            "stack.yaml:3:27 pipeline[0].stack_support.layers: layer options must be a mapping; "
            "`- stack_support.layers: Tag` reads as a layer 'stack_support.layers' with options 'Tag': write "
            "`- stack_support.layers:Tag` for the attribute 'Tag' of module 'stack_support.layers' (got 'Tag')",
            id="a space in module:attr",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - access_log: {file: /nonexistent/dir/access.log}\n",
            "stack.yaml:3:24 pipeline[0].access_log.file: access_log cannot open it: No such file or directory "
            "(got '/nonexistent/dir/access.log')",
            id="a file a layer opens",
        ),
        pytest.param(
            ECHO + "stores: {shared: 'redis://localhost:notaport/0'}\n",
            "stack.yaml:2:18 stores.shared: bad Redis store URL redis://localhost:notaport/0: Port could not be "
            "cast to integer value as 'notaport' (got 'redis://localhost:notaport/0')",
            id="store URL",
        ),
        pytest.param(
            ECHO + "stores:\n  shared: {url: 'redis://127.0.0.1:1/0', options: {socket_timeout: [1]}}\n",
            "stack.yaml:3:68 stores.shared.options.socket_timeout: store option socket_timeout must be a number of "
            "seconds above 0, got [1]",
            id="a store option, at the option",
        ),
        pytest.param(
            ECHO + "stores: {shared: 'redis://:Zm9v/YmFy@127.0.0.1:6379/0'}\n",
            "stack.yaml:2:18 stores.shared: bad Redis store URL: percent-encode the characters / ? # @ % & and "
            "spaces in its user name and password (/ as %2F, ? as %3F, # as %23, @ as %40, % as %25, & as %26, a "
            "space as %20): redis://:***@127.0.0.1:6379/0",
            id="a password to percent-encode: the advice survives the masking",
        ),
        pytest.param(
            ECHO + "server: {ident: \"a\\r\\nX-Evil: 1\"}\n",
            "stack.yaml:2:17 server.ident: ident is sent as the Server header: printable ASCII on one "
            "line (no control characters)",
            id="a line break in ident",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - cors: {origins: ['*'], allow_methods: [*]}\n",
            "stack.yaml:3:45 (top level): invalid YAML: expected alphabetic or numeric character, but found ']' "
            "(while scanning an alias at line 3, column 44); a * on its own starts a YAML alias: quote it ('*') to "
            "mean the text",
            id="an unquoted star",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - request_id: {max_length: ${RIDLEN:-64}}\n",
            "stack.yaml:3:31 (top level): invalid YAML: expected ',' or '}', but got '{' (while parsing a flow "
            "mapping at line 3, column 17); a value holding ${…} inside {…} or […] must be quoted: \"${VAR}\"",
            id="an unquoted interpolation in a flow mapping",
        ),
        pytest.param(
            ECHO + "server: {threads: 017}\npipeline: [errors: {}]\n",
            "stack.yaml:2:19 server.threads: 017 is read by YAML as the octal number 15: write 15 for that, 17 "
            "without the leading 0, or quote it to keep it as text",
            id="a number with a leading zero",
        ),
        pytest.param(
            ECHO + "server: {threads: +017}\npipeline: [errors: {}]\n",
            "stack.yaml:2:19 server.threads: +017 is read by YAML as the octal number 15",
            id="a signed number with a leading zero",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - validation: {deny_patterns: {010: [a], q: [b]}}\n",
            "stack.yaml:3:34 pipeline[0].validation.deny_patterns: 010 is read by YAML as the octal number 8",
            id="a key with a leading zero",
        ),
        pytest.param(
            ECHO + "stores:\n  shared: 6379\n",
            "stack.yaml:3:11 stores.shared: store 'shared' needs a URL (e.g. shared: memory:// or shared: "
            "redis://127.0.0.1:6379/0), or a mapping with url and options (got 6379)",
            id="a store that is a number",
        ),
        pytest.param(
            ECHO + "server: {threads: !!bool maybe}\n",
            "stack.yaml:2:19 server.threads: cannot read the value 'maybe' as !!bool; quote it to keep it as text",
            id="a tag its value does not fit",
        ),
        pytest.param(
            ECHO + "server: {threads: !!int ''}\n",
            "stack.yaml:2:19 server.threads: cannot read the value '' as !!int; quote it to keep it as text",
            id="an empty value tagged as a number",
        ),
        pytest.param(
            ECHO + 'server: {ident: "a\\ud800"}\n',
            "stack.yaml:2:17 server.ident: the value 'a\\ud800' holds a lone surrogate (\\ud800-\\udfff), which is "
            "not text: write the character itself, or its \\U escape",
            id="a lone surrogate in a value",
        ),
        pytest.param(
            ECHO + 'server: {"a\\udc00": 1}\n',
            "stack.yaml:2:10 server: the value 'a\\udc00' holds a lone surrogate",
            id="a lone surrogate in a key",
        ),
        pytest.param(
            ECHO + "server: {threads: " + ":".join(["59"] * 3000) + "}\n",
            "stack.yaml:2:19 server.threads: the number 59:59:59:59:59:59:59… is far larger than any setting takes",
            id="a base-60 number of 3000 places",
        ),
        pytest.param(
            ECHO + "server: {ident: 'a\x01b'}\n",
            "stack.yaml:2:19 (top level): invalid YAML: the character '\\x01' may not appear in YAML text; remove it, "
            "or write it as an escape in a double-quoted string",
            id="a control character in the text",
        ),
        pytest.param(
            ECHO + "pipeline:\n  - request_id: {pattern: '[a-z]{1,4294967296}'}\n",
            "stack.yaml:3:27 pipeline[0].request_id.pattern: pattern '[a-z]{1,4294967296}' is not a valid regular "
            "expression: the repetition number is too large",
            id="a regex repeat count past 2**32",
        ),
    ],
)
def test_refused_with_the_place_and_the_fix(text: str, expected: str) -> None:
    lines = errors_of(text)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("def broken(:\n", "SyntaxError in {path}, line 1: ", id="syntax error"),
        pytest.param("import os\nSETTING = os.environ['WSGISTACK_NO_SUCH_VARIABLE']\n",
                     "KeyError: 'WSGISTACK_NO_SUCH_VARIABLE'", id="KeyError while importing"),
        pytest.param("raise RuntimeError('not today')\n", "RuntimeError: not today", id="RuntimeError while importing"),
    ],
)
def test_a_layer_module_that_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                             expected: str) -> None:
    module = tmp_path / "wsgistack_broken_layer.py"
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "wsgistack_broken_layer", raising=False)
    lines = errors_of(ECHO + "pipeline:\n  - errors: {}\n  - wsgistack_broken_layer:Layer: {}\n")
    prefix = "stack.yaml:4:5 pipeline[1]: cannot import layer 'wsgistack_broken_layer:Layer': "
    assert lines[0].startswith(prefix + expected.format(path=module)), lines
    monkeypatch.delitem(sys.modules, "wsgistack_broken_layer", raising=False)
    app_lines = errors_of("app: {factory: 'wsgistack_broken_layer:create'}\npipeline: [errors: {}]\n")
    assert app_lines[0].startswith("stack.yaml:1:16 app.factory: cannot import the app factory: "
                                   + expected.format(path=module)), app_lines


def test_a_factory_gets_its_options_as_its_hints_say() -> None:
    """"2" for an int is handed over as 2: ProxyFix compares it with a number on every request."""
    built = build_from_text(ECHO + "pipeline:\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: '1'}\n")
    app = TestApp(built.app)
    seen = app.get("/x", headers={"X-Forwarded-For": "203.0.113.9"}, extra_environ={"REMOTE_ADDR": "10.0.0.1"})
    assert seen.json["remote_addr"] == "203.0.113.9"


@pytest.mark.parametrize("layer", [
    pytest.param("stack_support:AllowList: {allowed: [/a]}", id="an Iterable hint: the list itself, not an iterator"),
    pytest.param("werkzeug.middleware.shared_data:SharedDataMiddleware: {exports: {}, disallow: '*.py'}",
                 id="a hint stricter than the code (disallow: None takes a pattern)"),
])
def test_hints_other_than_scalars_are_left_to_the_factory(layer: str) -> None:
    app = TestApp(build_from_text(ECHO + f"pipeline:\n  - {layer}\n").app)
    for _ in range(3):  # the same answer every time
        assert app.get("/a").status_int == 200


@pytest.mark.parametrize(
    ("yaml_text", "secret"),
    [
        pytest.param("stores:\n  shared: redis://:Hunter2Secret@redis.internal:63x79/0\npipeline:\n  - errors: {}\n",
                     "Hunter2Secret", id="store URL password"),
        pytest.param("pipeline:\n  - errors: {}\n  - auth: {secret: [Hunter2Secret]}\n", "Hunter2Secret",
                     id="secret of the wrong type"),
        pytest.param("stores:\n  shared: redis://redis.internal:63x79/0?password=Hunter2Secret\npipeline:\n"
                     "  - errors: {}\n", "Hunter2Secret", id="password in the query"),
        pytest.param("pipeline:\n  - errors: {}\n  - stack_support:KeyedLayer: {api_key: sk-live-Hunter2Secret}\n",
                     "Hunter2Secret", id="a third-party layer's api_key"),
        pytest.param("pipeline:\n  - errors: {}\n  - session: {secret_key: 918273645546372819}\n",
                     "918273645546372819", id="a secret written as a number"),
        pytest.param("pipeline:\n  - errors: {}\n  - stack_support:KeyedLayer: {api_key: 918273645546372819}\n",
                     "918273645546372819", id="a number in a layer's own error text"),
        pytest.param("app:\n  factory: stack_support:app_refusing_its_token\n  options: {api_token: sk-Hunter2Secret}\n"
                     "pipeline:\n  - errors: {}\n", "Hunter2Secret", id="the app factory's own error text"),
    ],
)
def test_problems_never_repeat_a_secret(yaml_text: str, secret: str) -> None:
    """Problems are printed, logged and shown on the operator page after a failed reload."""
    with pytest.raises(ConfigError) as info:
        build_from_text(yaml_text, base_dir=".")
    text = "\n".join(str(problem) for problem in info.value.problems)
    assert info.value.problems and secret not in text
    assert secret not in repr([p.value for p in info.value.problems])


def test_file_options_expand_the_home_folder_and_resolve_against_base_dir(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """~ is the user's home for every file option; other relative paths are the stack file's folder's."""
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "drain").write_text("")
    text = ("app: {factory: 'app:create_app', options: {var_dir: ~/var}}\n"
            "pipeline:\n  - errors: {}\n  - health: {drain_file: drain}\n"
            "  - auth: {public_keys: [~/keys/missing.pem]}\n")
    with pytest.raises(ConfigError) as info:
        build_from_text(text, base_dir=conf)
    assert [p.message for p in info.value.problems] == [
        f"a public_keys entry: cannot read '{home}/keys/missing.pem' (No such file or directory)"]
    built = build_from_text(text.replace("  - auth: {public_keys: [~/keys/missing.pem]}\n", ""), base_dir=conf)
    try:
        assert built.config.app.options["var_dir"] == str(home / "var")
        assert TestApp(built.app).get("/readyz", expect_errors=True).status_int == 503  # conf/drain, not ./drain
    finally:
        built.close()


def test_index_source_folders_resolve_against_the_stack_files_folder(tmp_path: Path) -> None:
    """A folder as the other file options are; a module name (json) stays a name."""
    text = ("app: {factory: 'app:create_app', options: {var_dir: var, "
            "search: {index_sources: [./mydocs, lib/more, json]}}}\npipeline:\n  - errors: {}\n")
    built = build_from_text(text, base_dir=tmp_path)
    try:
        assert built.config.app.options["search"]["index_sources"] == [
            str(tmp_path / "mydocs"), str(tmp_path / "lib" / "more"), "json"]
    finally:
        built.close()


def test_aliases_of_an_interpolated_value_share_one_string(tmp_path: Path) -> None:
    """A value with a $ is interpolated once however many aliases repeat it: 729 aliases of a 100 kB value
    made 729 copies (73 MB here; 59,049 of them took gigabytes from a file of 100 kB)."""
    import tracemalloc

    lines = [f'a: &a "{"x" * 100_000}$$"']
    for level, below in zip("bcd", "abc", strict=True):
        lines.append(f"{level}: &{level} [{', '.join([f'*{below}'] * 9)}]")
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + "\n".join(lines) + "\npipeline: [errors: {}]\n")
    tracemalloc.start()
    try:
        found = [str(p) for p in check(path, env={})]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [line.split(": ", 1)[1] for line in found] == [
        f"unknown top-level key '{key}' (known: server, stores, app, pipeline, logging)" for key in "abcd"]
    assert peak < 20_000_000, f"{peak / 1e6:.0f} MB"


@pytest.mark.parametrize(
    "app_section",
    [
        pytest.param("", id="no app section"),
        pytest.param("app:\n", id="empty app section"),
        pytest.param("app: {factory: 'app:create_app'}\n", id="no options"),
        pytest.param("app: {factory: app.create_app, options: null}\n", id="null options, dotted factory"),
        pytest.param("app:\n  options:\n", id="empty options"),
        pytest.param("app: {options: {}}\n", id="empty options mapping"),
    ],
)
def test_the_default_var_dir_is_beside_the_stack_file_without_app_options(
        app_section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server, `check` and the `users` command share conf/var wherever serve.py is started."""
    import io

    import serve
    from app.users import users_cli
    from config import build_from_file

    conf = tmp_path / "conf"
    conf.mkdir()
    path = conf / "stack.yaml"
    path.write_text(app_section + "pipeline:\n  - errors: {}\n")
    monkeypatch.chdir(tmp_path)
    db_path = serve._app_option(str(path), "users_db", "users.sqlite3")
    assert db_path == str(conf / "var" / "users.sqlite3")
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert users_cli(["add", "bob", "--password-stdin"], db_path) == 0
    assert check(path) == []
    built = build_from_file(path)
    try:
        state = built.core.extensions["wsgistack"]
        assert state.options.var_dir == str(conf / "var")
        assert str(state.users.path) == db_path
        assert state.options.index_file == str(conf / "var" / "search-index.sqlite3")
        assert state.users.get("bob") is not None
    finally:
        built.close()
    assert not (tmp_path / "var").exists()


STRICT_FACTORIES = (
    "from pydantic import BaseModel, ConfigDict\n\n"
    "class Options(BaseModel):\n    model_config = ConfigDict(extra='forbid')\n    greeting: str = 'hi'\n\n"
    "class WithVar(Options):\n    var_dir: str = 'var'\n\n"
    "def _answer(text):\n"
    "    def app(environ, start_response):\n"
    "        start_response('200 OK', [('Content-Type', 'text/plain')])\n        return [text.encode()]\n"
    "    return app\n\n"
    "def create(options):\n    return _answer(Options.model_validate(options).greeting)\n\n"
    "def create_with_var(options):\n    return _answer(WithVar.model_validate(options).var_dir)\n\n"
    "create.Options = Options\ncreate_with_var.Options = WithVar\n")


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        pytest.param("{factory: 'strict_factory:create'}", {}, id="no options"),
        pytest.param("{factory: 'strict_factory:create', options: {}}", {}, id="empty options"),
        pytest.param("{factory: 'strict_factory:create', options: null}", {}, id="null options"),
        pytest.param("{factory: strict_factory.create, options: {greeting: hello}}", {"greeting": "hello"},
                     id="dotted, options"),
        pytest.param("{factory: 'strict_factory:create_with_var'}", {"var_dir": "{tmp}/var"},
                     id="its Options declare var_dir"),
        pytest.param("{factory: 'strict_factory:create_with_var', options: {var_dir: data}}",
                     {"var_dir": "{tmp}/data"}, id="var_dir set"),
    ],
)
def test_an_app_factory_of_your_own_gets_a_var_dir_only_when_it_takes_one(
        section: str, expected: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """var_dir is the built-in app's option; another factory's Options may refuse unknown keys."""
    (tmp_path / "strict_factory.py").write_text(STRICT_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    built = build_from_text(f"app: {section}\npipeline: [errors: {{}}]\n", base_dir=tmp_path)
    expected = {key: value.replace("{tmp}", str(tmp_path)) for key, value in expected.items()}
    try:
        assert built.config.app.options == expected
        assert TestApp(built.app).get("/").text == expected.get("var_dir", expected.get("greeting", "hi"))
    finally:
        built.close()
