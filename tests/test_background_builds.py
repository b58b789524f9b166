"""The test suite's background builds (tests/background_builds.py and the ``prebuild`` marker in conftest.py)."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest
import background_builds
import conftest

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_jobs_run_in_order_on_one_thread_and_hand_back_results_and_errors():
    builds = background_builds.BuildQueue()
    seen = []

    def job(name, delay):
        def run():
            time.sleep(delay)
            seen.append((name, threading.current_thread().name))
            return name
        return run

    def failing():
        raise ValueError("compiler said no")

    first = builds.submit(job("first", 0.2))
    second = builds.submit(job("second", 0.0))
    bad = builds.submit(failing)
    assert second.result(timeout=10) == "second" and first.result(timeout=10) == "first"
    with pytest.raises(ValueError, match="compiler said no"):
        bad.result(timeout=10)
    assert [name for name, _ in seen] == ["first", "second"]
    assert {thread for _, thread in seen} == {"background-builds"}
    builds.stop()


def test_run_captures_the_output_and_the_return_code():
    builds = background_builds.BuildQueue()
    done = builds.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                      timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    with pytest.raises(Exception, match="timed out"):
        builds.run(SLEEP, timeout=0.5)
    builds.stop()


def test_stop_kills_the_running_build_and_cancels_the_rest():
    builds = background_builds.BuildQueue()
    running = builds.submit(lambda: builds.run(SLEEP, timeout=120))
    queued = builds.submit(lambda: "never")
    deadline = time.monotonic() + 30
    while not builds._processes and time.monotonic() < deadline:  # (the sleeper has started)
        time.sleep(0.05)
    assert builds._processes, "the first job's process never started"
    start = time.monotonic()
    builds.stop()
    assert running.result(timeout=30).returncode < 0  # killed
    assert time.monotonic() - start < 30
    with pytest.raises(CancelledError):
        queued.result(timeout=10)
    assert builds.submit(lambda: "late").cancelled()
    with pytest.raises(RuntimeError, match="stopped"):
        builds.run(SLEEP, timeout=10)


class FakeMarker:
    def __init__(self, *args):
        self.args = args


class FakeItem:
    def __init__(self, prebuilds, skip=False):
        self.markers = {"prebuild": [FakeMarker(start) for start in prebuilds], "skipif": [FakeMarker(skip)]}

    def iter_markers(self, name):
        return iter(self.markers.get(name, []))


def test_prebuilds_start_once_each_in_test_order_and_not_for_skipped_tests():
    started = []
    a, b, c = (lambda name=name: started.append(name) for name in "abc")

    def broken():
        started.append("broken")
        raise FileNotFoundError("no compiler")

    class Session:
        class config:
            class option:
                collectonly = False
        items = [FakeItem([b]), FakeItem([c], skip=True), FakeItem([broken, a, b]), FakeItem([])]

    conftest.pytest_collection_finish(Session())
    assert started == ["b", "broken", "a"]
    started.clear()
    Session.config.option.collectonly = True
    conftest.pytest_collection_finish(Session())
    assert started == []
