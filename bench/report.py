"""The benchmark report: JSON, markdown and a latency-vs-throughput plot."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {"p50_ms_c1": 2.0, "throughput_ratio_c8": 20.0, "recall_at_10": 0.95, "memory_mb": 1536.0}


def _at(system: dict, c: int) -> dict | None:
    return next((r for r in system.get("sweep", []) if r["concurrency"] == c), None)


def summarize(report: dict) -> dict:
    """Ratios to the reference and the floors, and the targets met or missed."""
    ours, ref, trivial = report["systems"]["ours"], report["systems"]["reference"], report["systems"]["trivial"]
    ratios = {}
    for row in ours["sweep"]:
        c = row["concurrency"]
        r, t = _at(ref, c), _at(trivial, c)
        ratios[c] = {
            "throughput_vs_reference": row["throughput"] / r["throughput"] if r else None,
            "p50_reference_over_ours": r["p50_ms"] / row["p50_ms"] if r else None,
            "p50_minus_trivial_ms": row["p50_ms"] - t["p50_ms"] if t else None,
        }
    c1, c8 = _at(ours, 1), ratios.get(8, {})
    memory = ours["memory_mb"]["total"]
    recall = report["catalogue"]["index"]["recall_at_10"]
    checks = {
        "p50 at concurrency 1 <= 2 ms": (c1["p50_ms"] if c1 else None, c1 is not None and c1["p50_ms"] <= TARGETS["p50_ms_c1"]),
        "throughput at concurrency 8 >= 20x the reference": (c8.get("throughput_vs_reference"),
                                                             (c8.get("throughput_vs_reference") or 0) >= TARGETS["throughput_ratio_c8"]),
        "served index recall@10 vs exact >= 0.95": (recall, recall >= TARGETS["recall_at_10"]),
        "server + stubs < 1.5 GB": (memory, memory < TARGETS["memory_mb"]),
    }
    in_process = report["systems"]["in_process"]
    return {"ratios": ratios, "targets": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()},
            "in_process_vs_server_p50_ms": (c1["p50_ms"] - in_process["p50_ms"]) if c1 else None}


def markdown(report: dict) -> str:
    s = report["summary"]
    cat = report["catalogue"]
    lines = [
        f"# Serving benchmark ({report['machine']})", "",
        f"Catalogue: {cat['real_items'] + cat['synthetic_items']:,} items ({cat['real_items']:,} trained, "
        f"{cat['synthetic_items']:,} synthetic: trained vectors plus noise of norm {cat['noise']}), d={cat['index']['dim']}; "
        f"served index {cat['index']['factory']} {cat['index']['search_params']}, recall@10 vs exact {cat['index']['recall_at_10']:.4f}.",
        "perf_analyzer over gRPC, one user per request, realistic user ids; client and server share the machine.", "",
        "## Throughput and latency", "",
        "| system | concurrency | infer/s | p50 ms | p95 ms | p99 ms | server queue ms | server compute ms |", "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("ours", "reference", "trivial"):
        for r in report["systems"][name]["sweep"]:
            lines.append(f"| {name} | {r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['server_queue_ms']:.2f} | {r['server_compute_ms']:.2f} |")
    ip = report["systems"]["in_process"]
    lines += [f"| in-process (no server) | 1 | {ip['throughput']:.1f} | {ip['p50_ms']:.3f} | {ip['p95_ms']:.3f} | {ip['p99_ms']:.3f} | - | - |", ""]
    lines += ["## Ratios", "", "| concurrency | ours / reference throughput | reference p50 / ours p50 | ours p50 - Triton floor p50 (ms) |", "|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for c, r in s["ratios"].items():
        lines.append(f"| {c} | {fmt(r['throughput_vs_reference'], '.1f')}x | {fmt(r['p50_reference_over_ours'], '.1f')}x | {fmt(r['p50_minus_trivial_ms'], '.2f')} |")
    lines += ["", "In-process stages (ms per 1-user request): " + ", ".join(f"{k} {v:.3f}" for k, v in ip["stage_ms"].items()), ""]
    lines += ["## Memory (RSS after the sweep, MB)", "", "| system | tritonserver | stubs | total |", "|---|---|---|---|"]
    for name in ("ours", "reference", "trivial"):
        m = report["systems"][name]["memory_mb"]
        stubs = sum(v for k, v in m.items() if k.startswith("stub_"))
        lines.append(f"| {name} | {m['tritonserver']:.0f} | {stubs:.0f} | {m['total']:.0f} |")
    lines += ["", "## Triton per-model split (ms per inference, whole sweep)", "", "| system | model | queue | compute input | compute infer | compute output |", "|---|---|---|---|---|---|"]
    for name in ("ours", "reference", "trivial"):
        for model, st in report["systems"][name]["stats"].items():
            lines.append(f"| {name} | {model} | {st['queue_ms']:.3f} | {st['compute_input_ms']:.3f} | {st['compute_infer_ms']:.3f} | {st['compute_output_ms']:.3f} |")
    if report.get("indexes"):
        lines += ["", "## Index choices", "", "| index | nprobe | efSearch | build s | memory MB | recall@10 vs exact | p50 ms per query |", "|---|---|---|---|---|---|---|"]
        for r in report["indexes"]:
            lines.append(f"| {r['factory']} | {r['nprobe'] or '-'} | {r['ef_search'] or '-'} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | "
                         f"{r['recall_at_10']:.4f} | {r['p50_ms_one_query']:.3f} |")
    t = report["training"]
    lines += ["", "## Training and ETL", "",
              f"ETL (NVTabular fit + transform of train and valid): {t['ours']['etl_rows_per_s']:,.0f} impressions/s.",
              f"Training: ours {t['ours']['examples_per_s']:,.0f} examples/s (batch {t['ours']['batch_size']}, no in-batch metrics); "
              f"the seed's plain fit {t['seed']['examples_per_s']:,.0f} examples/s (batch {t['seed']['batch_size']}, Recall@10/NDCG@10 as training metrics).", ""]
    lines += ["## Targets", "", "| target | value | met |", "|---|---|---|"]
    for name, v in s["targets"].items():
        value = "-" if v["value"] is None else f"{v['value']:.3f}"
        lines.append(f"| {name} | {value} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("ours", "reference", "trivial"):
        sweep = report["systems"][name]["sweep"]
        ax.plot([r["throughput"] for r in sweep], [r["p50_ms"] for r in sweep], marker="o", label=name)
        for r in sweep:
            ax.annotate(f"c{r['concurrency']}", (r["throughput"], r["p50_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ip = report["systems"]["in_process"]
    ax.scatter([ip["throughput"]], [ip["p50_ms"]], marker="x", color="black", label="in-process")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (infer/s)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"{report['catalogue']['real_items'] + report['catalogue']['synthetic_items']:,} items")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(report: dict, out: Path) -> dict[str, Path]:
    report["summary"] = summarize(report)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "latency_vs_throughput.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths
