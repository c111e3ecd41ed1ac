"""Our Prometheus metric families, through the Python backend's custom metrics API.

Triton serves them on its metrics port beside its own (nv_inference_*):
    retrieval_requests_total{outcome="ok|invalid|unavailable|error"}
    retrieval_users_total{kind="known|unknown"}
    retrieval_excluded_items_total{source="request|seen"}   (seen: users with exclude_seen)
    retrieval_stage_seconds{stage="parse|lookup|transform|tower|search"}   histogram per batch
    retrieval_batch_users   histogram of users per executed batch (dynamic batching at work)

A backend without histograms (Triton 23.06's) gets each histogram as two counters instead,
`<name>_sum` and `<name>_count`, which give the same mean and rate in Prometheus.
"""

from __future__ import annotations

STAGES = {"LookupUserFeatures": "lookup", "TransformUserFeatures": "transform", "QueryTower": "tower", "SearchItems": "search"}
SECONDS_BUCKETS = [2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 1e-1]
USERS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
OUTCOMES = ("ok", "invalid", "unavailable", "error")


class _SumCount:
    """A histogram's sum and count as two counters (for backends without HISTOGRAM)."""

    def __init__(self, sums, counts):
        self.sums, self.counts = sums, counts

    def observe(self, value: float) -> None:
        self.sums.increment(float(value))
        self.counts.increment(1)


class ServingMetrics:
    """Creates the families once per model instance and records each batch's BatchReport.

    Args:
        pb_utils: the backend's utils module.
        caps: its BackendCapabilities.
        model_name, version: labels on every metric.
    """

    def __init__(self, pb_utils, caps, model_name: str, version: str):
        labels = {"model": model_name, "version": version}
        self.enabled = caps.metrics
        self._families = []
        if not self.enabled:
            return
        family = pb_utils.MetricFamily

        def new(name, text, kind):
            self._families.append(family(name, text, kind))
            return self._families[-1]

        requests = new("retrieval_requests_total", "Requests by outcome", family.COUNTER)
        users = new("retrieval_users_total", "Users answered, known or not seen in training", family.COUNTER)
        excluded = new("retrieval_excluded_items_total", "Items excluded: ids sent per request, users with exclude_seen", family.COUNTER)
        self.requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        self.users = {k: users.Metric(labels={**labels, "kind": k}) for k in ("known", "unknown")}
        self.excluded = {s: excluded.Metric(labels={**labels, "source": s}) for s in ("request", "seen")}
        stage_text, batch_text = "Seconds per executed batch in each stage of the request path", "Users per executed batch"
        if caps.histograms:
            stages = new("retrieval_stage_seconds", stage_text, family.HISTOGRAM)
            batch = new("retrieval_batch_users", batch_text, family.HISTOGRAM)
            self.stages = {s: stages.Metric(labels={**labels, "stage": s}, buckets=SECONDS_BUCKETS) for s in ("parse", *STAGES.values())}
            self.batch_users = batch.Metric(labels=labels, buckets=USERS_BUCKETS)
        else:
            sums = new("retrieval_stage_seconds_sum", stage_text + " (sum)", family.COUNTER)
            counts = new("retrieval_stage_seconds_count", stage_text + " (count)", family.COUNTER)
            self.stages = {s: _SumCount(sums.Metric(labels={**labels, "stage": s}), counts.Metric(labels={**labels, "stage": s}))
                           for s in ("parse", *STAGES.values())}
            self.batch_users = _SumCount(new("retrieval_batch_users_sum", batch_text + " (sum)", family.COUNTER).Metric(labels=labels),
                                         new("retrieval_batch_users_count", batch_text + " (count)", family.COUNTER).Metric(labels=labels))

    def record(self, report) -> None:
        if not self.enabled:
            return
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

    def record_failure(self, outcome: str, n_requests: int) -> None:
        """Counts requests of a batch that failed as a whole ('unavailable' or 'error')."""
        if self.enabled:
            self.requests[outcome].increment(n_requests)

    def close(self) -> None:
        """Drops the metrics before their families, as the backend requires."""
        self.requests = self.users = self.excluded = self.stages = {}
        self.batch_users = None
        self._families = []
