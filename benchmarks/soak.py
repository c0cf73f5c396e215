"""Soak test: thousands of random networks through the export properties.

Runs ``tests/export_props.run_example`` (the same checks as
``tests/test_random_networks.py``) on consecutive seeds and writes a summary:
examples run, outcomes, failures grouped by their first problem, and the
seeds of every failure (each reproducible on its own)::

    python benchmarks/soak.py --examples 5000 --seed 0 --time-limit 900 --json soak.json

Exit status: 0 when every example held every property, 1 otherwise.
Reproduce one seed: ``python benchmarks/soak.py --examples 1 --seed SEED -v``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import export_props  # noqa: E402


def _signature(problem: str) -> str:
    """A failure class: the first problem with numbers and names blanked."""
    first = problem.splitlines()[0] if problem else ""
    first = re.sub(r"'[^']*'", "'…'", first)
    first = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", first)
    return first[:160]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="number of random networks (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="first seed; example i uses seed + i (default 0)")
    ap.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--json", type=str, default=None, help="also write the summary as JSON to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the full report of every failure")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    status = collections.Counter()
    kinds = collections.Counter()
    modes = collections.Counter()
    classes: dict = collections.defaultdict(list)
    barriers = collections.Counter()
    failures = []
    slowest = (0.0, None)
    run = 0
    stopped = None
    for i in range(args.examples):
        if args.time_limit is not None and time.perf_counter() - t0 > args.time_limit:
            stopped = f"time limit {args.time_limit:g}s reached"
            break
        seed = args.seed + i
        out = export_props.run_example(seed, show_net=args.verbose)
        run += 1
        status[out.status if out.ok else "FAILED"] += 1
        if out.request is not None:
            kinds[out.request.kind] += 1
            modes[f"{out.request.mode}{'' if out.request.reorder else '/no-reorder'}"] += 1
        for b in out.barriers:
            barriers[b.split(" in ")[0]] += 1
        if out.seconds > slowest[0]:
            slowest = (out.seconds, seed)
        if not out.ok:
            failures.append(seed)
            classes[_signature(out.problems[0])].append(seed)
            print(out.report() if args.verbose else f"FAIL seed {seed}: {out.problems[0].splitlines()[0][:200]}",
                  flush=True)
        if run % 250 == 0:
            print(f"... {run} examples, {len(failures)} failures, {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                  flush=True)
    elapsed = time.perf_counter() - t0
    summary = {
        "examples_run": run,
        "examples_requested": args.examples,
        "first_seed": args.seed,
        "seconds": round(elapsed, 2),
        "examples_per_second": round(run / elapsed, 2) if elapsed else None,
        "failures": len(failures),
        "failure_seeds": failures,
        "failure_classes": {k: v for k, v in sorted(classes.items(), key=lambda kv: -len(kv[1]))},
        "outcomes": dict(status),
        "request_kinds": dict(kinds),
        "modes": dict(modes),
        "barrier_ops": dict(barriers),
        "slowest_example": {"seconds": round(slowest[0], 3), "seed": slowest[1]},
        "stopped_early": stopped,
        "torch": torch.__version__,
    }
    print()
    print(f"soak: {run} examples (seeds {args.seed}..{args.seed + run - 1}) in {elapsed:.1f}s "
          f"({summary['examples_per_second']}/s){'; ' + stopped if stopped else ''}")
    print(f"outcomes: {dict(status)}")
    print(f"failures: {len(failures)}")
    for sig, seeds in summary["failure_classes"].items():
        print(f"  {len(seeds):4d} x {sig}")
        print(f"         seeds: {seeds[:20]}{' ...' if len(seeds) > 20 else ''}")
    if barriers:
        print(f"barrier ops seen: {dict(barriers)}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"summary written to {args.json}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
