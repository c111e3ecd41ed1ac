"""Our Prometheus metric families, through the Python backend's custom metrics API.

Triton serves them on its metrics port beside its own (nv_inference_*):
    retrieval_requests_total{outcome="ok|invalid|unavailable|error"}
    retrieval_users_total{kind="known|unknown"}
    retrieval_excluded_items_total{source="request|seen"}   (seen: users with exclude_seen)
    retrieval_history_items_total{kind="known|unknown"}   history item ids each request brought (a
        model with a history input: every stored and sent one, before the latest N known are kept); unknown: ids the item
        vocabulary does not hold (a newer catalogue than the model's, or a client's typo), left out
        of the query. A rising unknown share says the model is due for retraining.
    retrieval_cached_users_total   users whose query came from the query cache (`ensemble.query_cache`):
        stored users that sent only their id, for whom no lookup, transform or tower ran
    retrieval_stage_seconds{stage="parse|lookup|transform|tower|search"}   histogram per batch (sampled under
        load); a batch whose users all came from the query cache runs no lookup, transform or tower
    retrieval_batch_users   histogram of users per executed batch (dynamic batching at work; sampled under load)

A backend without histograms (Triton 23.06's) gets each histogram as two counters instead,
`<name>_sum` and `<name>_count`, which give the same mean and rate in Prometheus.

Every metric call of the Python backend is a round trip from the stub to tritonserver (shared
memory, a message, a wait for the answer): 16 us alone and about 80 us under load on our 2 cores,
and a batch made a dozen of them: 0.79 ms of a 2.05 ms execute at 1M items. So `record` only queues
the batch's report and a background thread sends them every FLUSH_INTERVAL_S: counters (and the
sum/count pairs of backends without histograms) as one exact increment per label, zeros skipped;
histograms one observation per batch up to MAX_OBSERVED_PER_SEND batches per send (40 batches/s),
an even sample of that many beyond it, so `_count` counts observed batches under load
(Triton's nv_inference_exec_count has them all), and the sample's distribution and mean stand
for those of every batch. Values reach the metrics port within about FLUSH_INTERVAL_S of the batch; `close`
sends what is left. The backend's calls let go of the GIL while they wait for tritonserver
(measured: a Python loop in the model's thread kept 77% of its speed while another thread made
2,000 metric calls), so sending does not hold the model up.
"""

from __future__ import annotations

import threading

STAGES = {"LookupUserFeatures": "lookup", "TransformUserFeatures": "transform", "QueryTower": "tower", "SearchItems": "search"}
SECONDS_BUCKETS = [2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 1e-1]
USERS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
OUTCOMES = ("ok", "invalid", "unavailable", "error")
FLUSH_INTERVAL_S = 0.2
# Histogram observations per series and send: 8 every 0.2 s is every batch up to 40 batches/s.
MAX_OBSERVED_PER_SEND = 8


class _Histogram:
    """A backend histogram fed the values queued since the last send: all of them up to
    MAX_OBSERVED_PER_SEND, else an even sample of that many (every n-th batch)."""

    def __init__(self, metric):
        self.metric = metric

    def observe_all(self, values: list[float]) -> None:
        step = -(-len(values) // MAX_OBSERVED_PER_SEND)
        for value in values[::step] if step > 1 else values:
            self.metric.observe(float(value))


class _SumCount:
    """A histogram's sum and count as two counters (for backends without HISTOGRAM)."""

    def __init__(self, sums, counts):
        self.sums, self.counts = sums, counts

    def observe_all(self, values: list[float]) -> None:
        if values:
            self.sums.increment(float(sum(values)))
            self.counts.increment(len(values))


class ServingMetrics:
    """Creates the families once per model instance; queues each batch's BatchReport and sends them in the background.

    Args:
        pb_utils: the backend's utils module.
        caps: its BackendCapabilities.
        model_name, version: labels on every metric.
        flush_interval_s: how often the background thread sends what was queued.
        on_error: called with a message when sending fails (the model logs it); sending goes on.
    """

    def __init__(self, pb_utils, caps, model_name: str, version: str, flush_interval_s: float = FLUSH_INTERVAL_S, on_error=None):
        labels = {"model": model_name, "version": version}
        self.enabled = caps.metrics
        self.flush_interval_s = flush_interval_s
        self._families = []
        self._queue: list = []  # BatchReports, and (outcome, n_requests) for batches that failed whole
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._on_error = on_error
        self._thread = None
        if not self.enabled:
            return
        family = pb_utils.MetricFamily

        def new(name, text, kind):
            self._families.append(family(name, text, kind))
            return self._families[-1]

        requests = new("retrieval_requests_total", "Requests by outcome", family.COUNTER)
        users = new("retrieval_users_total", "Users answered, known or not seen in training", family.COUNTER)
        excluded = new("retrieval_excluded_items_total", "Items excluded: ids sent per request, users with exclude_seen", family.COUNTER)
        history = new("retrieval_history_items_total", "History item ids in queries: known to the model, or unknown and left out",
                      family.COUNTER)
        self.requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        self.users = {k: users.Metric(labels={**labels, "kind": k}) for k in ("known", "unknown")}
        self.excluded = {s: excluded.Metric(labels={**labels, "source": s}) for s in ("request", "seen")}
        self.history = {k: history.Metric(labels={**labels, "kind": k}) for k in ("known", "unknown")}
        self.cached = new("retrieval_cached_users_total", "Users whose query came from the query cache (no lookup, transform or tower)",
                          family.COUNTER).Metric(labels=labels)
        stage_text, batch_text = "Seconds per executed batch in each stage of the request path", "Users per executed batch"
        if caps.histograms:
            stages = new("retrieval_stage_seconds", stage_text, family.HISTOGRAM)
            batch = new("retrieval_batch_users", batch_text, family.HISTOGRAM)
            self.stages = {s: _Histogram(stages.Metric(labels={**labels, "stage": s}, buckets=SECONDS_BUCKETS))
                           for s in ("parse", *STAGES.values())}
            self.batch_users = _Histogram(batch.Metric(labels=labels, buckets=USERS_BUCKETS))
        else:
            sums = new("retrieval_stage_seconds_sum", stage_text + " (sum)", family.COUNTER)
            counts = new("retrieval_stage_seconds_count", stage_text + " (count)", family.COUNTER)
            self.stages = {s: _SumCount(sums.Metric(labels={**labels, "stage": s}), counts.Metric(labels={**labels, "stage": s}))
                           for s in ("parse", *STAGES.values())}
            self.batch_users = _SumCount(new("retrieval_batch_users_sum", batch_text + " (sum)", family.COUNTER).Metric(labels=labels),
                                         new("retrieval_batch_users_count", batch_text + " (count)", family.COUNTER).Metric(labels=labels))
        self._thread = threading.Thread(target=self._run, name="retrieval-metrics", daemon=True)
        self._thread.start()

    def record(self, report) -> None:
        """Queues one executed batch's BatchReport (no call into the backend here)."""
        if self.enabled:
            with self._lock:
                self._queue.append(report)

    def record_failure(self, outcome: str, n_requests: int) -> None:
        """Queues the requests of a batch that failed as a whole ('unavailable' or 'error')."""
        if self.enabled:
            with self._lock:
                self._queue.append((outcome, n_requests))

    def flush(self) -> int:
        """Sends everything queued so far; returns the number of batches sent."""
        if not self.enabled:
            return 0
        with self._send_lock:
            with self._lock:
                queue, self._queue = self._queue, []
            if not queue:
                return 0
            counts = {o: 0 for o in OUTCOMES}
            known = unknown = excluded = seen = history_known = history_unknown = cached = 0
            stages = {s: [] for s in self.stages}
            batch_users = []
            for item in queue:
                if isinstance(item, tuple):
                    counts[item[0]] += item[1]
                    continue
                counts["ok"] += item.ok
                counts["invalid"] += item.invalid
                if not item.users:
                    continue
                known += item.users - item.unknown_users
                unknown += item.unknown_users
                excluded += item.excluded_items
                seen += item.exclude_seen_users
                history_known += item.history_known
                history_unknown += item.history_unknown
                cached += item.cached_users
                stages["parse"].append(item.parse_s)
                for label, seconds in item.stages_s.items():
                    if label in STAGES:
                        stages[STAGES[label]].append(seconds)
                batch_users.append(item.users)
            increments = [(self.requests[o], counts[o]) for o in OUTCOMES]
            increments += [(self.users["known"], known), (self.users["unknown"], unknown),
                           (self.excluded["request"], excluded), (self.excluded["seen"], seen),
                           (self.history["known"], history_known), (self.history["unknown"], history_unknown),
                           (self.cached, cached)]
            for metric, value in increments:
                if value:
                    metric.increment(value)
            for stage, values in stages.items():
                self.stages[stage].observe_all(values)
            self.batch_users.observe_all(batch_users)
            return len(queue)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - a failed send must not end the thread; say so and go on
                if self._on_error is not None:
                    self._on_error(f"sending metrics failed: {e}")

    def close(self) -> None:
        """Stops the background thread, sends what is left, then drops the metrics before their families."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
        self.enabled = False
        self.requests = self.users = self.excluded = self.history = self.stages = {}
        self.batch_users = self.cached = None
        self._families = []
