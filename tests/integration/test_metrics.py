"""Triton's Prometheus endpoint carries our metric families with values that add up."""

import re
import time
import urllib.request

import pandas as pd
import pytest

from common import contract
from common.errors import ClientError
from ensemble.metrics import FLUSH_INTERVAL_S

pytestmark = pytest.mark.integration


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def metric(values, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        if key.split("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', key))
        if all(found.get(k) == str(v) for k, v in labels.items()):
            total += value
    return total


def scrape_after(server, before: dict[str, float], name: str, at_least: float) -> dict[str, float]:
    """The metrics once `name` has grown by `at_least` since `before`, and one more send for the rest.

    The model sends its metrics from a background thread every FLUSH_INTERVAL_S."""
    deadline = time.monotonic() + 25 * FLUSH_INTERVAL_S
    while metric(scrape(server), name) - metric(before, name) < at_least:
        assert time.monotonic() < deadline, f"{name} did not reach the metrics port within 25 flush intervals"
        time.sleep(FLUSH_INTERVAL_S / 4)
    time.sleep(FLUSH_INTERVAL_S)
    return scrape(server)


def test_our_families_count_what_we_sent(server, trained):
    from client.client import RetrievalClient

    users = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.to_numpy()[:3].tolist()
    before = scrape(server)
    with RetrievalClient(server.grpc_url) as client:
        for _ in range(4):
            client.recommend(users + [10**12], top_k=3, exclude=[[1, 2], [], [], [3]])
        client.recommend(users[:1], top_k=3, exclude_seen=True)
        with pytest.raises(ClientError):
            client.recommend(users[:1], top_k=0)
    after = scrape_after(server, before, "retrieval_requests_total", 6)  # the 6 requests, and the rest of that send

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("retrieval_requests_total", outcome="ok") == 5
    assert delta("retrieval_requests_total", outcome="invalid") == 1
    assert delta("retrieval_users_total", kind="known") == 4 * 3 + 1
    assert delta("retrieval_users_total", kind="unknown") == 4
    assert delta("retrieval_excluded_items_total", source="request") == 4 * 3
    assert delta("retrieval_excluded_items_total", source="seen") == 1
    # Known users that sent only their ids take their query from the cache: the four mixed batches
    # ran the lookup, transform and tower for their unknown user alone, the last batch not at all.
    assert delta("retrieval_cached_users_total") == 4 * 3 + 1
    for stage, batches in (("parse", 5), ("lookup", 4), ("transform", 4), ("tower", 4), ("search", 5)):
        assert delta("retrieval_stage_seconds_count", stage=stage) == batches  # one observation per batch that ran it
        assert 0 < delta("retrieval_stage_seconds_sum", stage=stage) < batches * 0.5  # seconds, and sane ones
    assert delta("retrieval_batch_users_sum") == 4 * 4 + 1
    assert metric(after, "nv_inference_request_success", model=contract.MODEL_NAME) >= 5  # Triton's own, beside ours


def test_the_canary_runs_the_whole_request_path_and_not_only_the_cache(server, repository, trained):
    """A stored user's query comes from the query cache; the canary's second request, for a user the
    export does not store, is what runs the lookup, the transform and the tower on every probe."""
    from ensemble.health import canary, canary_user

    user, known, new_user = canary_user(repository)
    stored = set(pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).user_id.tolist())
    assert known and user in stored and new_user is not None and new_user not in stored
    before = scrape(server)
    result = canary(server.http_url, user, known, 10.0, cold_user_id=new_user)
    assert result.ok, result
    assert re.fullmatch(rf"user {user} -> item -?\d+, new user {new_user} -> item -?\d+", result.detail), result.detail
    after = scrape_after(server, before, "retrieval_requests_total", 2)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("retrieval_requests_total", outcome="ok") == 2
    assert delta("retrieval_cached_users_total") == 1
    assert delta("retrieval_users_total", kind="unknown") == 1
    for stage in ("lookup", "transform", "tower"):
        assert delta("retrieval_stage_seconds_count", stage=stage) == 1
