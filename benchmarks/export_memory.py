"""Peak memory of an export beyond the model: the plan (``compute``) and the
default ``prune()`` (slicing in place plus its verification), measured in a
fresh subprocess per model from ``/proc/self/status`` (the peak, VmHWM, is
reset through ``/proc/self/clear_refs`` before each phase).

Models: torchvision resnet50 and densenet121 (float32, 224x224, 30% of every
consumer's input channels at random), and a Llama-3-8B-shaped model in
bfloat16 (random weights; 25% of the MLP channels, a quarter of the KV
groups and a quarter of the hidden size): planned on the meta device (no
weights at all), and pruned in memory when ``--llama-in-memory`` is given
(about 16 GB of weights)::

    python benchmarks/export_memory.py --out docs/export-memory.md
    python benchmarks/export_memory.py --llama-in-memory --out docs/export-memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from memstat import reset_peak, status_kb  # noqa: E402


def _phase(fn) -> Dict[str, float]:
    """Run ``fn``; MiB of peak RSS over the RSS before it, RSS after, seconds."""
    before = reset_peak()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    return {"peak_mb": (status_kb("VmHWM") - before) / 1024, "after_mb": (status_kb("VmRSS") - before) / 1024, "s": dt}


def child(which: str) -> Dict[str, Any]:
    import torch

    sys.path.insert(0, HERE)
    from channelcut import PruningManager

    torch.set_num_threads(2)
    out: Dict[str, Any] = {"model": which}
    if which in ("resnet50", "densenet121"):
        import torchvision

        net = torchvision.models.get_model(which, weights=None).eval()
        x = torch.rand(1, 3, 224, 224)
        probe = PruningManager(net)
        probe.trace([x])
        rng = random.Random(0)
        req = [(p, c) for p, n in probe.consumers().items() for c in rng.sample(range(n), int(0.3 * n))]
        out["model_mb"] = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
        pm = PruningManager(net)
        out["compute"] = _phase(lambda: pm.compute([x], pruned_inputs=req))
        out["prune"] = _phase(lambda: pm.prune())
        return out
    import transformers

    from llm_latency import _config, request

    cfg = _config("8b")
    req = request(cfg, "all", 0.25)
    meta = which == "llama8b-meta"
    device = torch.device("meta") if meta else torch.device("cpu")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16 (a float32 build would need 32 GB)
    try:
        with torch.device(device):
            net = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    out["model_mb"] = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    ids = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    pm = PruningManager(net)
    out["compute"] = _phase(lambda: pm.compute(ids, **req))
    if not meta:
        out["prune"] = _phase(lambda: pm.prune())
        out["largest_tensor_mb"] = max(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    return out


def table_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """The markdown table of ``rows`` (what :func:`child` reports per model)."""
    lines = ["| model | weights MiB | compute: peak MiB / s | prune (verified): peak MiB / s | after prune MiB |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | |")
            continue
        c, p = r["compute"], r.get("prune")
        lines.append(f"| {r['model']} | {r['model_mb']:.0f} | {c['peak_mb']:.0f} / {c['s']:.2f} | "
                     + (f"{p['peak_mb']:.0f} / {p['s']:.2f} | {p['after_mb']:.0f} |" if p else "(planned only: no weights) | |"))
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/export-memory.md")
    ap.add_argument("--llama-in-memory", action="store_true", help="also prune the 8B-shaped model in memory (~16 GB)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return
    models = ["resnet50", "densenet121", "llama8b-meta"] + (["llama8b"] if args.llama_in_memory else [])
    rows: List[Dict[str, Any]] = []
    for m in models:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", m], capture_output=True, text=True)
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode} (killed: out of memory?)"])[-1][:200]
            rows.append({"model": m, "error": why})
        else:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    lines = ["# Export memory\n",
             f"`python benchmarks/export_memory.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}, 2 threads). "
             "Peak resident set during each phase over the resident set before it, in a fresh process per model "
             "(VmHWM reset first); the model is built before. `compute` traces on meta tensors; `prune` is the default "
             "path: slicing in place, one tensor at a time, and its verification (two forward passes on the example "
             "input, no copy of the model).\n",
             *table_lines(rows)]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
