"""client.soak: a short mixed load on the session's server finds nothing wrong."""

import pytest

from client.soak import run_soak, save

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_short_soak_passes(server, trained, tmp_path):
    report = run_soak(server.grpc_url, server.process.pid, trained["artifacts"], duration_s=8, concurrency=4, sample_every_s=1)
    assert report["good_requests"] > 50 and report["bad_requests"] > 0
    assert report["errors_on_good"] == 0 and report["changed_answers"] == 0
    assert report["bad_answered"] == 0 and report["bad_unexpected_message"] == 0, report["examples"]
    assert report["memory_mb"]["max"] > 100  # it measured the server and its stub
    assert report["passed"]
    paths = save(report, tmp_path)
    assert paths["png"].stat().st_size > 0


def test_a_short_soak_of_the_history_model_passes(hist_server, hist_trained):
    """Histories of 0 to 3 ids mixed into the dynamic batches, and the hostile history inputs."""
    report = run_soak(hist_server.grpc_url, hist_server.process.pid, hist_trained["artifacts"], duration_s=6, concurrency=4, sample_every_s=1)
    assert report["good_requests"] > 50 and report["bad_requests"] > 0
    assert report["errors_on_good"] == 0 and report["changed_answers"] == 0, report["examples"]
    assert report["bad_answered"] == 0 and report["bad_unexpected_message"] == 0, report["examples"]
    assert 0.15 * report["good_requests"] < report["requests_with_history"] < 0.45 * report["good_requests"]  # 30% of them
