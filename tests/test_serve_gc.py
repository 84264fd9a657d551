"""serve.py leaves what it built at start out of the collector's walks (gc.freeze), until a reload retires it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from loadgen import ServeProcess, request


def config(port: int, workers: int, greeting: str) -> str:
    return (f'app: {{factory: "stack_support:gc_app", options: {{greeting: {greeting}}}}}\n'
            f"server: {{listen: '127.0.0.1:{port}', workers: {workers}}}\n"
            "pipeline:\n  - errors: {}\n")


def frozen(port: int) -> int:
    status, _, body = request(port, "GET", "/")
    assert status == 200
    answer = json.loads(body)
    return int(answer["frozen"])


@pytest.mark.parametrize("workers", [1, 2])
def test_startup_objects_are_frozen_until_the_first_reload(tmp_path: Path, workers: int) -> None:
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(config(port, workers, "one"))
    with ServeProcess(path) as server:
        wait_for_port(port)
        assert frozen(port) > 10_000  # the modules, the app and the pipeline, in the worker too (forked after)
        path.write_text(config(port, workers, "two"))
        server.signal(signal.SIGHUP)
        server.wait_output("generation 2 serving", count=workers + (workers > 1))  # each worker and the supervisor
        for _ in range(4 * workers):  # the retired pipeline's cycles are collectable again, in every worker
            assert frozen(port) == 0
    assert "Traceback" not in server.output()
