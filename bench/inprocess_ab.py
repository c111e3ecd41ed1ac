"""Our request path at a git revision against the current one, in-process, in alternating blocks.

    python -m bench.inprocess_ab --repository build/stub_profile/repo_ours --artifacts build/bench-artifacts \
        --ref 3adc4c6 --out build/inprocess_ab

No server: each side loads the same model repository in a process of its own, with the code the
repository ships (`code/` and `model.py`), the reference side with that code as of `--ref`
(`stub_profile.repository_at_revision`). The two processes then run the same blocks of requests
in turn (batches of one user and of several, order swapped every round), so the machine's drift,
which reaches 1.7x here within minutes, falls on both alike; the per-round ratio new / ref is the
figure, its median and quartiles are reported. Both sides also answer one fixed set of batches
first, and the report says whether their item ids and scores agree bit for bit: a speed-up that
changed answers shows as such.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common.cli import run_cli

LOG = logging.getLogger(__name__)

# Run with the repository's shipped code first on sys.path, so each side imports its own copy.
WORKER = r'''
import hashlib, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from common import contract
from ensemble.loader import load_model_in_process

executor = load_model_in_process(sys.argv[2])
users = np.load(sys.argv[3])
sizes = [int(b) for b in sys.argv[4].split(",")]

def batches(size, start, n):
    return [[({contract.INPUT_USER_ID: np.array([[u]], np.int64)}, {}) for u in users[(start + i * size + np.arange(size)) % len(users)]]
            for i in range(n)]

digest = hashlib.sha256()
for requests in batches(max(sizes), 0, 50):
    for answer in executor.execute(requests):
        digest.update(np.ascontiguousarray(answer[contract.OUTPUT_ITEM_IDS]).tobytes())
        digest.update(np.ascontiguousarray(answer[contract.OUTPUT_SCORES]).tobytes())
print("ready", digest.hexdigest(), flush=True)
done = dict.fromkeys(sizes, 0)
for line in sys.stdin:
    size, n = map(int, line.split())
    block = batches(size, done[size] * size, n)
    done[size] += n
    started = time.perf_counter()
    for requests in block:
        executor.execute(requests)
    print((time.perf_counter() - started) / n * 1000, flush=True)
'''


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", required=True, type=Path, help="a model repository (make ensemble, or the bench's)")
    parser.add_argument("--artifacts", required=True, type=Path, help="its trained artifacts (for realistic user ids)")
    parser.add_argument("--ref", required=True, help="the git revision to compare the current code with")
    parser.add_argument("--out", required=True, type=Path, help="folder for the reference repository and the results")
    parser.add_argument("--rounds", type=int, default=15, help="blocks per side and batch size")
    parser.add_argument("--batch-sizes", default="1,5", help="comma-separated users per batch (one request per user)")
    parser.add_argument("--requests", type=int, default=1500, help="users per block")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be >= 1")
    return args


def shipped_code(repository: Path) -> Path:
    """The version folder of `repository`'s model whose `code/` its stubs import."""
    versions = sorted(p for p in repository.glob("*/*") if (p / "model.py").is_file() and (p / "code").is_dir())
    if not versions:
        raise FileNotFoundError(f"{repository} holds no model version with shipped code (model.py and code/)")
    return versions[-1]


def start_worker(version: Path, users: Path, sizes: list[int], log: Path) -> tuple[subprocess.Popen, str]:
    """A process with `version`'s code and model loaded; returns it and the digest of its answers
    to the fixed batches. Its stderr (TensorFlow's and Merlin's import noise included) goes to `log`."""
    with open(log, "wb") as err:
        worker = subprocess.Popen([sys.executable, "-c", WORKER, str(version / "code"), str(version.parent.parent), str(users),
                                   ",".join(map(str, sizes))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    line = worker.stdout.readline().split()
    if len(line) != 2 or line[0] != "ready":
        worker.kill()
        raise RuntimeError(f"the in-process worker for {version} did not start (exit {worker.wait()}); {log} says why")
    return worker, line[1]


def compare(workers: dict[str, subprocess.Popen], sizes: list[int], rounds: int, requests: int) -> dict:
    """{size: {side: [ms per batch, a block each round]}}, sides in turn, order swapped every round."""
    times = {size: {side: [] for side in workers} for size in sizes}
    for r in range(rounds):
        for size in sizes:
            order = list(workers) if r % 2 == 0 else list(workers)[::-1]
            for side in order:
                workers[side].stdin.write(f"{size} {max(1, requests // size)}\n")
                workers[side].stdin.flush()
                times[size][side].append(float(workers[side].stdout.readline()))
        LOG.info("round %d of %d: %s", r + 1, rounds, ", ".join(
            f"batch {s} ref {times[s]['ref'][-1]:.3f} new {times[s]['new'][-1]:.3f} ms" for s in sizes))
    return times


def summary(times: dict, same_answers: bool) -> dict:
    out = {"same_answers": same_answers, "batch_sizes": {}}
    for size, sides in times.items():
        ratios = np.array(sides["new"]) / np.array(sides["ref"])
        out["batch_sizes"][size] = {"ref_ms": statistics.median(sides["ref"]), "new_ms": statistics.median(sides["new"]),
                                    "ratio_median": float(np.median(ratios)), "ratio_p25": float(np.percentile(ratios, 25)),
                                    "ratio_p75": float(np.percentile(ratios, 75)), "rounds": sides}
    return out


def report(result: dict, ref: str) -> str:
    lines = [f"in-process, current code against {ref}, {len(next(iter(result['batch_sizes'].values()))['rounds']['new'])} "
             f"alternating rounds; answers {'identical' if result['same_answers'] else 'DIFFERENT'} on the fixed batches",
             "| users per batch | ref ms a batch (median) | new ms a batch (median) | new / ref, median of rounds (p25-p75) |",
             "|---|---|---|---|"]
    for size, s in result["batch_sizes"].items():
        lines.append(f"| {size} | {s['ref_ms']:.3f} | {s['new_ms']:.3f} | {s['ratio_median']:.3f} ({s['ratio_p25']:.3f}-{s['ratio_p75']:.3f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import pandas as pd

    from bench.stub_profile import repository_at_revision
    from common import contract

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    reference = repository_at_revision(args.repository, args.out / "repo_ref", args.ref)
    ids = pd.read_parquet(args.artifacts / contract.ARTIFACT_USER_FEATURES).iloc[:, 0].to_numpy(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        users = Path(tmp) / "users.npy"
        np.save(users, np.random.default_rng(args.seed).choice(ids, size=20_000))
        workers, digests = {}, {}
        try:
            for side, repo in (("ref", reference), ("new", args.repository)):
                workers[side], digests[side] = start_worker(shipped_code(repo), users, sizes, args.out / f"worker_{side}.log")
            times = compare(workers, sizes, args.rounds, args.requests)
        finally:
            for worker in workers.values():
                worker.stdin.close()
                worker.wait(timeout=60)
    result = summary(times, digests["ref"] == digests["new"])
    text = report(result, args.ref)
    (args.out / "inprocess_ab.json").write_text(json.dumps({"ref": args.ref, **result}, indent=1, default=str))
    (args.out / "inprocess_ab.md").write_text(text + "\n")
    shutil.rmtree(args.out / "repo_ref", ignore_errors=True)
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main)
