"""Readiness that tells the truth: a canary request through the model, not Triton's own flag.

Triton's /v2/health/ready stays 200 while the Python-backend stub is dead, while the feature
store is gone and after a failed version load; a real request fails in each of those cases. The
canary is plain HTTP/JSON (standard library only) so it runs anywhere the server does: in the
supervisor, in a container's health check, in a Kubernetes exec probe
(`python -m ensemble health --url 127.0.0.1:8000`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from common import contract

# How a canary failed: the model answered with an error naming the feature store (not a reason to
# restart tritonserver), the model failed otherwise (a dead stub, a failed version), or nothing
# answered at all.
OK, FEATURE_STORE, MODEL, UNREACHABLE = "ok", "feature_store", "model", "unreachable"


@dataclass(frozen=True)
class CanaryResult:
    """One canary's outcome.

    Attributes:
        kind: OK, FEATURE_STORE, MODEL or UNREACHABLE.
        detail: what was wrong (the server's error message), or what came back.
        latency_s: how long the request took.
    """

    kind: str
    detail: str
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.kind == OK


def canary(http_url: str, user_id: int = 0, expect_known: bool = False, timeout_s: float = 5.0,
           model: str = contract.MODEL_NAME) -> CanaryResult:
    """Asks the model for one user's top item over HTTP and judges the answer.

    Args:
        http_url: host:port of Triton's HTTP endpoint.
        user_id: the user to ask for.
        expect_known: the user is in the training data, so `unknown_user=true` means the feature
            store lost it (a flushed store must not pass as a healthy one).
        timeout_s: the request's bound.
    """
    import time

    body = json.dumps({
        "parameters": {contract.PARAM_TOP_K: 1},
        "inputs": [{"name": contract.INPUT_USER_ID, "shape": [1, 1], "datatype": "INT64", "data": [int(user_id)]}],
    }).encode()
    request = urllib.request.Request(f"http://{http_url}/v2/models/{model}/infer", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        message = _error_text(e)
        kind = FEATURE_STORE if "feature store" in message else MODEL
        return CanaryResult(kind, message, time.monotonic() - started)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return CanaryResult(UNREACHABLE, f"no answer from http://{http_url}: {getattr(e, 'reason', e)}", time.monotonic() - started)
    except json.JSONDecodeError as e:
        return CanaryResult(MODEL, f"the answer is not JSON: {e}", time.monotonic() - started)
    elapsed = time.monotonic() - started
    outputs = {o.get("name"): o.get("data") for o in answer.get("outputs", [])}
    ids, unknown = outputs.get(contract.OUTPUT_ITEM_IDS), outputs.get(contract.OUTPUT_UNKNOWN)
    if not ids or ids[0] < 0:
        return CanaryResult(MODEL, f"the answer holds no item: {answer}", elapsed)
    if expect_known and unknown and unknown[0]:
        return CanaryResult(FEATURE_STORE, f"known user {user_id} came back unknown: the feature store lost its features", elapsed)
    return CanaryResult(OK, f"user {user_id} -> item {ids[0]}", elapsed)


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", f"HTTP {error.code}")
    except (ValueError, OSError):
        return f"HTTP {error.code}"


def canary_user(repository, model: str = contract.MODEL_NAME) -> tuple[int, bool]:
    """(user id, known) for the canary: the repository's `canary_user_id` parameter when set."""
    from ensemble.loader import model_parameters

    try:
        params, _ = model_parameters(f"{repository}/{model}")
    except (OSError, ValueError):
        return 0, False
    if "canary_user_id" in params:
        return int(params["canary_user_id"]), True
    return 0, False
