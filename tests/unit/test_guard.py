"""ensemble.guard: each rule refuses what it must (with its own message) and lets real requests through."""

import json
import urllib.error

import numpy as np
import pytest

from ensemble.guard import GuardLimits, Refused, check_infer

LIMITS = GuardLimits(max_body_bytes=1 << 20, max_elements=1000)


def _json(*inputs) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def _tensor(shape, data=None, name="user_id", **extra):
    out = {"name": name, "shape": shape, "datatype": "INT64", **extra}
    if data is not None:
        out["data"] = data
    return out


@pytest.mark.parametrize("body, message", [
    (_json(_tensor([2**40, 1], [1])), r"shape \[1099511627776, 1\] has a dimension outside 0\.\.2147483647"),
    (_json(_tensor([2**61 + 1, 1], list(range(10)))), r"has a dimension outside 0\.\.2147483647"),
    (_json(_tensor([-1, 1], [1])), r"shape \[-1, 1\] has a dimension outside"),
    (_json(_tensor([2000, 1], [1])), r"shape \[2000, 1\] holds 2000 values, over the maximum of 1000"),
    (_json(_tensor([2, 1], [1])), r"input 'user_id': data holds 1 values, shape \[2, 1\] needs 2"),
    (_json(_tensor([1.5, 1], [1])), r"shape must be a list of at most 8 integers, got \[1\.5, 1\]"),
    (_json(_tensor([True, 1], [1])), r"shape must be a list of at most 8 integers, got \[True, 1\]"),
    (_json(_tensor([1, 1])), r"input 'user_id' has neither 'data' nor a binary_data_size"),
    (b'{"inputs":[{"name":"user_id","shape":[1,1],"datatype":"INT64","data":' + b"[" * 40_000 + b"1" + b"]" * 40_000 + b"}]}",
     "request JSON is nested too deeply"),
    (_json(_tensor([1, 1], [[[[[[[[[[[1]]]]]]]]]]])), "nested deeper than any tensor shape"),
    (b"{not json", "request body is not valid JSON"),
    (b'{"outputs": []}', "must be an object with an 'inputs' list"),
])
def test_each_refusal_has_its_own_message(body, message):
    with pytest.raises(Refused, match=message):
        check_infer(body, None, LIMITS)


def test_binary_requests_must_add_up():
    header = _json(_tensor([2, 1], parameters={"binary_data_size": 16}))
    payload = np.array([[1], [2]], np.int64).tobytes()
    check_infer(header + payload, len(header), LIMITS)  # a real binary request passes
    with pytest.raises(Refused, match=r"binary inputs declare 16 bytes, the body carries 8"):
        check_infer(header + payload[:8], len(header), LIMITS)
    with pytest.raises(Refused, match=r"Inference-Header-Content-Length 100000 is not within the body of \d+ bytes"):
        check_infer(header + payload, 100_000, LIMITS)
    wrapped = _json(_tensor([1, 2**61 + 1], name="exclude_item_ids", parameters={"binary_data_size": 8}))
    with pytest.raises(Refused, match=r"input 'exclude_item_ids': shape \[1, 2305843009213693953\] has a dimension outside"):
        check_infer(wrapped + payload[:8], len(wrapped), LIMITS)
    lying = _json(_tensor([2, 1], parameters={"binary_data_size": 8}))
    with pytest.raises(Refused, match=r"binary_data_size 8 does not match shape \[2, 1\] of INT64"):
        check_infer(lying + payload[:8], len(lying), LIMITS)


def test_real_requests_pass():
    check_infer(_json(_tensor([3, 1], [1, 2, 3]), _tensor([3, 2], [[1, 2], [3, 4], [5, -1]], name="exclude_item_ids")), None, LIMITS)
    check_infer(_json(_tensor([0, 1], [])), None, LIMITS)  # Triton judges an empty batch itself


class _Upstream:
    """Records what the guard forwards (the real tritonserver behind it is in test_chaos.py)."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                seen.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture()
def guarded():
    from ensemble.guard import HttpGuard
    from ensemble.server import free_port

    upstream = _Upstream()
    port = free_port()
    guard = HttpGuard("127.0.0.1", port, upstream.address, LIMITS).start()
    yield port, upstream.seen
    guard.stop()
    upstream.server.shutdown()


def _raw(port: int, request: bytes) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):  # the guard closes the connection after a refusal
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


def test_request_smuggling_and_absolute_targets_are_refused(guarded):
    port, seen = guarded
    body = _json(_tensor([2**40, 1], [1]))
    smuggled = (b"POST /v2/models/retrieval/config HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: 0\r\n\r\n" % len(body)) + body
    answer = _raw(port, smuggled)
    assert "400 " in answer.splitlines()[0] and "exactly one numeric Content-Length is needed, got ['" in answer
    absolute = (b"POST http://127.0.0.1/v2/models/retrieval/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    answer = _raw(port, absolute)
    assert "400 " in answer.splitlines()[0] and "the request target must be a path starting with '/'" in answer
    generate = b'POST /v2/models/retrieval/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}'
    assert "404 " in _raw(port, generate).splitlines()[0]
    assert seen == []  # none of them reached the server


def test_bodies_python_cannot_parse_are_refused_on_every_path(guarded):
    port, seen = guarded
    body = b'{"a":"\xff","b":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = (b"POST /v2/repository/models/retrieval/load HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    answer = _raw(port, request)
    assert "400 " in answer.splitlines()[0] and "request body is not valid JSON" in answer
    assert seen == []


def test_compressed_requests_are_checked_and_forwarded_inflated(guarded):
    import gzip
    import urllib.request

    port, seen = guarded
    good = _json(_tensor([2, 1], [1, 2]))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/retrieval/infer", data=gzip.compress(good),
                                     headers={"Content-Encoding": "gzip"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200
    path, headers, body = seen[-1]
    assert body == good and "Content-Encoding" not in headers and headers["Content-Length"] == str(len(good))
    bad = gzip.compress(_json(_tensor([2**40, 1], [1])))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/retrieval/infer", data=bad,
                                     headers={"Content-Encoding": "gzip"}, method="POST")
    with pytest.raises(urllib.error.HTTPError, match="400") as e:
        urllib.request.urlopen(request, timeout=10)
    assert "has a dimension outside" in e.value.read().decode()
    bomb = gzip.compress(b" " * (LIMITS.max_body_bytes + 10))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/retrieval/infer", data=bomb,
                                     headers={"Content-Encoding": "gzip"}, method="POST")
    with pytest.raises(urllib.error.HTTPError, match="413"):
        urllib.request.urlopen(request, timeout=10)
    assert len(seen) == 1


def test_a_burst_of_new_connections_is_queued_not_reset(guarded):
    """The default listen backlog (5) reset about half of 64 simultaneous connections."""
    import concurrent.futures as cf
    import urllib.request

    port, _ = guarded

    def one(_):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/retrieval/infer", data=_json(_tensor([1, 1], [1])), method="POST")
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status

    with cf.ThreadPoolExecutor(64) as pool:
        assert list(pool.map(one, range(64))) == [200] * 64
