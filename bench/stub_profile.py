"""Where our Python stub spends its time: ours vs Triton's floor vs the in-process path, one run.

    python -m bench.stub_profile --artifacts build/artifacts --work build/work --out build/stub_profile

Serves the bench's scaled catalogue (built once under --out, reused after) with our model and
with the trivial echo model, runs perf_analyzer at the given concurrencies on each, reads Triton's
per-stage statistics, times the in-process request path, and prints the issue-12 ratios:
p50 at c=1 against (trivial p50 + in-process p50), and throughput at the highest concurrency
against the trivial model's. `--profile` also serves a copy of our repository whose model is
wrapped to time each section of `execute` in the stub (perf_counter_ns; written at unload).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from common.cli import run_cli
from common.config import IndexConfig

LOG = logging.getLogger(__name__)

# The wrapper model: the real model.py is imported as model_impl.py from the same folder and the
# calls of interest are wrapped with timers; totals go to $STUB_PROFILE_OUT at unload.
PROFILED_MODEL = r'''
import importlib.util, json, os, sys, time
from pathlib import Path
_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("model_impl", _HERE / "model_impl.py")
impl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(impl)
import triton_python_backend_utils as pb_utils
from ensemble import executor as ex_mod, request as rq_mod

TOTALS = {}

def timed(label, fn):
    def wrapper(*a, **k):
        t = time.perf_counter_ns()
        try:
            return fn(*a, **k)
        finally:
            n, s = TOTALS.get(label, (0, 0))
            TOTALS[label] = (n + 1, s + time.perf_counter_ns() - t)
    return wrapper



class _Proxy:
    """pb_utils as the model sees it, with Tensor and InferenceResponse timed."""

    def __init__(self, real):
        self._real = real
        self.Tensor = timed("pb_utils.Tensor", real.Tensor)
        self.InferenceResponse = timed("pb_utils.InferenceResponse", real.InferenceResponse)
        self.get_input_tensor_by_name = timed("get_input_tensor_by_name", real.get_input_tensor_by_name)

    def __getattr__(self, name):
        return getattr(self._real, name)


class TritonPythonModel(impl.TritonPythonModel):
    def initialize(self, args):
        # The stub fills pb_utils (Tensor, ...) in after importing model.py: patch here, not at import.
        impl.pb_utils = _Proxy(pb_utils)
        impl.parse_parameters = timed("parse_parameters", impl.parse_parameters)
        ex_mod.parse_request = timed("executor.parse_request", ex_mod.parse_request)
        ex_mod.merge = timed("executor.merge", ex_mod.merge)
        ex_mod.split = timed("executor.split", ex_mod.split)
        super().initialize(args)
        self.executor.execute = timed("executor.execute", self.executor.execute)
        self.executor.runner.run = timed("runner.run", self.executor.runner.run)
        self.metrics.record = timed("metrics.record", self.metrics.record)
        if hasattr(self.metrics, "flush"):  # sent from a background thread (not part of execute)
            self.metrics.flush = timed("metrics.flush (background thread)", self.metrics.flush)
        self._execute = timed("execute (whole)", super().execute)

    def execute(self, requests):
        n, s = TOTALS.get("requests per execute", (0, 0))
        TOTALS["requests per execute"] = (n + 1, s + len(requests))
        return self._execute(requests)

    def finalize(self):
        stages = dict(self.executor.runner.timings_s)
        with open(os.environ["STUB_PROFILE_OUT"], "w") as f:
            json.dump({"sections": {k: {"calls": n, "total_ns": s} for k, (n, s) in TOTALS.items()},
                       "op_seconds": stages}, f, indent=1)
        super().finalize()
'''


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stub_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, type=Path, help="trained artifacts (make train)")
    parser.add_argument("--work", required=True, type=Path, help="the training work folder (for user queries)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the scaled catalogue, repositories and results")
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size to serve")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated perf_analyzer concurrencies")
    parser.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--tools", type=Path, default=Path(".tools/perf_analyzer"), help="where perf_analyzer is unpacked")
    parser.add_argument("--rescale", action="store_true", help="rebuild the scaled catalogue even if --out has one")
    parser.add_argument("--profile", action="store_true", help="also serve a timed copy of our model and report its sections")
    parser.add_argument("--label", default="run", help="name of this run in the results file")
    parser.add_argument("--compare-ref", default=None,
                        help="also serve our model with its code as of this git revision (A/B in the same run)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times (noisy machine)")
    parser.add_argument("--interleave", action="store_true",
                        help="serve every system at once and alternate short perf_analyzer windows between them, "
                             "so each round's systems see the same load (a shared, noisy machine)")
    parser.add_argument("--serve-variant", action="append", default=[], metavar="FIELD=VALUE",
                        help="also serve ours with this serve setting changed (threads=2, instance_count=2, ...); repeatable")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def profiled_repository(repository: Path, out: Path) -> Path:
    """A copy of `repository` whose model.py is the timing wrapper around the real one."""
    from common.manifest import file_digests

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(repository, out, symlinks=True)
    for version in (p for p in (out / "retrieval").iterdir() if (p / "model.py").is_file()):
        (version / "model.py").rename(version / "model_impl.py")
        (version / "model.py").write_text(PROFILED_MODEL)
        manifest = json.loads((version / "manifest.json").read_text())
        # The loader checks every shipped file against the manifest: record the wrapper as model.py.
        manifest["repository_files"].update(file_digests(version, ["model.py", "model_impl.py"]))
        (version / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return out


def variant_repository(artifacts: Path, out: Path, variant: str) -> Path:
    """Our repository for `artifacts` served with one serve setting changed ("threads=2"): the
    setting is read as `--set serve.<variant>` would be (typed, validated)."""
    from common.config import load_config
    from common.manifest import artifacts_config, read_manifest
    from ensemble.build import build_repository

    cfg = load_config(overrides=[f"serve.{variant}"], environ={}, base=artifacts_config(read_manifest(artifacts)))
    shutil.rmtree(out, ignore_errors=True)
    return build_repository(artifacts, out, cfg=cfg)


def repository_at_revision(repository: Path, out: Path, revision: str) -> Path:
    """A copy of `repository` whose vendored code and model.py are those of a git revision (same artifacts)."""
    import subprocess

    from common.manifest import file_digests

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(repository, out, symlinks=True)
    for version in (p for p in (out / "retrieval").iterdir() if (p / "model.py").is_file()):
        sources = {"model.py": "ensemble/triton_model.py"}
        sources.update({p.relative_to(version).as_posix(): p.relative_to(version / "code").as_posix()
                        for p in (version / "code").rglob("*.py") if "__pycache__" not in p.parts})
        for shipped, tracked in sources.items():
            old = subprocess.run(["git", "show", f"{revision}:{tracked}"], capture_output=True)
            if old.returncode == 0:
                (version / shipped).write_bytes(old.stdout)
        manifest = json.loads((version / "manifest.json").read_text())
        manifest["repository_files"].update(file_digests(version, list(sources)))
        (version / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return out


def summarize(results: dict, name: str = "ours") -> dict:
    """The issue-12 ratios of one served system against the trivial model of the same round."""
    trivial, ours, local = results["trivial"]["sweep"], results[name]["sweep"], results["in_process"]
    c1 = {r["concurrency"]: r for r in ours}, {r["concurrency"]: r for r in trivial}
    top = max(c1[0])
    out = {f"throughput_c{top}": c1[0][top]["throughput"], f"trivial_throughput_c{top}": c1[1][top]["throughput"],
           "throughput_share": c1[0][top]["throughput"] / c1[1][top]["throughput"]}
    if 1 in c1[0]:  # the p50 target needs concurrency 1 in the sweep
        floor = c1[1][1]["p50_ms"] + local["p50_ms"]
        out.update({"p50_c1_ms": c1[0][1]["p50_ms"], "floor_plus_in_process_ms": floor, "p50_ratio": c1[0][1]["p50_ms"] / floor})
    return out


def main(argv=None) -> int:
    from bench import scale, systems, trivial
    from ensemble.build import build_repository

    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    scaled = out / "artifacts_scaled"
    if args.rescale or not (scaled / "manifest.json").is_file():
        scale.scale_artifacts(args.artifacts, args.work, scaled, args.items, IndexConfig(), seed=args.seed)
    repos = {name: out / f"repo_{name}" for name in ("ours", "trivial")}
    for path in repos.values():
        shutil.rmtree(path, ignore_errors=True)
    build_repository(scaled, repos["ours"])
    trivial.build_trivial_repository(repos["trivial"])
    rows, shapes = systems.our_inputs(args.artifacts, 1000, args.seed)
    perf = out / "perf"
    servers = [("trivial", repos["trivial"], trivial.MODEL), ("ours", repos["ours"], "retrieval")]
    if args.compare_ref:
        servers.append(("ref", repository_at_revision(repos["ours"], out / "repo_ref", args.compare_ref), "retrieval"))
    for variant in args.serve_variant:
        servers.append((f"ours {variant}", variant_repository(scaled, out / f"repo_{variant.replace('=', '_')}", variant), "retrieval"))
    if args.interleave:
        return interleaved(args, servers, rows, shapes, concurrencies, perf, repos)
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: systems.sweep_server(name, repo, model, rows, shapes, concurrencies, args.tools, perf, args.measurement_ms)
                       for name, repo, model in servers})
    results = dict(rounds[-1])
    results["rounds"] = rounds
    results["in_process"] = systems.in_process(repos["ours"], args.artifacts, 3000, args.seed)
    results["ratios"] = {f"round {i + 1} {name}": summarize({**r, "in_process": results["in_process"]}, name)
                         for i, r in enumerate(rounds) for name in r if name != "trivial"}
    history = out / "stub_profile.json"
    runs = json.loads(history.read_text()) if history.is_file() else {}
    runs[args.label] = results
    history.write_text(json.dumps(runs, indent=1, default=str))
    if args.profile:
        import os

        sections = (out / "stub_sections.json").resolve()
        os.environ["STUB_PROFILE_OUT"] = str(sections)
        profiled = profiled_repository(repos["ours"], out / "repo_profiled")
        results["profiled"] = systems.sweep_server("profiled", profiled, "retrieval", rows, shapes, concurrencies, args.tools,
                                                   perf, args.measurement_ms)
        results["profiled"]["sections"] = json.loads(sections.read_text())
        runs[args.label] = results
        history.write_text(json.dumps(runs, indent=1, default=str))
    print(report(results))
    return 0


def interleaved(args, servers, rows, shapes, concurrencies, perf: Path, repos: dict) -> int:
    """All servers up together; each round runs every system at each concurrency back to back."""
    import statistics

    from bench import systems
    from bench.report import p50_over_floor, paired, rounds_at, throughput_share

    measured = systems.sweep_servers({name: (repo, model) for name, repo, model in servers}, rows, shapes, concurrencies, args.tools,
                                     perf, args.measurement_ms, rounds=args.rounds,
                                     local={"in_process": systems.InProcess(repos["ours"], args.artifacts, 3000, args.seed)})
    local = measured.pop("in_process")
    local_rounds = local["rounds"]
    top = max(concurrencies)
    lines = [f"interleaved, {args.rounds} rounds, {args.measurement_ms} ms windows; in-process p50 per round "
             + " / ".join(f"{r['p50_ms']:.3f}" for r in local_rounds) + " ms",
             "| system | c=1 p50 ms (median) | c=%d infer/s (median) | p50 ratio (median of rounds) | c=%d share (median of rounds) |" % (top, top),
             "|---|---|---|---|---|"]
    summary = {}
    trivial = measured["trivial"]
    for name, _, _ in servers:
        system = measured[name]
        p50 = [r["p50_ms"] for r in rounds_at(system, 1) if r]
        thr = [r["throughput"] for r in rounds_at(system, top) if r]
        ratio = paired(p50_over_floor, rounds_at(system, 1), rounds_at(trivial, 1),
                       local_rounds)
        share = paired(throughput_share, rounds_at(system, top), rounds_at(trivial, top))
        summary[name] = {"p50_c1_ms": p50, f"throughput_c{top}": thr, "p50_ratio": ratio[1], "throughput_share": share[1]}
        lines.append(f"| {name} | {statistics.median(p50):.3f} | {statistics.median(thr):,.0f} | {ratio[0]:.2f} | {share[0]:.2f} |")
    lines += ["", "Triton's stats over the interleaved rounds, ms per inference (per execution in brackets):",
              "| system | queue | compute_input | compute_infer | compute_output | inferences/execution |", "|---|---|---|---|---|---|"]
    for name, _, model in servers:
        st = measured[name]["stats"][model]
        per_exec = st["inference_count"] / max(st["execution_count"], 1)
        cells = [f"{st[f'{stage}_ms']:.3f} ({st[f'{stage}_ms'] * per_exec:.3f})" for stage in ("queue", "compute_input", "compute_infer", "compute_output")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_exec:.2f} |")
    text = "\n".join(lines)
    history = args.out / "stub_profile.json"
    runs = json.loads(history.read_text()) if history.is_file() else {}
    runs[args.label] = {"interleaved": summary, "in_process": local, "systems": measured, "report": text}
    history.write_text(json.dumps(runs, indent=1, default=str))
    print(text)
    return 0


def report(results: dict) -> str:
    lines = ["| system | c | infer/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for i, one in enumerate(results["rounds"]):
        for name, system in one.items():
            for r in system["sweep"]:
                lines.append(f"| {name} (round {i + 1}) | {r['concurrency']} | {r['throughput']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    for r in results.get("profiled", {}).get("sweep", []):
        lines.append(f"| profiled | {r['concurrency']} | {r['throughput']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    local = results["in_process"]
    lines.append(f"| in-process | 1 | {local['throughput']:,.0f} | {local['p50_ms']:.2f} | {local['p99_ms']:.2f} |")
    if "p50_after_idle_ms" in local:
        lines.append(f"| in-process, {local['idle_ms']:g} ms idle before each request | 1 | - | {local['p50_after_idle_ms']:.2f} | - |")
    lines += ["", "Triton's stats, ms per inference over the whole sweep:", "| model | queue | compute_input | compute_infer | compute_output | inferences/execution |",
              "|---|---|---|---|---|---|"]
    systems_seen = [(f"{name} (round {i + 1})", system) for i, one in enumerate(results["rounds"]) for name, system in one.items()]
    systems_seen += [("profiled", results["profiled"])] if "profiled" in results else []
    for name, system in systems_seen:
        for model, s in system["stats"].items():
            per_exec = s["inference_count"] / max(s["execution_count"], 1)
            lines.append(f"| {name}/{model} | {s['queue_ms']:.3f} | {s['compute_input_ms']:.3f} | {s['compute_infer_ms']:.3f} | "
                         f"{s['compute_output_ms']:.3f} | {per_exec:.2f} |")
    lines += ["", "in-process stage ms: " + ", ".join(f"{k} {v:.3f}" for k, v in local["stage_ms"].items())]
    lines += [""] + [(f"ratios {label}: p50 c=1 {r['p50_c1_ms']:.2f} ms / (trivial + in-process) {r['floor_plus_in_process_ms']:.2f} ms = "
                      f"{r['p50_ratio']:.2f} (target <= 1.25); " if "p50_ratio" in r else f"ratios {label}: ")
                     + f"throughput share at top concurrency {r['throughput_share']:.2f} (target >= 0.40)"
                     for label, r in results["ratios"].items()]
    if "profiled" in results:
        sections = results["profiled"]["sections"]["sections"]
        calls = sections.get("execute (whole)", {"calls": 1})["calls"]
        lines += ["", "stub sections (profiled copy), us per execute:"]
        for label, v in sorted(sections.items(), key=lambda kv: -kv[1]["total_ns"]):
            if label == "requests per execute":
                lines.append(f"  requests per execute: {v['total_ns'] / max(v['calls'], 1):.2f}")
            else:
                lines.append(f"  {label:28s} {v['total_ns'] / calls / 1e3:9.1f}  ({v['calls']} calls)")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
