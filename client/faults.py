"""The faults of `make chaos`, and the probe that measures what a client sees while they happen.

Each fault is a plain function on a running (supervised) server or its Redis; `Probe` runs a
bounded client loop and a readiness poller beside it and turns their records into figures:
requests sent and failed, wrong answers, seconds until good answers resumed, and how long
readiness disagreed with what the model could do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import psutil

from common import contract

# -- hostile requests ------------------------------------------------------------------------


def _infer_json(shape, data, name=contract.INPUT_USER_ID, extra_inputs=()) -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": "INT64", "data": data}, *extra_inputs]}).encode()


def hostile_http_requests(user_id: int) -> list[tuple[str, bytes, dict]]:
    """(name, body, extra headers) of small HTTP requests that crash or exhaust tritonserver 2.51's
    HTTP front end when they reach it (measured; see ensemble.guard)."""
    u = {"name": contract.INPUT_USER_ID, "shape": [1, 1], "datatype": "INT64", "data": [user_id]}
    deep = b'{"inputs":[{"name":"user_id","shape":[1,1],"datatype":"INT64","data":' + b"[" * 40_000 + b"1" + b"]" * 40_000 + b"}]}"
    header = json.dumps({"inputs": [{"name": contract.INPUT_EXCLUDE, "shape": [1, 2**61 + 1], "datatype": "INT64",
                                     "parameters": {"binary_data_size": 8}}, {**u, "data": None, "parameters": {"binary_data_size": 8}}]}).encode()
    header = header.replace(b',"data": null', b"")
    return [
        ("user_id_shape_2^40", _infer_json([2**40, 1], [1]), {}),
        ("exclude_shape_1x2^40", _infer_json([1, 2**40], [1], contract.INPUT_EXCLUDE, (u,)), {}),
        ("user_id_shape_10^9", _infer_json([10**9, 1], [1]), {}),
        ("user_id_shape_2^32+1", _infer_json([2**32 + 1, 1], [1]), {}),
        ("byte_size_wraps_2^61+1", _infer_json([2**61 + 1, 1], list(range(1000))), {}),
        ("shape_2^63-1", _infer_json([2**63 - 1, 1], [1]), {}),
        ("data_nested_40000_deep", deep, {}),
        ("binary_exclude_1x2^61+1", header + b"\0" * 16, {"Inference-Header-Content-Length": str(len(header))}),
        ("binary_header_longer_than_body", header, {"Inference-Header-Content-Length": str(10**6)}),
        ("not_json", b"{this is not json", {}),
    ]


def send_raw_http(http_url: str, path: str, body: bytes, headers: dict | None = None, timeout_s: float = 10.0) -> tuple[int, str]:
    """POSTs bytes as they are (no client library rewrites them); (status, body text)."""
    request = urllib.request.Request(f"http://{http_url}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def claim_huge_body(http_url: str, claimed_bytes: int = 10 * 2**30, timeout_s: float = 5.0) -> str:
    """Sends headers claiming a 10 GB body and a few bytes; returns the first response line."""
    host, port = http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(f"POST /v2/models/{contract.MODEL_NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {claimed_bytes}\r\n\r\n{{}}".encode())
        return s.recv(4096).decode(errors="replace").splitlines()[0]


def grpc_model_killer(grpc_url: str, user_id: int) -> str:
    """A gRPC request whose ragged input claims 2^61+1 values in 8 bytes: tritonserver 2.51 lets it
    through (the byte size wraps around) and the Python-backend stub dies building the array.
    Returns the error text the client got."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=contract.MODEL_NAME)
    request.inputs.add(name=contract.INPUT_USER_ID, datatype="INT64", shape=[1, 1])
    request.inputs.add(name=contract.INPUT_EXCLUDE, datatype="INT64", shape=[1, 2**61 + 1])
    request.raw_input_contents.extend([np.array([user_id], np.int64).tobytes(), np.array([1], np.int64).tobytes()])
    with grpc.insecure_channel(grpc_url) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            return "answered"
        except grpc.RpcError as e:
            return f"[{e.code().name}] {e.details()}"


# -- processes ---------------------------------------------------------------------------------


def stub_pids(server_pid: int) -> list[int]:
    """The Python-backend stubs of a tritonserver."""
    try:
        return [p.pid for p in psutil.Process(server_pid).children(recursive=True) if "triton_python_backend_stub" in p.name()]
    except psutil.NoSuchProcess:
        return []


def rss_mb(server_pid: int) -> tuple[float, float]:
    """(tritonserver RSS, its stubs' RSS) in MB."""
    server = psutil.Process(server_pid)
    stubs = sum(psutil.Process(p).memory_info().rss for p in stub_pids(server_pid))
    return server.memory_info().rss / 2**20, stubs / 2**20


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# -- the probe ---------------------------------------------------------------------------------


@dataclass
class Probe:
    """A client loop and a readiness poller, run while a fault happens.

    Args:
        grpc_url: the server.
        ready_url: the supervisor's /ready (None: not polled).
        users: the users every request asks for.
        expected: their item ids [len(users), k] (an answer that differs counts as wrong).
        top_k: k.
    """

    grpc_url: str
    ready_url: str | None
    users: list[int]
    expected: np.ndarray
    top_k: int
    requests: list = field(default_factory=list)  # (t when it ended, ok, error text or None)
    readiness: list = field(default_factory=list)  # (t, ready)
    wrong: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        from client.client import RetrievalClient

        client = None
        # Each request is recorded when it ends: that is when its client learns the outcome (a
        # request that hangs on a frozen server fails seconds after it started).
        while not self._stop.is_set():
            try:
                if client is None:
                    client = RetrievalClient(self.grpc_url, timeout_s=5.0)
                recs = client.recommend(self.users, top_k=self.top_k)
                if not np.array_equal(recs.item_ids, self.expected):
                    self.wrong += 1
                self.requests.append((time.monotonic(), True, None))
            except Exception as e:  # noqa: BLE001 - every failure is a data point
                self.requests.append((time.monotonic(), False, str(e)[:300]))
                if client is not None:
                    client.close()
                client = None
                self._stop.wait(0.05)
        if client is not None:
            client.close()

    def _poll(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as r:
                    self.readiness.append((t, r.status == 200))
            except Exception:  # noqa: BLE001 - 503 and no answer both mean not ready
                self.readiness.append((t, False))
            self._stop.wait(0.1)

    def __enter__(self) -> "Probe":
        self._threads = [threading.Thread(target=self._loop, daemon=True)]
        if self.ready_url:
            self._threads.append(threading.Thread(target=self._poll, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def report(self, fault_at: float) -> dict:
        """Figures for the time since `fault_at`."""
        after = [r for r in self.requests if r[0] >= fault_at]
        failed = [r for r in after if not r[1]]
        first_fail = failed[0][0] if failed else None
        resumed = next((r[0] for r in after if r[1] and first_fail is not None and r[0] > failed[-1][0]), None)
        ready_while_failing = 0.0
        if self.readiness and failed:
            ready_while_failing = sum(0.1 for t, ok in self.readiness if ok and first_fail <= t <= failed[-1][0])
        not_ready = [t for t, ok in self.readiness if t >= fault_at and not ok]
        return {
            "requests": len(after), "failed": len(failed), "wrong_answers": self.wrong,
            "seconds_until_good_answers": round((resumed - fault_at), 2) if resumed is not None else (0.0 if not failed else None),
            "ready_while_failing_s": round(ready_while_failing, 1),
            "not_ready_s": round(len(not_ready) * 0.1, 1),
            "ready_at_end": bool(self.readiness[-1][1]) if self.readiness else None,
            "errors": sorted({r[2] for r in failed})[:5],
        }
