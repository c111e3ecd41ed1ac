"""Our Prometheus metric families, through the Python backend's custom metrics API.

Triton serves them on its metrics port beside its own (nv_inference_*):
    retrieval_requests_total{outcome="ok|invalid|error"}
    retrieval_users_total{kind="known|unknown"}
    retrieval_excluded_items_total{source="request|seen"}   (seen: users with exclude_seen)
    retrieval_stage_seconds{stage="parse|lookup|transform|tower|search"}   histogram per batch
    retrieval_batch_users   histogram of users per executed batch (dynamic batching at work)
"""

from __future__ import annotations

STAGES = {"LookupUserFeatures": "lookup", "TransformUserFeatures": "transform", "QueryTower": "tower", "SearchItems": "search"}
SECONDS_BUCKETS = [2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 1e-1]
USERS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class ServingMetrics:
    """Creates the families once per model instance and records each batch's BatchReport."""

    def __init__(self, pb_utils, model_name: str, version: str):
        labels = {"model": model_name, "version": version}
        family = pb_utils.MetricFamily
        self._families = [
            family("retrieval_requests_total", "Requests by outcome", family.COUNTER),
            family("retrieval_users_total", "Users answered, known or not seen in training", family.COUNTER),
            family("retrieval_excluded_items_total", "Items excluded: ids sent per request, users with exclude_seen", family.COUNTER),
            family("retrieval_stage_seconds", "Seconds per executed batch in each stage of the request path", family.HISTOGRAM),
            family("retrieval_batch_users", "Users per executed batch", family.HISTOGRAM),
        ]
        requests, users, excluded, stages, batch = self._families
        self.requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in ("ok", "invalid", "error")}
        self.users = {k: users.Metric(labels={**labels, "kind": k}) for k in ("known", "unknown")}
        self.excluded = {s: excluded.Metric(labels={**labels, "source": s}) for s in ("request", "seen")}
        self.stages = {s: stages.Metric(labels={**labels, "stage": s}, buckets=SECONDS_BUCKETS) for s in ("parse", *STAGES.values())}
        self.batch_users = batch.Metric(labels=labels, buckets=USERS_BUCKETS)

    def record(self, report) -> None:
        self.requests["ok"].increment(report.ok)
        self.requests["invalid"].increment(report.invalid)
        if not report.users:
            return
        self.users["known"].increment(report.users - report.unknown_users)
        self.users["unknown"].increment(report.unknown_users)
        self.excluded["request"].increment(report.excluded_items)
        self.excluded["seen"].increment(report.exclude_seen_users)
        self.stages["parse"].observe(report.parse_s)
        for label, seconds in report.stages_s.items():
            if label in STAGES:
                self.stages[STAGES[label]].observe(seconds)
        self.batch_users.observe(report.users)

    def record_error(self, n_requests: int) -> None:
        self.requests["error"].increment(n_requests)

    def close(self) -> None:
        """Drops the metrics before their families, as the backend requires."""
        self.requests = self.users = self.excluded = self.stages = {}
        self.batch_users = None
        self._families = []
