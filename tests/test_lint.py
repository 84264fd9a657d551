"""Pipeline order checks: unsafe orders are errors, odd ones warnings, each with its reason."""

from __future__ import annotations

import importlib

import pytest

from config import lint, parse, read_text

HEAD = """app: {factory: "stack_support:echo_app"}
stores: {shared: "memory://", redis: "redis://127.0.0.1:1/0"}
"""
#: A secret as `secrets.token_urlsafe(32)` makes one (a run repeated, "s" * 40, is warned of).
SECRET = "q3VhZ0mN8xLr2TfKpW9sYbC4eGjH7uAd1oIvX6nE5yQ"


def problems(text: str, hosted: bool = False) -> list[str]:
    """Lint a pipeline given as YAML and return the problem lines (``hosted``: for another WSGI server)."""
    return [str(p) for p in lint(parse(read_text(HEAD + text, file="stack.yaml", env={})), hosted=hosted)]


@pytest.mark.parametrize(
    ("pipeline", "expected"),
    [
        pytest.param(
            "pipeline:\n  - request_id: {}\n  - errors: {}\n",
            "stack.yaml:5:5 pipeline[1]: errors must be the outermost layer",
            id="errors not outermost",
        ),
        pytest.param(
            "pipeline:\n  - errors: {paths: ['/api/*']}\n",
            "stack.yaml:4:5 pipeline[0]: errors may not be scoped",
            id="errors scoped",
        ),
        pytest.param(
            f"pipeline:\n  - cache: {{}}\n  - auth: {{secret: {SECRET}}}\n",
            "stack.yaml:4:5 pipeline[0]: cache at pipeline[0] is outside auth at pipeline[1]",
            id="cache outside auth",
        ),
        pytest.param(
            f"pipeline:\n  - stack_support:MyCache: {{}}\n  - stack_support:AuthMiddleware: {{secret: {SECRET}}}\n",
            "stack.yaml:4:5 pipeline[0]: cache at pipeline[0] is outside auth at pipeline[1]",
            id="a subclassed cache outside a re-exported auth",
        ),
        pytest.param(
            f"server: {{workers: 2}}\npipeline:\n  - stack_support:MySession: {{secret_key: {SECRET}}}\n",
            "stack.yaml:5:5 pipeline[0]: session keeps state in store 'shared' (memory://) but server.workers is 2",
            id="a subclassed session on memory:// under workers",
        ),
        pytest.param(
            f"pipeline:\n  - cache: {{}}\n  - session: {{secret_key: {SECRET}}}\n",
            "stack.yaml:4:5 pipeline[0]: cache at pipeline[0] is outside session at pipeline[1]",
            id="cache outside session",
        ),
        pytest.param(
            f"pipeline:\n  - auth: {{secret: {SECRET}}}\n"
            "  - cache: {paths: ['/api/*'], purge_path: /_stack/cache/purge}\n",
            "stack.yaml:5:5 pipeline[1]: cache at pipeline[1] sets purge_path '/_stack/cache/purge' outside its own "
            "scope (paths, exclude_paths, methods): a purge would never reach the layer; add the path to its paths",
            id="a purge path outside the cache's scope",
        ),

        pytest.param(
            "pipeline:\n  - ratelimit: {limits: ['10/second']}\n  - proxy: {x_for: 1}\n",
            "stack.yaml:4:5 pipeline[0]: ratelimit at pipeline[0] is outside the proxy layer at pipeline[1]: "
            "it would key on the proxy's address",
            id="ratelimit before proxy",
        ),
        pytest.param(
            "pipeline:\n  - ratelimit: {limits: ['10/second']}\n"
            "  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 1}\n",
            "stack.yaml:4:5 pipeline[0]: ratelimit at pipeline[0] is outside the proxy layer at pipeline[1]: "
            "it would key on the proxy's address",
            id="ratelimit before werkzeug's ProxyFix, which is a proxy layer too",
        ),
        pytest.param(
            "server: {listen: '0.0.0.0:8000'}\npipeline:\n  - errors: {}\n"
            "  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 1}\n",
            "stack.yaml:6:5 pipeline[1]: werkzeug.middleware.proxy_fix:ProxyFix at pipeline[1] believes "
            "X-Forwarded-* from every peer, and the server listens on 0.0.0.0:8000: any client could set its own "
            "address",
            id="ProxyFix off loopback: every peer is believed",
        ),
        pytest.param(
            "server: {listen: '0.0.0.0:8000', trusted_proxy: 10.0.0.5, trusted_proxy_headers: [x-forwarded-for]}\n"
            "pipeline:\n  - errors: {}\n"
            "  - werkzeug.middleware.proxy_fix:ProxyFix: {x_prefix: 1}\n",
            "stack.yaml:6:5 pipeline[1]: werkzeug.middleware.proxy_fix:ProxyFix at pipeline[1] believes "
            "X-Forwarded-Prefix from every peer: Waitress clears the untrusted forwarding headers it knows, and "
            "this is not one of them",
            id="ProxyFix's x_prefix under Waitress's trusted_proxy: that header is never cleared",
        ),
        pytest.param(
            f"pipeline:\n  - ratelimit: {{limits: ['10/second'], key: user}}\n  - auth: {{secret: {SECRET}}}\n",
            "stack.yaml:4:5 pipeline[0]: ratelimit at pipeline[0] keys on user but is not inside auth",
            id="user key outside auth",
        ),
        pytest.param(
            "pipeline:\n  - request_id: {}\n  - request_id: {paths: ['/api/*']}\n",
            "stack.yaml:5:5 warning: pipeline[1]: request_id appears twice with overlapping scope",
            id="same layer twice, overlapping",
        ),
        pytest.param(
            f"pipeline:\n  - auth: {{secret: {SECRET}}}\n  - cors: {{origins: ['https://a.example']}}\n",
            "stack.yaml:5:5 warning: pipeline[1]: cors at pipeline[1] is inside auth at pipeline[0]",
            id="cors inside auth",
        ),
        pytest.param(
            "pipeline:\n  - cache: {}\n  - cors: {origins: ['https://a.example']}\n",
            "stack.yaml:4:5 pipeline[0]: cache at pipeline[0] is outside cors at pipeline[1]",
            id="cache outside cors",
        ),
        pytest.param(
            "pipeline:\n  - cache: {}\n  - ratelimit: {limits: ['10/second']}\n",
            "stack.yaml:4:5 warning: pipeline[0]: cache at pipeline[0] is outside ratelimit at pipeline[1]: cached "
            "answers are never counted, and each carries the RateLimit fields of the client whose request filled it "
            "to every other client; move cache inside ratelimit",
            id="cache outside ratelimit",
        ),
        pytest.param(
            f"pipeline:\n  - session: {{secret_key: {SECRET}}}\n  - auth: {{secret: {SECRET}}}\n",
            "stack.yaml:5:5 warning: pipeline[1]: auth at pipeline[1] accepts the session cookie as credentials "
            "(accept_session) but the pipeline has no csrf layer",
            id="session credentials without csrf",
        ),
        pytest.param(
            "pipeline:\n  - metrics: {}\n  - proxy: {x_for: 1}\n",
            "stack.yaml:5:5 warning: pipeline[1]: proxy at pipeline[1] is inside metrics at pipeline[0]: metrics "
            "sees the proxy's address",
            id="proxy inside metrics",
        ),
        pytest.param(
            "pipeline:\n  - proxy: {x_for: 1, paths: ['/api/*']}\n",
            "stack.yaml:4:5 warning: pipeline[0]: proxy should not be scoped",
            id="proxy scoped",
        ),
        pytest.param(
            "pipeline:\n  - cors: {origin_regex: ['https://app.example.org']}\n",
            "stack.yaml:4:5 warning: pipeline[0]: origin_regex 'https://app.example.org' has an unescaped '.', "
            "which matches any character (https://appXexample.org too); write '\\.' for a dot",
            id="unescaped dot in an origin regex",
        ),
        pytest.param(
            "pipeline:\n  - cache: {}\n  - versioning: {supported: [v1]}\n",
            "stack.yaml:5:5 warning: pipeline[1]: versioning at pipeline[1] is inside cache",
            id="versioning inside cache",
        ),
        pytest.param(
            f"pipeline:\n  - auth: {{secret: {SECRET}}}\n  - health: {{}}\n",
            "stack.yaml:5:5 warning: pipeline[1]: health at pipeline[1] is inside auth at pipeline[0]",
            id="health behind auth",
        ),
        pytest.param(
            "server: {workers: 2}\npipeline:\n  - ratelimit: {limits: ['10/second']}\n",
            "stack.yaml:5:5 pipeline[0]: ratelimit keeps state in store 'shared' (memory://) but server.workers is 2",
            id="workers with memory state",
        ),
        pytest.param(
            "server: {workers: 2}\npipeline:\n  - cache: {}\n",
            "stack.yaml:5:5 warning: pipeline[0]: cache on a memory:// store with 2 workers",
            id="workers with memory cache",
        ),
        pytest.param(
            "server: {workers: 2}\npipeline:\n  - stack_support:SharedVisits: {}\n",
            "stack.yaml:5:5 pipeline[0]: stack_support:SharedVisits keeps state in store 'shared' (memory://) that "
            "its class says every process must share (shared_state), but server.workers is 2",
            id="a layer of your own whose state must be shared, on memory:// under workers",
        ),
        pytest.param(
            "server: {workers: 2}\npipeline:\n  - stack_support:Visits: {}\n",
            "stack.yaml:5:5 warning: pipeline[0]: stack_support:Visits keeps state in store 'shared' (memory://) and "
            "server.workers is 2: each process has its own copy; if it must be shared (counters, sessions, "
            "revocations), use redis:// and set shared_state = True on its class",
            id="a layer of your own with a store, on memory:// under workers",
        ),
        pytest.param(
            "pipeline:\n  - cache: {per_user: true}\n",
            "stack.yaml:4:5 pipeline[0]: cache at pipeline[0] has per_user: true but no auth layer runs before it",
            id="per_user cache without auth",
        ),
        pytest.param(
            f"pipeline:\n  - session: {{secret_key: {SECRET}}}\n  - csrf: {{cookie_name: other}}\n",
            "stack.yaml:5:5 pipeline[1]: csrf cookie_name 'other' differs from the session layer's cookie_name",
            id="csrf cookie name mismatch",
        ),
        pytest.param(
            f"pipeline:\n  - csrf: {{double_submit: true, secret_key: {SECRET}}}\n"
            f"  - session: {{secret_key: {SECRET}}}\n",
            "stack.yaml:4:5 pipeline[0]: csrf at pipeline[0] uses double_submit but is not inside a session layer",
            id="double submit outside session",
        ),
        pytest.param(
            f"pipeline:\n  - auth: {{secret: {SECRET}}}\n  - session: {{secret_key: {SECRET}}}\n",
            "stack.yaml:4:5 pipeline[0]: auth at pipeline[0] has accept_session: true but is outside session",
            id="auth outside session",
        ),
        pytest.param(
            "pipeline:\n  - ratelimit: {limits: ['10/second'], key: 'header:X-Api-Key'}\n",
            "stack.yaml:4:5 warning: pipeline[0]: ratelimit at pipeline[0] keys only on request headers",
            id="header-only ratelimit key",
        ),
        pytest.param(
            f"pipeline:\n  - auth: {{secret: {SECRET}}}\n  - ratelimit: {{limits: ['10/second']}}\n",
            "stack.yaml:5:5 warning: pipeline[1]: ratelimit at pipeline[1] keys on client_ip but is inside auth",
            id="client_ip ratelimit only inside auth",
        ),
        pytest.param(
            "pipeline:\n  - cors: {origins: ['https://a.example']}\n  - request_id: {}\n",
            "stack.yaml:5:5 warning: pipeline[1]: request_id at pipeline[1] is inside cors",
            id="request_id late",
        ),
        pytest.param(
            "pipeline:\n  - validation: {}\n  - headers: {}\n",
            "stack.yaml:5:5 warning: pipeline[1]: headers at pipeline[1] is inside validation",
            id="headers inside validation",
        ),
        pytest.param(
            "server: {max_request_body_size: 1000}\npipeline:\n  - validation: {max_body_bytes: 5000}\n",
            "stack.yaml:5:5 warning: pipeline[0]: validation.max_body_bytes (5000) is above "
            "server.max_request_body_size (1000)",
            id="validation above waitress",
        ),
        pytest.param(
            "pipeline:\n  - ratelimit: {limits: ['100/minute'], paths: ['/api/*']}\n"
            "  - ratelimit: {limits: ['100 per minute'], paths: ['/auth/*']}\n",
            "stack.yaml:5:5 warning: pipeline[1]: ratelimit at pipeline[1] and the one at pipeline[0] count in "
            "store 'shared' under the same namespace with an equal limit: they share one counter per client",
            id="two ratelimits sharing counters",
        ),
        pytest.param(
            "pipeline:\n  - ratelimit: {limits: ['9/minute'], rules: [{paths: ['/x'], limits: ['1/second']}, "
            "{paths: ['/a'], limits: ['4/minute']}]}\n"
            "  - ratelimit: {limits: ['7/minute'], rules: [{paths: ['/a'], limits: ['4/minute']}]}\n",
            "stack.yaml:5:5 warning: pipeline[1]: ratelimit at pipeline[1] and the one at pipeline[0] count in "
            "store 'shared' under the same namespace with an equal limit",
            id="the same rule at another place in each layer: one counter, as the layers name them by what they match",
        ),
        pytest.param(
            "pipeline:\n  - metrics: {}\n  - metrics: {path: /m2}\n",
            "stack.yaml:5:5 pipeline[1]: metrics may appear only once",
            id="metrics twice",
        ),
        pytest.param(
            f"pipeline:\n  - session: {{secret_key: {SECRET}, on_store_error: open}}\n",
            "stack.yaml:4:5 warning: pipeline[0]: session has on_store_error: open",
            id="session fails open",
        ),
        pytest.param(
            "pipeline:\n  - operator_page: {roles: [admin]}\n",
            "stack.yaml:4:5 pipeline[0]: operator_page at pipeline[0] requires roles but no auth layer runs before it",
            id="operator page roles without auth",
        ),
        pytest.param(
            "pipeline:\n  - operator_page: {}\n  - proxy: {x_for: 1}\n",
            "stack.yaml:4:5 pipeline[0]: operator_page at pipeline[0] is outside proxy at pipeline[1]",
            id="operator page outside proxy",
        ),
        pytest.param(
            "server: {listen: '[::1]:8889'}\npipeline:\n  - errors: {}\n"
            "  - proxy: {x_for: 1, trusted_proxies: [127.0.0.1, '::ffff:10.0.0.0/104']}\n",
            "stack.yaml:6:5 pipeline[1]: proxy at pipeline[1] trusts only 127.0.0.1/32, ::ffff:a00:0/104, and every "
            "listen address is IPv6: no such proxy can be the peer (IPv6 sockets take IPv6 peers only), so its "
            "forwarding headers would never count and every client would seem to be the proxy; add the address the "
            "proxy connects from",
            id="a proxy layer that trusts no peer the server can have",
        ),
        pytest.param(
            "server: {clear_untrusted_proxy_headers: true}\npipeline:\n  - errors: {}\n  - proxy: {x_for: 1}\n",
            "stack.yaml:3:41 server.clear_untrusted_proxy_headers: clear_untrusted_proxy_headers is true and "
            "trusted_proxy is unset: Waitress would remove every X-Forwarded-* and Forwarded header before proxy at "
            "pipeline[1] reads them, so every request would seem to come from the proxy itself; remove the setting "
            "(it is then off while a layer reads the headers) or set it to false",
            id="Waitress told to strip the headers the proxy layer reads",
        ),
        pytest.param(
            "server: {clear_untrusted_proxy_headers: true}\npipeline:\n  - errors: {}\n"
            "  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 1}\n",
            "stack.yaml:3:41 server.clear_untrusted_proxy_headers: clear_untrusted_proxy_headers is true and "
            "trusted_proxy is unset: Waitress would remove every X-Forwarded-* and Forwarded header before "
            "werkzeug.middleware.proxy_fix:ProxyFix at pipeline[1] reads them",
            id="Waitress told to strip the headers ProxyFix reads",
        ),
        pytest.param(
            "pipeline:\n  - validation: {}\n  - cors: {origins: ['https://a.example']}\n",
            "stack.yaml:5:5 warning: pipeline[1]: cors at pipeline[1] is inside validation at pipeline[0]: "
            "preflights would meet validation first and its refusals would lack CORS headers",
            id="cors inside validation",
        ),
        pytest.param(
            "pipeline:\n  - versioning: {supported: [v1]}\n  - cors: {origins: ['https://a.example']}\n",
            "stack.yaml:5:5 warning: pipeline[1]: cors at pipeline[1] is inside versioning at pipeline[0]",
            id="cors inside versioning",
        ),
        pytest.param(
            "pipeline:\n  - cors: {origins: ['https://a.example'], methods: [PUT, DELETE]}\n",
            "stack.yaml:4:5 warning: pipeline[0]: cors at pipeline[0] is scoped to methods PUT, DELETE without "
            "OPTIONS: browsers' preflights (OPTIONS) pass it by and reach the app, which answers them without "
            "CORS headers, so those requests are never sent; add OPTIONS to methods",
            id="cors scoped to methods without OPTIONS",
        ),
        pytest.param(
            "pipeline:\n  - ratelimit: {store: redis, limits: ['9/minute'], rules: [{paths: [/l], limits: [], "
            "on_store_error: closed}]}\n",
            "stack.yaml:4:5 warning: pipeline[0]: ratelimit rules[0] sets on_store_error, but it has no limits",
            id="a rule's store policy on an exempt rule",
        ),
        pytest.param(
            "server: {trusted_proxy: 127.0.0.1, trusted_proxy_headers: [x-forwarded-proto]}\n"
            "pipeline:\n  - errors: {}\n  - ratelimit: {limits: ['10/second']}\n",
            "stack.yaml:6:5 warning: pipeline[1]: ratelimit at pipeline[1] keys on client_ip, but nothing takes the "
            "client's address from the proxy in front (server.trusted_proxy is set, and server.trusted_proxy_headers "
            "lacks x-forwarded-for and forwarded; no proxy layer outside it reads X-Forwarded-For or Forwarded): "
            "every request seems to come from the proxy, so all clients share one limit; add x-forwarded-for to "
            "server.trusted_proxy_headers",
            id="Waitress trusts a proxy but not its X-Forwarded-For: one bucket for every client",
        ),
        pytest.param(
            "pipeline:\n  - errors: {}\n  - proxy: {x_proto: 1}\n  - ratelimit: {limits: ['10/second']}\n",
            "stack.yaml:6:5 warning: pipeline[2]: ratelimit at pipeline[2] keys on client_ip, but nothing takes the "
            "client's address from the proxy in front (proxy at pipeline[1] reads neither X-Forwarded-For (x_for) "
            "nor Forwarded (forwarded)): every request seems to come from the proxy, so all clients share one "
            "limit; set x_for (or forwarded) on proxy at pipeline[1]",
            id="a proxy layer that takes the scheme but not the client address",
        ),
        pytest.param(
            "pipeline:\n  - errors: {}\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 0}\n"
            "  - ratelimit: {limits: ['10/second']}\n",
            "stack.yaml:6:5 warning: pipeline[2]: ratelimit at pipeline[2] keys on client_ip, but nothing takes the "
            "client's address from the proxy in front (werkzeug.middleware.proxy_fix:ProxyFix at pipeline[1] reads",
            id="ProxyFix told not to read X-Forwarded-For",
        ),
        pytest.param(
            f"pipeline:\n  - errors: {{}}\n  - auth: {{secret: {SECRET}, default: none}}\n",
            "stack.yaml:5:5 warning: pipeline[1]: auth at pipeline[1] has default: none and no rule that asks for a "
            "token (auth: required or optional, or roles): it never looks at a request, so no request needs a token "
            "and no identity is ever set (the token endpoints still issue them); set default: required (or "
            "optional), or add rules for the paths to protect",
            id="auth that checks nothing",
        ),
        pytest.param(
            f"pipeline:\n  - errors: {{}}\n  - auth: {{secret: {SECRET}, default: none, rules: [{{paths: [/a], "
            "auth: none}]}\n",
            "stack.yaml:5:5 warning: pipeline[1]: auth at pipeline[1] has default: none and no rule that asks for a "
            "token",
            id="auth whose rules all say none",
        ),
        pytest.param(
            "pipeline:\n  - errors: {}\n  - cache: {paths: ['/public/*']}\n"
            f"  - auth: {{secret: {SECRET}, paths: ['/api/*']}}\n  - versioning: {{supported: [v1]}}\n",
            "stack.yaml:5:5 pipeline[1]: cache at pipeline[1] is outside auth at pipeline[2]",
            id="scopes apart, but a layer inside rewrites paths: still an error",
        ),
        pytest.param(
            "pipeline:\n  - errors: {}\n  - cache: {paths: ['/p?blic/*']}\n"
            f"  - auth: {{secret: {SECRET}, paths: ['/public/x*']}}\n",
            "stack.yaml:5:5 pipeline[1]: cache at pipeline[1] is outside auth at pipeline[2]",
            id="scopes that share paths through a ? pattern",
        ),
        pytest.param(
            "pipeline:\n  - errors: {}\n  - cache: {paths: ['/api/*']}\n"
            f"  - auth: {{secret: {SECRET}, paths: ['/api/v1/*']}}\n",
            "stack.yaml:5:5 pipeline[1]: cache at pipeline[1] is outside auth at pipeline[2]",
            id="scopes that overlap",
        ),
        pytest.param(
            f"pipeline:\n  - errors: {{}}\n  - auth: {{secret: {SECRET}, methods: [HEAD]}}\n"
            "  - cors: {origins: ['https://a.example'], methods: [GET, OPTIONS]}\n",
            "stack.yaml:6:5 warning: pipeline[2]: cors at pipeline[2] is inside auth at pipeline[1]",
            id="scopes whose methods share HEAD, which GET covers",
        ),
        pytest.param(
            "server: {listen: '[::]:8000'}\npipeline:\n  - errors: {}\n"
            "  - operator_page: {allow_from: [0.0.0.0/0, '::/0']}\n",
            "stack.yaml:6:5 pipeline[1]: operator_page at pipeline[1] has allow_from 0.0.0.0/0, which is every "
            "address, and no roles: any client could read the whole configuration (the layer refuses an empty "
            "allow_from without roles for this reason); list the operators' networks, or set roles (with an auth "
            "layer outside it)",
            id="an operator page open to every address without roles, on a public listener",
        ),
        pytest.param(
            "server: {listen: '0.0.0.0:8000'}\npipeline:\n  - errors: {}\n  - metrics: {allow_from: ['::/0']}\n",
            "stack.yaml:6:5 warning: pipeline[1]: metrics at pipeline[1] has allow_from ::/0, which is every "
            "address, and the server listens on 0.0.0.0:8000: any client could scrape /metrics (its routes, "
            "traffic and errors); list the Prometheus servers' networks",
            id="metrics open to every address on a public listener",
        ),
        pytest.param(
            "pipeline:\n  - cache: {store: sharde}\n",
            "stack.yaml:4:20 pipeline[0].cache.store: cache names store 'sharde', which the stores section does not "
            "define; did you mean 'shared'? (known: redis, shared)",
            id="unknown store",
        ),
        pytest.param(
            "pipeline:\n  - health: {stores: [shared, sharde]}\n",
            "stack.yaml:4:31 pipeline[0].health.stores[1]: health names store 'sharde', which the stores section "
            "does not define; did you mean 'shared'? (known: redis, shared)",
            id="unknown store in health's list",
        ),
    ],
)
def test_lint(pipeline: str, expected: str) -> None:
    found = problems(pipeline)
    assert any(line.startswith(expected) for line in found), found


def test_a_secret_from_the_environment_is_masked_in_what_check_says() -> None:
    """A value a secret-named variable gave (a purge path kept secret) is masked in a rule's problem too."""
    text = HEAD + "pipeline:\n  - cache: {paths: ['/api/*'], purge_path: '${PURGE_SECRET}'}\n"
    found = [str(p) for p in lint(parse(read_text(text, file="stack.yaml", env={"PURGE_SECRET": "/purge-x7Kq9"})))]
    assert any("sets purge_path '***' outside its own scope" in line for line in found), found
    assert not any("x7Kq9" in line for line in found), found


VERSIONED = "pipeline:\n  - errors: {}\n  - versioning: {supported: [v1, v2]%s}\n"


@pytest.mark.parametrize(("layer", "expected"), [
    pytest.param("  - cache: {paths: [/api/*/search, /api/search, /api]}\n",
                 "stack.yaml:6:36 pipeline[2].cache.paths[1]: cache at pipeline[2] has paths[1] '/api/search', "
                 "which no request reaches it with: versioning at pipeline[1], outside it, rewrites it to "
                 "/api/<version>/search first; write /api/*/search for every version, or name one (/api/v1/search)",
                 id="a path without a version"),
    pytest.param("  - cache: {paths: [/api/V2/search]}\n",
                 "stack.yaml:6:21 pipeline[2].cache.paths[0]: cache at pipeline[2] has paths[0] '/api/V2/search', "
                 "which no request reaches it with: versioning at pipeline[1], outside it, rewrites it to "
                 "/api/v2/search first; write /api/v2/search", id="a version in another case"),
    pytest.param("  - cache: {paths: ['/api/v3/*']}\n",
                 "stack.yaml:6:21 pipeline[2].cache.paths[0]: cache at pipeline[2] has paths[0] '/api/v3/*', "
                 "which no request reaches it with: versioning at pipeline[1], outside it, answers 404 for version "
                 "'v3', which it does not support; name a supported version (/api/v1/*) or remove it",
                 id="a version it does not support"),
    pytest.param(f"  - auth: {{secret: {SECRET}, rules: [{{paths: [/api/admin/*], roles: [admin]}}]}}\n",
                 f"stack.yaml:6:{39 + len(SECRET)} pipeline[2].auth.rules[0].paths[0]: auth at pipeline[2] has "
                 "rules[0].paths[0] '/api/admin/*', which no request reaches it with", id="a rule of auth inside"),
    pytest.param(f"  - auth: {{secret: {SECRET}}}\n  - cache: {{purge_path: /api/cache/purge}}\n",
                 "stack.yaml:7:25 pipeline[3].cache.purge_path: cache at pipeline[3] has purge_path "
                 "'/api/cache/purge', which no request reaches it with: versioning at pipeline[1], outside it, "
                 "rewrites it to /api/<version>/cache/purge first; name a version (/api/v1/cache/purge)",
                 id="a purge path"),
    pytest.param("  - cache: {exclude_paths: [/api/health]}\n",
                 "stack.yaml:6:29 warning: pipeline[2].cache.exclude_paths[0]: cache at pipeline[2] has "
                 "exclude_paths[0] '/api/health', which no request reaches it with", id="an exclusion: a warning"),
])
def test_paths_the_layers_inside_versioning_never_see(layer: str, expected: str) -> None:
    found = problems(VERSIONED % "" + layer)
    assert any(line.startswith(expected) for line in found), found


@pytest.mark.parametrize("layer", [
    pytest.param("  - cache: {paths: ['/api/*/search', /api/v2/x, /other/search, /apis/x]}\n",
                 id="every version, one version, a path outside the prefix"),
    pytest.param("  - cache: {paths: ['/api/[vV]1/x', '/api/v?/x']}\n", id="patterns for versions"),
])
def test_paths_the_layers_inside_versioning_see(layer: str) -> None:
    assert [p for p in problems(VERSIONED % "" + layer) if "versioning at" in p] == []


def test_a_path_versioning_leaves_alone_is_seen_inside() -> None:
    text = VERSIONED % ", exclude_paths: [/api/health]" + "  - cache: {paths: [/api/health]}\n"
    assert [p for p in problems(text) if "versioning at" in p] == []


@pytest.mark.parametrize(
    "pipeline",
    [
        pytest.param("pipeline:\n  - errors: {}\n  - request_id: {}\n", id="minimal"),
        pytest.param("server: {workers: 2}\npipeline:\n  - errors: {}\n  - stack_support:LocalVisits: {}\n",
                     id="a layer of your own whose copy per process is right"),
        pytest.param("server: {workers: 2}\npipeline:\n  - errors: {}\n  - stack_support:Visits: {store: redis}\n",
                     id="a layer of your own on redis://"),
        pytest.param(
            f"pipeline:\n  - errors: {{}}\n  - cors: {{origins: ['https://a.example']}}\n"
            f"  - ratelimit: {{limits: ['10/second']}}\n  - auth: {{secret: {SECRET}}}\n"
            "  - ratelimit: {limits: ['100/minute'], key: user}\n  - versioning: {supported: [v1]}\n"
            "  - cache: {}\n",
            id="recommended order, two ratelimits with different keys",
        ),
        pytest.param(
            "pipeline:\n  - errors: {}\n"
            "  - ratelimit: {limits: ['100/minute'], paths: ['/api/*'], namespace: api}\n"
            "  - ratelimit: {limits: ['100/minute'], paths: ['/auth/*'], namespace: auth}\n",
            id="two ratelimits, each in its namespace",
        ),
        pytest.param(
            "pipeline:\n  - errors: {}\n"
            "  - ratelimit: {paths: ['/a/*'], limits: ['9/minute'], rules: [{paths: ['/a/x'], limits: [4/minute]}]}\n"
            "  - ratelimit: {paths: ['/b/*'], limits: ['7/minute'], rules: [{paths: ['/b/x'], limits: [4/minute]}]}\n",
            id="two ratelimits whose first rules match other paths: apart, though both are the first",
        ),
        pytest.param("pipeline:\n  - errors: {}\n  - proxy: {x_for: 1}\n",
                     id="proxy layer; Waitress leaves the headers to it"),
        pytest.param("pipeline:\n  - errors: {}\n  - request_id: {}\n  - proxy: {x_for: 1}\n",
                     id="proxy inside request_id, which reads no client address: its refusals carry the id"),
        pytest.param("pipeline:\n  - errors: {}\n  - metrics: {allow_from: [0.0.0.0/0]}\n",
                     id="metrics open to every address on a loopback-only server"),
        pytest.param("pipeline:\n  - errors: {}\n  - operator_page: {allow_from: ['::/0', 0.0.0.0/0]}\n",
                     id="an operator page open to every address on a loopback-only server"),
        pytest.param(f"pipeline:\n  - errors: {{}}\n  - cache: {{paths: ['/public/*']}}\n"
                     f"  - auth: {{secret: {SECRET}, paths: ['/api/*']}}\n",
                     id="a cache for public pages outside an auth layer for the API: scopes apart"),
        pytest.param(f"pipeline:\n  - errors: {{}}\n  - cache: {{paths: ['/p?blic/*', '/static/v[0-9]/*']}}\n"
                     f"  - auth: {{secret: {SECRET}, paths: ['/api/*']}}\n",
                     id="a cache scoped with ? and [...] outside an auth layer for the API: scopes apart"),
        pytest.param(f"pipeline:\n  - errors: {{}}\n  - cors: {{origins: ['https://a.example'], paths: ['/api/*']}}\n"
                     f"  - auth: {{secret: {SECRET}, paths: ['/admin/*']}}\n"
                     "  - cors: {origins: ['https://b.example'], paths: ['/partner/*']}\n",
                     id="cors for partner paths inside an auth layer for admin paths: scopes apart"),
        pytest.param(f"pipeline:\n  - errors: {{}}\n  - auth: {{secret: {SECRET}, methods: [POST]}}\n"
                     "  - cors: {origins: ['https://a.example'], methods: [GET, OPTIONS]}\n",
                     id="cors for reads inside an auth layer for POST only: methods apart"),
        pytest.param(f"pipeline:\n  - errors: {{}}\n  - auth: {{secret: {SECRET}, default: none, rules: [{{paths: "
                     "['/admin/*'], roles: [admin]}]}\n", id="auth open by default, roles on some paths"),
        pytest.param("server: {trusted_proxy: 127.0.0.1, trusted_proxy_headers: [x-forwarded-for]}\n"
                     "pipeline:\n  - errors: {}\n  - ratelimit: {limits: ['10/second']}\n",
                     id="Waitress takes the client address from the proxy it trusts"),
        pytest.param("pipeline:\n  - errors: {}\n  - werkzeug.middleware.proxy_fix:ProxyFix: {x_proto: 1}\n"
                     "  - ratelimit: {limits: ['10/second']}\n",
                     id="ProxyFix takes X-Forwarded-For unless told not to"),
        pytest.param("server: {clear_untrusted_proxy_headers: false}\npipeline:\n  - errors: {}\n"
                     "  - proxy: {x_for: 1}\n", id="proxy layer, headers kept explicitly"),
        pytest.param("pipeline:\n  - errors: {}\n  - cors: {origins: ['https://a.example']}\n  - validation: {}\n"
                     "  - versioning: {supported: [v1]}\n", id="cors outside the layers that refuse"),
    ],
)
def test_clean_orders_pass(pipeline: str) -> None:
    assert problems(pipeline) == []


CSRF_DOUBLE = f"  - session: {{secret_key: {SECRET}, cookie_name: sid, cookie_secure: false}}\n" \
              f"  - csrf: {{cookie_name: sid, double_submit: true, secret_key: {SECRET}}}\n"


@pytest.mark.parametrize(("allow_headers", "warned"), [
    pytest.param("[Authorization]", True, id="not allowed"),
    pytest.param("[]", True, id="no header allowed"),
    pytest.param("[Authorization, x-csrf-token]", False, id="allowed, in any case"),
    pytest.param("['*']", False, id="every header allowed"),
])
def test_a_double_submit_header_the_cors_layer_refuses_is_warned(allow_headers: str, warned: bool) -> None:
    found = problems("pipeline:\n  - cors: {origins: ['https://app.example.org'], allow_headers: "
                     f"{allow_headers}}}\n" + CSRF_DOUBLE)
    expected = ("stack.yaml:4:5 warning: pipeline[0]: cors at pipeline[0] does not allow the X-CSRF-Token header that "
                "csrf at pipeline[2] needs (double_submit): a preflight asking for it is refused, so pages on other "
                "origins cannot write; add X-CSRF-Token to allow_headers")
    assert (expected in found) is warned, found


@pytest.mark.parametrize("target", [
    pytest.param("no_such_module_anywhere:Layer", id="a module that does not import"),
    pytest.param("middleware.headers:NoSuchLayer", id="a missing attribute"),
    pytest.param("middleware.base:refuse", id="a function, not a class"),
])
def test_a_broken_registry_entry_does_not_stop_other_pipelines(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    linting = importlib.import_module("config.lint")  # (config.lint is also the function)
    from config import registry

    monkeypatch.setitem(registry.LAYERS, "broken", target)
    linting._built_in_classes.cache_clear()
    try:
        found = problems(f"pipeline:\n  - cache: {{}}\n  - stack_support:AuthMiddleware: {{secret: {SECRET}}}\n")
    finally:
        linting._built_in_classes.cache_clear()
    assert [line.partition(": a cached")[0] for line in found] == [
        "stack.yaml:4:5 pipeline[0]: cache at pipeline[0] is outside auth at pipeline[1]"]


PUBLIC = "server: {listen: '0.0.0.0:8000'}\npipeline:\n  - errors: {}\n"
OUTSIDE = ("warning: pipeline[1]: headers at pipeline[1] is outside proxy at pipeline[2], which sets the scheme: "
           "headers reads it first and never sends Strict-Transport-Security; put proxy right after errors")
NOTHING = "sends Strict-Transport-Security only on https requests, but nothing makes wsgi.url_scheme https"


@pytest.mark.parametrize(("layers", "expected"), [
    pytest.param("  - headers: {}\n", NOTHING, id="no proxy layer"),
    pytest.param("  - proxy: {x_for: 1}\n  - headers: {}\n", NOTHING, id="a proxy layer that keeps the scheme"),
    pytest.param("  - headers: {}\n  - proxy: {x_proto: 1}\n", OUTSIDE, id="headers outside the proxy layer"),
    pytest.param("  - headers: {}\n  - proxy: {forwarded: 1}\n", OUTSIDE, id="outside a Forwarded proxy layer"),
    pytest.param("  - proxy: {x_proto: 1}\n  - headers: {}\n", None, id="proxy first: clean"),
    pytest.param("  - werkzeug.middleware.proxy_fix:ProxyFix: {x_for: 1}\n  - headers: {}\n", None,
                 id="ProxyFix reads the scheme unless told not to"),
    pytest.param("  - werkzeug.middleware.proxy_fix:ProxyFix: {x_proto: 0}\n  - headers: {}\n", NOTHING,
                 id="ProxyFix told not to"),
    pytest.param("  - headers: {hsts: false}\n", None, id="no HSTS to send"),
])
def test_hsts_that_can_never_be_sent_is_warned(layers: str, expected: str | None) -> None:
    found = [p for p in problems(PUBLIC + layers) if "Strict-Transport-Security" in p]
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(("text", "served", "hosted"), [
    pytest.param(PUBLIC + "  - headers: {}\n", NOTHING, None,
                 id="no https in serve.py's server: another may set the scheme itself"),
    pytest.param(PUBLIC + "  - headers: {}\n  - proxy: {x_proto: 1}\n", OUTSIDE, None,
                 id="headers outside the proxy layer: judged on the hosting server's address instead"),
    pytest.param("server: {listen: '0.0.0.0:8000', trusted_proxy: 10.0.0.1, trusted_proxy_headers: [x-forwarded-for]}"
                 "\npipeline:\n  - errors: {}\n  - proxy: {x_for: 1}\n",
                 "under Waitress keep only server.trusted_proxy", None,
                 id="trusted_proxy and a proxy layer: only the layer counts elsewhere"),
    pytest.param("server: {trusted_proxy: '*', trusted_proxy_headers: [x-forwarded-for]}\n"
                 "pipeline:\n  - errors: {}\n",
                 "trusted_proxy '*' trusts every peer", None, id="trusted_proxy '*' has no effect elsewhere"),
])
def test_rules_on_serve_pys_server_settings_are_not_said_to_another_server(text: str, served: str,
                                                                           hosted: str | None) -> None:
    assert any(served in line for line in problems(text))
    found = [line for line in problems(text, hosted=True) if served in line]
    assert found == ([] if hosted is None else [next(line for line in problems(text) if hosted in line)])


def test_a_purge_path_with_a_letter_outside_ascii_is_inside_a_scope_that_names_it() -> None:
    text = (f"pipeline:\n  - auth: {{secret: {SECRET}}}\n"
            "  - cache: {paths: ['/\u00e4/*'], purge_path: /\u00e4/purge}\n")
    assert problems(text) == []


def test_a_query_limit_the_url_limit_overrides_is_named() -> None:
    assert problems("pipeline:\n  - validation: {max_query_length: 12400}\n") == [
        "stack.yaml:4:5 warning: pipeline[0]: validation.max_query_length (12400) is not below max_url_length "
        "(8192): the URL's limit refuses such queries first (414); raise max_url_length"]


@pytest.mark.parametrize(("pipeline", "expected"), [
    pytest.param(f"pipeline:\n  - errors: {{}}\n  - session: {{secret_key: {SECRET}}}\n  - validation: {{}}\n",
                 "stack.yaml:5:5 warning: pipeline[1]: session at pipeline[1] is outside validation at pipeline[2]: "
                 "it would do store work for requests validation refuses; move validation before it",
                 id="store work before validation"),
    pytest.param(f"pipeline:\n  - errors: {{}}\n  - session: {{secret_key: {SECRET}, cookie_name: sid}}\n"
                 "  - cache: {cookie_names: [other]}\n",
                 "stack.yaml:6:5 warning: pipeline[2]: cache at pipeline[2] does not list the session cookie 'sid' "
                 "in cookie_names: requests carrying a session would not be treated as private",
                 id="the session cookie missing from the cache's cookie_names"),
    pytest.param("pipeline:\n  - errors: {}\n  - ratelimit: {limits: ['10/second'], key: 'header:X-Api-Key'}\n",
                 "stack.yaml:5:5 warning: pipeline[1]: ratelimit at pipeline[1] keys only on request headers",
                 id="a limiter keyed only on a header"),
    pytest.param(f"pipeline:\n  - errors: {{}}\n  - auth: {{secret: {SECRET}}}\n"
                 "  - ratelimit: {limits: ['10/second']}\n",
                 "stack.yaml:6:5 warning: pipeline[2]: ratelimit at pipeline[2] keys on client_ip but is inside auth",
                 id="the only client_ip limiter inside auth"),
])
def test_warnings(pipeline: str, expected: str) -> None:
    found = problems(pipeline)
    assert any(line.startswith(expected) for line in found), found


@pytest.mark.parametrize("pipeline", [
    pytest.param("pipeline:\n  - errors: {}\n  - ratelimit: {limits: ['10/second'], key: [client_ip, 'header:X-A']}\n",
                 id="a header key beside client_ip"),
    pytest.param(f"pipeline:\n  - errors: {{}}\n  - ratelimit: {{limits: ['10/second']}}\n"
                 f"  - auth: {{secret: {SECRET}}}\n  - ratelimit: {{limits: ['100/minute'], namespace: inner}}\n",
                 id="a client_ip limiter inside auth, with another before it"),
])
def test_limiters_that_are_fine(pipeline: str) -> None:
    found = problems(pipeline)
    assert not [line for line in found if "keys only on request headers" in line or "but is inside auth" in line], \
        found


def test_errors_come_first_then_warnings_each_in_the_order_of_the_file() -> None:
    # The rules find them in another order: errors_outermost, ratelimit_escapes, then unknown_stores.
    found = problems("pipeline:\n  - health: {stores: [nope]}\n"
                     "  - ratelimit: {limits: ['10/second'], key: 'header:X-A'}\n  - errors: {}\n")
    assert [(line.split(" ")[0], " warning: " in line) for line in found] == [
        ("stack.yaml:4:23", False), ("stack.yaml:6:5", False), ("stack.yaml:5:5", True)], found


AUTH = f"  - auth: {{secret: {SECRET}"
PAGE_IN_CORS = ("stack.yaml:{line}:5 warning: pipeline[{page}]: operator_page at pipeline[{page}] is inside cors at "
                "pipeline[1]: cors would let pages of the origins it allows read the page's data (the whole "
                "configuration; with allow_credentials, as the signed-in operator); the page refuses other origins "
                "itself, but keep it out of cors: add ['{path}', '{path}/*'] to cors's exclude_paths, or put the page "
                "before cors")
NO_IDENTITY = ("stack.yaml:6:5 warning: pipeline[2]: operator_page at pipeline[2] requires roles, but {why}: no "
               "identity is set for the page, so every request would get 401; let auth see the page's path")
OUT_OF_SCOPE = "the scope of auth at pipeline[1] (paths, exclude_paths, methods) leaves its path '/_stack' out"
NO_AUTH = "auth at pipeline[1] gives its path '/_stack' auth: none (its rules or default)"
UNSEEN_WRITES = ("stack.yaml:5:5 warning: pipeline[1]: cache at pipeline[1] is scoped to methods {methods}: "
                 "{missing} requests never reach it, so a successful write no longer drops the entries of its URI "
                 "(RFC 9111 §4.4) and readers get the old answer until its ttl ends; remove methods (the cache answers "
                 "only GET and HEAD anyway)")


@pytest.mark.parametrize(("layers", "expected"), [
    # operator_page inside cors
    pytest.param("  - cors: {origins: ['https://a.example'], allow_credentials: true}\n  - operator_page: {}\n",
                 PAGE_IN_CORS.format(line=6, page=2, path="/_stack"), id="operator page inside cors"),
    pytest.param(f"  - cors: {{origins: ['https://a.example']}}\n{AUTH}}}\n  - operator_page: {{roles: [admin], "
                 "path: /ops}\n", PAGE_IN_CORS.format(line=7, page=3, path="/ops"),
                 id="with roles: cors outside auth outside the page"),
    pytest.param("  - cors: {origins: ['https://a.example'], paths: ['/api/*', '/_stack/data.json']}\n"
                 "  - operator_page: {}\n", PAGE_IN_CORS.format(line=6, page=2, path="/_stack"),
                 id="cors scoped to the page's data"),
    pytest.param("  - cors: {origins: ['https://a.example'], exclude_paths: ['/_stack', '/_stack/*']}\n"
                 "  - operator_page: {}\n", None, id="cors scoped away from the page"),
    pytest.param("  - cors: {origins: ['https://a.example'], paths: ['/api/*']}\n  - operator_page: {}\n", None,
                 id="cors scoped to the API only"),
    pytest.param("  - operator_page: {}\n  - cors: {origins: ['https://a.example']}\n", None,
                 id="the page before cors"),
    # operator_page roles with an auth layer that never sets an identity for it
    pytest.param(f"{AUTH}, paths: ['/api/*']}}\n  - operator_page: {{roles: [admin]}}\n",
                 NO_IDENTITY.format(why=OUT_OF_SCOPE), id="auth scoped to other paths"),
    pytest.param(f"{AUTH}, exclude_paths: ['/_stack*']}}\n  - operator_page: {{roles: [admin]}}\n",
                 NO_IDENTITY.format(why=OUT_OF_SCOPE), id="auth excluding the page"),
    pytest.param(f"{AUTH}, paths: ['/_stack']}}\n  - operator_page: {{roles: [admin]}}\n",
                 NO_IDENTITY.format(why=OUT_OF_SCOPE), id="auth on the page, not on its data"),
    pytest.param(f"{AUTH}, methods: [POST]}}\n  - operator_page: {{roles: [admin]}}\n",
                 NO_IDENTITY.format(why=OUT_OF_SCOPE), id="auth scoped to writes"),
    pytest.param(f"{AUTH}, rules: [{{paths: ['/_stack*'], auth: none}}]}}\n  - operator_page: {{roles: [admin]}}\n",
                 NO_IDENTITY.format(why=NO_AUTH), id="auth rules let the page through"),
    pytest.param(f"{AUTH}, default: none}}\n  - operator_page: {{roles: [admin]}}\n",
                 NO_IDENTITY.format(why=NO_AUTH), id="auth default none"),
    pytest.param(f"{AUTH}, paths: ['/api/*', '/_stack*']}}\n  - operator_page: {{roles: [admin]}}\n", None,
                 id="auth scoped to the API and the page"),
    pytest.param(f"{AUTH}, default: optional, rules: [{{paths: ['/public/*'], auth: none}}]}}\n"
                 "  - operator_page: {roles: [admin]}\n", None, id="auth optional, none elsewhere"),
    pytest.param(f"{AUTH}, paths: ['/api/*']}}\n{AUTH}, realm: ops}}\n  - operator_page: {{roles: [admin]}}\n",
                 None, id="a second auth layer that sees the page"),
    pytest.param(f"{AUTH}, paths: ['/api/*']}}\n  - operator_page: {{}}\n", None, id="no roles: no identity needed"),
    # a cache whose methods scope leaves writes out
    pytest.param("  - cache: {methods: [GET, HEAD]}\n",
                 UNSEEN_WRITES.format(methods="GET, HEAD", missing="POST, PUT, PATCH, DELETE"),
                 id="cache GET and HEAD"),
    pytest.param("  - cache: {methods: [get, post, put, delete]}\n",
                 UNSEEN_WRITES.format(methods="GET, POST, PUT, DELETE", missing="PATCH"), id="cache without PATCH"),
    pytest.param("  - cache: {methods: [GET, POST, PUT, PATCH, DELETE]}\n", None, id="cache with every write"),
    pytest.param("  - cache: {paths: ['/api/*']}\n", None, id="cache scoped by paths only"),
])
def test_access_and_scope_warnings(layers: str, expected: str | None) -> None:
    found = [p for p in problems("pipeline:\n  - errors: {}\n" + layers)
             if "operator_page" in p.split(": ", 1)[1] or "is scoped to methods" in p]
    assert found == ([] if expected is None else [expected])


STREAMS_TAKE_EVERY_THREAD = (
    "stack.yaml:{line}:{column} warning: app.options.search.max_streams: search.max_streams ({streams}) is not "
    "below server.threads ({threads}) with search.stream_interval {interval}: paced streams can hold every "
    "server thread of a process (each for about five intervals), and every other request, the health probes "
    "too, then waits behind them; set max_streams to at most {most}, or raise server.threads (both count per "
    "process, with workers too)")


@pytest.mark.parametrize(("server", "search", "expected"), [
    pytest.param("{threads: 4}", "{stream_interval: 0.5, max_streams: 4}",
                 STREAMS_TAKE_EVERY_THREAD.format(line=6, column=36, streams=4, threads=4, interval=0.5, most=3),
                 id="as many streams as threads"),
    pytest.param("{threads: 2, workers: 3}", "{stream_interval: 1}",
                 STREAMS_TAKE_EVERY_THREAD.format(line=6, column=5, streams=4, threads=2, interval=1, most=1),
                 id="the default max_streams over two threads, per worker"),
    pytest.param("{threads: 1}", "{stream_interval: 2}",
                 STREAMS_TAKE_EVERY_THREAD.format(line=6, column=5, streams=4, threads=1, interval=2, most=0)
                 .replace("set max_streams to at most 0, or raise", "raise"),
                 id="one thread: no cap leaves room"),
    pytest.param("{threads: 8}", "{stream_interval: 0.5}", None, id="the defaults: 4 of 8 threads"),
    pytest.param("{threads: 4}", "{stream_interval: 0.5, max_streams: 3}", None, id="a thread left over"),
    pytest.param("{threads: 2}", "{stream_interval: 0, max_streams: 4}", None, id="unpaced streams end at once"),
])
def test_paced_streams_that_can_take_every_thread_are_a_warning(server: str, search: str,
                                                                expected: str | None) -> None:
    text = (f"server: {server}\napp:\n  factory: app:create_app\n  options:\n    var_dir: var\n"
            f"    search: {search}\n")
    found = [str(p) for p in lint(parse(read_text(text, file="stack.yaml", env={}))) if "max_streams" in str(p)]
    assert found == ([] if expected is None else [expected])
    if expected is not None:  # a setting of serve.py's server: another WSGI server has threads of its own
        assert [p for p in lint(parse(read_text(text, file="stack.yaml", env={})), hosted=True)
                if "max_streams" in str(p)] == []


def test_a_stream_cap_of_another_app_is_not_judged() -> None:
    text = ("server: {threads: 1}\napp:\n  factory: stack_support:echo_app\n"
            "  options: {search: {stream_interval: 1, max_streams: 9}}\n")
    assert [p for p in lint(parse(read_text(text, file="stack.yaml", env={}))) if "max_streams" in str(p)] == []


SHARED_OWN = ("keeps state in store 'shared' (memory://) that its class says every process must share "
              "(shared_state), but server.workers is 2: each process would have its own copy; use redis://")


@pytest.mark.parametrize(("target", "written", "expected"), [
    pytest.param("stack_support:SharedVisits", "visits",
                 [f"stack.yaml:5:5 pipeline[0]: visits {SHARED_OWN}"], id="shared_state, by its short name"),
    pytest.param("stack_support:SharedVisits", "stack_support:SharedVisits",
                 [f"stack.yaml:5:5 pipeline[0]: stack_support:SharedVisits {SHARED_OWN}"],
                 id="shared_state, by its path while registered"),
    pytest.param("stack_support:Visits", "visits",
                 ["stack.yaml:5:5 warning: pipeline[0]: visits keeps state in store 'shared' (memory://) and "
                  "server.workers is 2: each process has its own copy; if it must be shared (counters, sessions, "
                  "revocations), use redis:// and set shared_state = True on its class; if a copy per process is "
                  "right, set shared_state = False"], id="a store and no word on sharing"),
    pytest.param("stack_support:LocalVisits", "visits", [], id="shared_state = False"),
])
def test_a_registered_layer_is_judged_by_its_shared_state_under_workers(
        monkeypatch: pytest.MonkeyPatch, target: str, written: str, expected: list[str]) -> None:
    linting = importlib.import_module("config.lint")
    from config import registry

    monkeypatch.setitem(registry.LAYERS, "visits", target)
    linting._built_in_classes.cache_clear()
    try:
        assert problems(f"server: {{workers: 2}}\npipeline:\n  - {written}: {{}}\n") == expected
    finally:
        linting._built_in_classes.cache_clear()


@pytest.mark.parametrize(("base", "options", "expected"), [
    pytest.param("middleware.session:SessionMiddleware", f"{{secret_key: {SECRET}}}",
                 "session keeps state in store 'shared' (memory://) but server.workers is 2: each process would "
                 "have its own copy; use redis://", id="a session subclass: told once"),
    pytest.param("middleware.cache:CacheMiddleware", "{}", f"stack_support:Shared {SHARED_OWN}",
                 id="a cache subclass whose class says its entries must be shared: an error, not the cache warning"),
])
def test_a_subclassed_built_in_that_sets_shared_state(monkeypatch: pytest.MonkeyPatch, base: str, options: str,
                                                      expected: str) -> None:
    import stack_support

    from config.registry import import_string

    monkeypatch.setattr(stack_support, "Shared", type("Shared", (import_string(base),), {"shared_state": True}),
                        raising=False)
    assert problems(f"server: {{workers: 2}}\npipeline:\n  - stack_support:Shared: {options}\n") == [
        f"stack.yaml:5:5 pipeline[0]: {expected}"]


@pytest.mark.parametrize(("layers", "expected"), [
    pytest.param("  - stack_support:Visits: {}\n  - stack_support:Visits: {paths: ['/api/*']}\n",
                 ["stack.yaml:5:5 warning: pipeline[1]: stack_support:Visits appears twice with overlapping scope "
                  "(pipeline[0] and pipeline[1]); requests in both scopes pass it twice"], id="a layer of your own"),
    pytest.param("  - stack_support:Tag: {name: a}\n  - stack_support:Tag: {name: a}\n",
                 ["stack.yaml:5:5 warning: pipeline[1]: stack_support:Tag appears twice with overlapping scope "
                  "(pipeline[0] and pipeline[1]); requests in both scopes pass it twice"], id="a plain factory"),
    pytest.param("  - stack_support:Tag: {name: a}\n  - stack_support:Tag: {name: b}\n", [],
                 id="with other options: a layer of your own may be meant to run twice"),
    pytest.param("  - stack_support:Visits: {paths: ['/a/*']}\n  - stack_support:Visits: {paths: ['/b/*']}\n", [],
                 id="scopes apart"),
])
def test_a_layer_of_your_own_twice(layers: str, expected: list[str]) -> None:
    assert problems("pipeline:\n" + layers) == expected


@pytest.mark.parametrize(("text", "where"), [
    pytest.param("pipeline: []\n", "stack.yaml:3:1", id="an empty list"),
    pytest.param("pipeline:\n", "stack.yaml:3:1", id="the key with no value"),
    pytest.param("", "stack.yaml:1:1", id="no pipeline key"),
])
def test_a_pipeline_without_layers_is_warned(text: str, where: str) -> None:
    assert problems(text) == [
        f"{where} warning: pipeline: pipeline lists no layer: the app is served behind the default errors layer "
        "alone (no request ids, security headers, limits or access log); list the layers, as in the default "
        "stack.yaml"]


@pytest.mark.parametrize(("options", "where", "why"), [
    pytest.param(f"session: {{secret_key: {'a' * 48}}}", "5:27 warning: pipeline[1].session.secret_key",
                 "is a run of 1 character repeated", id="one character"),
    pytest.param(f"session: {{secret_key: {'changeme' * 4}cha}}", "5:27 warning: pipeline[1].session.secret_key",
                 "is a run of 8 characters repeated", id="a word over and over, the last copy cut"),
    pytest.param(f"auth: {{secret: '{'0123456' * 5}'}}", "5:20 warning: pipeline[1].auth.secret",
                 "is a run of 7 characters repeated", id="digits over and over"),
    pytest.param(f"session: {{secret_key: {SECRET}, secret_key_fallbacks: [{'ab' * 16}]}}",
                 "5:95 warning: pipeline[1].session.secret_key_fallbacks[0]", "is a run of 2 characters repeated",
                 id="an old key"),
    pytest.param(f"csrf: {{secret_key: {'abcabcabcabcabcabcabcabcabcabcxy' + 'aabbccxy'}}}",
                 "5:24 warning: pipeline[1].csrf.secret_key", "uses only 5 different characters in 40",
                 id="few characters"),
])
def test_a_long_secret_that_is_easy_to_guess_is_warned(options: str, where: str, why: str) -> None:
    found = problems(f"pipeline:\n  - errors: {{}}\n  - {options}\n")
    assert [line for line in found if "the secret" in line] == [
        f"stack.yaml:{where}: the secret {why}: its length says little of how hard it is to guess; generate one "
        "with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"]


@pytest.mark.parametrize("secret", [
    pytest.param(SECRET, id="token_urlsafe"),
    pytest.param("3f1c9a7be2d04c6f8a1e5b7d9c2f4a6e8b0d1c3e5f7a9b2d4c6e8f0a1b3c5d7e", id="token_hex"),
])
def test_a_random_secret_is_not_warned(secret: str) -> None:
    assert problems(f"pipeline:\n  - errors: {{}}\n  - session: {{secret_key: {secret}}}\n") == []


@pytest.mark.parametrize(("layers", "expected"), [
    pytest.param(f"  - session: {{secret_key: {SECRET}}}\n  - auth: {{secret: {SECRET}}}\n",
                 ["stack.yaml:6:20 warning: pipeline[2].auth.secret: the same secret as "
                  "pipeline[1].session.secret_key"],
                 id="the session's key and the tokens'"),
    pytest.param(f"  - session: {{secret_key: {SECRET}}}\n  - csrf: {{secret_key: {SECRET}}}\n",
                 ["stack.yaml:6:24 warning: pipeline[2].csrf.secret_key: the same secret as "
                  "pipeline[1].session.secret_key"], id="the session's and csrf's"),
    pytest.param(f"  - session: {{secret_key: {SECRET}, secret_key_fallbacks: [{SECRET}]}}\n", [],
                 id="one layer's own key among its fallbacks (a rotation under way)"),
    pytest.param(f"  - session: {{secret_key: {SECRET}}}\n  - auth: {{secret: {SECRET[::-1]}}}\n", [],
                 id="keys of their own"),
])
def test_one_secret_for_two_layers_is_warned(layers: str, expected: list[str]) -> None:
    found = problems(f"pipeline:\n  - errors: {{}}\n{layers}")
    assert [line.split(": give each")[0] for line in found if "the same secret" in line] == expected
    assert all(line.endswith(": give each layer a key of its own; generate one with: python3 -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'") for line in found if "the same secret" in line)
    assert not any(SECRET in line for line in found)  # (the masking: the secret itself is never shown)


def test_a_rate_limit_key_is_no_secret_to_judge() -> None:
    found = problems("pipeline:\n  - errors: {}\n  - ratelimit: {limits: ['10/second'], key: 'header:aaaaaaaaaaaa'}\n")
    assert not [line for line in found if "the secret" in line], found


@pytest.mark.parametrize(("paths", "other", "expected"), [
    pytest.param(["/api/v?/search"], ["/api/v1/*"], True, id="? against *"),
    pytest.param(["/api/v1/*"], ["/api/v?/search"], True, id="* against ?"),
    pytest.param(["/api/v[12]/search"], ["/api/v1/search"], True, id="a class against a literal path"),
    pytest.param(["/api/v[!2]/*"], ["/api/v1/x"], True, id="a negated class"),
    pytest.param(["/p?blic/*"], ["/public/x*"], True, id="? early in the path"),
    pytest.param(["/api/*"], ["/api/v1/*"], True, id="one prefix begins the other"),
    pytest.param(["*.json"], ["/api/*"], True, id="a glob that starts with *"),
    pytest.param(["/a[b"], ["/a[b"], True, id="an unclosed [ is a literal"),
    pytest.param(["/api/v?/search"], ["/admin/*"], False, id="? with another prefix"),
    pytest.param(["/api/v[12]/*"], ["/public/*"], False, id="a class with another prefix"),
    pytest.param(["/api/*/search"], ["/api/*/users"], False, id="the same prefix, other endings"),
    pytest.param(["/api/v?/search"], ["/api/v1/users"], False, id="? with another ending"),
    pytest.param(["/a/*"], ["/b/*"], False, id="prefixes apart"),
    pytest.param([], ["/b/*"], True, id="no paths: every path"),
])
def test_scope_overlaps_is_never_sure_of_a_wrong_no(paths: list[str], other: list[str], expected: bool) -> None:
    from config.scope import Scope

    one, two = Scope(paths), Scope(other)
    assert (one.overlaps(two), two.overlaps(one)) == (expected, expected)


@pytest.mark.parametrize(("layers", "expected"), [
    pytest.param("  - request_id: {paths: ['/api/v?/search']}\n  - request_id: {paths: ['/api/v1/*']}\n",
                 ["stack.yaml:6:5 warning: pipeline[2]: request_id appears twice with overlapping scope "
                  "(pipeline[1] and pipeline[2]); requests in both scopes pass it twice"], id="? meets *"),
    pytest.param("  - request_id: {paths: ['/api/v[12]/*']}\n  - request_id: {paths: ['/api/v1/search']}\n",
                 ["stack.yaml:6:5 warning: pipeline[2]: request_id appears twice with overlapping scope "
                  "(pipeline[1] and pipeline[2]); requests in both scopes pass it twice"], id="a class meets a path"),
    pytest.param("  - request_id: {paths: ['/api/v?/search']}\n  - request_id: {paths: ['/admin/*']}\n", [],
                 id="? apart"),
])
def test_the_same_layer_twice_through_glob_wildcards(layers: str, expected: list[str]) -> None:
    assert problems("pipeline:\n  - errors: {}\n" + layers) == expected


STAR = ("server: {{listen: '{listen}', trusted_proxy: '*', trusted_proxy_headers: [{headers}]}}\n"
        "pipeline:\n  - errors: {{}}\n")


@pytest.mark.parametrize(("listen", "headers", "expected"), [
    pytest.param("0.0.0.0:8000", "x-forwarded-for", "stack.yaml:3:49 server.trusted_proxy: trusted_proxy '*' trusts "
                 "every peer, and the server listens on 0.0.0.0:8000: any client could set its own address in "
                 "X-Forwarded-For or Forwarded (its rate-limit key, allow_from); set trusted_proxy to the proxy's "
                 "address, or use the proxy layer with trusted_proxies", id="beyond loopback: an error"),
    pytest.param("[::]:8000", "forwarded", "stack.yaml:3:46 server.trusted_proxy: trusted_proxy '*' trusts "
                 "every peer, and the server listens on [::]:8000: any client could set its own address in "
                 "X-Forwarded-For or Forwarded (its rate-limit key, allow_from); set trusted_proxy to the proxy's "
                 "address, or use the proxy layer with trusted_proxies", id="Forwarded beyond loopback: an error"),
    pytest.param("127.0.0.1:8000", "x-forwarded-for", "stack.yaml:3:51 warning: server.trusted_proxy: trusted_proxy "
                 "'*' trusts every peer, so any client can forge X-Forwarded-For", id="loopback only: a warning"),
    pytest.param("0.0.0.0:8000", "x-forwarded-proto", "stack.yaml:3:49 warning: server.trusted_proxy: trusted_proxy "
                 "'*' trusts every peer, so any client can forge X-Forwarded-Proto",
                 id="no address header trusted: a warning"),
])
def test_trusted_proxy_star_beyond_loopback_lets_a_client_forge_its_address(listen: str, headers: str,
                                                                            expected: str) -> None:
    found = [line for line in problems(STAR.format(listen=listen, headers=headers)) if "trusted_proxy '*'" in line]
    assert found == [expected]


EVERY_PEER = "server: {{listen: '{listen}'}}\npipeline:\n  - errors: {{}}\n  - proxy: {{{options}}}\n"


@pytest.mark.parametrize(("listen", "options", "expected"), [
    pytest.param("0.0.0.0:8000", "x_for: 1, trusted_proxies: [0.0.0.0/0]",
                 ["stack.yaml:6:5 pipeline[1]: proxy at pipeline[1] trusts every address (0.0.0.0/0 in "
                  "trusted_proxies), and the server listens on 0.0.0.0:8000: any client could set its own address "
                  "(its rate-limit key, allow_from); list only the proxies' addresses in trusted_proxies, or "
                  "server.trusted_proxy"], id="0.0.0.0/0 beyond loopback: an error"),
    pytest.param("[::]:8000", "forwarded: 1, trusted_proxies: ['10.0.0.0/8', '::/0']",
                 ["stack.yaml:6:5 pipeline[1]: proxy at pipeline[1] trusts every address (::/0 in "
                  "trusted_proxies), and the server listens on [::]:8000: any client could set its own address "
                  "(its rate-limit key, allow_from); list only the proxies' addresses in trusted_proxies, or "
                  "server.trusted_proxy"], id="::/0 beyond loopback: an error"),
    pytest.param("0.0.0.0:8000", "x_proto: 1, x_prefix: 1, trusted_proxies: [0.0.0.0/0]",
                 ["stack.yaml:6:5 pipeline[1]: proxy at pipeline[1] trusts every address (0.0.0.0/0 in "
                  "trusted_proxies), and the server listens on 0.0.0.0:8000: any client could set its own scheme "
                  "and prefix; list only the proxies' addresses in trusted_proxies, or server.trusted_proxy"],
                 id="no address read: what it reads is named"),
    pytest.param("0.0.0.0:8000", "x_for: 1, trusted_proxies: [10.0.0.0/8]", [], id="the proxies' network"),
    pytest.param("0.0.0.0:8000", "trusted_proxies: [0.0.0.0/0]", [], id="no header read"),
    pytest.param("127.0.0.1:8000", "x_for: 1, trusted_proxies: [0.0.0.0/0]", [], id="loopback only"),
])
def test_a_proxy_layer_that_trusts_every_address(listen: str, options: str, expected: list[str]) -> None:
    found = [line for line in problems(EVERY_PEER.format(listen=listen, options=options)) if "every address" in line]
    assert found == expected


PROBES_MEET = ("warning: pipeline[2]: {name} at pipeline[2] is inside {inner} at pipeline[1]: probes and scrapes "
               "would meet it first")


@pytest.mark.parametrize(("outer", "probe", "expected"), [
    pytest.param("ratelimit: {limits: ['10/second']}", "health: {}",
                 PROBES_MEET.format(name="health", inner="ratelimit"), id="health inside ratelimit"),
    pytest.param("ratelimit: {limits: ['10/second'], paths: ['/*z']}", "health: {}",
                 PROBES_MEET.format(name="health", inner="ratelimit"), id="a scope that takes /healthz"),
    pytest.param("ratelimit: {limits: ['10/second'], paths: ['/*']}", "health: {readiness_path: /ready}",
                 PROBES_MEET.format(name="health", inner="ratelimit"), id="a scope that takes every path"),
    pytest.param(f"auth: {{secret: {SECRET}, methods: [GET]}}", "metrics: {}",
                 PROBES_MEET.format(name="metrics", inner="auth"), id="auth on every GET"),
    pytest.param("ratelimit: {limits: ['10/second'], paths: ['/api/*']}", "health: {}", None,
                 id="ratelimit scoped to the API"),
    pytest.param(f"auth: {{secret: {SECRET}, paths: ['/api/*']}}", "metrics: {}", None, id="auth scoped to the API"),
    pytest.param("ratelimit: {limits: ['10/second'], exclude_paths: ['/healthz', '/readyz']}", "health: {}", None,
                 id="ratelimit excluding the probes"),
    pytest.param("ratelimit: {limits: ['10/second'], exclude_paths: ['/healthz']}", "health: {}",
                 PROBES_MEET.format(name="health", inner="ratelimit"), id="readiness still limited"),
    pytest.param("ratelimit: {limits: ['10/second'], paths: ['/api/*']}",
                 "health: {liveness_path: /api/live, readiness_path: /api/ready}",
                 PROBES_MEET.format(name="health", inner="ratelimit"), id="probes moved into the scope"),
    pytest.param("ratelimit: {limits: ['10/second'], methods: [POST]}", "health: {}", None,
                 id="ratelimit on writes only"),
    pytest.param("cache: {paths: ['/api/*/search']}", "metrics: {path: /_metrics}", None,
                 id="a cache for search only"),
])
def test_probes_inside_a_layer_scoped_away_from_them(outer: str, probe: str, expected: str | None) -> None:
    found = [p.split(" ", 1)[1] for p in problems(f"pipeline:\n  - errors: {{}}\n  - {outer}\n  - {probe}\n")
             if "probes and scrapes" in p]
    assert found == ([] if expected is None else [expected])


NO_REQUEST = ("stack.yaml:5:{column} pipeline[1].ratelimit.exclude_paths[{i}]: ratelimit at pipeline[1] applies to no "
              "request: exclude_paths {glob!r} leaves out {what}; remove the layer, or narrow exclude_paths")


@pytest.mark.parametrize(("scope", "expected"), [
    pytest.param("exclude_paths: ['/*']", NO_REQUEST.format(column=56, i=0, glob="/*", what="every path"),
                 id="every path excluded"),
    pytest.param("exclude_paths: ['/healthz', '/**']",
                 NO_REQUEST.format(column=68, i=1, glob="/**", what="every path"), id="every path, second entry"),
    pytest.param("paths: ['/api/*'], exclude_paths: ['/api/*']",
                 NO_REQUEST.format(column=75, i=0, glob="/api/*", what="every path of its paths"),
                 id="the paths excluded as written"),
    pytest.param("paths: ['/api/v1/search', '/api/v?/items'], exclude_paths: ['/api/*']",
                 NO_REQUEST.format(column=100, i=0, glob="/api/*", what="every path of its paths"),
                 id="the paths inside an excluded prefix"),
    pytest.param("paths: ['/api/*', '/auth/login'], exclude_paths: ['/api/*', '/auth/*']",
                 NO_REQUEST.format(column=90, i=0, glob="/api/*", what="every path of its paths").replace(
                     "'/api/*' leaves", "'/api/*', '/auth/*' leave"),
                 id="each path excluded by another entry"),
    pytest.param("paths: ['/api/*'], exclude_paths: ['/api/internal/*']", None, id="part of the paths excluded"),
    pytest.param("paths: ['/api/*', '/auth/login'], exclude_paths: ['/api/*']", None, id="one path left"),
    pytest.param("exclude_paths: ['/*.css', '/static/*']", None, id="some paths excluded"),
    pytest.param("paths: ['/a*'], exclude_paths: ['/a?*']", None, id="/a itself is left"),
    pytest.param("paths: ['/a?'], exclude_paths: ['/a[?]']", None, id="a class is no wildcard taken as text"),
])
def test_a_layer_whose_exclude_paths_leave_it_no_request(scope: str, expected: str | None) -> None:
    found = [p for p in problems(f"pipeline:\n  - errors: {{}}\n  - ratelimit: {{limits: ['10/second'], {scope}}}\n")
             if "applies to no request" in p]
    assert found == ([] if expected is None else [expected])


TWO_STORES = """app: {{factory: "stack_support:echo_app"}}
stores: {{a: "{a}", b: {b}}}
pipeline:
  - ratelimit: {{store: a, limits: ['100/minute'], paths: ['/api/*']}}
  - ratelimit: {{store: b, limits: ['100/minute'], paths: ['/auth/*']}}
"""
SHARED_COUNTERS = ("stack.yaml:5:5 warning: pipeline[1]: ratelimit at pipeline[1] and the one at pipeline[0] count in "
                   "stores 'b' and 'a' (one Redis database under one key_prefix) under the same namespace with an "
                   "equal limit: they share one counter per client, so requests to one use up the other's budget; "
                   "give each a namespace")


@pytest.mark.parametrize(("a", "b", "expected"), [
    pytest.param("redis://127.0.0.1:6379/0", '"redis://127.0.0.1:6379/0"', SHARED_COUNTERS, id="one URL, two names"),
    pytest.param("redis://LocalHost/0", '"redis://localhost:6379"', SHARED_COUNTERS,
                 id="the default port and database, the host's case"),
    pytest.param("redis://127.0.0.1:6379/0", '{url: "redis://127.0.0.1:6379/0", options: {key_prefix: "wsgistack:"}}',
                 SHARED_COUNTERS, id="the default key_prefix written out"),
    pytest.param("redis://127.0.0.1:6379/0", '"redis://127.0.0.1:6379/1"', None, id="another database"),
    pytest.param("redis://127.0.0.1:6379/0", '{url: "redis://127.0.0.1:6379/0", options: {key_prefix: "b:"}}', None,
                 id="another key_prefix"),
    pytest.param("memory://", '"memory://"', None, id="two memory stores are two stores"),
    pytest.param("redis://127.0.0.1:6379/\u00b2", '"redis://127.0.0.1:6379/\u00b2"', None,
                 id="a database that is no number int() reads (refused at stage 3, not compared)"),
    pytest.param("redis://127.0.0.1:6379/0/", '"redis://127.0.0.1:6379/0"', None,
                 id="a path that names no database is not database 0"),
])
def test_two_stores_on_one_redis_keyspace_share_counters(a: str, b: str, expected: str | None) -> None:
    found = [str(p) for p in lint(parse(read_text(TWO_STORES.format(a=a, b=b), file="stack.yaml", env={})))
             if "one counter per client" in p.message]
    assert found == ([] if expected is None else [expected])
