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
           model: str = contract.MODEL_NAME, cold_user_id: int | None = None) -> CanaryResult:
    """Asks the model for one user's top item over HTTP and judges the answer.

    Args:
        http_url: host:port of Triton's HTTP endpoint.
        user_id: the user to ask for.
        expect_known: the user is in the training data, so `unknown_user=true` means the feature
            store lost it (a flushed store must not pass as a healthy one).
        timeout_s: each request's bound.
        cold_user_id: a user the export did not store, asked next in a request of its own: a stored
            user's query can come from the query cache (`ensemble.query_cache`), so this request is
            what makes the lookup, the transform and the tower run on every probe. It must hold an
            item too.
    """
    import time

    started = time.monotonic()
    answer = _ask(http_url, model, user_id, timeout_s)
    if isinstance(answer, CanaryResult):
        return answer
    ids, unknown = answer
    if expect_known and unknown:
        return CanaryResult(FEATURE_STORE, f"known user {user_id} came back unknown: the feature store lost its features",
                            time.monotonic() - started)
    detail = f"user {user_id} -> item {ids}"
    if cold_user_id is not None:
        answer = _ask(http_url, model, cold_user_id, timeout_s)
        if isinstance(answer, CanaryResult):
            return answer
        detail += f", new user {cold_user_id} -> item {answer[0]}"
    return CanaryResult(OK, detail, time.monotonic() - started)


def _ask(http_url: str, model: str, user_id: int, timeout_s: float) -> tuple[int, bool] | CanaryResult:
    """(top item, unknown_user) of one user's request, or the failed CanaryResult."""
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
        return CanaryResult(kind, f"user {user_id}: {message}", time.monotonic() - started)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return CanaryResult(UNREACHABLE, f"no answer from http://{http_url}: {getattr(e, 'reason', e)}", time.monotonic() - started)
    except json.JSONDecodeError as e:
        return CanaryResult(MODEL, f"the answer is not JSON: {e}", time.monotonic() - started)
    outputs = {o.get("name"): o.get("data") for o in answer.get("outputs", [])}
    ids, unknown = outputs.get(contract.OUTPUT_ITEM_IDS), outputs.get(contract.OUTPUT_UNKNOWN)
    if not ids or ids[0] < 0:
        return CanaryResult(MODEL, f"the answer for user {user_id} holds no item: {answer}", time.monotonic() - started)
    return int(ids[0]), bool(unknown and unknown[0])


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", f"HTTP {error.code}")
    except (ValueError, OSError):
        return f"HTTP {error.code}"


def canary_user(repository, model: str = contract.MODEL_NAME) -> tuple[int, bool, int | None]:
    """(user id, known, new user id or None) for the canary: the repository's `canary_user_id` and
    `canary_cold_user_id` parameters when set (user 0, not known and no second request otherwise)."""
    from ensemble.loader import model_parameters

    try:
        params, _ = model_parameters(f"{repository}/{model}")
    except (OSError, ValueError):
        return 0, False, None
    cold = int(params["canary_cold_user_id"]) if "canary_cold_user_id" in params else None
    if "canary_user_id" in params:
        return int(params["canary_user_id"]), True, cold
    return 0, False, cold
