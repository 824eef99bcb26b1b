"""Faults of BentoML 1.4.39 behind slow or failed searches, fixed where they start (docs/PERFORMANCE.md, section 6).

Each reaches into BentoML's internals (or aiohttp's, its client between the services), so both are pinned in
requirements.txt, and each fix is tested against the real part, as shipped and fixed (tests/test_bentoml_fixes.py,
and the service tests under load).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import aiohttp
import psutil
from starlette.responses import JSONResponse

from query.errors import ApiError, error_response
from query.guard import NOSNIFF

log = logging.getLogger("bentoml.imagesearch")

IDLE_CONNECTION_S = 1.0


def tune_client(proxy: object) -> None:
    """Two faults of BentoML's client between services, behind the dropped and stalled embed calls (BentoML
    issue 4971): it replaces its aiohttp session every 100 calls and closes the old one while calls are still
    in flight on it (they fail with "Server disconnected"); and aiohttp keeps an idle connection for 15 s where
    the embedder's server (uvicorn) closes it after 5 s, so a call can be sent on a connection being closed.
    Here the session is kept, and idle connections are dropped after 1 s."""
    manager = getattr(getattr(proxy, "to_async", None), "_session_manager", None)
    if manager is None or not hasattr(manager, "_make_client"):  # in-process use has no HTTP hop
        return
    manager.max_requests = manager.max_age = math.inf
    make = manager._make_client

    def make_with_short_keepalive() -> aiohttp.ClientSession:
        session = make()
        if session.connector is not None:
            session.connector._keepalive_timeout = IDLE_CONNECTION_S
            reuse_newest_first(session.connector)
        return session

    manager._make_client = make_with_short_keepalive


def reuse_newest_first(connector: aiohttp.BaseConnector) -> None:
    """aiohttp reuses idle connections oldest first, so after a burst has opened several, calls one at a time
    cycle through all of them and keep them all alive. Each leads to an embedder worker; cycling sends
    consecutive lone searches to different workers, and a worker whose neighbour ran a pass in the last
    half second runs on one core (model_store/core_share.py): 58-68 ms where 47-50 on one worker. Newest
    first, one connection carries calls one at a time and the others expire after IDLE_CONNECTION_S."""
    release = connector._release

    def release_newest_first(key: object, protocol: object, **kwargs: object) -> None:
        release(key, protocol, **kwargs)
        idle = connector._conns.get(key)
        if idle and idle[-1][0] is protocol:
            idle.rotate(1)  # the connection just released is the next one taken

    connector._release = release_newest_first


def never_hold_batches_back() -> None:
    """BentoML's adaptive batching (CorkDispatcher) holds a lone request back while n x (its age + the
    per-photo cost) stays under the average wait of the last 50 batches, hoping for company. That average
    counts the time requests spent queued behind a running batch, so after a burst of load it stays high
    and a lone search waits for company that does not come: measured 38 ms p50 one at a time before a 15 s
    burst, 128 ms after it, still 110 ms 20 s later. Its training does the same on a new worker's first
    calls: after 8 calls it holds lone calls back for company, up to 5 and 7 passes' worth, to time batches
    of 2 and 3 (measured: +30-40 ms on a 20 ms pass, and a burst then can pass the entry's embed deadline).
    And it polls: while a batch runs and calls are queued it wakes every millisecond to see whether the
    worker is free, so the next batch leaves up to a tick after the last one ended, and each worker's event
    loop wakes a thousand times a second on the cores torch runs on.

    A worker runs one batch at a time, so photos that arrive during a pass form the next batch anyway. Its
    controller is replaced by one that sleeps until a call arrives or a batch ends, and then sends what has
    queued (up to max_batch_size) at once. It starts untrained (its cost model at zero) and keeps BentoML's
    backstop: the oldest queued call is refused when the model expects it to wait past max_latency_ms."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    if getattr(CorkDispatcher, "_holds_nothing_back", False):
        return

    async def run_then_wake(self: CorkDispatcher, jobs: tuple) -> None:
        try:
            await self.outbound_call(jobs)  # frees the worker (its semaphore) when the batch ends
        finally:
            async with self._wake_event:
                self._wake_event.notify_all()

    async def controller(self: CorkDispatcher) -> None:
        self.optimizer.o_a = self.optimizer.o_b = 0  # no training: it learns from the batches it runs

        def worker_free_and_calls_queued() -> bool:
            return bool(self._queue) and not self._sema.is_locked()

        while True:
            try:
                async with self._wake_event:  # woken by each new call (inbound_call) and each batch's end
                    await self._wake_event.wait_for(worker_free_and_calls_queued)
                n, oldest = len(self._queue), self._queue[0]
                expected_s = time.time() - oldest.enqueue_time + self.optimizer.o_a * n + self.optimizer.o_b
                if n > 1 and expected_s >= max(self.max_latency, self.backstop_floor_s):
                    self._queue.popleft().future.cancel()  # answered 503, as BentoML does
                    continue
                jobs = tuple(self._get_inputs())
                self._sema.acquire()
                self._loop.create_task(run_then_wake(self, jobs))
            except Exception:  # noqa: BLE001 -- as BentoML's own controller: log, keep dispatching
                log.exception("embedder batching: dispatching a batch failed")

    CorkDispatcher.controller = controller
    CorkDispatcher.backstop_floor_s = 0.0
    CorkDispatcher._holds_nothing_back = True


def batching_backstop_at_least(seconds: float) -> None:
    """The backstop refuses no call it expects to wait less than `seconds`: max_latency_ms is fixed where the
    service is defined, before the network is loaded, and its 3 s are two batches of VGG16 on one core of
    this CPU. The embedder raises it as far as the measured pass lengthens the embed deadline
    (query/embed_pace.py). After never_hold_batches_back()."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    CorkDispatcher.backstop_floor_s = seconds


def media_types_worked_out_once(service: object) -> None:
    """For an output that is not a pydantic model (the embedder's array, a dict), BentoML works out each
    response's media type from the output's JSON schema, built anew for every response (a pydantic
    TypeAdapter and its schema: 1.1% of a saturated embedder worker's samples, py-spy, 2026-12-04). The
    answer never changes; each API's output spec answers it from the first time on."""
    for api in service.apis.values():
        spec = api.output_spec
        value = spec.mime_type()
        spec.mime_type = classmethod(lambda cls, value=value: value)


def start_dead_workers_again(check_s: float) -> None:
    """Two things `bentoml serve` does with a dead worker. Inside a container (BentoML's image sets
    BENTOML_CONTAINERIZED; BentoCloud, BENTOCLOUD_DEPLOYMENT_URL) it tells circus never to start one again,
    leaving that to the orchestrator, which only hears of it when a service's last worker is gone: circus then
    stops the whole server. So in a pod one embedder worker of two killed (the kernel's OOM killer, a crash)
    left half the capacity, ready and alive, for good; all of them, or the entry's one worker, stopped the
    server and every search in flight. And circus looks for dead workers every 10 s (BentoML's choice; its
    comment blames conflicts seen at start-up, not seen here with 1 s), so a lost worker was started again
    only 0-10 s later. Measured on this project's server (docs/PERFORMANCE.md, section 6). Now every worker is
    started again, inside a container too, and circus looks every `check_s`. An embedder that stays
    unreachable still fails /livez after IMAGESEARCH_EMBEDDER_LOST_S (query/embedder_health.py), so an
    orchestrator restarts a pod these restarts do not heal. Must run in the process that builds the watchers
    (`bentoml serve` imports the service there first)."""
    import bentoml._internal.utils.circus as bentoml_circus
    import bentoml.serving

    make_watcher, make_arbiter = bentoml.serving.create_watcher, bentoml_circus.create_standalone_arbiter
    if getattr(make_watcher, "respawns", False):
        return

    @functools.wraps(make_watcher)
    def create_watcher(*args: object, **kwargs: object):
        watcher = make_watcher(*args, **kwargs)
        watcher.respawn = True
        return watcher

    @functools.wraps(make_arbiter)
    def create_standalone_arbiter(*args: object, **kwargs: object):
        return make_arbiter(*args, **{"check_delay": check_s, **kwargs})

    create_watcher.respawns = True
    bentoml.serving.create_watcher = create_watcher
    bentoml_circus.create_standalone_arbiter = create_standalone_arbiter


METRICS_FOLDERS = "prometheus_per_server"  # in BENTOML_HOME: a folder per server, named <host>-<process id>


def metrics_of_its_own() -> None:
    """BentoML keeps the Prometheus files of every server started with one BENTOML_HOME in one folder, and empties
    it whenever a server starts. A second server on the same store (a staging server beside production, or the
    two services started apart on one box) deleted the first one's files: its workers went on counting into
    deleted files, and its /metrics lost their series (requests in flight, which the autoscalers follow, and the
    Embedder's batch sizes among them) until it was restarted. Here each server gets a folder of its own, and
    those of servers no longer running on this host are removed. Must run in the process that starts the server
    (`bentoml serve` and `start-http-server` import the service there first); it hands the folder to its
    workers in PROMETHEUS_MULTIPROC_DIR, so a worker, which has that, does nothing."""
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    if "PROMETHEUS_MULTIPROC_DIR" in os.environ or bentoml.server_context.worker_index is not None:
        return
    folders, host = Path(BentoMLContainer.bentoml_home.get()) / METRICS_FOLDERS, socket.gethostname()
    for folder in folders.glob(f"{host}-*"):
        pid = folder.name.removeprefix(f"{host}-")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    BentoMLContainer.prometheus_multiproc_dir.set(str(folders / f"{host}-{os.getpid()}"))


def keep_answering_after_sigterm(grace_s: float) -> None:
    """On SIGTERM, `bentoml serve` (circus) stops every worker of every service at once, so the embedder stopped
    listening while the entry still finished the searches it had received: those whose embed call was not yet
    sent waited out their deadline and answered 503 (tests/test_faults.py, SIGTERM under load, failed so in a
    CI run on 2026-12-03). Called in an embedder worker, after uvicorn took SIGTERM: uvicorn hears of it `grace_s`
    later, so the entry drains first; a second SIGTERM stops at once. Needs the main thread (BentoML creates
    the service instance there); elsewhere it logs and does nothing."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous) or grace_s <= 0:
        return

    def later(sig: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, previous)
        timer = threading.Timer(grace_s, previous, (sig, frame))
        timer.daemon = True
        timer.start()

    try:
        signal.signal(signal.SIGTERM, later)
    except ValueError:  # not the main thread
        log.warning("embedder: cannot delay SIGTERM outside the main thread; it stops at once")


class ApiErrorsInOneLine(logging.Filter):
    """BentoML logs every exception an API raises at ERROR with its traceback, ours that answer a client's
    mistake (a 4xx with its message) too: twenty lines of log and an ERROR an alert may follow, per bad request.
    An ApiError becomes one line saying what was answered and why: INFO for a 4xx, WARNING for a 5xx (not ready,
    the embedder did not answer); any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ApiError) and isinstance(record.args, tuple) and len(record.args) == 2:
            path, method = record.args
            record.levelno = logging.INFO if exc.status < 500 else logging.WARNING
            record.levelname = logging.getLevelName(record.levelno)
            record.msg, record.args = "%s %s answered %d: %s", (method, path, exc.status, exc.message)
            record.exc_info = record.exc_text = None
        return True


def api_errors_in_one_line() -> None:
    """Installs ApiErrorsInOneLine on the logger of BentoML's `log_exception`."""
    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, ApiErrorsInOneLine) for f in logger.filters):
        logger.addFilter(ApiErrorsInOneLine())


def own_answers_in_one_shape() -> None:
    """BentoML's own traffic answers, the backstop's 504 (TimeoutMiddleware, at `traffic.timeout`, after every
    limit the guard answers first) and a 429 past `traffic.max_concurrency`, are made outside the guard with the
    module's JSONResponse: `{"error": ...}` without `field`, and without nosniff. Made with this one, they are in
    the one shape and say nosniff, as every other answer."""
    from bentoml._internal.server.http import traffic

    def in_one_shape(content: dict, status_code: int = 200, headers: dict | None = None) -> JSONResponse:
        answer = error_response(f"{content.get('error', 'the server could not answer')}: retry", status_code,
                                headers=headers)
        answer.raw_headers.append(NOSNIFF)
        return answer

    traffic.JSONResponse = in_one_shape
