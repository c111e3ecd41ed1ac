"""Runs the real tritonserver on a model repository: its command line, its process, and what it
leaves behind (process group, shared-memory regions, temp folders). Where the server and its
Python come from is `ensemble.stack`; keeping it serving is `ensemble.supervisor`'s job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import contract
from common.config import ServeConfig
from common.errors import ServerError
from ensemble.stack import ServerStack, prepare_backends, server_environment, tritonserver_flags

LOG = logging.getLogger(__name__)


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (connections in TIME_WAIT do not count, as for Triton)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = contract.DEFAULT_HOST) -> int:
    """A port the OS reports free right now (for tests; never the fixed defaults)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# What a retrieval client never needs: closed to anyone without the admin key. Registering the
# backend's own shared-memory region and writing an output into it crashed tritonserver 2.51.
RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace")
ADMIN_KEY_HEADER = contract.ADMIN_KEY_HEADER
ADMIN_KEY_ENV = contract.ADMIN_KEY_ENV


def admin_key() -> str:
    """The value clients must send in the `admin-key` header to reach the restricted APIs:
    $RETRIEVAL_ADMIN_KEY, or a random one nobody knows (the APIs are then closed to everyone)."""
    return os.environ.get(ADMIN_KEY_ENV) or secrets.token_hex(16)


def free_serve_config(**overrides) -> ServeConfig:
    """A ServeConfig on four ports the OS reports free (tests, chaos, benchmarks; never the defaults)."""
    ports = set()
    while len(ports) < 4:
        ports.add(free_port())
    http, grpc, metrics, health = sorted(ports)
    return ServeConfig(**{"http_port": http, "grpc_port": grpc, "metrics_port": metrics, "health_port": health,
                          "ready_timeout_s": 240, **overrides})


def server_command(binary: Path, repository: Path, backends: Path | None, cfg: ServeConfig, model_control: str = "none",
                   model: str = contract.MODEL_NAME, known_flags: frozenset[str] | None = None,
                   key: str | None = None, http_host: str | None = None) -> list[str]:
    """The tritonserver command line; `make serve`, the tests and docker-compose share these flags.

    model_control "none" (the default) leaves the load/unload API off; "explicit" turns it on
    (needed to switch versions, see ensemble.deploy) and loads `model` at start. Where the
    binary knows them (`known_flags`; 2.51 has both, 2.36 only the gRPC one) the shared-memory,
    model-repository, logging and trace APIs answer only requests carrying the admin key.
    `http_host` binds tritonserver's HTTP elsewhere than cfg.host (loopback, behind the guard).
    """
    known = known_flags if known_flags is not None else frozenset({"--http-restricted-api", "--grpc-restricted-protocol"})
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={key or '${' + ADMIN_KEY_ENV + '}'}"
    return [
        str(binary),
        f"--model-repository={repository}",
        *([f"--backend-directory={backends}"] if backends is not None else []),
        f"--http-address={http_host or cfg.host}", f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.host}", f"--grpc-port={cfg.grpc_port}",
        f"--metrics-address={cfg.host}", f"--metrics-port={cfg.metrics_port}",
        f"--model-control-mode={model_control}",
        *([f"--load-model={model}"] if model_control == "explicit" else []),
        *([f"--http-restricted-api={restricted}"] if "--http-restricted-api" in known else []),
        *([f"--grpc-restricted-protocol={restricted}"] if "--grpc-restricted-protocol" in known else []),
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        "--cuda-memory-pool-byte-size=0:0",
        "--disable-auto-complete-config",
        # Triton's strict readiness stays false for good once any version failed to load, even
        # while the previous version serves; readiness that tells the truth is the canary's.
        "--strict-readiness=false",
        "--exit-timeout-secs=10",
    ]


SHM_PREFIX = "triton_python_backend_shm_region_"


def _mapped_shm_files() -> set[str]:
    """Names of /dev/shm files that some live process has mapped."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        mapped.update(m for m in re.findall(r"/dev/shm/(\S+)", text) if m.startswith(SHM_PREFIX))
    return mapped


@dataclass
class TritonServer:
    """A tritonserver process on a model repository.

    Use as a context manager, or call start()/wait_ready()/stop(). Output goes to `log_path`
    when given (appended on a restart), else to this process's stdout (`make serve`).

    Attributes:
        repository: the model repository.
        cfg: host and ports.
        log_path: file to write the server log to.
        model_control: Triton's --model-control-mode (none or explicit).
        model: the model the repository must hold.
        stack: where tritonserver and the stub's Python come from (default: this interpreter's).
        extra_env: environment variables added for tritonserver and its stubs.
    """

    repository: Path
    cfg: ServeConfig
    log_path: Path | None = None
    model_control: str = "none"
    model: str = contract.MODEL_NAME
    stack: ServerStack | None = None
    extra_env: dict | None = None
    process: subprocess.Popen | None = None

    def __post_init__(self):
        self.repository = Path(self.repository).resolve()
        self.stack = self.stack or ServerStack.current()
        self._guard = None
        self._triton_http_port = self.cfg.http_port
        self._backends: Path | None = None
        self._log = None
        self._shm_before: set[str] = set()

    @property
    def http_url(self) -> str:
        return f"{self.cfg.host}:{self.cfg.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self.cfg.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.metrics_port}/metrics"

    def start(self) -> "TritonServer":
        if not (self.repository / self.model / "config.pbtxt").is_file():
            raise ServerError(f"{self.repository} holds no {self.model!r} model; run `make ensemble` first")
        ports = (self.cfg.grpc_port, self.cfg.metrics_port) if self._guard is not None else (self.cfg.http_port, self.cfg.grpc_port, self.cfg.metrics_port)
        for port in ports:
            if not port_is_free(self.cfg.host, port):
                raise ServerError(f"port {self.cfg.host}:{port} is already in use; choose other ports")
        if self.stack.system_binary is None:
            self._backends = prepare_backends(Path(tempfile.mkdtemp(prefix="triton-backends-")), self.stack)
        triton_cfg = self.cfg
        if self.cfg.http_guard:
            # tritonserver's HTTP moves to a loopback port of its own; the guard takes the public one.
            if self._guard is None:
                from ensemble.guard import GuardLimits, HttpGuard

                self._triton_http_port = free_port()
                self._guard = HttpGuard(self.cfg.host, self.cfg.http_port, f"127.0.0.1:{self._triton_http_port}",
                                        GuardLimits(max_body_bytes=self.cfg.max_request_bytes)).start()
            triton_cfg = dataclasses.replace(self.cfg, http_port=self._triton_http_port)
        cmd = server_command(self.stack.binary, self.repository, self._backends, triton_cfg, self.model_control, self.model,
                             tritonserver_flags(self.stack), admin_key(), http_host="127.0.0.1" if self.cfg.http_guard else None)
        LOG.info("starting %s", " ".join(re.sub(rf"{ADMIN_KEY_HEADER}=[^\s,]+", f"{ADMIN_KEY_HEADER}=***", c) for c in cmd))
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")
        self._shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        self.process = subprocess.Popen(
            cmd, env={**server_environment(self.stack), **(self.extra_env or {})}, stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
        )
        return self

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not Path(self.log_path).is_file():
            return "(log went to stdout)"
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def is_ready(self) -> bool:
        """Triton's own readiness of the model (see ensemble.health for the canary that tells the truth)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{self.model}/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> "TritonServer":
        """Polls readiness while watching the process; raises with the log if it dies or stalls."""
        timeout_s = timeout_s or self.cfg.ready_timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} before it was ready:\n{self.log_tail()}")
            if self.is_ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code. Then ends what is left of its
        process group (stubs of a server that died), removes the shared-memory regions it left
        and the backend folder. (A killed server also leaves the Python backend's empty
        /tmp/python_env_* folder; nothing tells whose it is, and removing a live server's makes
        that server abort when it stops, so they stay.)"""
        code = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                LOG.warning("tritonserver did not stop in %.0f s; killing pid %d", timeout_s, self.process.pid)
                os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        if self.process is not None:
            self._end_group()
            self._remove_shm()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None
        return code

    def kill(self) -> int | None:
        """SIGKILLs the server and its stubs at once (for a server that cannot serve anyway)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return self.stop()

    def _end_group(self) -> None:
        """SIGKILLs processes left in the server's session (its stubs outlive a killed server)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def _remove_shm(self) -> None:
        """Removes Python-backend regions that appeared while this server ran and no process maps."""
        if not os.path.isdir("/dev/shm"):
            return
        new = {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)} - self._shm_before
        for name in new - _mapped_shm_files():
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")
                LOG.debug("removed /dev/shm/%s left by tritonserver", name)

    def close(self, timeout_s: float = 30.0) -> int | None:
        """stop() and also close the HTTP guard (stop() alone keeps it for a restart)."""
        code = self.stop(timeout_s)
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        return code

    def __enter__(self) -> "TritonServer":
        try:
            return self.start().wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def serve_forever(repository: Path, cfg: ServeConfig, model_control: str = "none", supervise: bool = True) -> int:
    """Runs tritonserver in the foreground until Ctrl-C or SIGTERM; returns its exit code.

    Supervised (the default, see ensemble.supervisor): restarted when it dies or its model stops
    answering, with readiness from a canary on the health port.
    """
    server = TritonServer(repository, cfg, model_control=model_control)
    if supervise:
        from ensemble.supervisor import Supervisor

        return Supervisor(server, cfg).run_forever()
    stopping = {"flag": False}

    def _stop(signum, _frame):
        stopping["flag"] = True
        LOG.info("received %s; stopping tritonserver", signal.Signals(signum).name)
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    server.start().wait_ready()
    LOG.info("ready: model %r on gRPC %s, HTTP http://%s (pid %d), unsupervised", contract.MODEL_NAME, server.grpc_url,
             server.http_url, server.process.pid)
    code = server.process.wait()
    server.close()
    LOG.info("tritonserver exited with code %s", code)
    return 0 if stopping["flag"] and code in (0, -signal.SIGTERM) else code
