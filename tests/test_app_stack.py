"""The Flask core built from stack.yaml through config/, with the layers it relies on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.users import UserStore

STACK = """
server: {{listen: "127.0.0.1:8889"}}
stores: {{shared: "memory://"}}
app:
  options:
    var_dir: {var}
    search: {{index_sources: [json], per_page: 5}}
pipeline:
  - errors: {{format: envelope}}
  - request_id: {{}}
  - validation: {{}}
  - session: {{secret_key: "{key}", cookie_name: sid, cookie_secure: false}}
  - auth:
      secret: "{secret}"
      rules: [{{paths: ["/auth/*", "/api/*/health"], auth: none}}]
  - versioning: {{supported: [v1, v2], default: v1}}
"""


@pytest.fixture
def stack(make_stack: Callable[..., Any], tmp_path: Path) -> Any:
    """The whole pipeline from YAML, with alice in the users database."""
    var = tmp_path / "var"
    users = UserStore(var / "users.sqlite3", hash_method="pbkdf2:sha256:1000")
    users.add("alice", "wonderland", ["admin"])
    users.close()
    return make_stack(STACK.format(var=json.dumps(str(var)), key="k" * 40, secret="s" * 48))


def test_login_then_search_through_the_whole_pipeline(stack: Any) -> None:
    stack.get("/api/v1/search", {"q": "decode"}, status=401)
    tokens = stack.post_json("/auth/login", {"username": "alice", "password": "wonderland"}).json
    headers = {"Authorization": f"Bearer {tokens['access_token']}", "X-API-Version": "v2"}
    response = stack.get("/api/search", {"q": "decode"}, headers=headers)
    assert response.headers["X-Request-ID"]
    assert set(response.json) == {"query", "data", "pagination"}  # rewritten to /api/v2/search
    assert response.json["pagination"]["per_page"] == 5


def test_app_errors_carry_the_request_id(stack: Any) -> None:
    response = stack.get("/auth/nope", status=404)
    assert response.json["error"]["request_id"] == response.headers["X-Request-ID"]


def test_health_is_open_and_versioned(stack: Any) -> None:
    assert stack.get("/api/v2/health").json == {"status": "ok", "version": "v2", "engine": "local"}


def test_bad_app_options_are_reported_with_their_yaml_line(make_stack: Callable[..., Any]) -> None:
    from config import ConfigError

    text = "app:\n  options:\n    search:\n      engine: searxng\n"
    with pytest.raises(ConfigError) as caught:
        make_stack(text)
    report = str(caught.value)
    assert "upstream is required when engine is 'searxng'" in report
    assert ":3:" in report or ":4:" in report, report
