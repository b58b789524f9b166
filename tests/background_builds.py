"""Long compilations that the selected tests need, started once collection ends, one after another on a worker
thread, so that they overlap the tests that run before the ones that need them (pytest runs the tests on one core).

A test names the function that starts its build with ``@pytest.mark.prebuild.with_args(start)``; ``start()`` is
called once (in the main thread, when collection ends, unless the test is deselected or skipped by a ``skipif``
that holds) and hands the work to :func:`submit`. The test itself then asks for the same build as it would without
this module, and waits for the background one or finds its result (see ``cuda_emulation.build_emulation`` and the
CUDA build's lock). Every compiler process is started through :func:`run`, which :func:`stop` (at the end of the
session) kills if it is still running.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from concurrent.futures import Future
from typing import Any, Callable


class BuildQueue:
    """Jobs run one after another, in the order submitted, on one daemon thread (started by the first job), and the
    processes they start through :meth:`run`, which :meth:`stop` kills."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def _work(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as error:  # (handed to whoever waits on the future)
                future.set_exception(error)

    def submit(self, job: Callable[[], Any]) -> Future:
        """Run ``job()`` after the jobs submitted before it; returns its future (cancelled once stopped)."""
        future: Future = Future()
        with self._lock:
            if self._stopped:
                future.cancel()
                return future
            if self._worker is None:
                # a daemon: a session that ends early does not wait for its builds (stop() kills their processes)
                self._worker = threading.Thread(target=self._work, name="background-builds", daemon=True)
                self._worker.start()
            self._jobs.put((job, future))
        return future

    def run(self, command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)``, the process
        killed by :meth:`stop` if that comes first (its return code then negative)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"the build queue has stopped: not starting {command[0]}")
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
            self._processes.add(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        finally:
            with self._lock:
                self._processes.discard(process)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def stop(self) -> None:
        """Cancel the jobs not yet started and kill the processes still running; later jobs and runs are refused."""
        with self._lock:
            self._stopped = True
            running = list(self._processes)
            while True:
                try:
                    _, future = self._jobs.get_nowait()
                except queue.Empty:
                    break
                future.cancel()
        for process in running:
            process.kill()


# the test session's queue
_session = BuildQueue()
submit = _session.submit
run = _session.run
stop = _session.stop
