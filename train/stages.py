"""Per-stage cost of a training run: seconds, peak memory and rows per second, as a table.

Peak memory is the process's resident high-water mark during the stage: Linux resets it when
"5" is written to /proc/self/clear_refs, and reports it as VmHWM. Where that is not allowed
the figure is the process's peak so far (getrusage), and the table says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOG = logging.getLogger(__name__)

STAGES_JSON = "stages.json"
STAGES_MD = "stages.md"


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The resident high-water mark (since the last reset) in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Stage:
    """One stage's cost. `rows` is what the stage processed, counted in `unit`."""

    name: str
    seconds: float = 0.0
    peak_mb: float = 0.0
    rows: int = 0
    unit: str = "rows"
    peak_since_start: bool = False

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class StageRecorder:
    """Times named stages; `with recorder.stage("etl") as s: ...; s.rows = n`."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, unit: str = "rows"):
        record = Stage(name, unit=unit)
        record.peak_since_start = not _reset_peak()
        t = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - t
            record.peak_mb = peak_rss_mb()
            self.stages.append(record)
            LOG.info("stage %s: %.1f s, peak %.0f MiB%s", name, record.seconds, record.peak_mb,
                     f", {record.rows:,} {unit} ({record.rate:,.0f} {unit}/s)" if record.rows else "")

    def table(self) -> str:
        lines = ["| stage | seconds | peak memory (MiB) | processed | per second |", "|---|---|---|---|---|"]
        for s in self.stages:
            processed = f"{s.rows:,} {s.unit}" if s.rows else ""
            rate = f"{s.rate:,.0f} {s.unit}/s" if s.rows else ""
            peak = f"{s.peak_mb:,.0f}" + (" (process peak)" if s.peak_since_start else "")
            lines.append(f"| {s.name} | {s.seconds:,.1f} | {peak} | {processed} | {rate} |")
        total = time.perf_counter() - self.started
        lines.append(f"| total | {total:,.1f} | {max((s.peak_mb for s in self.stages), default=0):,.0f} | | |")
        return "\n".join(lines)

    def save(self, out_dir: Path) -> None:
        """Writes stages.json and stages.md into out_dir."""
        out_dir.mkdir(parents=True, exist_ok=True)
        body = {"stages": [{**asdict(s), "rows_per_s": s.rate} for s in self.stages],
                "total_s": time.perf_counter() - self.started}
        (out_dir / STAGES_JSON).write_text(json.dumps(body, indent=2))
        (out_dir / STAGES_MD).write_text(self.table() + "\n")
