"""A guard in front of tritonserver's HTTP port: it refuses, cheaply and with a 400, the requests
that crash tritonserver 2.51's HTTP front end before they reach its allocator.

Measured on tritonserver 2.51 (README, "Operations"): a ~100-byte JSON request whose `shape`
claims 2^40 rows aborts the server (bad_alloc); a shape whose byte size wraps around 2^64
(2^61 + 1 rows) corrupts its heap with bytes the client chooses; `data` nested 40,000 deep is a
SIGSEGV; a body of any size is buffered whole; malformed JSON gets a 500. Triton has no flag that
bounds any of these. The guard checks, with Python integers that never wrap:

1. a body of at most `max_body_bytes`, announced by Content-Length (no chunked bodies);
2. JSON that parses (Python's parser refuses deep nesting with RecursionError, it does not crash)
   and, for an inference request, inputs whose shapes are lists of integers in 0..2^31, whose
   element count is at most `max_elements`, and whose `data` holds exactly that many values;
3. binary-extension requests (`Inference-Header-Content-Length`): a header inside the body,
   and binary sizes that add up to the rest of the body and match each shape.
Everything else (health, metadata, statistics, the restricted admin APIs) is passed through.
Triton listens on a loopback port of its own; the guard owns the public HTTP port.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = logging.getLogger(__name__)

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/\d+)?/infer$")
DTYPE_BYTES = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4, "UINT32": 4,
               "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}
MAX_DIM = 1 << 31
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


DRAIN_BYTES = 64 << 20


def _drain(stream, length: int, chunk: int = 1 << 20) -> None:
    while length > 0:
        data = stream.read(min(chunk, length))
        if not data:
            return
        length -= len(data)


class Refused(Exception):
    """A request the guard answers itself, with 400 and this message."""


@dataclass(frozen=True)
class GuardLimits:
    """What an HTTP request may claim.

    Attributes:
        max_body_bytes: largest request body.
        max_elements: most values one input tensor may hold (its shape's product).
    """

    max_body_bytes: int = 8 << 20
    max_elements: int = 1 << 20


def _count_values(data, depth: int = 0) -> int:
    if isinstance(data, list):
        if depth > 8:
            raise Refused("input 'data' is nested deeper than any tensor shape")
        return sum(_count_values(x, depth + 1) for x in data)
    return 1


def check_infer(body: bytes, header_length: int | None, limits: GuardLimits) -> None:
    """Checks an inference request body (see the module docstring); raises Refused."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise Refused(f"Inference-Header-Content-Length {header_length} is not within the body of {len(body)} bytes")
        header, binary_bytes = body[:header_length], len(body) - header_length
    else:
        header, binary_bytes = body, 0
    try:
        request = json.loads(header)
    except RecursionError:
        raise Refused("request JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise Refused("request JSON must be an object with an 'inputs' list")
    binary_total = 0
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict):
            raise Refused("each input must be a JSON object")
        name, shape = tensor.get("name"), tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape) or len(shape) > 8:
            raise Refused(f"input {name!r}: shape must be a list of at most 8 integers, got {shape!r}"[:300])
        if any(not 0 <= d < MAX_DIM for d in shape):
            raise Refused(f"input {name!r}: shape {shape} has a dimension outside 0..{MAX_DIM - 1}")
        elements = math.prod(shape)
        if elements > limits.max_elements:
            raise Refused(f"input {name!r}: shape {shape} holds {elements} values, over the maximum of {limits.max_elements}")
        params = tensor.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            width = DTYPE_BYTES.get(tensor.get("datatype"))
            if type(size) is not int or size < 0 or (width is not None and size != elements * width):
                raise Refused(f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of {tensor.get('datatype')}")
            binary_total += size
        elif "data" in tensor:
            found = _count_values(tensor["data"])
            if found != elements:
                raise Refused(f"input {name!r}: data holds {found} values, shape {shape} needs {elements}")
        else:
            raise Refused(f"input {name!r} has neither 'data' nor a binary_data_size")
    if binary_total != binary_bytes:
        raise Refused(f"binary inputs declare {binary_total} bytes, the body carries {binary_bytes}")


class HttpGuard:
    """The guard's HTTP server, forwarding to Triton's HTTP endpoint at `upstream` (host:port).

    Args:
        host, port: where the guard listens (the public HTTP address).
        upstream: tritonserver's HTTP host:port (loopback).
        limits: request limits.
    """

    def __init__(self, host: str, port: int, upstream: str, limits: GuardLimits | None = None):
        self.upstream, self.limits = upstream, limits or GuardLimits()
        self.refused = 0
        self._local = threading.local()
        guard = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body go out as two writes; with Nagle on, the second waits for the
                # client's delayed ACK (40 ms a request, measured).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):  # noqa: N802
                guard.forward(self, b"")

            def do_POST(self):  # noqa: N802
                guard.handle_post(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def start(self) -> "HttpGuard":
        self._thread = threading.Thread(target=self.server.serve_forever, name="http-guard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            host, port = self.upstream.rsplit(":", 1)
            conn = self._local.conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def refuse(self, handler, message: str, code: int = 400) -> None:
        self.refused += 1
        data = json.dumps({"error": message}).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def handle_post(self, handler) -> None:
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            handler.close_connection = True
            return self.refuse(handler, "chunked request bodies are not accepted; send a Content-Length", 411)
        length = handler.headers.get("Content-Length", "0")  # no Content-Length, no chunks: no body
        if not length.isdigit():
            handler.close_connection = True
            return self.refuse(handler, f"Content-Length must be a number of bytes, got {length!r}", 400)
        if int(length) > self.limits.max_body_bytes:
            # Read and drop a body up to DRAIN_BYTES so the client hears the answer (a client that
            # is still sending sees a broken pipe otherwise); larger claims are not read at all.
            if int(length) <= DRAIN_BYTES:
                _drain(handler.rfile, int(length))
            handler.close_connection = True
            return self.refuse(handler, f"request body of {int(length)} bytes is over the maximum of {self.limits.max_body_bytes}", 413)
        body = handler.rfile.read(int(length))
        if INFER_PATH.match(handler.path.split("?")[0]):
            header = handler.headers.get("Inference-Header-Content-Length")
            try:
                if header is not None and not header.isdigit():
                    raise Refused(f"Inference-Header-Content-Length must be a number, got {header!r}")
                check_infer(body, int(header) if header is not None else None, self.limits)
            except Refused as e:
                return self.refuse(handler, str(e))
        elif body:
            try:
                json.loads(body)
            except RecursionError:
                return self.refuse(handler, "request JSON is nested too deeply")
            except (ValueError, UnicodeDecodeError):
                pass  # not ours to judge: Triton answers it
        self.forward(handler, body)

    def forward(self, handler, body: bytes) -> None:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "host"}
        for attempt in (1, 2):  # a kept-alive connection Triton closed is retried once, fresh
            conn = None
            try:
                conn = self._connection()
                conn.request(handler.command, handler.path, body=body if handler.command == "POST" else None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                self._local.conn = None
                if attempt == 2:
                    return self.refuse(handler, f"tritonserver is not answering on {self.upstream}: {e}", 503)
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
