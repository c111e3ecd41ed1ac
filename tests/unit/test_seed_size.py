"""bench.seed_size: the report table from fabricated figures (the measurement itself is `make bench-seed`)."""

from bench.seed_size import format_report


def _server(ready, rss, p50, p99, throughput):
    return {"ready_s": ready, "memory_mb": {"total": rss}, "sweep": [{"p50_ms": p50, "p99_ms": p99, "throughput": throughput}]}


def test_table_with_and_without_redis():
    report = {
        "counts": {"items": 489198, "users": 199953, "train_positives": 4188840},
        "index": {"factory": "IVF1024,Flat", "recall_at_10": 0.991, "bytes": 130 * 2**20},
        "build_s": 12.5, "in_process_load_s": 3.25, "in_process_load_rss_mb": 410.0,
        "in_process": {"p50_ms": 0.61}, "materialize_s": 8.0, "materialized_users": 199953,
        "query_cache": {"embedded": "on, 199,953 users, 48.8 MB, built in 2.10 s", "redis": "off: the feature store is Redis"},
        "embedded": _server(6.0, 1500.0, 1.21, 2.5, 800.0), "redis": _server(6.5, 1100.0, 1.45, 3.0, 650.0),
    }
    text = format_report(report)
    assert text.startswith("Catalogue 489,198 trained items, 199,953 users, 4,188,840 training clicks; index IVF1024,Flat (recall@10 0.991, 130 MiB).")
    assert "| c=1 p50 / p99 (perf_analyzer, gRPC) | 1.21 / 2.50 ms | 1.45 / 3.00 ms |" in text
    assert "| materialize into Redis |  | 8.0 s (199,953 users) |" in text
    assert "| in-process load | 3.2 s, +410 MiB |  |" in text
    assert "| query cache (stored users' queries, at load) | on, 199,953 users, 48.8 MB, built in 2.10 s | off: the feature store is Redis |" in text
    del report["redis"], report["query_cache"]["redis"]
    text = format_report(report)
    assert "| server + stubs RSS | 1,500 MiB |  |" in text and "materialize" not in text
