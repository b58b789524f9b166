"""Long compilations that the selected tests need, started once collection ends, one after another on a worker
thread, so that they overlap the tests that run before the ones that need them (pytest runs the tests on one core).

A test names the function that starts its build with ``@pytest.mark.prebuild(start)``; ``start()`` is called once
(in the main thread, when collection ends, unless the test is deselected or skipped by a ``skipif`` that holds) and
hands the work to :func:`submit`. The test itself then asks for the same build as it would without this module,
and waits for the background one or finds its result (see ``cuda_emulation.build_emulation`` and the CUDA build's
lock). Every compiler process is started through :func:`run`, which :func:`stop` kills at the end of the session.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from concurrent.futures import Future
from typing import Any, Callable

_jobs: queue.Queue = queue.Queue()
_worker: threading.Thread | None = None
_processes: set[subprocess.Popen] = set()
_lock = threading.Lock()
_stopped = False


def _work() -> None:
    while True:
        job, future = _jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(job())
        except BaseException as error:  # (handed to whoever waits on the future)
            future.set_exception(error)


def submit(job: Callable[[], Any]) -> Future:
    """Run ``job()`` on the worker thread after the jobs submitted before it; returns its future."""
    global _worker
    future: Future = Future()
    with _lock:
        if _stopped:
            future.cancel()
            return future
        if _worker is None:
            # a daemon: a session that ends early does not wait for its builds (stop() kills their processes)
            _worker = threading.Thread(target=_work, name="background-builds", daemon=True)
            _worker.start()
    _jobs.put((job, future))
    return future


def run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)``, with the process
    killed by :func:`stop` if the session ends first."""
    with _lock:
        if _stopped:
            raise RuntimeError(f"the test session has ended; not starting {command[0]}")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        _processes.add(process)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    finally:
        with _lock:
            _processes.discard(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def stop() -> None:
    """Cancel the jobs not yet started and kill the compiler processes still running."""
    global _stopped
    with _lock:
        _stopped = True
        running = list(_processes)
    while True:
        try:
            _, future = _jobs.get_nowait()
        except queue.Empty:
            break
        future.cancel()
    for process in running:
        process.kill()
