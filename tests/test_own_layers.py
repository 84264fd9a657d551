"""Layers of your own, named in stack.yaml by their ``module:attr`` path: how the builder makes and closes them."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp

from config import build_from_text

OWN_LAYERS = textwrap.dedent('''
    import flask

    CLOSED = []


    class Holder:
        """A middleware that holds a resource (a file, a thread): its close() lets it go."""

        def __init__(self, app, name="holder"):
            self.app, self.name = app, name

        def __call__(self, environ, start_response):
            return self.app(environ, start_response)

        def close(self):
            CLOSED.append(self.name)


    def maybe(app, enabled=False):
        """A factory that hands the app back as it came when it has nothing to do, as many do."""
        return Holder(app, "maybe") if enabled else app


    def flask_app(options):
        """A Flask app that closes what it holds with the pipeline."""
        app = flask.Flask("own_app")
        app.add_url_rule("/", "index", lambda: "ok")
        app.close = lambda: CLOSED.append("app")
        return app
''')


@pytest.fixture
def own_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The module ``own_layers`` (above), importable from a folder on sys.path."""
    (tmp_path / "own_layers.py").write_text(OWN_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "own_layers", raising=False)
    yield importlib.import_module("own_layers")
    sys.modules.pop("own_layers", None)


def counting_access_log_close(monkeypatch: pytest.MonkeyPatch, closed: list[str]) -> None:
    """Make the access log's close() say when it runs (and still close its file)."""
    from middleware.access_log import AccessLogMiddleware

    close: Callable[[AccessLogMiddleware], None] = AccessLogMiddleware.close

    def counted(self: AccessLogMiddleware) -> None:
        closed.append("access_log")
        close(self)

    monkeypatch.setattr(AccessLogMiddleware, "close", counted)


@pytest.mark.parametrize(("pipeline", "expected"), [
    pytest.param("  - own_layers:maybe\n", ["app"], id="around the app"),
    pytest.param("  - own_layers:maybe\n  - access_log: {stream: stdout}\n", ["access_log", "app"],
                 id="around a built-in layer"),
    pytest.param("  - own_layers:maybe\n  - own_layers:Holder\n", ["holder", "app"], id="around a layer of your own"),
    pytest.param("  - own_layers:maybe\n  - own_layers:maybe\n  - access_log: {stream: stdout}\n",
                 ["access_log", "app"], id="twice, around a built-in layer"),
    pytest.param("  - own_layers:maybe: {enabled: true}\n  - own_layers:maybe\n", ["maybe", "app"],
                 id="inside one that is enabled"),
])
def test_a_factory_that_hands_back_its_app_does_not_close_it_twice(
        own_layers: Any, monkeypatch: pytest.MonkeyPatch, pipeline: str, expected: list[str]) -> None:
    """Every layer and the app are closed once when the pipeline is, whatever a factory returned."""
    counting_access_log_close(monkeypatch, own_layers.CLOSED)
    built = build_from_text("app: {factory: 'own_layers:flask_app'}\npipeline:\n  - errors: {}\n" + pipeline)
    assert TestApp(built.app).get("/").text == "ok"
    built.close()
    closed = own_layers.CLOSED
    assert closed == expected
