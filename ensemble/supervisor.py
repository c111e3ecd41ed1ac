"""Keeps tritonserver serving by itself, and says truthfully whether it can answer.

- tritonserver dies (a crash of its HTTP front end, an OOM kill, kill -9): the supervisor logs
  the cause (exit code or signal), counts it and starts a new one at once.
- the model stops answering while Triton still says ready (a dead Python-backend stub, a failed
  version): `recover_after_failures` canaries in a row fail, then tritonserver is restarted.
- the feature store is unreachable, frozen or flushed: readiness is false with the store's own
  message, and nothing is restarted (a new server would not bring Redis back).
- more than `max_restarts` restarts within `restart_window_s`: a crash loop. It is logged at ERROR
  and shown on /status, and each further restart waits longer (doubling, at most 60 s) instead of
  giving up: a few hostile requests must not stop the service for good.

Readiness and liveness are served on `health_port`: GET /ready answers 200 only while the last
canary passed (503 with the reason otherwise), GET /live 200 while the supervisor runs,
GET /status the counters as JSON. Load balancers and orchestrators use /ready.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from common import contract
from common.config import ServeConfig
from common.errors import ServerError
from ensemble.guard import QuietHTTPServer
from ensemble.health import FEATURE_STORE, OK, CanaryResult, canary, canary_user
from ensemble.server import TritonServer

LOG = logging.getLogger(__name__)


MAX_BACKOFF_S = 60.0


def describe_exit(code: int | None) -> str:
    """An exit code in words (negative: killed by that signal)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class HealthState:
    """What the health endpoints report; written by the supervisor thread only."""

    ready: bool = False
    reason: str = "starting"
    restarts: int = 0
    crash_loop: bool = False
    restart_causes: list = field(default_factory=list)
    last_canary: CanaryResult | None = None
    since: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        last = self.last_canary
        return {
            "ready": self.ready, "reason": self.reason, "since_unix_s": round(self.since, 3), "restarts": self.restarts,
            "crash_loop": self.crash_loop,
            "restart_causes": self.restart_causes[-10:],
            "last_canary": None if last is None else {"kind": last.kind, "detail": last.detail, "latency_ms": round(last.latency_s * 1e3, 2)},
        }


class Supervisor:
    """Runs a TritonServer under supervision (see the module docstring).

    Args:
        server: the server to start and restart.
        cfg: the serve settings (health port, canary interval and timeout, restart budget).
    """

    def __init__(self, server: TritonServer, cfg: ServeConfig):
        self.server, self.cfg = server, cfg
        self.state = HealthState()
        self._canary_stamp = None
        self._canary_users()  # sets canary_user, canary_known, canary_cold_user
        self._stop = threading.Event()
        self._lock = threading.Lock()  # start/stop of the server: the supervising thread vs stop()
        self._restarts: deque[float] = deque()
        self._health: QuietHTTPServer | None = None

    # -- health endpoints -------------------------------------------------------------------
    def start_health_server(self) -> None:
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/live":
                    code, body = 200, {"live": True}
                elif self.path == "/ready":
                    code, body = (200 if state.ready else 503), {"ready": state.ready, "reason": state.reason}
                elif self.path == "/status":
                    code, body = 200, state.as_dict()
                else:
                    code, body = 404, {"error": f"no such path {self.path}; use /live, /ready or /status"}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # health checks every few seconds: keep the log quiet
                pass

        self._health = QuietHTTPServer((self.cfg.host, self.cfg.health_port), Handler)
        threading.Thread(target=self._health.serve_forever, name="health", daemon=True).start()

    @property
    def health_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.health_port}"

    # -- supervision ------------------------------------------------------------------------
    def _set(self, ready: bool, reason: str) -> None:
        if ready != self.state.ready or reason != self.state.reason:
            self.state.since = time.time()
            if ready:
                LOG.info("ready: %s", reason)
            else:
                LOG.warning("not ready: %s", reason)
        self.state.ready, self.state.reason = ready, reason

    def _canary_users(self) -> tuple[int, bool, int | None]:
        """The canary's users, read again whenever config.pbtxt is replaced: a deploy switches it to
        a version whose export may hold other users (the old stored one would come back unknown)."""
        try:
            st = (Path(self.server.repository) / self.server.model / "config.pbtxt").stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._canary_stamp or stamp is None:
            self._canary_stamp = stamp
            self.canary_user, self.canary_known, self.canary_cold_user = canary_user(self.server.repository, self.server.model)
        return self.canary_user, self.canary_known, self.canary_cold_user

    def _check(self) -> CanaryResult:
        self._canary_users()
        result = canary(self.server.http_url, self.canary_user, self.canary_known, self.cfg.canary_timeout_s, self.server.model,
                        self.canary_cold_user)
        self.state.last_canary = result
        return result

    def _restart(self, cause: str) -> None:
        if self._stop.is_set():
            return
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.cfg.restart_window_s:
            self._restarts.popleft()
        excess = len(self._restarts) - self.cfg.max_restarts + 1
        if excess > 0:
            wait_s = min(MAX_BACKOFF_S, 2.0 ** excess)
            self.state.crash_loop = True
            LOG.error("crash loop: %d restarts in %.0f s (last cause: %s); waiting %.0f s before the next",
                      len(self._restarts), self.cfg.restart_window_s, cause, wait_s)
            self._stop.wait(wait_s)
            if self._stop.is_set():
                return
        else:
            self.state.crash_loop = False
        self._restarts.append(now)
        self.state.restarts += 1
        self.state.restart_causes.append({"unix_s": round(time.time(), 3), "cause": cause})
        self._set(False, f"restarting tritonserver: {cause}")
        LOG.warning("restart %d: %s", self.state.restarts, cause)
        with self._lock:
            if self._stop.is_set():
                return
            # No graceful stop: a dead server or a dead stub serves nothing, and Triton would wait
            # exit_timeout for the stub that will never answer.
            self.server.kill()
            self.server.start()

    def _wait_serving(self) -> None:
        """Waits until the new server's canary passes (or it dies, or ready_timeout_s passes)."""
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                return  # the loop sees it and restarts
            if self.server.is_ready():
                result = self._check()
                if result.ok or result.kind == FEATURE_STORE:
                    return
            time.sleep(0.1)

    def run(self) -> None:
        """Starts the server and supervises it until stop() (raises ServerError on a crash loop)."""
        started = time.monotonic()
        with self._lock:
            if self._stop.is_set():
                return
            self.server.start()
        self._wait_serving()
        failures = 0
        while not self._stop.is_set():
            code = self.server.process.poll() if self.server.process is not None else -1
            if code is not None:
                try:
                    self._restart(f"tritonserver {describe_exit(code)}" if code != -1 else "tritonserver could not be started")
                except ServerError as e:
                    LOG.error("restart failed: %s", e)  # counted in the restart budget; tried again
                    self.server.process = None
                    self._pause(1.0)
                    continue
                self._wait_serving()
                failures = 0
                continue
            result = self._check()
            if result.kind == OK:
                if not self.state.ready:
                    self._set(True, f"canary answered ({result.detail}, {result.latency_s * 1e3:.1f} ms)"
                              + (f" {time.monotonic() - started:.1f} s after start" if self.state.restarts == 0 else ""))
                failures = 0
            elif result.kind == FEATURE_STORE:
                self._set(False, f"feature store: {result.detail}")
                failures = 0
            else:
                failures += 1
                self._set(False, f"canary failed ({failures}/{self.cfg.recover_after_failures}): {result.detail}")
                if failures >= self.cfg.recover_after_failures and self.server.process.poll() is None:
                    self._restart(f"the model stopped answering: {result.detail}")
                    self._wait_serving()
                    failures = 0
                    continue
            self._pause(self.cfg.canary_interval_s if self.state.ready else min(0.5, self.cfg.canary_interval_s))

    def _pause(self, seconds: float) -> None:
        """Sleeps between canaries, but wakes as soon as tritonserver exits or stop() is called."""
        deadline = time.monotonic() + seconds
        while (not self._stop.is_set() and time.monotonic() < deadline
               and (self.server.process is None or self.server.process.poll() is None)):
            self._stop.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    def stop(self) -> int | None:
        self._stop.set()
        with self._lock:
            code = self.server.close(timeout_s=10)
        if self._health is not None:
            self._health.shutdown()
            self._health.server_close()
        return code

    def run_forever(self) -> int:
        """`make serve`: health endpoints, supervision until Ctrl-C/SIGTERM; returns the exit code."""
        stopping = threading.Event()

        def _signal(signum, _frame):
            LOG.info("received %s; stopping", signal.Signals(signum).name)
            stopping.set()
            self._stop.set()

        signal.signal(signal.SIGINT, _signal)
        signal.signal(signal.SIGTERM, _signal)
        self.start_health_server()
        LOG.info("supervising tritonserver: model %r on gRPC %s, HTTP http://%s, metrics %s; readiness at %s/ready "
                 "(canary every %.1f s, user %d%s). Press Ctrl-C to stop.", contract.MODEL_NAME, self.server.grpc_url,
                 self.server.http_url, self.server.metrics_url, self.health_url, self.cfg.canary_interval_s, self.canary_user,
                 "" if self.canary_cold_user is None else f", then new user {self.canary_cold_user}")
        try:
            self.run()
        except ServerError as e:
            LOG.error("%s", e)
            self.stop()
            return 1
        code = self.stop()
        LOG.info("tritonserver stopped (%s); %d restart(s) while serving", describe_exit(code), self.state.restarts)
        # Asked to stop, it stopped: even a server that had to be killed (a frozen one) is a clean stop.
        return 0 if stopping.is_set() else 1


class SupervisorThread:
    """A Supervisor run in a background thread (tests and the chaos suite), with its health port."""

    def __init__(self, server: TritonServer, cfg: ServeConfig):
        self.supervisor = Supervisor(server, cfg)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def __enter__(self) -> Supervisor:
        self.supervisor.start_health_server()

        def target():
            try:
                self.supervisor.run()
            except BaseException as e:  # noqa: BLE001 - surfaced to the test through .error
                self.error = e

        self._thread = threading.Thread(target=target, name="supervisor", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.supervisor.cfg.ready_timeout_s
        while not self.supervisor.state.ready and time.monotonic() < deadline and self.error is None:
            time.sleep(0.1)
        if not self.supervisor.state.ready:
            self.__exit__()
            raise ServerError(f"supervised tritonserver not ready: {self.error or self.supervisor.state.reason}\n"
                              f"{self.supervisor.server.log_tail()}")
        return self.supervisor

    def __exit__(self, *exc) -> None:
        self.supervisor.stop()
        if self._thread is not None:
            self._thread.join(30)
