"""perf_analyzer and the Merlin reference ensemble on the real server (the pieces of `make bench`)."""

import numpy as np
import pandas as pd
import pytest

from common import contract

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def perf_tools(tmp_path_factory):
    from client.perf import ensure_perf_analyzer

    return ensure_perf_analyzer(tmp_path_factory.mktemp("tools"))


def test_perf_analyzer_measures_our_model(server, trained, perf_tools, tmp_path):
    from bench.systems import model_stats, our_inputs
    from client.perf import run_perf, write_input_data

    rows, shapes = our_inputs(trained["artifacts"], 50, seed=0)
    data = write_input_data(tmp_path / "input.json", rows, shapes)
    before = model_stats(server.http_url)[contract.MODEL_NAME]["inference_count"]
    result = run_perf(*perf_tools, contract.MODEL_NAME, server.grpc_url, 1, data, measurement_ms=800, max_trials=3)
    assert result.throughput > 10 and 0 < result.p50_ms <= result.p99_ms
    assert model_stats(server.http_url)[contract.MODEL_NAME]["inference_count"] > before + 10


def test_servers_measured_together_in_rounds(trained, perf_tools, tmp_path):
    """`make bench` serves ours and Triton's floor at once and measures both in every round."""
    from bench import trivial
    from bench.systems import our_inputs, sweep_servers
    from ensemble.build import build_repository

    repos = {"ours": (build_repository(trained["artifacts"], tmp_path / "ours"), contract.MODEL_NAME),
             "trivial": (trivial.build_trivial_repository(tmp_path / "trivial"), trivial.MODEL)}
    rows, shapes = our_inputs(trained["artifacts"], 50, seed=0)
    tools = perf_tools[0].parent.parent  # <tools>/bin/perf_analyzer, unpacked by the fixture
    class Local:  # stands in for InProcess: timed once a round after the servers' first concurrency, then measured
        calls = 0

        def back_to_back(self) -> dict:
            self.calls += 1
            return {"p50_ms": float(self.calls)}

        def measure(self) -> dict:
            return {"p50_ms": 9.0, "idle_ms": 1.0}

    out = sweep_servers(repos, rows, shapes, [1, 2], tools, tmp_path / "perf", measurement_ms=500, rounds=2, local={"local": Local()})
    assert out["local"] == {"p50_ms": 9.0, "idle_ms": 1.0, "rounds": [{"p50_ms": 1.0}, {"p50_ms": 2.0}]}
    for name, model in (("ours", contract.MODEL_NAME), ("trivial", trivial.MODEL)):
        system = out[name]
        assert [[r["concurrency"] for r in one] for one in system["rounds"]] == [[1, 2], [1, 2]]
        for c in (1, 2):
            throughputs = sorted(one[i]["throughput"] for one in system["rounds"] for i in range(2) if one[i]["concurrency"] == c)
            assert next(r for r in system["sweep"] if r["concurrency"] == c)["throughput"] == pytest.approx(np.median(throughputs))
        # Triton's own count over the rounds: what perf_analyzer sent, no warm-up before them
        assert system["stats"][model]["inference_count"] >= 4 * 10
        assert system["memory_mb"]["total"] > 0


def test_the_reference_ensemble_serves_on_this_server(trained, tmp_path):
    import tritonclient.grpc as grpcclient

    from bench.reference import MODEL, build_reference_repository
    from ensemble.server import TritonServer
    from tests.integration.conftest import free_serve_config

    repo = build_reference_repository(trained["artifacts"], tmp_path / "ref", tmp_path / "scratch", trained["cfg"].data)
    users = pd.read_parquet(trained["artifacts"] / contract.ARTIFACT_USER_FEATURES).head(1)
    with TritonServer(repo, free_serve_config(), log_path=tmp_path / "log.txt", model=MODEL) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = []
        for column in users.columns:
            tensor = grpcclient.InferInput(column, [1], "INT32")
            tensor.set_data_from_numpy(users[column].to_numpy(np.int32))
            inputs.append(tensor)
        ids = client.infer(MODEL, inputs).as_numpy("candidate_ids")
        client.close()
    n_items = len(np.load(trained["artifacts"] / contract.ARTIFACT_ITEM_IDS))
    assert ids.shape == (10,) and ((ids >= 0) & (ids < n_items)).all()  # encoded rows, no scores
