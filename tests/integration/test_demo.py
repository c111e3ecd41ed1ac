"""`make demo`'s last step (client.demo) against a fresh server, as a user without an admin key runs it."""

from __future__ import annotations

from common import contract
from tests.integration.conftest import free_serve_config


def test_demo_serves_both_protocols_without_an_admin_key(hist_repository, hist_trained, monkeypatch, capsys):
    from client import demo

    # As on a fresh machine: no $RETRIEVAL_ADMIN_KEY (the model list it shows is a restricted API).
    monkeypatch.setenv(contract.ADMIN_KEY_ENV, "set-then-removed")  # so that the test's end restores its absence
    monkeypatch.delenv(contract.ADMIN_KEY_ENV)
    cfg = free_serve_config()
    code = demo.main(["--repository", str(hist_repository), "--artifacts", str(hist_trained["artifacts"]),
                      "--http-port", str(cfg.http_port), "--grpc-port", str(cfg.grpc_port),
                      "--metrics-port", str(cfg.metrics_port), "--top-k", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"gRPC and HTTP agree for users {list(demo.DEMO_USERS)}" in out
    assert out.count("item_ids [") == 2 * len(demo.DEMO_USERS)
