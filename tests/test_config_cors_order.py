"""The shipped configurations put cors outside every layer that refuses: refusals reach the page readable.

A browser shows a cross-origin page an error response only when it carries
CORS headers; the cors layer adds them to the refusals of the layers inside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from webtest import TestApp

from config import build_from_file

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"SESSION_SECRET": "s" * 43, "JWT_SECRET": "j" * 64}


@pytest.mark.parametrize(
    ("config", "env", "origin"),
    [
        pytest.param("stack.yaml", {}, "http://localhost:3000", id="stack.yaml"),
        pytest.param("examples/production.yaml", {"REDIS_URL": "memory://", "WSGISTACK_WORKERS": "1"},
                     "https://app.example.org", id="examples/production.yaml"),
        pytest.param("bench/full.yaml", {}, "http://localhost:3000", id="bench/full.yaml"),
    ],
)
@pytest.mark.parametrize(
    ("target", "status"),
    [
        pytest.param("/api/v1/search?q=%FF", 400, id="400 bad UTF-8"),
        pytest.param("/api/v1/search?q=" + "a" * 20000, 414, id="414 URL too long"),
    ],
)
def test_validation_refusals_carry_cors_headers(tmp_path: Path, config: str, env: dict[str, str], origin: str,
                                                target: str, status: int) -> None:
    environ = {**SECRETS, "WSGISTACK_VAR_DIR": str(tmp_path), **env}
    built = build_from_file(ROOT / config, env=environ)
    try:
        assert [p for p in built.warnings if "cors" in p.message] == []
        client = TestApp(built.app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        response = client.get(target, headers={"Origin": origin}, status=status)
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
    finally:
        built.close()
