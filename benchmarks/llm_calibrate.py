"""Calibrated importance at LLM scale: score a checkpoint on disk one decoder
layer at a time, choose what to remove to a parameter budget, and stream the
pruned checkpoint, with the peak memory of each step.

For one Llama shape (``--shape``; the random bfloat16 checkpoint of
``benchmarks/llm_scale.py``, written once to ``--dir`` and reused):

1. calibration text this machine has: the Python standard library's ``.py``
   files in name order, as bytes (token ids 0-255), cut into ``--batches``
   batches of ``--tokens`` tokens;
2. in a fresh process, ``channelcut.calibrate.calibrate_pretrained`` (float32,
   ``--method``), then ``select_to_budget`` (``--keep`` of the parameters,
   MLP channels, key/value groups and hidden channels, ``--round-to``), then
   ``channelcut.hf.prune_pretrained`` of that request; for each step the
   time and the peak resident-set growth (VmHWM, reset through
   ``/proc/self/clear_refs``) over the resident set before it;
3. the checks: the parameter count of the written checkpoint (from its
   shard headers) against the budget's, every MLP width and the hidden size
   multiples of ``--round-to``; with ``--compare`` (shapes that fit in
   memory in float32), the scores against ``ActivationNorm``/``Wanda`` run
   by ``MaskingManager`` on the model loaded whole.

Writes ``docs/llm-calibrate.json`` (by shape, merged with earlier runs) and
``docs/llm-calibrate.md``::

    python benchmarks/llm_calibrate.py --shape small --compare          # ~1 GB, a few minutes
    python benchmarks/llm_calibrate.py --shape 8b --keep-checkpoint     # ~16 GB on disk
    python benchmarks/llm_calibrate.py --report-only                    # redraw the report from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm_scale import SHAPES, write_checkpoint  # noqa: E402
from memstat import reset_peak, status_kb  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def calibration_batches(batches: int, tokens: int) -> List[torch.Tensor]:
    """``batches`` (1, tokens) tensors of the standard library's bytes."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    need = batches * tokens
    data = bytearray()
    for f in sorted(lib.glob("*.py")):
        data += f.read_bytes()
        if len(data) >= need:
            break
    ids = torch.tensor(list(data[:need]), dtype=torch.long)
    return list(ids.view(batches, 1, tokens))


def _headers_params(folder: Path) -> int:
    from channelcut.safetensors_stream import read_header

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        for e in read_header(f).entries.values():
            n = 1
            for d in e.shape:
                n *= d
            total += n
    return total


def child(args: argparse.Namespace) -> None:
    """Calibrate, select, prune; print the figures as JSON."""
    warnings.simplefilter("ignore")
    import transformers

    from channelcut.calibrate import calibrate_pretrained, select_to_budget
    from channelcut.hf import prune_pretrained

    transformers.LlamaForCausalLM  # noqa: B018 - import the modeling module (lazy) before the clock starts
    torch.set_num_threads(args.threads)
    src, dst = Path(args.dir) / args.shape, Path(args.dir) / f"{args.shape}-pruned"
    data = calibration_batches(args.batches, args.tokens)
    out: Dict[str, Any] = {}

    def step(name: str, fn):
        before = status_kb("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        result = fn()
        out[name] = {"s": time.perf_counter() - t0, "rss_before_mb": before / 1024,
                     "peak_rss_growth_mb": (status_kb("VmHWM") - before) / 1024}
        return result

    def progress(done: int, total: int) -> None:
        print(f"  layer {done}/{total}", file=sys.stderr, flush=True)

    cal = step("calibrate", lambda: calibrate_pretrained(src, data, method=args.method, progress=progress))
    out["calibrate"].update(tokens=cal.tokens, batches=cal.batches, bytes_read=cal.bytes_read,
                            largest_layer_mb=cal.largest_layer_bytes / 2**20, hidden_mb=cal.hidden_bytes / 2**20,
                            summary=cal.summary())
    budget = step("select", lambda: select_to_budget(cal.scores, src, keep=args.keep, round_to=args.round_to))
    out["select"].update(params_before=budget.params_before, params_after=budget.params_after, target=budget.target,
                         removed=budget.removed, hidden=budget.hidden, mlp=[min(budget.mlp), max(budget.mlp)],
                         kv_groups=[min(budget.kv_groups), max(budget.kv_groups)], summary=budget.summary(),
                         pairs_in=len(budget.pruned_inputs), pairs_out=len(budget.pruned_outputs))
    if dst.exists():
        shutil.rmtree(dst)
    report = step("prune_pretrained", lambda: prune_pretrained(src, dst, **budget.request()))
    out["prune_pretrained"].update(summary=report.summary(), config=report.config, loads_with=report.loads_with)
    written = _headers_params(dst)
    out["checks"] = {
        "written_params": written, "written_equals_budget": written == budget.params_after,
        "round_to_ok": budget.hidden % args.round_to == 0 and all(w % args.round_to == 0 for w in budget.mlp),
        "at_most_target": budget.params_after <= budget.target,
    }
    if args.compare:
        out["compare"] = compare(src, data, cal.scores, args.method)
    shutil.rmtree(dst)
    print(json.dumps(out))


def compare(src: Path, data: List[torch.Tensor], scores: Dict[str, torch.Tensor], method: str) -> Dict[str, Any]:
    """The in-memory heuristic on the whole model in float32, max relative difference."""
    import transformers

    from channelcut import MaskingManager
    from channelcut.importance import ActivationNorm, Wanda

    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    h = (ActivationNorm if method == "activation" else Wanda)(data=[{"input_ids": x} for x in data])
    want = MaskingManager(model, {"input_ids": data[0][:, :8]}).importance(h).scores()
    worst = max(float((scores[k] - v).abs().max() / v.abs().max()) for k, v in want.items())
    return {"layers": len(want), "max_rel_diff": worst, "same_layers": set(want) <= set(scores)}


def render(results: Dict[str, Any]) -> str:
    lines = [
        "# Calibrated importance at LLM scale",
        "",
        "Made by `benchmarks/llm_calibrate.py` (see its docstring). A random bfloat16 Llama-shaped checkpoint on disk;",
        "calibration text: the Python standard library's sources as bytes. Each step runs in one fresh process;",
        "peak RSS growth is the peak resident set during the step minus the resident set before it.",
        "",
        "| shape | step | time | peak RSS growth | what |",
        "|---|---|---:|---:|---|",
    ]
    for shape, r in results.items():
        c, s, p = r["calibrate"], r["select"], r["prune_pretrained"]
        lines.append(f"| {shape} | calibrate ({r['args']['method']}, {c['tokens']} tokens) | {c['s']:.0f} s | "
                     f"{c['peak_rss_growth_mb']:.0f} MiB | largest layer {c['largest_layer_mb']:.0f} MiB in float32, "
                     f"hidden states {c['hidden_mb']:.0f} MiB, read {c['bytes_read'] / 2**30:.1f} GiB |")
        lines.append(f"| {shape} | select_to_budget (keep {r['args']['keep']}, round_to {r['args']['round_to']}) | "
                     f"{s['s']:.1f} s | {s['peak_rss_growth_mb']:.0f} MiB | {s['params_before']:,} -> "
                     f"{s['params_after']:,} parameters; hidden {s['hidden']}, MLP {s['mlp'][0]}-{s['mlp'][1]}, "
                     f"KV groups {s['kv_groups'][0]}-{s['kv_groups'][1]} |")
        lines.append(f"| {shape} | prune_pretrained | {p['s']:.0f} s | {p['peak_rss_growth_mb']:.0f} MiB | "
                     f"config: {p['config']}, loads with {p['loads_with']} |")
    lines += ["", "Memory: calibration holds one decoder layer in float32, the calibration batches' hidden states and "
              "one layer's activations; the freed layer is handed back to the system (`malloc_trim`) before the next "
              "is read. Its peak over the largest layer:", ""]
    for shape, r in results.items():
        c = r["calibrate"]
        lines.append(f"- {shape}: {c['peak_rss_growth_mb']:.0f} MiB / {c['largest_layer_mb']:.0f} MiB = "
                     f"{c['peak_rss_growth_mb'] / c['largest_layer_mb']:.2f}; the model in bfloat16 is "
                     f"{r['select']['params_before'] * 2 / 2**20:,.0f} MiB")
    lines += ["", "Checks:", ""]
    for shape, r in results.items():
        ch = r["checks"]
        line = (f"- {shape}: the written checkpoint holds {ch['written_params']:,} parameters "
                f"({'equal to' if ch['written_equals_budget'] else 'NOT equal to'} the budget's count); "
                f"at most the target: {ch['at_most_target']}; widths multiples of round_to: {ch['round_to_ok']}")
        if "compare" in r:
            cp = r["compare"]
            line += (f"; scores vs the in-memory heuristic on the whole model ({cp['layers']} layers): "
                     f"max relative difference {cp['max_rel_diff']:.1e}")
        lines.append(line)
    lines += ["", "Removed (fraction of each kind's units):", ""]
    for shape, r in results.items():
        lines.append(f"- {shape}: " + ", ".join(f"{k} {v:.1%}" for k, v in r["select"]["removed"].items()))
    any_r = next(iter(results.values()))
    lines += ["", f"Machine: {any_r['machine']}; commit {any_r.get('commit') or '?'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=[s for s in SHAPES if s in ("small", "8b")], default="small")
    ap.add_argument("--dir", default="/tmp/channelcut-llm")
    ap.add_argument("--keep-checkpoint", action="store_true", help="keep the random checkpoint for a later run")
    ap.add_argument("--method", choices=("activation", "wanda"), default="activation")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--keep", type=float, default=0.75, help="fraction of the parameters to keep")
    ap.add_argument("--round-to", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="also score the model loaded whole (fits in memory only)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "llm-calibrate.json"))
    ap.add_argument("--report-only", action="store_true", help="redraw the report from --out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.report_only:
        out = Path(args.out)
        out.with_suffix(".md").write_text(render(json.loads(out.read_text())))
        return
    folder = Path(args.dir) / args.shape
    info = write_checkpoint(folder, args.shape)
    print(f"checkpoint {folder}: {info['bytes'] / 2**30:.1f} GiB", flush=True)
    argv = [sys.executable, __file__, "--child", *sys.argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env, timeout=7200)
        if r.returncode != 0:
            raise SystemExit(f"the run failed (exit {r.returncode})")
        result = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep_checkpoint:
            shutil.rmtree(folder, ignore_errors=True)
    result["args"] = {k: getattr(args, k) for k in ("method", "batches", "tokens", "keep", "round_to", "threads")}
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    try:
        result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=ROOT).stdout.strip()
    except OSError:
        pass
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.shape] = result
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(results))
    print(render({args.shape: result}))


if __name__ == "__main__":
    main()
