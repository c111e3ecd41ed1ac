"""common.progress: log lines with units and rates when output is captured, nothing for small work."""

import logging

import common.progress as progress


def test_captured_output_gets_log_lines_with_units_and_rates(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="progress"):
        with progress.progress_bar(4_000_000, "epoch 1/3", "examples") as bar:  # pytest captures stderr: not a TTY
            bar.update(1_000_000)
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert line.startswith("epoch 1/3: 1,000,000/4,000,000 examples (25%), ") and " examples/s, about " in line


def test_small_work_and_the_switch_show_nothing(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="progress"):
        with progress.progress_bar(10, "small", "rows") as bar:
            bar.update(10)
        monkeypatch.setenv("RETRIEVAL_PROGRESS", "0")
        with progress.progress_bar(4_000_000, "silenced", "rows") as bar:
            bar.update(4_000_000)
    assert bar.disable and caplog.records == []
