"""Runs the real tritonserver that ships in the nvidia-pytriton wheel, on a model repository.

The wheel carries tritonserver 2.51, the Python backend and per-Python stubs. The backend
directory is assembled in a temporary folder (library, utils and this Python's stub side by
side, where the backend looks for them) and the environment puts this virtualenv's `bin` first
on PATH, which is how the stub finds our interpreter and its packages.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import contract
from common.config import ServeConfig
from common.errors import ServerError

LOG = logging.getLogger(__name__)


def pytriton_root() -> Path:
    """Folder of the tritonserver distribution inside the nvidia-pytriton wheel."""
    import pytriton

    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary under {root}; is nvidia-pytriton installed?")
    return root


def tritonserver_binary() -> Path:
    """tritonserver from $TRITONSERVER, from PATH inside a Triton container, or from the wheel."""
    if os.environ.get("TRITONSERVER"):
        return Path(os.environ["TRITONSERVER"])
    return pytriton_root() / "bin" / "tritonserver"


def prepare_backends(dest: Path) -> Path:
    """Lays out `dest/python/` with the Python backend and this interpreter's stub."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(root / "backends" / "python" / name, python_dir / name)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return dest


def server_environment() -> dict[str, str]:
    """Environment for tritonserver: the wheel's libraries and this venv first on PATH."""
    import pytriton

    env = dict(os.environ)
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


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


def server_command(binary: Path, repository: Path, backends: Path, cfg: ServeConfig, model_control: str = "none",
                   model: str = contract.MODEL_NAME) -> list[str]:
    """The tritonserver command line; `make serve`, the tests and docker-compose share these flags.

    model_control "none" (the default) leaves the load/unload API off; "explicit" turns it on
    (needed to switch versions, see ensemble.deploy) and loads `model` at start.
    """
    return [
        str(binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--http-address={cfg.host}", f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.host}", f"--grpc-port={cfg.grpc_port}",
        f"--metrics-address={cfg.host}", f"--metrics-port={cfg.metrics_port}",
        f"--model-control-mode={model_control}",
        *([f"--load-model={model}"] if model_control == "explicit" else []),
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        "--cuda-memory-pool-byte-size=0:0",
        "--disable-auto-complete-config",
        "--exit-timeout-secs=10",
    ]


@dataclass
class TritonServer:
    """A tritonserver process on a model repository.

    Use as a context manager, or call start()/wait_ready()/stop(). Output goes to `log_path`
    when given (tests), else to this process's stdout (`make serve`).

    Attributes:
        repository: the model repository.
        cfg: host and ports.
        log_path: file to write the server log to.
        model_control: Triton's --model-control-mode (none or explicit).
        model: the model the repository must hold.
    """

    repository: Path
    cfg: ServeConfig
    log_path: Path | None = None
    model_control: str = "none"
    model: str = contract.MODEL_NAME
    process: subprocess.Popen | None = None

    def __post_init__(self):
        self.repository = Path(self.repository).resolve()
        self._backends: Path | None = None
        self._log = None

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
        for port in (self.cfg.http_port, self.cfg.grpc_port, self.cfg.metrics_port):
            if not port_is_free(self.cfg.host, port):
                raise ServerError(f"port {self.cfg.host}:{port} is already in use; choose other ports")
        self._backends = prepare_backends(Path(tempfile.mkdtemp(prefix="triton-backends-")))
        cmd = server_command(tritonserver_binary(), self.repository, self._backends, self.cfg, self.model_control, self.model)
        LOG.info("starting %s", " ".join(cmd))
        if self.log_path is not None:
            self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            cmd, env=server_environment(), stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
        )
        return self

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not Path(self.log_path).is_file():
            return "(log went to stdout)"
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
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
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code. Cleans the backend folder."""
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
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(repository: Path, cfg: ServeConfig, model_control: str = "none") -> int:
    """Runs tritonserver in the foreground until Ctrl-C or SIGTERM; returns its exit code."""
    server = TritonServer(repository, cfg, model_control=model_control)
    stopping = {"flag": False}

    def _stop(signum, _frame):
        stopping["flag"] = True
        LOG.info("received %s; stopping tritonserver", signal.Signals(signum).name)
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    server.start().wait_ready()
    LOG.info(
        "ready: model %r on gRPC %s, HTTP http://%s, metrics %s (pid %d); model control %s%s. Press Ctrl-C to stop.",
        contract.MODEL_NAME, server.grpc_url, server.http_url, server.metrics_url, server.process.pid, model_control,
        " (load/unload API on: anyone who reaches these ports can switch models)" if model_control == "explicit" else " (load/unload API off)",
    )
    code = server.process.wait()
    server.stop()
    LOG.info("tritonserver exited with code %s", code)
    return 0 if stopping["flag"] and code in (0, -signal.SIGTERM) else code
