"""CUDA latency of channelcut's exports next to the dense and the ideal model.

The GPU counterpart of the latency part of ``compare.py``: for a few models
at one amount (default 30%), the same variants (``variants.py``: dense,
channelcut unconstrained / baseline / constrained, the ideal model, and
apple-upscale / torch-pruning when they are installed, skipped otherwise) are
exported on the CPU from one set of per-consumer L1 masks, moved to the
device, and timed at batch 1 and batch 32 (224x224) in each dtype.

Timing: every variant of one (model, batch, dtype) is called round-robin, the
order rotating each round, so drift hits all alike. Each call is timed with
CUDA events between two ``torch.cuda.synchronize()`` (so it includes the
kernel-launch overhead a user sees), after warm-up rounds; the table shows
medians. ``torch.backends.cudnn.benchmark`` is left off by default (with
``--cudnn-benchmark`` every pruned width is tuned during warm-up, which takes
most of the run); TF32 is left at torch's defaults.

Needs only torch, torchvision and channelcut (run from the repository root)::

    python benchmarks/gpu_latency.py                         # about 2 minutes on one H200
    python benchmarks/gpu_latency.py --dtypes float32,float16,bfloat16 --out docs/performance-gpu.md
    python benchmarks/gpu_latency.py --device cpu --quick --out /tmp/gpu.md   # a smoke run on CPU

Writes a markdown table to ``--out`` (labelled with the device name) and the
raw numbers next to it (same name, ``.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants as V  # noqa: E402

DEFAULT_MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "vit_b_16"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated torchvision model names")
    ap.add_argument("--amount", type=float, default=0.3, help="fraction of input channels pruned per consumer")
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--image-size", type=int, default=224, help="image side (ViTs always use 224)")
    ap.add_argument("--dtypes", default="float32,float16", help="comma-separated: float32, float16, bfloat16")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--no-device-costs", action="store_true",
                    help="skip the variant exported with the costs calibrated on the device (calibrate_costs)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cudnn tune each conv shape during warm-up (slower start: every pruned width is a new shape)")
    ap.add_argument("--no-peers", action="store_true", help="skip apple-upscale and torch-pruning even if installed")
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet18 and mobilenet_v2, 64x64, batch 1 and 2, 2 rounds")
    ap.add_argument("--out", default="docs/performance-gpu.md", help="markdown output (raw numbers go to the .json next to it)")
    args = ap.parse_args(argv)
    if args.quick:
        if args.models == ",".join(DEFAULT_MODELS):
            args.models = "resnet18,mobilenet_v2"
        args.image_size = min(args.image_size, 64)
        if args.batch == "1,32":
            args.batch = "1,2"
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batch_list = [int(b) for b in args.batch.split(",") if b.strip()]
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtype_list:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def time_round_robin(models: Dict[str, torch.nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> Dict[str, Dict[str, float]]:
    """Median / p10 / p90 ms of one call of each model, interleaved round-robin."""
    cuda = x.device.type == "cuda"
    names = list(models)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(warmup + repeats):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                m = models[n]
                if cuda:
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    m(x)
                    end.record()
                    torch.cuda.synchronize()
                    ms = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    m(x)
                    ms = (time.perf_counter() - t0) * 1e3
                if r >= warmup:
                    times[n].append(ms)
    out = {}
    for n, ts in times.items():
        s = sorted(ts)
        out[n] = {"median_ms": statistics.median(s), "p10_ms": s[int(0.1 * (len(s) - 1))], "p90_ms": s[int(0.9 * (len(s) - 1))]}
    return out


def run(args: argparse.Namespace) -> Dict[str, Any]:
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available; use --device cpu for a smoke run")
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    peers = not args.no_peers
    results: Dict[str, Any] = {
        "meta": {
            "device": device_name(device), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "torch": torch.__version__, "cuda": torch.version.cuda, "channelcut": V.engine_version(), "amount": args.amount, "repeats": args.repeats,
            "warmup": args.warmup, "image_size": args.image_size, "device_type": device.type, "cudnn_benchmark": args.cudnn_benchmark, "peers": {
                "apple-upscale": peers and V.have_upscale(), "torch-pruning": peers and V.have_torch_pruning()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "models": {},
    }
    t_start = time.perf_counter()
    costs: Dict[str, Dict[str, float]] = {}
    if not args.no_device_costs:
        from channelcut.pruning.costs import calibrate_costs

        for dname in args.dtype_list:
            costs[dname] = calibrate_costs(device=device, dtype=DTYPES[dname])
        results["meta"]["device_costs"] = costs
        print(f"costs on {device_name(device)}: {costs}", flush=True)
    for name in args.model_list:
        t0 = time.perf_counter()
        size = V.image_size(name, args.image_size)
        model = V.build_model(name)
        x = torch.rand(1, 3, size, size)
        masks, head = V.select_masks(model, x, [args.amount])
        cpu_models, info = V.build_variants(name, model, x, masks[args.amount], head, peers=peers,
                                            log=lambda s: print(s, file=sys.stderr))
        res: Dict[str, Any] = {"image_size": size, "export_s": time.perf_counter() - t0, "latency": {},
                               "copies": {k: {f: info.get(k, {}).get(f) for f in ("copied_channels", "copy_ops", "view_ops")}
                                          for k in ("unconstrained", "baseline", "upscale")},
                               "errors": {k: v["error"] for k, v in info.items() if "error" in v}}
        for dname in args.dtype_list:
            dtype = DTYPES[dname]
            models = {k: copy.deepcopy(m).to(device=device, dtype=dtype) for k, m in cpu_models.items()}
            for b in args.batch_list:
                xb = torch.rand(b, 3, size, size, device=device, dtype=dtype)
                timed = models
                if dname in costs:  # exported for this device and batch
                    e = V.export_channelcut(model, torch.rand(b, 3, size, size), masks[args.amount], "unconstrained", **costs[dname])
                    timed = dict(models, device_costs=e.model.to(device=device, dtype=dtype))
                    res.setdefault("device_costs", {})[f"{dname}/{b}"] = {
                        "copied_channels": e.info.get("copied_channels"), "copy_ops": e.info.get("copy_ops"),
                        "view_ops": e.info.get("view_ops"), "superset_reads": e.info.get("superset_reads")}
                try:
                    lat = time_round_robin(timed, xb, args.repeats, args.warmup)
                except Exception as exc:  # e.g. a dtype an op does not support on this device
                    res["latency"][f"{dname}/{b}"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                    continue
                res["latency"][f"{dname}/{b}"] = lat
                u, i = lat["unconstrained"]["median_ms"], lat["ideal"]["median_ms"]
                print(f"{name} {dname} b{b}: unconstrained {u:.3f} ms, ideal {i:.3f} ms ({u / i:.3f}x)"
                      + (f", apple-upscale {lat['upscale']['median_ms']:.3f} ms" if "upscale" in lat else ""), flush=True)
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
        res["seconds"] = time.perf_counter() - t0
        results["models"][name] = res
        del cpu_models, model
    results["meta"]["elapsed_s"] = time.perf_counter() - t_start
    return results


def report(results: Dict[str, Any], args: argparse.Namespace) -> str:
    meta = results["meta"]
    L = [f"# GPU latency: {meta['device']}\n",
         f"Written by `benchmarks/gpu_latency.py` ({meta['started']}, {meta['elapsed_s']:.0f} s): `{meta['command']}`; "
         f"torch {meta['torch']}, CUDA {meta['cuda']}, channelcut at commit {meta.get('channelcut', '?')}.\n",
         f"Every model pruned {meta['amount']:.0%} per consumer (per-consumer L1 input-channel masks, classifier head kept), "
         "exported on the CPU by each tool from the same masks, then moved to the device. Median of "
         f"{meta['repeats']} calls after {meta['warmup']} warm-up rounds, all variants interleaved round-robin, each call timed "
         + ("with CUDA events between two synchronizations (launch overhead included); " if meta.get("device_type", "cuda") == "cuda"
            else "with time.perf_counter (CPU smoke run); ")
         + f"cudnn.benchmark {'on' if meta.get('cudnn_benchmark') else 'off'}. "
         f"Image {meta['image_size']}x{meta['image_size']} (ViTs: 224). apple-upscale: "
         f"{'included' if meta['peers']['apple-upscale'] else 'not installed, skipped'}; torch-pruning (at the unconstrained "
         f"export's MACs): {'included' if meta['peers']['torch-pruning'] else 'not installed, skipped'}. "
         "The ideal model is the unconstrained export with every input subset read for free (see `variants.make_ideal`).\n"]
    keys = sorted({k for r in results["models"].values() for k in r["latency"]},
                  key=lambda k: (list(DTYPES).index(k.split("/")[0]), int(k.split("/")[1])))
    for key in keys:
        dname, b = key.split("/")
        L.append(f"## {dname}, batch {b}\n")
        L.append("| model | " + " | ".join(V.LABELS[v] for v in V.VARIANTS)
                 + " | unc / ideal | unc (device costs) / ideal | unc / apple-upscale | unc / dense |")
        L.append("|---|" + "---:|" * (len(V.VARIANTS) + 4))
        for name, r in results["models"].items():
            lat = r["latency"].get(key)
            if lat is None:
                continue
            if "error" in lat:
                L.append(f"| {name} | {lat['error']} |")
                continue
            g = lambda v, lat=lat: lat[v]["median_ms"] if v in lat else None
            cells = [f"{g(v):.3f}" if g(v) is not None else "-" for v in V.VARIANTS]
            rat = [(g("unconstrained") / g(d) if g(d) else None) for d in ("ideal",)]
            rat.append(g("device_costs") / g("ideal") if g("device_costs") and g("ideal") else None)
            rat += [(g("unconstrained") / g(d) if g(d) else None) for d in ("upscale", "dense")]
            L.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(f"{v:.3f}" if v else "-" for v in rat) + " |")
        L.append("")
    L.append("## Copies per inference\n")
    L.append("Channels gathered / copy ops (views).\n")
    L.append("| model | channelcut unconstrained | channelcut baseline | apple-upscale |")
    L.append("|---|---:|---:|---:|")
    for name, r in results["models"].items():
        c = r["copies"]
        cell = lambda d: "-" if d.get("copied_channels") is None else f"{d['copied_channels']} / {d['copy_ops']} ({d['view_ops']})"  # noqa: E731
        L.append(f"| {name} | {cell(c['unconstrained'])} | {cell(c['baseline'])} | {cell(c['upscale'])} |")
    errors = [(n, k, e) for n, r in results["models"].items() for k, e in r["errors"].items()]
    if errors:
        L.append("\nExports that failed: " + "; ".join(f"{n} {V.LABELS.get(k, k)}: `{e}`" for n, k, e in errors))
    L.append("")
    return "\n".join(L)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    results = run(args)
    text = report(results, args)
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
