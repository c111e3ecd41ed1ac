"""What the running Triton Python backend offers, detected once when the model loads.

The same model repository runs on the Python backend of tritonserver 2.51 (our pinned stack) and
on that of Triton 23.06 (the Merlin 23.08 container), which has no error codes on `TritonError`
and no HISTOGRAM metric kind. Nothing here reads a version string: each capability is looked up
on the `triton_python_backend_utils` module the stub hands us, and a missing one degrades to the
closest thing the backend has (an error without a code, counters of sums and counts).
"""

from __future__ import annotations

# The error kinds our responses use, by their name on pb_utils.TritonError.
INVALID_ARG = "INVALID_ARG"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"


class BackendCapabilities:
    """The capabilities of one pb_utils module.

    Attributes:
        error_codes: TritonError takes a code (INVALID_ARG, UNAVAILABLE, ...).
        metrics: the custom metrics API (MetricFamily) exists.
        histograms: MetricFamily has the HISTOGRAM kind.
    """

    def __init__(self, pb_utils):
        self.pb_utils = pb_utils
        self.error_codes = all(hasattr(pb_utils.TritonError, k) for k in (INVALID_ARG, UNAVAILABLE, INTERNAL))
        family = getattr(pb_utils, "MetricFamily", None)
        self.metrics = family is not None and hasattr(family, "COUNTER")
        self.histograms = self.metrics and hasattr(family, "HISTOGRAM")

    def error(self, message: str, kind: str = INTERNAL):
        """A new TritonError for one response (never share one between responses: the backend
        frees it with the first response it is attached to)."""
        if self.error_codes:
            return self.pb_utils.TritonError(message, getattr(self.pb_utils.TritonError, kind))
        return self.pb_utils.TritonError(message)

    def describe(self) -> str:
        return (f"error codes {'yes' if self.error_codes else 'no (messages only)'}, metrics "
                f"{'no' if not self.metrics else 'histograms' if self.histograms else 'counters (sums and counts, no histograms)'}")
