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
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = logging.getLogger(__name__)

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/\d+)?/infer$")
# Triton's generate extension: not part of this service's contract, and its own JSON path.
GENERATE_PATH = re.compile(r"^/v2/models/[^/]+(/versions/\d+)?/generate(_stream)?$")
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
    """A request the guard answers itself, with this message and `status` (400 unless said)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body as sent (identity) or inflated (gzip, deflate), never past max_bytes."""
    if not encoding or encoding.lower() == "identity":
        return body
    kinds = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
    if encoding.lower() not in kinds:
        raise Refused(f"Content-Encoding {encoding!r} is not accepted; use gzip, deflate or none", status=415)
    inflater = zlib.decompressobj(kinds[encoding.lower()])
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise Refused(f"the {encoding} body cannot be decompressed: {e}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise Refused(f"the decompressed body is over the maximum of {max_bytes} bytes", status=413)
    return out


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
    """Scalars in (possibly nested) JSON lists; a flat list is counted without a Python loop."""
    if not isinstance(data, list):
        return 1
    if depth > 8:
        raise Refused("input 'data' is nested deeper than any tensor shape")
    if list not in set(map(type, data)):  # map and set run in C: 256k exclusions cost no Python loop
        return len(data)
    return sum(_count_values(x, depth + 1) for x in data)


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


CLIENT_TIMEOUT_S = 30.0


class QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with a deep accept queue (bursts of new connections are not reset;
    the default backlog is 5) whose client disconnects are one debug line, not a traceback."""

    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        LOG.debug("connection from %s ended with an error", client_address, exc_info=True)


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

            timeout = CLIENT_TIMEOUT_S  # a connection idle or trickling this long is closed

            def setup(self):
                super().setup()
                # Headers and body go out as two writes; with Nagle on, the second waits for the
                # client's delayed ACK (40 ms a request, measured).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):  # noqa: N802
                if not self.path.startswith("/"):
                    self.close_connection = True
                    return guard.refuse(self, f"the request target must be a path starting with '/', got {self.path[:100]!r}")
                guard.forward(self, b"")

            def do_POST(self):  # noqa: N802
                guard.handle_post(self)

            def log_message(self, *args):
                pass

        self.server = QuietHTTPServer((host, port), Handler)
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
        try:
            body, path = self._read_checked(handler)
        except Refused as e:
            handler.close_connection = True
            return self.refuse(handler, str(e), getattr(e, "status", 400))
        self.forward(handler, body, path)

    def _read_checked(self, handler) -> tuple[bytes, str]:
        """The request's body (decompressed) and path, once every rule passed; raises Refused."""
        path = handler.path
        if not path.startswith("/"):  # absolute-form targets (http://host/...) would slip past the path rules
            raise Refused(f"the request target must be a path starting with '/', got {path[:100]!r}")
        route = path.split("?")[0]
        if GENERATE_PATH.match(route):
            raise Refused(f"{route} is not served here; use /v2/models/<model>/infer", status=404)
        if handler.headers.get("Transfer-Encoding"):
            raise Refused("chunked (or otherwise encoded) request bodies are not accepted; send a Content-Length", status=411)
        lengths = handler.headers.get_all("Content-Length") or ["0"]  # no Content-Length, no chunks: no body
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise Refused(f"exactly one numeric Content-Length is needed, got {lengths}")
        length = int(lengths[0])
        if length > self.limits.max_body_bytes:
            # Read and drop a body up to DRAIN_BYTES so the client hears the answer (a client that
            # is still sending sees a broken pipe otherwise); larger claims are not read at all.
            if length <= DRAIN_BYTES:
                _drain(handler.rfile, length)
            raise Refused(f"request body of {length} bytes is over the maximum of {self.limits.max_body_bytes}", status=413)
        body = _decompress(handler.rfile.read(length), handler.headers.get("Content-Encoding"), self.limits.max_body_bytes)
        if INFER_PATH.match(route):
            header = handler.headers.get("Inference-Header-Content-Length")
            if header is not None and not header.isdigit():
                raise Refused(f"Inference-Header-Content-Length must be a number, got {header!r}")
            check_infer(body, int(header) if header is not None else None, self.limits)
        elif body:
            # Every other POST of the API takes JSON; what Python cannot parse (deep nesting, bytes
            # that are not UTF-8) is refused rather than handed to a parser without those bounds.
            try:
                json.loads(body)
            except RecursionError:
                raise Refused("request JSON is nested too deeply") from None
            except (ValueError, UnicodeDecodeError) as e:
                raise Refused(f"request body is not valid JSON: {e}") from None
        return body, path

    def forward(self, handler, body: bytes, path: str | None = None) -> None:
        # The body forwarded is the one checked: its length is set here (http.client), never the
        # client's headers, and it travels decompressed.
        dropped = HOP_BY_HOP | {"host", "content-length", "content-encoding"}
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in dropped}
        for attempt in (1, 2):  # a kept-alive connection Triton closed is retried once, fresh
            conn = None
            try:
                conn = self._connection()
                conn.request(handler.command, path or handler.path, body=body if handler.command == "POST" else None, headers=headers)
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
