"""Fuzz the readers and the model loader with mutated real files, and count the outcomes.

Every target (``read_volume`` and ``open_volume`` + every slice on TIFF, NIfTI, PNG, JPEG and
DICOM seeds; ``load_model`` on a plain and a packed model file) runs in a worker process on
mutations of a small real file (see ``tests/fuzz_targets.py``). Each case must end in success
(well-formed data) or a clean error (``ValueError``, one line, naming the file); anything else
(another exception, a case over its time limit, a worker that dies) counts as ``other``, and
``other`` must be 0. A dead or hung worker is restarted at the next case.

    python benchmarks/fuzz.py [--seconds 600 | --cases N] [--targets NAME...] [--update-readme]

Cases are numbered per target and reproducible: ``--targets T --start K --cases 1 --verbose``
replays case ``K`` of target ``T``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine, machine_line, update_readme, write_results

sys.path.insert(0, str(ROOT / "tests"))
import fuzz_targets as fz

SHARED_DATA = ROOT.parent / "shared" / "data"
CASE_SECONDS = 20.0  # a case's own time limit; the parent waits a little longer


def worker(args: argparse.Namespace) -> None:
    """Run cases ``start..`` of one target, one result line each, until the count or the
    deadline."""
    workdir = Path(args.workdir)
    seeds = fz.build_seeds(SHARED_DATA, workdir / "seeds")
    target = next(t for t in fz.build_targets(seeds) if t.name == args.targets[0])
    deadline = time.monotonic() + args.seconds if args.seconds else float("inf")
    index = args.start
    while index < args.start + args.cases and time.monotonic() < deadline:
        data = fz.mutate(target.seed, random.Random(f"{target.name}/{args.seed}/{index}"))
        path = fz.write_case(target.seed, data, workdir / "case")
        outcome = fz.run_case(target, path, CASE_SECONDS)
        detail = " ".join(outcome.detail.split())[:400] if outcome.kind != "success" else ""
        print(json.dumps({"index": index, "kind": outcome.kind, "detail": detail}), flush=True)
        index += 1


def run_target(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Workers over one target until its share of the time (or its cases) is spent."""
    counts = dict.fromkeys(fz.OUTCOMES, 0)
    others: list[str] = []
    start, began = args.start, time.monotonic()
    budget = args.seconds / len(args.targets) if args.seconds else None
    end = args.start + args.cases
    while True:
        left = None if budget is None else budget - (time.monotonic() - began)
        if (left is not None and left <= 1) or (budget is None and start >= end):
            break
        command = [sys.executable, __file__, "--worker", "--targets", name, "--start",
                   str(start), "--seed", str(args.seed), "--workdir", str(workdir / name),
                   "--cases", str(args.cases if budget is None else 10**9),
                   "--seconds", str(left or 0)]  # fmt: skip
        start = _follow(subprocess.Popen(command, stdout=subprocess.PIPE, text=True), start,
                        counts, others)  # fmt: skip
    seconds = time.monotonic() - began
    return {"cases": sum(counts.values()), "seconds": round(seconds, 1), **counts,
            "other_examples": others[:10]}  # fmt: skip


def _follow(process: subprocess.Popen[str], start: int, counts: dict[str, int],
            others: list[str]) -> int:  # fmt: skip
    """Count a worker's results; a worker that dies or stays silent past the time limit is
    one ``other`` case. Returns the next case index."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    index = start
    while True:
        if not selector.select(timeout=CASE_SECONDS + 60):  # hung where no signal reaches
            process.kill()
            process.wait()
            return _lost(index, "hang: no result within the time limit", counts, others)
        line = process.stdout.readline()
        if not line:
            break
        result = json.loads(line)
        counts[result["kind"]] += 1
        if result["kind"] == "other":
            others.append(f"case {result['index']}: {result['detail']}")
        index = result["index"] + 1
    if process.wait() != 0:
        return _lost(index, f"worker died (exit status {process.returncode})", counts, others)
    return index


def _lost(index: int, why: str, counts: dict[str, int], others: list[str]) -> int:
    counts["other"] += 1
    others.append(f"case {index}: {why}")
    return index + 1


def markdown(results: dict[str, Any], info: dict[str, Any], command: str) -> str:
    rows = [
        "| target | cases | success | clean error | other | cases/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        rate = r["cases"] / max(r["seconds"], 1e-9)
        rows.append(
            f"| `{name}` | {r['cases']} | {r['success']} | {r['clean error']} | {r['other']} "
            f"| {rate:.0f} |"
        )
    total = {k: sum(r[k] for r in results.values()) for k in ("cases", *fz.OUTCOMES)}
    rows.append(
        f"| **all** | {total['cases']} | {total['success']} | {total['clean error']} "
        f"| {total['other']} | |"
    )
    return (
        "Mutated real files (bit flips, truncation, insertions, deletions, header fields set to "
        "extreme values, edited safetensors headers): every case must read well-formed data or "
        "fail with one clean line naming the file; `other` counts anything else.\n\n"
        + "\n".join(rows)
        + f"\n\n`{command}` on {machine_line(info)}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="total time (all targets)")
    parser.add_argument("--cases", type=int, default=200, help="cases per target (no --seconds)")
    parser.add_argument("--targets", nargs="+", default=None, help="target names (all)")
    parser.add_argument("--seed", type=int, default=0, help="base of every case's randomness")
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="print every other's detail")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        seeds = fz.build_seeds(SHARED_DATA, Path(scratch) / "seeds")
        names = [t.name for t in fz.build_targets(seeds)]
    unknown = set(args.targets or ()) - set(names)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; choose from {names}")
    args.targets = args.targets or names
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.targets:
            results[name] = run_target(name, args, Path(workdir))
            r = results[name]
            print(
                f"{name:<26} {r['cases']:>6} cases: {r['success']:>6} success, "
                f"{r['clean error']:>6} clean error, {r['other']:>3} other",
                flush=True,
            )
            for example in r["other_examples"] if args.verbose or r["other"] else []:
                print(f"    {example}")
    command = "python benchmarks/fuzz.py " + " ".join(sys.argv[1:])
    info = machine()
    text = markdown(results, info, command.strip())
    write_results("fuzz", {"machine": info, "command": command, "targets": results}, text)
    if args.update_readme:
        update_readme("fuzz", text)
    others = sum(r["other"] for r in results.values())
    print(f"{others} other outcomes; results in benchmarks/results/fuzz.json and fuzz.md")
    sys.exit(1 if others else 0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # many short cases: no thread pools to spin
    main()
