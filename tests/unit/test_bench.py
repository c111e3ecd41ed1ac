"""bench: the scaled catalogue, the reference build and the report arithmetic."""

import json

import numpy as np
import pytest
import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format

from bench.report import markdown, summarize
from bench.scale import scale_artifacts, synthetic_catalogue
from common import contract
from common.config import IndexConfig
from common.manifest import read_manifest


def test_synthetic_catalogue_keeps_the_trained_rows_first():
    real = np.eye(4, 8, dtype=np.float32)
    vectors, source = synthetic_catalogue(real, 50, noise=0.6, seed=0)
    assert vectors.shape == (50, 8) and len(source) == 46
    np.testing.assert_array_equal(vectors[:4], real)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    cos = np.einsum("nd,nd->n", vectors[4:], real[source])
    assert 0.7 < cos.mean() < 0.95  # near their source, not copies of it


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


def _sweep(c_throughput):
    return [{"concurrency": c, "throughput": t, "p50_ms": 1000.0 / t, "p95_ms": 0, "p99_ms": 0, "server_queue_ms": 0,
             "server_compute_ms": 0} for c, t in c_throughput]


def test_report_ratios_and_targets():
    report = {
        "machine": "test", "indexes": [],
        "catalogue": {"real_items": 10, "synthetic_items": 90, "noise": 0.6,
                      "index": {"dim": 4, "factory": "Flat", "search_params": {}, "recall_at_10": 1.0}},
        "systems": {
            "ours": {"sweep": _sweep([(1, 1000.0), (8, 3000.0)]), "memory_mb": {"tritonserver": 40, "stub_1": 600, "total": 640}, "stats": {}},
            "reference": {"sweep": _sweep([(1, 30.0), (8, 100.0)]), "memory_mb": {"tritonserver": 40, "total": 40}, "stats": {}},
            "trivial": {"sweep": _sweep([(1, 2000.0), (8, 6000.0)]), "memory_mb": {"tritonserver": 40, "total": 40}, "stats": {}},
            "in_process": {"throughput": 3000.0, "p50_ms": 0.3, "p95_ms": 0.4, "p99_ms": 0.5, "stage_ms": {}},
        },
        "training": {"ours": {"etl_rows_per_s": 1.0, "examples_per_s": 2.0, "batch_size": 1}, "seed": {"examples_per_s": 1.0, "batch_size": 4}},
    }
    s = summarize(report)
    assert s["ratios"][8]["throughput_vs_reference"] == pytest.approx(30.0)  # 3000 / 100
    assert s["ratios"][1]["p50_minus_trivial_ms"] == pytest.approx(1.0 - 0.5)  # 1000/1000 - 1000/2000
    assert all(t["met"] for t in s["targets"].values())
    report["summary"] = s
    assert "| 8 | 30.0x |" in markdown(report)
    json.dumps(report)
