"""serve.py while a reload is slow: a stop does not wait for it, and SIGHUPs meanwhile are one more reload."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from loadgen import ServeProcess, request


@contextlib.contextmanager
def _serve_slow(tmp_path: Path, workers: int) -> Iterator[tuple[ServeProcess, Path]]:
    """serve.py (one process, or a supervisor and its workers) whose reloads take 8 s; the builds' log."""
    port, builds = free_port(), tmp_path / "builds"
    config = tmp_path / "stack.yaml"
    config.write_text(f'app: {{factory: "stack_support:slow_reloading_app", options: {{log: "{builds}", delay: 8}}}}\n'
                      f"server: {{listen: '127.0.0.1:{port}', drain_timeout: 2, workers: {workers}}}\n"
                      "pipeline: [errors: {}]\n")
    served = ServeProcess(config).start()
    try:
        wait_for_port(port)
        yield served, builds
    finally:
        served.stop(timeout=1)


@pytest.fixture(params=[1, 2], ids=["one process", "two workers"])
def slow(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[ServeProcess, Path]]:
    with _serve_slow(tmp_path, request.param) as served:
        yield served


def _builds(path: Path) -> int:
    return path.read_text().count("build")


def _wait_builds(path: Path, count: int) -> None:
    deadline = time.monotonic() + 10
    while _builds(path) < count:
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.02)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_does_not_wait_for_a_slow_reload(slow: tuple[ServeProcess, Path], stop: int) -> None:
    served, builds = slow
    served.signal(signal.SIGHUP)
    _wait_builds(builds, 2)  # the reload is building (for 8 s)
    started = time.monotonic()
    served.signal(stop)
    assert served.proc is not None
    assert served.proc.wait(timeout=20) == 0, served.output()
    assert time.monotonic() - started < 4, served.output()  # nothing in flight: no drain to wait out either
    assert "stopping" in served.output()


def test_sighups_during_a_reload_are_one_more_reload(tmp_path: Path) -> None:
    with _serve_slow(tmp_path, 1) as (served, builds):
        _hup_storm(served, builds)


def _hup_storm(served: ServeProcess, builds: Path) -> None:
    served.signal(signal.SIGHUP)
    _wait_builds(builds, 2)
    for _ in range(10):
        served.signal(signal.SIGHUP)
        time.sleep(0.05)
    time.sleep(1)
    assert _builds(builds) == 2  # the first reload is still building: the others wait for it
    served.wait_output("generation 2 serving", timeout=15)
    _wait_builds(builds, 3)  # then one more, for all ten
    served.wait_output("generation 3 serving", timeout=15)
    time.sleep(1)
    assert _builds(builds) == 3


@pytest.mark.parametrize("pause", [0, 0.3], ids=["prompt", "supervisor slow after fork"])
def test_workers_that_never_start_stop_the_supervisor(tmp_path: Path, pause: float) -> None:
    """A crash loop is not a running server: after GIVE_UP failed starts in every slot the supervisor exits 3.

    A worker may be gone before the supervisor runs again after the fork (a loaded machine): its exit
    is still seen at once, a failed start, not a worker that lived until the supervisor looked."""
    port = free_port()
    config = tmp_path / "stack.yaml"
    config.write_text(f'app: {{factory: "stack_support:app_failing_in_workers", options: {{parent_pause: {pause}}}}}\n'
                      f"server: {{listen: '127.0.0.1:{port}', workers: 2}}\npipeline: [errors: {{}}]\n")
    served = ServeProcess(config).start()
    try:
        assert served.proc is not None
        assert served.proc.wait(timeout=30) == 3, served.output()
    finally:
        served.stop(timeout=1)
    assert "every worker failed to start 5 times in a row: stopping (exit code 3)" in served.output()
    assert served.output().count("starting a new one in") == 2 * 5 - 1


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_whose_factory_calls_sys_exit_fails_and_the_next_one_works(tmp_path: Path, workers: int) -> None:
    """sys.exit("…") in the app factory during a reload is a failed reload: the server (supervisor too)
    keeps serving, and a later SIGHUP reloads."""
    port, flag = free_port(), tmp_path / "flag"
    config = tmp_path / "stack.yaml"
    text = (f'app: {{factory: "stack_support:app_exiting_when_flagged", options: {{flag: "{flag}"}}}}\n'
            f"server: {{listen: '127.0.0.1:{port}', workers: {workers}}}\npipeline: [errors: {{}}]\n")
    config.write_text(text)
    served = ServeProcess(config).start()
    try:
        wait_for_port(port)
        flag.touch()
        served.signal(signal.SIGHUP)
        served.wait_output("DATABASE_URL is not set", timeout=15)  # the supervisor's: workers follow its success
        flag.unlink()
        config.write_text(text + "# edited\n")
        time.sleep(2.1)  # past the window in which a second SIGHUP of an unchanged file is the same one
        served.signal(signal.SIGHUP)
        served.wait_output("generation 2 serving", count=workers + (workers > 1), timeout=15)
        assert served.proc is not None and served.proc.poll() is None
    finally:
        assert served.stop(timeout=10) == 0, served.output()


def test_the_supervisor_reaps_only_its_workers(tmp_path: Path) -> None:
    """A reload runs the app factory in the supervisor while its loop reaps the workers that exit: the
    commands the factory runs keep their exit codes (a reap of any child took some, and the factory
    was told 0 for a command that failed)."""
    port, log = free_port(), tmp_path / "codes"
    config = tmp_path / "stack.yaml"
    config.write_text(f'app: {{factory: "stack_support:app_running_commands", options: {{log: "{log}", count: 100}}}}\n'
                      f"server: {{listen: '127.0.0.1:{port}', workers: 2}}\npipeline: [errors: {{}}]\n")
    served = ServeProcess(config).start()
    try:
        wait_for_port(port)
        served.signal(signal.SIGHUP)
        served.wait_output("supervisor: generation 2 serving", timeout=20)
        lines = log.read_text().splitlines()
        supervisor = [line for line in lines if line.startswith(f"{served.pid} ")]
        assert supervisor == [f"{served.pid} [7]"] * 2, lines  # the start's build, and the reload's
        # (and the workers are still reaped and replaced: test_workers.py)
    finally:
        assert served.stop(timeout=10) == 0, served.output()


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two workers"])
@pytest.mark.parametrize("asked", ["SIGHUP", "polled edit"])
def test_a_stopping_server_does_not_reload(tmp_path: Path, workers: int, asked: str) -> None:
    """A SIGHUP (or an edit the polling sees) while the server drains builds no new pipeline: the stop
    goes on, the request in flight is answered, and no "generation 2 serving" comes after "stopping"."""
    port = free_port()
    config = tmp_path / "stack.yaml"
    text = ('app: {factory: "loadgen:slow_app"}\n'
            f"server: {{listen: '127.0.0.1:{port}', workers: {workers}, drain_timeout: 5,"
            " reload: {watch: true, interval: 0.1}}\npipeline: [errors: {}]\n")
    config.write_text(text)
    served = ServeProcess(config).start()
    results: list[int] = []
    try:
        wait_for_port(port)
        thread = threading.Thread(target=lambda: results.append(request(port, "GET", "/?sleep=1.5", timeout=10)[0]))
        thread.start()
        time.sleep(0.3)  # the request is in flight
        served.signal(signal.SIGTERM)
        time.sleep(0.1)
        if asked == "SIGHUP":
            served.signal(signal.SIGHUP)
        else:
            config.write_text(text + "# edited\n")
        thread.join(10)
        assert served.proc is not None
        code = served.proc.wait(timeout=10)
    finally:
        served.stop(timeout=1)
    assert (code, results) == (0, [200]), served.output()
    assert "generation 2" not in served.output()
