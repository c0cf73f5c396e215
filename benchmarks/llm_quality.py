"""What pruning does to a language model's quality, on real text, no download.

A small Llama-shaped model (byte-level, about a million parameters) is
trained for a few minutes on the Python standard library's own sources (every
tenth file held out as the test split), then pruned at 10-50% by each
importance method and each kind of width, and its test perplexity measured
with no recovery and after a short recovery fine-tune:

- kinds: MLP channels (``down_proj`` inputs, the same count in every layer),
  whole KV groups (with their query heads), hidden size (the residual
  stream, through the RMS norms), and every consumer's input channels at
  once, unconstrained (each layer its own channels; copies where they
  disagree) vs constrained (whole channel groups: zero copies), compared at
  equal parameters on the plot;
- methods (``channelcut.importance``): ``L2`` (weights only),
  ``ActivationNorm`` (Minitron: RMS of each channel on calibration batches),
  ``Wanda`` (column magnitude times that RMS). KV groups and stream
  channels are scored by summing the per-channel scores of the layers that
  read them (each layer's scores divided by their maximum first).

Every export is ``PruningManager(...).compute(...).prune()`` with its default
verification. Writes ``docs/llm-quality.json``, the section between the
``<!-- quality -->`` markers of ``docs/llm.md`` and ``docs/llm-quality.png``::

    python benchmarks/llm_quality.py --threads 1     # about 12 minutes on one core
    python benchmarks/llm_quality.py --report-only   # redraw from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("mlp", "kv_groups", "hidden", "all_unconstrained", "all_constrained")
METHODS = ("L2", "ActivationNorm", "Wanda")
BEGIN, END = "<!-- quality -->", "<!-- /quality -->"


# ---------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------


def corpus(max_bytes: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(train bytes, test bytes, files): the standard library's top-level
    ``.py`` files in name order, every tenth one held out for the test split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    train, test, total = bytearray(), bytearray(), 0
    for i, p in enumerate(files):
        data = p.read_bytes()
        (test if i % 10 == 9 else train).extend(data)
        total += len(data)
        if total >= max_bytes:
            files = files[: i + 1]
            break
    as_tensor = lambda b: torch.frombuffer(bytes(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(test), len(files)


def windows(data: torch.Tensor, seq: int, count: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq - 1, (count,), generator=gen)
    return torch.stack([data[s: s + seq + 1] for s in starts.tolist()])


def make_model(seq: int):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                                   max_position_embeddings=seq, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def loss_on(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def train(model, data: torch.Tensor, steps: int, batch: int, seq: int, lr: float, seed: int) -> List[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_on(model, windows(data, seq, batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model, test: torch.Tensor, seq: int, max_windows: int) -> float:
    """exp of the mean next-byte loss over consecutive windows of the test split."""
    model.eval()
    n = min(max_windows, (test.numel() - 1) // seq)
    total = 0.0
    for i in range(0, n, 16):
        rows = [test[j * seq: j * seq + seq + 1] for j in range(i, min(n, i + 16))]
        total += float(loss_on(model, torch.stack(rows))) * len(rows)
    return math.exp(total / n)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------


def _importance(method: str, calib: List[Dict[str, torch.Tensor]]):
    from channelcut import importance as imp

    return {"L2": lambda: imp.L2(), "ActivationNorm": lambda: imp.ActivationNorm(data=calib),
            "Wanda": lambda: imp.Wanda(data=calib)}[method]()


def request(model, kind: str, amount: float, method: str, calib: List[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    """``compute()`` keyword arguments: what ``method`` removes of ``kind`` at ``amount``."""
    from channelcut import MaskingManager

    cfg = model.config
    layers = range(cfg.num_hidden_layers)
    mm = MaskingManager(model, calib[0]).importance(_importance(method, calib))
    if kind == "mlp":
        names = [f"model.layers.{i}.mlp.down_proj" for i in layers]
        return {"pruned_inputs": mm.select(amount, layers=names, ignore=[])}
    if kind in ("all_unconstrained", "all_constrained"):
        mode = kind.split("_")[1]
        return {"pruned_inputs": mm.select(amount, mode=mode), "constrained": mode == "constrained"}
    scores = {k: v / v.max().clamp_min(1e-30) for k, v in mm.scores().items()}
    if kind == "kv_groups":
        per = cfg.num_attention_heads // cfg.num_key_value_heads
        width = per * cfg.head_dim
        groups = max(1, round(cfg.num_key_value_heads * amount))
        out = []
        for i in layers:
            s = scores[f"model.layers.{i}.self_attn.o_proj.weight"].view(cfg.num_key_value_heads, width).sum(1)
            out += [(f"model.layers.{i}.self_attn.k_proj.weight", int(g) * cfg.head_dim)
                    for g in torch.argsort(s)[:groups].tolist()]
        return {"pruned_outputs": out}
    if kind == "hidden":
        readers = [f"model.layers.{i}.{m}.weight" for i in layers
                   for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
        s = sum(scores[r] for r in readers if r in scores)
        cut = int(cfg.hidden_size * amount) // cfg.num_attention_heads * cfg.num_attention_heads
        return {"pruned_outputs": [("model.embed_tokens.weight", int(c)) for c in torch.argsort(s)[:cut].tolist()]}
    raise ValueError(kind)


# ---------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from channelcut import PruningManager

    torch.set_num_threads(args.threads)
    train_data, test_data, files = corpus(args.max_bytes)
    print(f"corpus: {files} files, {train_data.numel()} train bytes, {test_data.numel()} test bytes", flush=True)
    model = make_model(args.seq)
    cache = Path(args.cache)
    t0 = time.time()
    losses: List[float] = []
    if cache.exists() and not args.retrain:
        model.load_state_dict(torch.load(cache))
        print(f"trained weights from {cache}", flush=True)
    else:
        losses = train(model, train_data, args.steps, args.batch, args.seq, args.lr, seed=1)
        torch.save(model.state_dict(), cache)
        print(f"trained {args.steps} steps in {time.time() - t0:.0f} s, last loss {losses[-1]:.3f}", flush=True)
    model.eval()
    base_ppl = perplexity(model, test_data, args.seq, args.eval_windows)
    base_params = n_params(model)
    print(f"dense: {base_params} parameters, test perplexity {base_ppl:.3f}", flush=True)
    gen = torch.Generator().manual_seed(2)
    calib = [{"input_ids": w[:-1][None]} for w in windows(train_data, args.seq, args.calib, gen)]
    calib = [{"input_ids": torch.cat([c["input_ids"] for c in calib[i: i + 4]])} for i in range(0, len(calib), 4)]
    points = []
    for method in METHODS:
        for kind in args.kinds:
            for amount in args.amounts:
                net = copy.deepcopy(model)
                t = time.perf_counter()
                try:
                    req = request(net, kind, amount, method, calib)
                    PruningManager(net).compute(calib[0], **req).prune()
                except Exception as exc:  # reported in the table, never hidden
                    points.append({"method": method, "kind": kind, "amount": amount,
                                   "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                    print(f"{method} {kind} {amount}: {points[-1]['error']}", flush=True)
                    continue
                p = {"method": method, "kind": kind, "amount": amount, "params": n_params(net),
                     "kept": n_params(net) / base_params, "ppl": perplexity(net, test_data, args.seq, args.eval_windows),
                     "export_s": round(time.perf_counter() - t, 3)}
                if amount in args.recover_at and kind in args.recover_kinds:
                    train(net, train_data, args.recover_steps, args.batch, args.seq, args.lr / 3, seed=3)
                    p["ppl_recovered"] = perplexity(net, test_data, args.seq, args.eval_windows)
                points.append(p)
                print(f"{method:>14} {kind:>17} {amount:.1f}: kept {p['kept']:.3f}, ppl {p['ppl']:.3f}"
                      + (f", recovered {p['ppl_recovered']:.3f}" if "ppl_recovered" in p else ""), flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "command": "python benchmarks/llm_quality.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads",
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "channelcut": commit},
        "corpus": {"files": files, "train_bytes": train_data.numel(), "test_bytes": test_data.numel(),
                   "source": "the Python standard library's top-level .py files; every tenth held out"},
        "model": {"params": base_params, "config": {k: getattr(model.config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size")}},
        "training": {"steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
                     "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None},
        "recovery": {"steps": args.recover_steps, "lr": args.lr / 3, "at": args.recover_at, "kinds": args.recover_kinds},
        "dense_ppl": base_ppl,
        "eval_windows": args.eval_windows,
        "calibration": f"{args.calib} windows of {args.seq} bytes from the train split",
        "points": points,
    }


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def render(r: Dict[str, Any], png: str) -> str:
    cfg = r["model"]["config"]
    lines = [
        BEGIN,
        "## Quality on real text: perplexity after pruning",
        "",
        f"Written by `benchmarks/llm_quality.py` (`{r['command'].strip()}`; `--report-only` redraws it from "
        "`llm-quality.json`). Machine: " + r["machine"] + f"; channelcut {r['versions']['channelcut']}, torch "
        f"{r['versions']['torch']}.",
        "",
        f"A byte-level Llama-shaped model ({r['model']['params'] / 1e6:.2f}M parameters: hidden {cfg['hidden_size']}, "
        f"MLP {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads in "
        f"{cfg['num_key_value_heads']} KV groups of head size {cfg['head_dim']}) trained for {r['training']['steps']} "
        f"steps (batch {r['training']['batch']} x {r['training']['seq']} bytes) on {r['corpus']['source']} "
        f"({r['corpus']['files']} files: {r['corpus']['train_bytes'] / 1e6:.1f} MB train, "
        f"{r['corpus']['test_bytes'] / 1e6:.2f} MB test). Dense test perplexity (per byte, {r['eval_windows']} "
        f"windows): **{r['dense_ppl']:.3f}**. Calibration: {r['calibration']}. Recovery: "
        f"{r['recovery']['steps']} fine-tuning steps at lr {r['recovery']['lr']:.2g}.",
        "",
        "Each cell: test perplexity with no recovery (after recovery), and the fraction of parameters kept. "
        "*all, unconstrained*: every consumer drops `amount` of its own input channels (copies where layers "
        "disagree); *all, constrained*: whole channel groups (zero copies); compare them at equal parameters "
        "on the plot. KV groups are whole (4 per layer): 10-30% remove one group per layer, 40-50% two.",
        "",
    ]
    pts = [p for p in r["points"] if "error" not in p]
    amounts = sorted({p["amount"] for p in r["points"]})
    kinds = [k for k in KINDS if any(p["kind"] == k for p in r["points"])]
    for kind in kinds:
        lines += [f"### {kind.replace('_', ', ')}", "", "| method | " + " | ".join(f"{a:.0%}" for a in amounts) + " |",
                  "|---|" + "---:|" * len(amounts)]
        for method in METHODS:
            cells = []
            for a in amounts:
                p = next((q for q in r["points"] if q["kind"] == kind and q["method"] == method and q["amount"] == a), None)
                if p is None:
                    cells.append("-")
                elif "error" in p:
                    cells.append(f"error: {p['error'][:60]}")
                else:
                    rec = f" ({p['ppl_recovered']:.2f})" if "ppl_recovered" in p else ""
                    cells.append(f"{p['ppl']:.2f}{rec}, {p['kept']:.0%}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    best = {}
    for p in pts:
        key = (p["kind"], p["amount"])
        if key not in best or p["ppl"] < best[key]["ppl"]:
            best[key] = p
    wins = {m: sum(1 for b in best.values() if b["method"] == m) for m in METHODS}
    lines += ["Unconstrained vs constrained at equal parameters (the constrained curve interpolated at the "
              "unconstrained point's parameters kept; no recovery):", "",
              "| method | amount | kept | unconstrained | constrained, interpolated |", "|---|---:|---:|---:|---:|"]
    for method in METHODS:
        con = sorted((p["kept"], p["ppl"]) for p in pts if p["kind"] == "all_constrained" and p["method"] == method)
        for p in sorted((p for p in pts if p["kind"] == "all_unconstrained" and p["method"] == method), key=lambda p: p["amount"]):
            pair = next(((a, b) for a, b in zip(con, con[1:]) if a[0] <= p["kept"] <= b[0]), None)
            if pair is None:
                continue
            (k0, y0), (k1, y1) = pair
            y = y0 if k1 == k0 else y0 + (y1 - y0) * (p["kept"] - k0) / (k1 - k0)
            lines.append(f"| {method} | {p['amount']:.0%} | {p['kept']:.0%} | {p['ppl']:.2f} | {y:.2f} |")
    lines.append("")
    lines += ["Best method per (kind, amount), no recovery: " + ", ".join(f"{m} {n}" for m, n in wins.items()) + ".",
              "", f"![perplexity vs parameters kept]({os.path.basename(png)})", "", END]
    return "\n".join(lines)


def plot(r: Dict[str, Any], png: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    kinds = [k for k in KINDS if any(p["kind"] == k and "error" not in p for p in r["points"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), sharey=True)
    axes = axes if len(kinds) > 1 else [axes]
    for ax, kind in zip(axes, kinds):
        for method, color in zip(METHODS, ("tab:blue", "tab:orange", "tab:green")):
            pts = sorted((p for p in r["points"] if p["kind"] == kind and p["method"] == method and "error" not in p),
                         key=lambda p: -p["kept"])
            if not pts:
                continue
            ax.plot([p["kept"] for p in pts], [p["ppl"] for p in pts], "o-", color=color, label=method)
            rec = [p for p in pts if "ppl_recovered" in p]
            if rec:
                ax.plot([p["kept"] for p in rec], [p["ppl_recovered"] for p in rec], "s--", color=color, alpha=0.7,
                        label=f"{method}, recovered")
        ax.axhline(r["dense_ppl"], color="gray", lw=0.8, ls=":")
        ax.set_title(kind.replace("_", ", "))
        ax.set_xlabel("parameters kept")
        ax.set_yscale("log")
        ax.invert_xaxis()
    axes[0].set_ylabel("test perplexity per byte (log)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def write_md(r: Dict[str, Any], md: Path, png: str) -> None:
    section = render(r, png)
    text = md.read_text() if md.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md.write_text(text)
    print(f"wrote {md}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-bytes", type=int, default=6_000_000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows")
    ap.add_argument("--eval-windows", type=int, default=400)
    ap.add_argument("--amounts", type=lambda s: [float(a) for a in s.split(",")], default=[0.1, 0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS))
    ap.add_argument("--recover-at", type=lambda s: [float(a) for a in s.split(",")], default=[0.3, 0.5])
    ap.add_argument("--recover-kinds", type=lambda s: s.split(","), default=["mlp", "all_unconstrained", "all_constrained"])
    ap.add_argument("--recover-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/channelcut-llm-quality.pt", help="trained weights (reused unless --retrain)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "llm-quality.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "llm.md"))
    ap.add_argument("--report-only", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    png = str(Path(args.out).with_suffix(".png"))
    if args.report_only:
        r = json.loads(Path(args.out).read_text())
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = run(args)
        Path(args.out).write_text(json.dumps(r, indent=1))
    plot(r, png)
    write_md(r, Path(args.md), png)


if __name__ == "__main__":
    main()
