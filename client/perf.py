"""perf_analyzer: fetch a working binary, write realistic input data, run bounded measurements.

PyPI's `perf-analyzer` package is a placeholder without a binary. The `tritonclient==2.40.0`
wheel carries a working one in its data files; it is unpacked into a tools folder and given the
two libraries it misses (`libb64.so.0d`, `libcudart.so.12`) from the nvidia-pytriton wheel.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import ClientError

LOG = logging.getLogger(__name__)

WHEEL = "tritonclient==2.40.0"
BINARY_IN_WHEEL = "tritonclient-2.40.0.data/data/bin/perf_analyzer"
LIBRARIES = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


def ensure_perf_analyzer(tools_dir: Path) -> tuple[Path, dict[str, str]]:
    """(binary, environment) of perf_analyzer under tools_dir, fetching the wheel once."""
    tools_dir = Path(tools_dir)
    binary = tools_dir / "bin" / "perf_analyzer"
    lib = tools_dir / "lib"
    if not binary.is_file():
        tools_dir.mkdir(parents=True, exist_ok=True)
        LOG.info("fetching perf_analyzer from the %s wheel into %s", WHEEL, tools_dir)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", WHEEL,
                        "-d", str(tools_dir)], check=True)
        wheel = next(tools_dir.glob("tritonclient-2.40.0-*.whl"))
        binary.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, z.open(BINARY_IN_WHEEL) as src:
            binary.write_bytes(src.read())
        binary.chmod(0o755)
    import pytriton

    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    lib.mkdir(parents=True, exist_ok=True)
    for name, prefix in LIBRARIES.items():
        target = next(libs.glob(prefix + "*"), None)
        if target is None:
            raise ClientError(f"nvidia_pytriton.libs has no {prefix}*; cannot run perf_analyzer")
        link = lib / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    return binary, env


def write_input_data(path: Path, rows: list[dict[str, list]], shapes: dict[str, list[int]]) -> Path:
    """perf_analyzer's --input-data JSON: one entry per request, content and shape per tensor."""
    data = [{name: {"content": values, "shape": shapes[name]} for name, values in row.items()} for row in rows]
    path.write_text(json.dumps({"data": data}))
    return path


@dataclass(frozen=True)
class PerfResult:
    """One perf_analyzer measurement at one concurrency (latencies in ms)."""

    concurrency: int
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    server_queue_ms: float
    server_compute_ms: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def run_perf(binary: Path, env: dict, model: str, url: str, concurrency: int, input_data: Path, *,
             protocol: str = "grpc", measurement_ms: int = 3000, max_trials: int = 5, batch_size: int = 1,
             request_parameters: dict | None = None, timeout_s: float = 300, stability: int = 30) -> PerfResult:
    """Runs perf_analyzer once (bounded: trials x window, then a hard timeout) and parses its CSV.

    Client and server share this machine's two cores, so a run that finds no stable window is
    repeated once with a window twice as long and a wide stability band (the result says so
    only through its spread, p95/p99).
    """
    try:
        return _run_perf(binary, env, model, url, concurrency, input_data, protocol, measurement_ms, max_trials,
                         batch_size, request_parameters, timeout_s, stability)
    except _Unstable:
        LOG.warning("no stable window for %s at concurrency %d; measuring again with a longer window", model, concurrency)
        return _run_perf(binary, env, model, url, concurrency, input_data, protocol, 2 * measurement_ms, max_trials,
                         batch_size, request_parameters, timeout_s, 100)


class _Unstable(Exception):
    pass


def _run_perf(binary, env, model, url, concurrency, input_data, protocol, measurement_ms, max_trials, batch_size,
              request_parameters, timeout_s, stability) -> PerfResult:
    report = input_data.with_suffix(f".c{concurrency}.csv")
    report.unlink(missing_ok=True)
    cmd = [str(binary), "-m", model, "-u", url, "-i", protocol, "--concurrency-range", f"{concurrency}:{concurrency}",
           "--input-data", str(input_data), "-b", str(batch_size), "--measurement-interval", str(measurement_ms),
           "--max-trials", str(max_trials), "--stability-percentage", str(stability), "--percentile", "50", "-f", str(report)]
    for name, value in (request_parameters or {}).items():
        cmd += ["--request-parameter", f"{name}:{value}:{'int' if isinstance(value, int) else 'string'}"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise ClientError(f"perf_analyzer ran past {timeout_s:.0f} s for {model} at concurrency {concurrency}") from e
    if "Failed to obtain stable measurement" in done.stdout + done.stderr:
        raise _Unstable()
    if done.returncode != 0 or not report.is_file():
        raise ClientError(f"perf_analyzer failed for {model} at concurrency {concurrency}: {(done.stdout + done.stderr)[-1500:]}")
    row = next(csv.DictReader(io.StringIO(report.read_text())))
    us = lambda key: float(row.get(key, 0) or 0) / 1000.0  # noqa: E731 - perf_analyzer reports microseconds
    compute = us("Server Compute Input") + us("Server Compute Infer") + us("Server Compute Output")
    return PerfResult(
        concurrency=concurrency, throughput=float(row["Inferences/Second"]),
        p50_ms=us("p50 latency"), p95_ms=us("p95 latency"), p99_ms=us("p99 latency"),
        avg_ms=sum(us(k) for k in ("Client Send", "Network+Server Send/Recv", "Server Queue", "Client Recv")) + compute,
        server_queue_ms=us("Server Queue"), server_compute_ms=compute,
    )
