"""bench: the scaled catalogue, the reference build and the report arithmetic."""

import json

import numpy as np
import pytest
import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format

from bench.report import markdown, summarize
from bench.scale import neighbour_cosines, scale_artifacts, synthetic_catalogue
from common import contract
from common.config import IndexConfig
from common.manifest import read_manifest


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, dim))
    v = centres[rng.integers(0, 4, n)] + 0.4 * rng.normal(size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_synthetic_catalogue_keeps_the_trained_rows_first():
    real = _clustered(400, 16, 0)
    vectors, source = synthetic_catalogue(real, 5000, seed=0)
    assert vectors.shape == (5000, 16) and len(source) == 4600 and source.max() < 400
    np.testing.assert_array_equal(vectors[:400], real)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    again, _ = synthetic_catalogue(real, 5000, seed=0)
    np.testing.assert_array_equal(again, vectors)  # seeded


def test_synthetic_vectors_look_like_trained_ones_not_copies():
    real = _clustered(400, 16, 1)
    vectors, source = synthetic_catalogue(real, 4400, seed=1)
    check = neighbour_cosines(real, vectors[400:], 400, seed=0)
    trained, synthetic = check["trained"], check["synthetic"]
    # the spread: top covariance eigenvalues within 25% of the trained ones
    np.testing.assert_allclose(synthetic["top_eigenvalues"], trained["top_eigenvalues"], rtol=0.25)
    # neighbours as near as the trained ones' (median within 0.05), not near-copies of a source
    assert abs(synthetic["nn_cosine_p5_p50_p95"][1] - trained["nn_cosine_p5_p50_p95"][1]) < 0.05
    assert np.einsum("nd,nd->n", vectors[400:], real[source]).mean() < 0.95


def test_scaled_artifacts_pass_the_manifest_checks(trained, tmp_path):
    info = scale_artifacts(trained["artifacts"], trained["work"], tmp_path / "scaled", 3000, IndexConfig(kind="ivf", nlist=32, nprobe=8, min_recall_at_10=0.5))
    manifest = read_manifest(tmp_path / "scaled")
    assert manifest["counts"]["items"] == 3000 and manifest["scaled"]["synthetic_items"] == 3000 - info["real_items"]
    ids = np.load(tmp_path / "scaled" / contract.ARTIFACT_ITEM_IDS)
    assert len(np.unique(ids)) == 3000
    assert manifest["index"]["factory"] == "IVF32,Flat" and manifest["index"]["recall_at_10"] >= 0.5


def test_reference_repository_is_the_stock_layout(trained, tmp_path):
    from bench.reference import MODEL, build_reference_repository

    repo = build_reference_repository(trained["artifacts"], tmp_path / "ref", tmp_path / "scratch", trained["cfg"].data)
    assert sorted(p.name for p in repo.iterdir()) == ["0_transformworkflowtriton", MODEL]
    config = text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [o.name for o in config.output] == ["candidate_ids"] and config.max_batch_size == 0
    assert {i.name for i in config.input} == set(trained["cfg"].data.user_columns)


def test_dynamic_batching_rewrites_the_stock_entry_config(tmp_path):
    from bench.reference import with_dynamic_batching

    path = tmp_path / "config.pbtxt"
    path.write_text('name: "executor_model"\nbackend: "python"\ninput { name: "user_id" data_type: TYPE_INT32 dims: -1 }\n'
                    'output { name: "candidate_ids" data_type: TYPE_INT32 dims: -1 dims: 10 }\n')
    with_dynamic_batching(path, 256)
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert config.max_batch_size == 256 and config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert list(config.input[0].dims) == [1] and config.input[0].HasField("reshape") and list(config.input[0].reshape.shape) == []
    assert list(config.output[0].dims) == [10]


def _sweep(c_throughput):
    return [{"concurrency": c, "throughput": t, "p50_ms": 1000.0 / t, "p95_ms": 0, "p99_ms": 0, "server_queue_ms": 0,
             "server_compute_ms": 0} for c, t in c_throughput]


def _system(c_throughput, total_mb=40.0):
    return {"sweep": _sweep(c_throughput), "memory_mb": {"tritonserver": 40, "stub_1": total_mb - 40, "total": total_mb}, "stats": {}}


def _report(items=10_000_000, ours_mb=2000.0, recall=0.96):
    index = {"dim": 4, "factory": "IVF4096,SQ8", "search_params": {"nprobe": 32}, "recall_at_10": recall, "build_s": 1.0, "bytes": 2**20}
    return {
        "machine": "test", "indexes": [],
        "settings": {"concurrency": [1, 8], "measurement_ms": 1000, "items": items, "baseline_items": 1_000_000},
        "catalogue": {"real_items": 10, "synthetic_items": items - 10, "generator": {"components": 8}, "index": index,
                      "baseline": {"real_items": 10, "synthetic_items": 999_990, "generator": {"components": 8}, "index": index}},
        "systems": {
            "ours": _system([(1, 500.0), (8, 2500.0)], ours_mb),  # p50 2.0 ms at c=1
            "ours_baseline": _system([(1, 625.0), (8, 3000.0)], 900.0),  # p50 1.6 ms at c=1
            "reference": _system([(1, 25.0), (8, 100.0)]),
            "reference_our_index": _system([(1, 40.0), (8, 50.0)]),
            "reference_our_index_batched": _system([(1, 40.0), (8, 200.0)]),
            "trivial": _system([(1, 1000.0), (8, 5000.0)]),  # p50 1.0 ms at c=1
            "in_process": {"throughput": 300.0, "p50_ms": 3.0, "p95_ms": 0.4, "p99_ms": 0.5, "stage_ms": {}},
            "in_process_baseline": {"throughput": 3000.0, "p50_ms": 0.6, "p95_ms": 0.4, "p99_ms": 0.5, "stage_ms": {}},
        },
        "training": {"ours": {"etl_rows_per_s": 1.0, "examples_per_s": 2.0, "batch_size": 1}, "seed": {"examples_per_s": 1.0, "batch_size": 4}},
    }


FLOOR = "p50 at c=1 <= 1.25 x (trivial p50 + in-process p50) (1,000,000 items)"
SHARE = "throughput at c=8 >= 40% of the trivial model's (1,000,000 items)"
VS_REFERENCE = "throughput at c=8 >= 20x the stock reference's (1,000,000 items)"
SCALING = "p50 at c=1, 10,000,000 items <= 1.5 x at 1,000,000 items"
RECALL = "served index recall@10 vs exact >= 0.95 (10,000,000 items)"
MEMORY = "server + stubs < 3 GB, MB (10,000,000 items)"


def test_report_targets_are_ratios_within_the_run():
    t = summarize(_report())["targets"]
    assert list(t) == [FLOOR, SHARE, VS_REFERENCE, SCALING, RECALL, MEMORY]
    # request-path targets at the baseline catalogue, where the reference and the in-process baseline ran
    assert t[FLOOR]["value"] == pytest.approx(1.6 / (1.0 + 0.6)) and t[FLOOR]["met"]
    assert t[SHARE]["value"] == pytest.approx(3000 / 5000) and t[SHARE]["met"]
    assert t[VS_REFERENCE]["value"] == pytest.approx(30.0) and t[VS_REFERENCE]["met"]  # 3000 / 100
    # scaling: ours at 10M against ours at 1M, both at c=1
    assert t[SCALING]["value"] == pytest.approx(2.0 / 1.6) and t[SCALING]["met"]
    assert t[RECALL]["met"] and t[MEMORY]["met"]


def test_report_targets_fail_when_missed():
    report = _report(ours_mb=3072.0, recall=0.94)
    report["systems"]["ours_baseline"]["sweep"] = _sweep([(1, 400.0), (8, 1500.0)])  # p50 2.5 ms
    report["systems"]["ours"]["sweep"] = _sweep([(1, 200.0), (8, 1000.0)])  # p50 5.0 ms
    t = summarize(report)["targets"]
    assert t[FLOOR]["value"] == pytest.approx(2.5 / 1.6)
    assert t[SHARE]["value"] == pytest.approx(0.3)
    assert t[VS_REFERENCE]["value"] == pytest.approx(15.0)
    assert t[SCALING]["value"] == pytest.approx(2.0)
    assert not any(v["met"] for v in t.values())  # 3072 MB is not under 3 GB


def test_report_without_a_baseline_reads_every_target_at_the_one_catalogue():
    report = _report(items=1_000_000)
    report["settings"]["baseline_items"] = 1_000_000
    del report["systems"]["ours_baseline"], report["systems"]["in_process_baseline"], report["catalogue"]["baseline"]
    t = summarize(report)["targets"]
    assert t["p50 at c=1, 1,000,000 items <= 1.5 x at 1,000,000 items"]["value"] is None  # not measured, so not a pass
    assert not t["p50 at c=1, 1,000,000 items <= 1.5 x at 1,000,000 items"]["met"]
    assert t[FLOOR]["value"] == pytest.approx(2.0 / (1.0 + 3.0))  # ours and its in-process path, at the one catalogue
    report["summary"] = summarize(report)
    assert "| p50 at c=1, 1,000,000 items <= 1.5 x at 1,000,000 items | - | <= 1.5 | not measured (FAIL) |" in markdown(report)


def test_report_attributes_the_gain_step_by_step():
    report = _report()
    report["summary"] = s = summarize(report)
    at8 = [r for r in s["attribution"] if r["concurrency"] == 8]
    assert [r["system"] for r in at8] == ["reference", "reference_our_index", "reference_our_index_batched", "ours_baseline"]
    # index: 50 / 100; batching: 200 / 50; our request path: 3000 / 200
    assert [r["throughput_gain"] for r in at8] == [None, pytest.approx(0.5), pytest.approx(4.0), pytest.approx(15.0)]
    md = markdown(report)
    assert "| 8 | + Triton's dynamic batching | 200.0 | 5.00 | 4.00 | 4.00 |" in md
    assert f"| {FLOOR} | 1.000 | <= 1.25 | PASS |" in md
    assert f"| {MEMORY} | 2000.000 | < 3072 | PASS |" in md
    json.dumps(report)


def test_report_shows_the_in_process_path_after_idle_beside_the_target_figure():
    report = _report()
    report["systems"]["in_process_baseline"].update(idle_ms=1.0, p50_after_idle_ms=0.9, stage_after_idle_ms={"SearchItems": 0.5})
    report["summary"] = s = summarize(report)
    assert s["targets"][FLOOR]["value"] == pytest.approx(1.6 / (1.0 + 0.6))  # the target keeps the back-to-back figure
    md = markdown(report)
    assert ("In-process at the baseline catalogue with 1 ms idle before each request (a server's cadence at concurrency 1): "
            "p50 0.900 ms against 0.600 back to back (targets use the latter); stages SearchItems 0.500") in md
    assert "In-process with" not in md  # the main catalogue's run has no idle figure in this report


def test_bench_refuses_an_export_with_a_history_input(hist_trained, tmp_path):
    """The stock reference cannot feed the history; the bench says so before any work."""
    from bench.__main__ import main
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"was trained with a history input \(train.history_length 5\); the stock Merlin reference"):
        main(["--artifacts", str(hist_trained["artifacts"]), "--work", str(hist_trained["work"]), "--out", str(tmp_path / "bench"),
              "--items", "1000"])
    assert not (tmp_path / "bench" / "artifacts_scaled").exists()


def test_paired_targets_take_each_ratio_within_its_round_and_report_the_median():
    """Systems served together are measured in rounds; a ratio of medians would pair a fast round's
    figure with a slow round's (here 2.2 / 2.0 = 1.1, a pass that no round showed)."""
    report = _report()
    systems = report["systems"]
    systems["ours"]["rounds"] = [_sweep([(1, 1000 / 2.0)]), _sweep([(1, 1000 / 3.2)]), _sweep([(1, 1000 / 2.2)])]
    systems["ours_baseline"]["rounds"] = [_sweep([(1, 1000 / 1.0), (8, 3000.0)]), _sweep([(1, 1000 / 2.0), (8, 1000.0)]),
                                          _sweep([(1, 1000 / 2.0)])]  # c=8 left out (unstable) in round 3
    systems["trivial"]["rounds"] = [_sweep([(1, 1000.0), (8, 5000.0)]), _sweep([(1, 500.0), (8, 5000.0)]), _sweep([(1, 1000.0), (8, 4000.0)])]
    t = summarize(report)["targets"]
    assert t[SCALING]["rounds"] == pytest.approx([2.0, 1.6, 1.1]) and t[SCALING]["value"] == pytest.approx(1.6)
    assert not t[SCALING]["met"]
    assert t[SHARE]["rounds"] == pytest.approx([0.6, 0.2]) and t[SHARE]["value"] == pytest.approx(0.4)  # round 3 has no c=8 pair
    assert t[FLOOR]["rounds"] == pytest.approx([1.0 / 1.6, 2.0 / 2.6, 2.0 / 1.6])  # one in-process figure for every round
    # the in-process path timed in each round (bench.systems.sweep_servers(local=...)) pairs with that round
    systems["in_process_baseline"]["rounds"] = [{"p50_ms": 0.6}, {"p50_ms": 1.0}, {"p50_ms": 0.4}]
    t = summarize(report)["targets"]
    assert t[FLOOR]["rounds"] == pytest.approx([1.0 / 1.6, 2.0 / 3.0, 2.0 / 1.4])
    report["summary"] = summarize(report)
    report["settings"]["rounds"] = 3
    md = markdown(report)
    assert f"| {SCALING} | 1.600 (2.000 / 1.600 / 1.100) | <= 1.5 | FAIL |" in md
    assert "(the c=1 target's figure): 0.600 / 1.000 / 0.400 ms." in md


def test_median_row_is_the_median_of_each_figure():
    from bench.systems import median_row

    rows = [{"concurrency": 8, "throughput": t, "p50_ms": p, "unstable": u} for t, p, u in ((100.0, 3.0, False), (300.0, 1.0, True),
                                                                                            (200.0, 9.0, False))]
    assert median_row(rows) == {"concurrency": 8, "throughput": 200.0, "p50_ms": 3.0, "unstable": True}


def test_the_recall_target_reads_the_served_search_when_it_was_measured():
    """At 10M the served search is not the index's own (ensemble.ops.probe_split): its recall is the target's."""
    report = _report(recall=0.96)
    report["catalogue"]["served_search"] = {"recall_at_10": 0.949, "recall_se": 0.004, "search": "FAISS 1.8.0, split"}
    t = summarize(report)["targets"]
    assert t[RECALL]["value"] == pytest.approx(0.949) and not t[RECALL]["met"]
    md = markdown(report | {"summary": summarize(report)})
    assert ("recall@10 vs exact 0.9600; through the served model's search, one query a call: recall@10 0.9490 "
            "(standard error 0.0040); FAISS 1.8.0, split.") in md
