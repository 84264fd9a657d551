"""Helpers for tests that drive a real headless Chromium and real Waitress servers.

``chromium()`` starts Debian's ``chromium`` through ``chromedriver`` (never
Selenium Manager, which would try to download a browser) with a fresh profile,
and skips the test with the reason when either is missing, unless
``WSGISTACK_REQUIRE_BROWSER=1``, which turns the skip into a failure.
``serve()`` runs any WSGI app under Waitress in a thread on a free loopback
port.  Tests import them with ``from browser import chromium, serve``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

CHROMIUM = os.environ.get("WSGISTACK_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("WSGISTACK_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRE_BROWSER = os.environ.get("WSGISTACK_REQUIRE_BROWSER") == "1"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--disable-dev-shm-usage", "--window-size=1280,800",
)


def unavailable(reason: str) -> None:
    """Skip (or fail, when the browser is required) with ``reason``."""
    if REQUIRE_BROWSER:
        pytest.fail(f"WSGISTACK_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@contextmanager
def chromium(*extra_flags: str) -> Iterator[Any]:
    """Yield a Selenium driver for a headless Chromium with a throwaway profile."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        unavailable(f"selenium is not installed ({exc})")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            unavailable(f"{path} is missing (apt-get install {package})")
    profile = Path(tempfile.mkdtemp(prefix="wsgistack-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, *extra_flags, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        unavailable(f"chromium did not start: {exc.msg or exc}")
    try:
        driver.set_script_timeout(20)
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, url: str, path: str | os.PathLike[str]) -> Path:
    """Load ``url`` and save a PNG of the viewport to ``path``."""
    driver.get(url)
    target = Path(path)
    driver.save_screenshot(str(target))
    return target


class Server:
    """A Waitress server in a daemon thread; ``url`` is ``http://HOST:PORT``."""

    def __init__(self, app: WSGIApplication, host: str = "127.0.0.1") -> None:
        from waitress.server import create_server

        # (waitress's stubs leave out what the tests use: effective_port, _map)
        self.server: Any = cast(Any, create_server(app, host=host, port=0, threads=4, asyncore_loop_timeout=0.2))
        self.port = int(self.server.effective_port)
        self.url = f"http://{host}:{self.port}"
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"waitress-{self.port}", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except OSError:
            if not self.stopping:
                raise

    def start(self) -> Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection, then wait for the loop to end."""
        self.stopping = True
        while self.server._map:
            for channel in list(self.server._map.values()):
                channel.handle_close()
        self.server.task_dispatcher.shutdown(timeout=5)
        self.thread.join(timeout=5)


@contextmanager
def serve(app: WSGIApplication, host: str = "127.0.0.1") -> Iterator[Server]:
    """Serve ``app`` with Waitress on a free port of ``host`` for the block."""
    server = Server(app, host).start()
    try:
        yield server
    finally:
        server.stop()
