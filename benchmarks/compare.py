"""channelcut side by side with apple-upscale and torch-pruning: export time,
latency of the exported models, copies per inference and export memory.

For every model and amount, one set of masks (per-consumer L1-magnitude
input-channel masks from :class:`channelcut.MaskingManager`) is exported by
every tool; ``variants.py`` builds the variants (dense, channelcut
unconstrained / baseline / constrained, apple-upscale, torch-pruning at the
same MACs, and the ideal model) and documents each one.

- **export time**: channelcut ``compute`` (trace + resolve) and ``prune``;
  apple-upscale ``PruningManager.compute`` and ``prune`` on the same pairs;
  torch-pruning's dependency graph + ``MagnitudePruner`` init + ``step``.
  Medians over all runs of a model (one per amount; more at the middle
  amount when ``--export-runs`` asks for more).
- **latency**: every variant of one (model, amount, batch) timed round-robin
  in this process (:func:`channelcut.stats.compare_latency`), median.
- **copies**: channels gathered per inference and copy ops, from channelcut's
  spec and from apple-upscale's ``Subselect`` layers.
- **export memory**: each tool exports the model in a fresh subprocess at the
  middle amount; peak resident set during the export over the resident set
  before it and, with ``--heap``, the Python-heap peak of a second export
  (``tracemalloc``).

Writes ``docs/performance.md``, ``docs/performance.json`` (raw results;
``--report-only`` redraws the report from it) and the plots
``docs/performance_latency_b<batch>.png`` and ``docs/performance_export.png``::

    pip install -e .[bench]                          # matplotlib, tqdm, torch-pruning 1.6.1
    pip install --no-deps apple-upscale==0.1.1       # its metadata pins torch 2.0.1; it runs on newer ones
    python benchmarks/compare.py                     # about 20 minutes on 2 idle cores
    python benchmarks/compare.py --quick --out /tmp/perf   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants as V  # noqa: E402
from export_memory import table_lines  # noqa: E402
from memstat import reset_peak, status_kb  # noqa: E402

from channelcut.stats import compare_latency  # noqa: E402

DEFAULT_MODELS = [
    "resnet18", "resnet50", "densenet121", "mobilenet_v2", "efficientnet_b0",
    "efficientnet_v2_s", "convnext_tiny", "regnet_y_400mf", "vit_b_32",
]
DEFAULT_AMOUNTS = [0.1, 0.2, 0.3, 0.4, 0.5]
TOOLS = {"channelcut": "unconstrained", "apple-upscale": "upscale", "torch-pruning": "torch_pruning"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated torchvision model names")
    ap.add_argument("--amounts", default=",".join(map(str, DEFAULT_AMOUNTS)), help="comma-separated fractions of input channels to prune")
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes for latency")
    ap.add_argument("--image-size", type=int, default=224, help="image side at batch 1 (and for export)")
    ap.add_argument("--large-image-size", type=int, default=64,
                    help="image side for batches > 1 (ViTs only take 224 and are skipped there unless --vit-large-batch)")
    ap.add_argument("--vit-large-batch", action="store_true", help="also time ViTs at batches > 1 (at 224x224: slow on CPU)")
    ap.add_argument("--repeats", type=int, default=11, help="timed rounds at batch 1 (batches > 1: half, at least 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for exports and latency")
    ap.add_argument("--export-runs", type=int, default=5, help="at least this many export runs per model (median)")
    ap.add_argument("--no-memory", action="store_true", help="skip the export-memory subprocesses")
    ap.add_argument("--heap", action="store_true", help="also measure the Python-heap peak of each export (tracemalloc: slow)")
    ap.add_argument("--no-peers", action="store_true", help="channelcut variants only")
    ap.add_argument("--out", default="docs", help="folder for performance.md/.json and the plots")
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet18 and mobilenet_v2 at 0.3, few repeats")
    ap.add_argument("--report-only", action="store_true", help="redraw the report and plots from <out>/performance.json")
    ap.add_argument("--memory-child", nargs=4, metavar=("MODEL", "TOOL", "PAIRS_JSON", "RATIO"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        if args.models == ",".join(DEFAULT_MODELS):
            args.models = "resnet18,mobilenet_v2"
        if args.amounts == ",".join(map(str, DEFAULT_AMOUNTS)):
            args.amounts = "0.3"
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
        args.export_runs = 1
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.amount_list = [float(a) for a in args.amounts.split(",") if a.strip()]
    args.batch_list = [int(b) for b in args.batch.split(",") if b.strip()]
    return args


# ----------------------------------------------------------------------------
# export memory, in a subprocess per (model, tool)
# ----------------------------------------------------------------------------
def _export_once(tool: str, model: torch.nn.Module, x: torch.Tensor, pairs: List[Any], ratio: float, head: str) -> None:
    if tool == "channelcut":
        from channelcut import PruningManager

        PruningManager(model).compute([x], pruned_inputs=pairs).prune()  # the default path, verified
    elif tool == "apple-upscale":
        from upscale.pruning import PruningManager as UpscaleManager

        V.quiet_upscale()
        UpscaleManager(model).compute([x], pruned_inputs=pairs).prune()
    else:
        import torch_pruning as tp

        kwargs: Dict[str, Any] = {}
        if model.__class__.__name__ == "VisionTransformer":
            kwargs = {"num_heads": {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)},
                      "prune_head_dims": True, "prune_num_heads": False}
        tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
            ignored_layers=[model.get_submodule(head)], **kwargs,
        ).step()


def memory_child(name: str, tool: str, pairs_json: str, ratio: str, threads: int, size: int, heap: bool) -> None:
    """Print ``{"rss_mb": ..., "heap_mb": ...}`` for one export of ``name`` by ``tool``.

    ``rss_mb``: peak resident set during the export minus the resident set
    just before it (the peak is reset first through ``/proc/self/clear_refs``;
    where that is not possible, the growth of ``ru_maxrss``). ``heap_mb``
    (with ``heap``): peak of Python-heap allocations in a second export
    (``tracemalloc``; tensor storage is not on the Python heap).
    """
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    with open(pairs_json) as f:
        data = json.load(f)
    pairs = [tuple(p) for p in data["pairs"]]
    x = torch.rand(1, 3, size, size)
    model = V.build_model(name)
    second = V.build_model(name) if heap else None
    gc.collect()
    try:
        before, how = reset_peak(), "VmHWM"  # the peak RSS (VmHWM) reset to the current RSS
    except OSError:
        before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    _export_once(tool, model, x, pairs, float(ratio), data["head"])
    after = status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: Dict[str, Any] = {"rss_mb": (after - before) / 1024.0, "rss_how": how}
    if heap:
        del model
        gc.collect()
        tracemalloc.start()
        _export_once(tool, second, x, pairs, float(ratio), data["head"])
        out["heap_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    print(json.dumps(out))


def measure_memory(name: str, tool: str, pairs: List[Any], head: str, ratio: float, args: argparse.Namespace) -> Dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"pairs": pairs, "head": head}, f)
        path = f.name
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--image-size", str(V.image_size(name, args.image_size)),
               "--memory-child", name, tool, path, repr(ratio)] + (["--heap"] if args.heap else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            return {"error": tail[:200]}
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------
def machine() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": __import__("torchvision").__version__,
        "upscale": _version("apple-upscale"), "torch_pruning": _version("torch-pruning"),
        "platform": platform.platform(), "channelcut": V.engine_version(),
    }


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    results: Dict[str, Any] = {
        "meta": {
            "machine": machine(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
            "image_size": args.image_size, "large_image_size": args.large_image_size,
            "amounts": args.amount_list, "batches": args.batch_list, "load_start": os.getloadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "models": {},
    }
    mid = args.amount_list[len(args.amount_list) // 2]
    n_amounts = len(args.amount_list)
    per_model = 1 + n_amounts * (1 + len(args.batch_list)) + (0 if args.no_memory else len(TOOLS)) + 1
    bar = tqdm(total=per_model * len(args.model_list), unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    for name in args.model_list:
        bar.set_description(f"{name}: masks")
        size = V.image_size(name, args.image_size)
        model = V.build_model(name)
        x = torch.rand(1, 3, size, size)
        masks, head = V.select_masks(model, x, args.amount_list)
        bar.update()
        res: Dict[str, Any] = {"head": head, "image_size": size, "amounts": {}, "export_runs": {}}
        runs: Dict[str, List[float]] = {"channelcut": [], "channelcut_prune": [], "channelcut_default": [], "apple-upscale": [],
                                        "apple-upscale_prune": [], "torch-pruning": []}
        for a in args.amount_list:
            bar.set_description(f"{name} @{a}: export")
            models, info = V.build_variants(name, model, x, masks[a], head, peers=not args.no_peers, log=bar.write)
            _collect_runs(runs, info)
            bar.update()
            entry: Dict[str, Any] = {"pairs": len(masks[a]), "info": info, "latency": {}}
            for b in args.batch_list:
                bar.set_description(f"{name} @{a}: latency b{b}")
                if b > 1 and name.startswith("vit_") and not args.vit_large_batch:
                    bar.update()
                    continue
                side = size if b == 1 else V.image_size(name, args.large_image_size)
                xb = torch.rand(b, 3, side, side)
                reps = args.repeats if b == 1 else max(3, args.repeats // 2)
                lat = compare_latency(models, [xb], repeats=reps, warmup=args.warmup, threads=args.threads)
                entry["latency"][str(b)] = {"image_size": side, "repeats": reps, **{k: v for k, v in lat.items()}}
                bar.update()
            res["amounts"][str(a)] = entry
            del models
            gc.collect()
        # more export runs at the middle amount, if asked for
        bar.set_description(f"{name}: export runs")
        while len(runs["channelcut"]) < args.export_runs or len(runs["channelcut_default"]) < args.export_runs:
            e = V.export_channelcut(model, x, masks[mid], "unconstrained")
            runs["channelcut"].append(e.compute_s)
            runs["channelcut_prune"].append(e.prune_s)
            runs["channelcut_default"].append(V.time_channelcut_default(model, x, masks[mid]))
            if not args.no_peers and "error" not in res["amounts"][str(mid)]["info"].get("upscale", {"error": 1}):
                e = V.export_upscale(model, x, masks[mid])
                runs["apple-upscale"].append(e.compute_s)
                runs["apple-upscale_prune"].append(e.prune_s)
            tp_info = res["amounts"][str(mid)]["info"].get("torch_pruning", {})
            if not args.no_peers and "ratio" in tp_info:
                e = V.export_torch_pruning(model, x, tp_info["ratio"], head)
                runs["torch-pruning"].append(e.compute_s)
        res["export_runs"] = runs
        bar.update()
        if not args.no_memory:
            mid_info = res["amounts"][str(mid)]["info"]
            res["memory"] = {}
            for tool, key in TOOLS.items():
                bar.set_description(f"{name}: memory {tool}")
                if args.no_peers and tool != "channelcut" or "error" in mid_info.get(key, {"error": "not run"}):
                    res["memory"][tool] = {"error": "export failed"}
                else:
                    ratio = mid_info.get("torch_pruning", {}).get("ratio", mid)
                    res["memory"][tool] = measure_memory(name, tool, [list(p) for p in masks[mid]], head, ratio, args)
                bar.update()
        results["models"][name] = res
        results["meta"]["elapsed_s"] = time.perf_counter() - t_start
        results["meta"]["load_end"] = os.getloadavg()
        _save_json(results, args.out)
        del model
        gc.collect()
    bar.close()
    return results


def _collect_runs(runs: Dict[str, List[float]], info: Dict[str, Dict[str, Any]]) -> None:
    if "compute_s" in info.get("unconstrained", {}):
        runs["channelcut"].append(info["unconstrained"]["compute_s"])
        runs["channelcut_prune"].append(info["unconstrained"]["prune_s"])
    if "compute_s" in info.get("upscale", {}):
        runs["apple-upscale"].append(info["upscale"]["compute_s"])
        runs["apple-upscale_prune"].append(info["upscale"]["prune_s"])
    runs["torch-pruning"].extend(info.get("torch_pruning", {}).get("runs_s", []))


def _save_json(results: Dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "performance.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)


# ----------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------
def med(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def fmt(v: Optional[float], digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}{unit}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def lat_ms(entry: Dict[str, Any], batch: str, variant: str) -> Optional[float]:
    d = entry.get("latency", {}).get(batch, {}).get(variant)
    return d["median_ms"] if d else None


def summarise(results: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers the report and the README quote."""
    meta = results["meta"]
    amounts = [str(a) for a in meta["amounts"]]
    ref = "0.3" if "0.3" in amounts else amounts[len(amounts) // 2]
    s: Dict[str, Any] = {"ref_amount": ref, "models": {}}
    for name, res in results["models"].items():
        runs = res["export_runs"]
        cc, ccp = med(runs["channelcut"]), med(runs["channelcut_prune"])
        up, upp = med(runs["apple-upscale"]), med(runs["apple-upscale_prune"])
        tp = med(runs["torch-pruning"])
        ccd = med(runs.get("channelcut_default", []))
        m: Dict[str, Any] = {
            "cc_compute": cc, "cc_prune": ccp, "cc_default": ccd, "up_compute": up, "up_prune": upp, "tp": tp,
            "tp_over_cc_default": ratio(tp, ccd), "up_total_over_cc_default": ratio((up or 0) + (upp or 0) if up else None, ccd),
            "up_over_cc": ratio(up, cc), "up_total_over_cc_total": ratio((up or 0) + (upp or 0) if up else None, (cc or 0) + (ccp or 0)),
            "tp_over_cc_total": ratio(tp, (cc or 0) + (ccp or 0)), "tp_over_cc": ratio(tp, cc),
            "up_error": res["amounts"][ref]["info"].get("upscale", {}).get("error"),
            "tp_error": res["amounts"][ref]["info"].get("torch_pruning", {}).get("error"),
            "latency": {},
        }
        for b in (str(x) for x in meta["batches"]):
            per_amount = {}
            for a in amounts:
                e = res["amounts"].get(a)
                if e is None or b not in e["latency"]:
                    continue
                u = lat_ms(e, b, "unconstrained")
                per_amount[a] = {
                    "vs_ideal": ratio(u, lat_ms(e, b, "ideal")),
                    "vs_upscale": ratio(u, lat_ms(e, b, "upscale")),
                    "vs_dense": ratio(u, lat_ms(e, b, "dense")),
                    "baseline_vs_ideal": ratio(lat_ms(e, b, "baseline"), lat_ms(e, b, "ideal")),
                    "upscale_vs_ideal": ratio(lat_ms(e, b, "upscale"), lat_ms(e, b, "ideal")),
                }
            if not per_amount:
                continue
            vi = [v["vs_ideal"] for v in per_amount.values() if v["vs_ideal"] is not None]
            vu = [v["vs_upscale"] for v in per_amount.values() if v["vs_upscale"] is not None]
            m["latency"][b] = {
                "per_amount": per_amount,
                "vs_ideal_ref": per_amount.get(ref, {}).get("vs_ideal"),
                "vs_ideal_median": med(vi), "vs_upscale_median": med(vu),
                "vs_upscale_max": max(vu) if vu else None,
            }
        copies = {}
        for a in amounts:
            info = res["amounts"].get(a, {}).get("info", {})
            copies[a] = {k: {f: info.get(k, {}).get(f) for f in ("copied_channels", "copy_ops", "view_ops", "zero_columns")}
                         for k in ("unconstrained", "baseline", "upscale")}
        m["copies"] = copies
        s["models"][name] = m
    return s


def write_report(results: Dict[str, Any], out: str) -> str:
    meta = results["meta"]
    s = summarise(results)
    ref = s["ref_amount"]
    batches = [str(b) for b in meta["batches"]]
    amounts = [str(a) for a in meta["amounts"]]
    mach = meta["machine"]
    L: List[str] = []
    add = L.append
    add("# Performance: channelcut vs apple-upscale vs torch-pruning\n")
    add("Written by `benchmarks/compare.py`; raw numbers in `performance.json` "
        "(`python benchmarks/compare.py --report-only` redraws this page from it).\n")
    add(f"- command: `{meta['command']}`")
    add(f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['platform']}; python {mach['python']}, "
        f"torch {mach['torch']}, torchvision {mach['torchvision']}, apple-upscale {mach['upscale']}, torch-pruning {mach['torch_pruning']}; "
        f"channelcut at commit {mach.get('channelcut', '?')}")
    add(f"- started {meta.get('started', '?')}, took {meta.get('elapsed_s', 0) / 60:.1f} min; 1-minute load average "
        f"{meta['load_start'][0]:.2f} at the start, {meta.get('load_end', [float('nan')])[0]:.2f} at the end")
    add(f"- {meta['threads']} torch thread(s) for every export and every timing (`torch.set_num_threads`), to keep a shared "
        f"machine's noise out; float32; randomly initialised torchvision models (`weights=None`, seed 0)")
    add("- masks: per-consumer L1-magnitude input-channel masks (`MaskingManager(...).importance(L1()).select(amount)`, "
        "classifier head kept), the same `(weight, channel)` pairs for every channelcut variant and for apple-upscale; "
        "torch-pruning: `MagnitudePruner` (L1) at the ratio whose MACs come closest to the unconstrained export's")
    add(f"- latency: median of {meta['repeats']} rounds at batch 1 ({meta['image_size']}x{meta['image_size']}) and "
        f"{max(3, meta['repeats'] // 2)} rounds at larger batches ({meta['large_image_size']}x{meta['large_image_size']} images to keep "
        f"CPU time in check; ViTs only take 224x224 and are not timed at large batches on CPU), {meta['warmup']} warm-up rounds; "
        f"all variants of one (model, amount, batch) interleaved round-robin in one process "
        f"(`channelcut.stats.compare_latency`), so ratios are trustworthy even where absolute times drift")
    add("- **ideal**: the unconstrained export with every input-subset read replaced by a free read of a tensor of the "
        "consumer's width (a view from channel 0 where that is contiguous, else a contiguous tensor of that shape made once "
        "and reused): every layer has the pruned widths, nothing is copied. It is the physical limit of this pruning "
        "pattern (`variants.make_ideal`).\n")

    add("## Headline\n")
    ups = [m["up_over_cc"] for m in s["models"].values() if m["up_over_cc"]]
    tps = [m["tp_over_cc_total"] for m in s["models"].values() if m["tp_over_cc_total"]]
    if ups:
        add(f"- export: channelcut's compute is **{min(ups):.1f}x-{max(ups):.1f}x** faster than apple-upscale's "
            f"(median {statistics.median(ups):.1f}x) on the {len(ups)} models apple-upscale exports")
    if tps:
        add(f"- export: channelcut's compute + prune vs torch-pruning's graph + init + step: **{min(tps):.2f}x-{max(tps):.2f}x** "
            f"(median {statistics.median(tps):.2f}x; above 1 = channelcut faster) on {len(tps)} models")
    tpd = [(n, m["tp_over_cc_default"]) for n, m in s["models"].items() if m.get("tp_over_cc_default")]
    if tpd:
        slower = [n for n, r in tpd if r < 1]
        add(f"- export, channelcut's **default path** (compute + verified prune) vs torch-pruning's graph + init + step: "
            f"**{min(r for _, r in tpd):.2f}x-{max(r for _, r in tpd):.2f}x** (median {statistics.median(r for _, r in tpd):.2f}x) "
            f"on {len(tpd)} models" + (f"; slower on {', '.join(slower)}" if slower else "; faster on every one"))
    upd = [(n, m["up_total_over_cc_default"]) for n, m in s["models"].items() if m.get("up_total_over_cc_default")]
    if upd:
        add("- export, channelcut's default path vs apple-upscale's compute + prune: "
            + ", ".join(f"{n} {r:.1f}x" for n, r in upd))
    for b in batches:
        vi = [(n, m["latency"][b]["vs_ideal_median"]) for n, m in s["models"].items() if b in m["latency"]]
        vu = [(n, m["latency"][b]["vs_upscale_median"]) for n, m in s["models"].items() if b in m["latency"] and m["latency"][b]["vs_upscale_median"]]
        if vi:
            add(f"- latency, batch {b}: unconstrained / ideal (median over amounts) "
                + ", ".join(f"{n} {v:.3f}" for n, v in vi if v is not None))
        if vu:
            add(f"- latency, batch {b}: unconstrained / apple-upscale (median over amounts) "
                + ", ".join(f"{n} {v:.3f}" for n, v in vu))
    pts = [c for m in s["models"].values() for c in m["copies"].values()
           if c["upscale"]["copied_channels"] is not None and c["unconstrained"]["copied_channels"] is not None]
    if pts:
        cu = sum(c["unconstrained"]["copied_channels"] for c in pts)
        cb = sum(c["baseline"]["copied_channels"] for c in pts)
        cp = sum(c["upscale"]["copied_channels"] for c in pts)
        add(f"- copies, summed over the {len(pts)} (model, amount) points apple-upscale exports: channelcut unconstrained "
            f"{cu} channels per inference, apple-upscale {cp} ({cu / cp:.2f}x), channelcut baseline {cb}")
    mem = [(r["memory"].get("channelcut", {}).get("rss_mb"), r["memory"].get(t, {}).get("rss_mb"), t)
           for r in results["models"].values() if "memory" in r for t in ("apple-upscale", "torch-pruning")]
    for t in ("apple-upscale", "torch-pruning"):
        rs = [b / a for a, b, tt in mem if tt == t and a and b]
        if rs:
            add(f"- export memory (peak RSS growth): {t} needs {min(rs):.2f}x-{max(rs):.2f}x channelcut's "
                f"(median {statistics.median(rs):.2f}x) on {len(rs)} models")
    if os.path.exists(os.path.join(out, "performance-gpu.md")):
        add("- GPU latency: [performance-gpu.md](performance-gpu.md) (`benchmarks/gpu_latency.py`)")
    add("")
    add(_targets(s, batches))

    add("## Export time\n")
    add("Seconds, median over the runs (one per amount, plus extra runs at the middle amount up to `--export-runs`); "
        "the time includes the tools' tracing forward pass at the export input size (channelcut's runs on meta "
        "tensors: shapes only, no arithmetic; the peers compute theirs for real). "
        "apple-upscale / channelcut compares `compute` with `compute`; torch-pruning (graph + pruner init + step, "
        "which prunes the model) is compared with channelcut's compute + `prune(verify=False)`, and with channelcut's "
        "**default path**: compute + `prune()`, which verifies the export against the unpruned model with the request "
        "zeroed (two forward passes; no peer verifies anything), timed on its own copies at the middle amount. "
        "Every timer starts after the model is deep-copied and the garbage of the copy collected (`variants.fresh_copy`).\n")
    add("| model | channelcut compute | channelcut prune | channelcut default (compute + verified prune) | "
        "apple-upscale compute | apple-upscale prune | torch-pruning | "
        "apple-upscale / channelcut (compute) | torch-pruning / channelcut (compute + prune) | "
        "torch-pruning / channelcut default | apple-upscale (compute + prune) / channelcut default |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, m in s["models"].items():
        upc = fmt(m["up_compute"], 3) if m["up_compute"] else _err(m["up_error"])
        tpc = fmt(m["tp"], 3) if m["tp"] else _err(m["tp_error"])
        add(f"| {n} | {fmt(m['cc_compute'], 3)} | {fmt(m['cc_prune'], 3)} | {fmt(m.get('cc_default'), 3)} | {upc} | "
            f"{fmt(m['up_prune'], 3)} | {tpc} | "
            f"{fmt(m['up_over_cc'], 1, 'x')} | {fmt(m['tp_over_cc_total'], 2, 'x')} | "
            f"{fmt(m.get('tp_over_cc_default'), 2, 'x')} | {fmt(m.get('up_total_over_cc_default'), 1, 'x')} |")
    add("")
    if any("memory" in r for r in results["models"].values()):
        add("## Export memory\n")
        add(f"One export (channelcut: the default path, compute + verified prune; torch-pruning: graph + init + step) at amount {ref} in a fresh subprocess per tool, "
            "the model already built: peak resident set during the export minus the resident set before it (MiB; the peak "
            "is reset through `/proc/self/clear_refs` first). It includes the tracing forward pass's activations. "
            "With `--heap`, also the peak of Python-heap allocations in a second export (`tracemalloc`).\n")
        heap = any("heap_mb" in d for r in results["models"].values() for d in r.get("memory", {}).values())
        keys = ["rss_mb"] + (["heap_mb"] if heap else [])
        add("| model | " + " | ".join(f"{t} {'RSS' if k == 'rss_mb' else 'heap'}" for k in keys for t in TOOLS)
            + " | apple-upscale / channelcut | torch-pruning / channelcut |")
        add("|---|" + "---:|" * (len(keys) * len(TOOLS) + 2))
        for n, r in results["models"].items():
            mem = r.get("memory", {})
            cells = [_mem(mem.get(t), k) for k in keys for t in TOOLS]
            cc = mem.get("channelcut", {}).get("rss_mb")
            rs = [ratio(mem.get(t, {}).get("rss_mb"), cc) for t in ("apple-upscale", "torch-pruning")]
            add(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(fmt(v, 2, "x") for v in rs) + " |")
        add("")
    _export_memory_by_phase(add, out)

    add("## Copies per inference\n")
    add("Channels gathered per inference / copy ops (views in brackets), the same masks. apple-upscale's are read from its "
        "`Subselect` layers (a `range` is a view; any other index list is a `torch.cat` of slices: one copy).\n")
    add("| model | amount | channelcut unconstrained | channelcut baseline | apple-upscale |")
    add("|---|---:|---:|---:|---:|")
    for n, m in s["models"].items():
        for a in amounts:
            c = m["copies"][a]
            add(f"| {n} | {a} | {_cp(c['unconstrained'])} | {_cp(c['baseline'])} | {_cp(c['upscale'])} |")
    add("")

    for b in batches:
        rows = [(n, res) for n, res in results["models"].items() if any(b in e["latency"] for e in res["amounts"].values())]
        if not rows:
            continue
        add(f"## Latency, batch {b}\n")
        add(f"Ratios at amount {ref} and medians over amounts (lower is better; < 1 vs a peer means channelcut is faster).\n")
        add(f"| model | unc / ideal @{ref} | unc / ideal (median) | unc / apple-upscale (median) | unc / apple-upscale (worst) | baseline / ideal @{ref} | apple-upscale / ideal @{ref} | unc / dense @{ref} |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n, _ in rows:
            lm = s["models"][n]["latency"].get(b)
            if not lm:
                continue
            pa = lm["per_amount"].get(ref, {})
            add(f"| {n} | {fmt(lm['vs_ideal_ref'], 3)} | {fmt(lm['vs_ideal_median'], 3)} | {fmt(lm['vs_upscale_median'], 3)} | "
                f"{fmt(lm['vs_upscale_max'], 3)} | {fmt(pa.get('baseline_vs_ideal'), 3)} | {fmt(pa.get('upscale_vs_ideal'), 3)} | {fmt(pa.get('vs_dense'), 3)} |")
        add("")
        add("Median latency in ms (`-`: the tool could not export this model).\n")
        add("| model | amount | " + " | ".join(V.LABELS[v] for v in V.VARIANTS) + " |")
        add("|---|---:|" + "---:|" * len(V.VARIANTS))
        for n, res in rows:
            for a in amounts:
                e = res["amounts"].get(a)
                if e is None or b not in e["latency"]:
                    continue
                add(f"| {n} | {a} | " + " | ".join(fmt(lat_ms(e, b, v), 1) for v in V.VARIANTS) + " |")
        add(f"\n![latency, batch {b}](performance_latency_b{b}.png)\n")

    add("## MACs\n")
    add(f"Millions of multiply-accumulates per image at amount {ref} (`channelcut.stats.count_macs`).\n")
    add("apple-upscale's export and channelcut's baseline have the unconstrained export's widths (the same masks), "
        "hence its MACs; torch-pruning's ratio was chosen to match them.\n")
    add("| model | dense | unconstrained | constrained | torch-pruning (ratio) |")
    add("|---|---:|---:|---:|---:|")
    for n, res in results["models"].items():
        info = res["amounts"][ref]["info"]
        g = lambda k, info=info: fmt(info[k]["macs"] / 1e6, 0) if "macs" in info.get(k, {}) else "-"
        tpr = info.get("torch_pruning", {}).get("ratio")
        add(f"| {n} | {g('dense')} | {g('unconstrained')} | {g('constrained')} | {g('torch_pruning')}"
            + (f" ({tpr:.2f})" if tpr is not None else "") + " |")
    add("")
    errors = sorted({(n, k, v["error"]) for n, r in results["models"].items() for e in r["amounts"].values()
                     for k, v in e["info"].items() if "error" in v})
    if errors:
        add("## Exports that failed\n")
        for n, k, err in errors:
            add(f"- {n}, {V.LABELS.get(k, k)}: `{err}`")
        add("")
    add("![export time](performance_export.png)\n")
    text = "\n".join(L)
    with open(os.path.join(out, "performance.md"), "w") as f:
        f.write(text)
    return text


def _export_memory_by_phase(add: Callable[[str], None], out: str) -> None:
    """The section drawn from ``export-memory.json`` next to this report
    (``benchmarks/export_memory.py``): channelcut's peak memory by phase, with
    an 8B-shaped Llama."""
    path = os.path.join(out, "export-memory.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = json.load(f)
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y-%m-%d")
    add("### channelcut's export memory by phase, and an 8B-shaped Llama\n")
    add(f"From [export-memory.md](export-memory.md) (`python benchmarks/export_memory.py --llama-in-memory`, {stamp}): "
        "peak resident set during each phase over the resident set before it, a fresh process per model. `prune` is the "
        "default path (slicing in place one tensor at a time, and verification: two forward passes, no copy of the "
        "model); llama8b-meta is planned on meta tensors (no weights), llama8b pruned in memory.\n")
    for line in table_lines(rows):
        add(line)
    add("")


def _verdict(ok: int, total: int, what: str, misses: List[str], label: str) -> str:
    head = "met" if not misses else "**missed**"
    tail = f" ({label}: {', '.join(misses)})" if misses else ""
    return f"{head}: {ok} of {total} {what}{tail}"


def _targets(s: Dict[str, Any], batches: List[str]) -> str:
    L = ["### Targets (issue 7)\n", "| target | result |", "|---|---|"]
    ms = s["models"]
    up = {n: m["up_over_cc"] for n, m in ms.items() if m["up_over_cc"]}
    miss = [f"{n} {v:.1f}x" for n, v in up.items() if v < 10]
    L.append(f"| export (compute) >= 10x faster than apple-upscale's | {_verdict(len(up) - len(miss), len(up), 'models', miss, 'below')} |")
    for key, what in (("tp_over_cc_total", "compute + prune"), ("tp_over_cc", "compute only")):
        tp = {n: m[key] for n, m in ms.items() if m[key]}
        miss = [f"{n} {v:.2f}x" for n, v in tp.items() if v < 1]
        L.append(f"| export faster than torch-pruning ({what}) | {_verdict(len(tp) - len(miss), len(tp), 'models', miss, 'slower')} |")
    for b in batches:
        have = {n: m["latency"][b] for n, m in ms.items() if b in m["latency"]}
        if not have:
            continue
        for key, where in (("vs_ideal_median", "median over amounts"), ("vs_ideal_ref", f"at {s['ref_amount']}")):
            vals = {n: v[key] for n, v in have.items() if v[key] is not None}
            miss = [f"{n} {v:.3f}" for n, v in vals.items() if v > 1.05]
            L.append(f"| batch {b}: unconstrained within 1.05x of ideal ({where}) | {_verdict(len(vals) - len(miss), len(vals), 'models', miss, 'over')} |")
        pts = [(n, a, v["vs_upscale"]) for n, m in have.items() for a, v in m["per_amount"].items() if v["vs_upscale"] is not None]
        slow = [f"{n} @{a} {r:.3f}" for n, a, r in pts if r > 1.0]
        far = [p for p in pts if p[2] > 1.05]
        L.append(f"| batch {b}: never slower than apple-upscale (same masks) | "
                 f"{_verdict(len(pts) - len(slow), len(pts), '(model, amount) points', slow, 'slower')}; "
                 f"{len(far)} point(s) slower by more than 5% |")
    pts = [(n, a, c["unconstrained"]["copied_channels"], c["upscale"]["copied_channels"]) for n, m in ms.items()
           for a, c in m["copies"].items() if c["upscale"]["copied_channels"] is not None and c["unconstrained"]["copied_channels"] is not None]
    more = [f"{n} @{a} {u} vs {p}" for n, a, u, p in pts if u > p]
    fewer = sum(1 for _, _, u, p in pts if u < p)
    L.append(f"| channels copied never more than apple-upscale's | {_verdict(len(pts) - len(more), len(pts), '(model, amount) points', more, 'more')}; "
             f"fewer at {fewer} |")
    L.append("")
    L.append("Single latency ratios carry the noise of a shared machine: differences of a few percent between variants "
             "with the same copies (e.g. unconstrained vs ideal with zero copies) are noise, not a cost.\n")
    return "\n".join(L)


def _err(e: Optional[str]) -> str:
    return f"fails ({e.split(':')[0]})" if e else "-"


def _mem(d: Optional[Dict[str, Any]], key: str) -> str:
    if not d:
        return "-"
    if "error" in d:
        return "fails"
    return f"{d[key]:.0f}"


def _cp(c: Dict[str, Any]) -> str:
    if c.get("copied_channels") is None:
        return "-"
    return f"{c['copied_channels']} / {c['copy_ops']} ({c['view_ops']})"


def plot(results: Dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    names = list(results["models"])
    styles = {"dense": ("k", "--"), "unconstrained": ("C0", "-"), "gather": ("C5", "--"), "baseline": ("C1", ":"), "upscale": ("C3", "-."),
              "constrained": ("C2", "-"), "torch_pruning": ("C4", "--"), "ideal": ("C7", "-")}
    for b in (str(x) for x in meta["batches"]):
        shown = [n for n in names if any(b in e["latency"] for e in results["models"][n]["amounts"].values())]
        if not shown:
            continue
        cols = min(3, len(shown))
        rows = (len(shown) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
        for ax, n in zip(axes.flat, shown):
            res = results["models"][n]
            amts = [a for a in res["amounts"] if b in res["amounts"][a]["latency"]]
            xs = [float(a) for a in amts]
            for v in V.VARIANTS:
                ys = [lat_ms(res["amounts"][a], b, v) for a in amts]
                pts = [(xv, yv) for xv, yv in zip(xs, ys) if yv is not None]
                if pts:
                    c, ls = styles[v]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, linestyle=ls, marker="o", ms=3,
                            lw=2.2 if v == "unconstrained" else 1.2, label=V.LABELS[v])
            side = res["amounts"][amts[0]]["latency"][b]["image_size"] if amts else "?"
            ax.set_title(f"{n} (batch {b}, {side}x{side})", fontsize=9)
            ax.set_xlabel("amount pruned", fontsize=8)
            ax.set_ylabel("ms (median)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
        fig.suptitle(f"Latency vs amount, batch {b}, {meta['threads']} thread(s), CPU", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 0.97))
        fig.savefig(os.path.join(out, f"performance_latency_b{b}.png"), dpi=90)
        plt.close(fig)
    s = summarise(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(names) + 2), 3.6))
    width = 0.27
    for i, (key, label, color) in enumerate([("cc_compute", "channelcut compute", "C0"), ("up_compute", "apple-upscale compute", "C3"),
                                              ("tp", "torch-pruning graph+init+step", "C4")]):
        vals = [s["models"][n][key] or 0 for n in names]
        ax.bar([j + (i - 1) * width for j in range(len(names))], vals, width, label=label, color=color)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds (median)")
    ax.set_yscale("log")
    ax.set_title("Export time (missing bar: the tool cannot export the model)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "performance_export.png"), dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child, threads=args.threads, size=args.image_size, heap=args.heap)
        return
    if args.report_only:
        with open(os.path.join(args.out, "performance.json")) as f:
            results = json.load(f)
    else:
        results = run(args)
    write_report(results, args.out)
    plot(results, args.out)
    s = summarise(results)
    print(json.dumps({n: {k: v for k, v in m.items() if k not in ("copies",)} for n, m in s["models"].items()}, indent=1, default=str)[:6000])
    print(f"wrote {os.path.join(args.out, 'performance.md')}")


if __name__ == "__main__":
    main()
