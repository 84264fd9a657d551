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

from config import ConfigError, build_from_text

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


FACTORIES = textwrap.dedent('''
    def contract(app, options, context):
        """The layer contract's signature, on a function without an Options model."""
        return app


    def by_position(app, limit, /, burst=1):
        """A factory whose limit can only be given by position."""
        return app


    def by_position_or_not(app, limit=10, /, burst=1):
        """The same, with a default for limit."""
        return app
''')


@pytest.mark.parametrize(("entry", "expected"), [
    pytest.param(
        "own_factories:contract: {level: 2}",
        "stack.yaml:3:29 pipeline[0].own_factories:contract: own_factories:contract takes (app, options, context), "
        "as the built-in layers do, so it needs their Options: an attribute Options that subclasses "
        "middleware.base.LayerOptions (it has none)",
        id="the layer contract on a function without Options"),
    pytest.param(
        "own_factories:by_position: {burst: 2}",
        "stack.yaml:3:32 pipeline[0].own_factories:by_position: own_factories:by_position takes limit by position "
        "only (it comes before the / in its signature), and stack.yaml passes options by name: wrap it in a factory "
        "of your own that takes limit by name",
        id="a required option taken by position only"),
    pytest.param(
        "own_factories:by_position: {limit: 5}",
        "stack.yaml:3:33 pipeline[0].own_factories:by_position.limit: own_factories:by_position takes limit by "
        "position only (it comes before the / in its signature), and stack.yaml passes options by name: wrap it in "
        "a factory of your own that takes limit by name",
        id="an option given that is taken by position only"),
    pytest.param(
        "own_factories:by_position_or_not: {limit: 5}",
        "stack.yaml:3:40 pipeline[0].own_factories:by_position_or_not.limit: own_factories:by_position_or_not takes "
        "limit by position only (it comes before the / in its signature), and stack.yaml passes options by name: "
        "wrap it in a factory of your own that takes limit by name",
        id="an option with a default given that is taken by position only"),
])
def test_a_factory_stack_yaml_cannot_call_as_written_is_refused_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, expected: str) -> None:
    (tmp_path / "own_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "own_factories", raising=False)
    with pytest.raises(ConfigError) as info:
        build_from_text(f"app: {{factory: 'stack_support:echo_app'}}\npipeline:\n  - {entry}\n", file="stack.yaml")
    assert [str(p) for p in info.value.problems] == [expected]


def test_a_factory_with_a_defaulted_option_taken_by_position_only_is_built_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "own_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "own_factories", raising=False)
    built = build_from_text("app: {factory: 'stack_support:echo_app'}\npipeline:\n"
                            "  - own_factories:by_position_or_not: {burst: 2}\n")
    assert TestApp(built.app).get("/").json["path"] == "/"
    built.close()


NOTING = textwrap.dedent('''
    from middleware.base import note


    def greeter(app, greeting="hello"):
        """A layer that says what it did, for serve.py explain, under the name its author chose."""
        def layer(environ, start_response):
            note(environ, "greeter", f"said {greeting}")
            return app(environ, start_response)
        return layer
''')


def test_explain_shows_what_a_layer_of_your_own_noted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer named module:attr notes under a name of its own choosing (it cannot know how stack.yaml
    spells it): explain shows the note all the same, under that name."""
    import serve

    (tmp_path / "own_noting.py").write_text(NOTING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "own_noting", raising=False)
    stack = tmp_path / "stack.yaml"
    stack.write_text("app: {factory: 'stack_support:echo_app'}\npipeline:\n  - own_noting:greeter: {greeting: hi}\n")
    lines, status = serve.explain(str(stack), "GET", "/")
    assert status == 200
    assert lines[1:5] == [
        "   default errors       applied",
        "       [0] own_noting:greeter applied",
        "      core app          applied",
        "      note greeter      said hi",
    ]


REWRITERS = textwrap.dedent('''
    from middleware.base import LayerOptions


    class Legacy:
        """Routes /legacy/* to /api/v1/*, and says so (rewrites_path) but shows no preview_environ."""

        class Options(LayerOptions):
            pass

        rewrites_path = True

        def __init__(self, app, options, context):
            self.app = app

        def __call__(self, environ, start_response):
            if environ["PATH_INFO"].startswith("/legacy/"):
                environ["PATH_INFO"] = "/api/v1/" + environ["PATH_INFO"][len("/legacy/"):]
            return self.app(environ, start_response)
''')


def test_a_layer_that_says_it_rewrites_paths_without_a_preview_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers outside can only apply their rules to the path it routes to through its preview_environ:
    without one, auth's rule for /api/v1/config would be stepped around with /legacy/config."""
    (tmp_path / "own_rewriters.py").write_text(REWRITERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "own_rewriters", raising=False)
    with pytest.raises(ConfigError) as info:
        build_from_text("app: {factory: 'stack_support:echo_app'}\npipeline:\n"
                        "  - auth: {secret: '" + "s" * 43 + "', rules: [{paths: ['/api/v1/config'], auth: required}]}\n"
                        "  - own_rewriters:Legacy: {}\n", file="stack.yaml")
    assert [str(p) for p in info.value.problems] == [
        "stack.yaml:4:5 pipeline[1]: own_rewriters:Legacy: its class sets rewrites_path but has no "
        "preview_environ(environ) method: the layers outside learn the path it routes a request to from that "
        "method (the entries it will set, PATH_INFO among them), so without it their rules and scopes would "
        "hold for the path as asked only; give it one, or drop rewrites_path"]
