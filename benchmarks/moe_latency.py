"""How pruned mixture-of-experts layers are stored, and what each layout costs.

One 3-D expert weight can not hold experts of different widths. channelcut
exports them **split** (``channelcut.moe.SplitExperts``: one MLP of plain
``nn.Linear`` layers per expert, each at its own width). The alternatives are
**padded** (Hugging Face's own fused module at the widest expert's width, the
narrower experts padded with zero rows and columns: exact, and loadable by
``from_pretrained``) and grouping experts by width (which is padded within
each group, so it lies between the two). This script times, on a random
Mixtral-shaped model, a prefill of ``--prefill`` tokens and a one-token step
(no cache: the MoE layers' cost with one token routed), round-robin, medians:

- **uniform**: every expert keeps 75% of its intermediate channels. *ideal*
  is Hugging Face's model built at that width (its own expert dispatch);
  *split* is channelcut's export.
- **varied**: expert e keeps between 50% and 100% (75% on average). *split*
  is channelcut's export; *padded* is Hugging Face's model at the widest
  width with zero padding; *ideal (mean width)* is the uniform model of the
  same parameter count, the arithmetic a perfect layout would do.

Every variant is checked to compute the same logits as the model it stands
for before it is timed. Command (writes the table into docs/moe.md's
``<!-- moe-latency -->`` section, and the raw JSON)::

    python benchmarks/moe_latency.py --threads 2 --out docs/moe-latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/moe-latency.json")
    ap.add_argument("--doc", default="docs/moe.md", help="markdown file whose MoE section is rewritten ('' to skip)")
    return ap.parse_args(argv)


def _model(a, intermediate: int):
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=1000, hidden_size=a.hidden, intermediate_size=intermediate,
                                     num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2,
                                     num_local_experts=a.experts, num_experts_per_tok=a.top_k,
                                     max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def _pruned(a, keep: List[int]):
    """channelcut's export of the model: expert e keeps keep[e] of its
    intermediate channels (a seeded random choice), in every layer."""
    from channelcut import PruningManager
    from channelcut.moe import split_experts

    net = _model(a, a.intermediate)
    blocks = split_experts(net)
    g = torch.Generator().manual_seed(1)
    req = []
    for b in blocks:
        for e, k in enumerate(keep):
            drop = torch.randperm(a.intermediate, generator=g)[k:].tolist()
            req += [(f"{b}.{e}.down_proj.weight", c) for c in drop]
    x = {"input_ids": torch.randint(0, 1000, (1, 16), generator=g)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PruningManager(net).compute(x, pruned_inputs=req).prune()
    return net


def _fused_from_split(a, split_net, width: int):
    """Hugging Face's model at ``width`` holding the split model's weights:
    each expert's rows and columns first, zeros after (exact)."""
    from channelcut.moe import SplitExperts

    net = _model(a, width)
    src = dict(split_net.named_parameters())
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in src and src[name].shape == p.shape:
                p.copy_(src[name])
        for li, layer in enumerate(net.model.layers):
            split = split_net.model.layers[li].mlp.experts
            assert isinstance(split, SplitExperts)
            fused = layer.mlp.experts
            fused.gate_up_proj.zero_()
            fused.down_proj.zero_()
            for e, mlp in zip(split.expert_ids, split):
                w = mlp.down_proj.in_features
                fused.gate_up_proj[e, :w] = mlp.gate_proj.weight
                fused.gate_up_proj[e, width:width + w] = mlp.up_proj.weight
                fused.down_proj[e, :, :w] = mlp.down_proj.weight
    return net


def _time(models: Dict[str, torch.nn.Module], x: torch.Tensor, a) -> Dict[str, float]:
    calls: Dict[str, Callable[[], object]] = {k: (lambda m=m: m(input_ids=x)) for k, m in models.items()}
    times: Dict[str, List[float]] = {k: [] for k in calls}
    names = list(calls)
    with torch.no_grad():
        for _ in range(a.warmup):
            for k in names:
                calls[k]()
        for r in range(a.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                t = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _same(m1, m2, x) -> float:
    with torch.no_grad():
        y1, y2 = m1(input_ids=x).logits, m2(input_ids=x).logits
    return float((y1 - y2).abs().max() / y2.abs().max())


def main(argv=None) -> Dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    inter, E = a.intermediate, a.experts
    uniform = [int(0.75 * inter)] * E
    varied = [int(inter * (0.5 + 0.5 * e / (E - 1))) // 8 * 8 for e in range(E)]
    mean_w = round(sum(varied) / E / 8) * 8
    g = torch.Generator().manual_seed(2)
    inputs = {"prefill": torch.randint(0, 1000, (1, a.prefill), generator=g),
              "one token": torch.randint(0, 1000, (1, 1), generator=g)}
    rows = []
    # uniform widths: the ideal exists
    split_u = _pruned(a, uniform)
    ideal_u = _fused_from_split(a, split_u, uniform[0])
    err_u = _same(split_u, ideal_u, inputs["prefill"])
    # varied widths
    split_v = _pruned(a, varied)
    padded_v = _fused_from_split(a, split_v, max(varied))
    err_v = _same(split_v, padded_v, inputs["prefill"])
    ideal_mean = _model(a, mean_w)
    impl = getattr(ideal_u.config, "_experts_implementation", None)
    for what, x in inputs.items():
        t = _time({"ideal": ideal_u, "split": split_u}, x, a)
        rows.append({"widths": "uniform 75%", "input": what, "ideal_ms": 1e3 * t["ideal"], "split_ms": 1e3 * t["split"],
                     "split_over_ideal": t["split"] / t["ideal"]})
        t = _time({"ideal": ideal_mean, "split": split_v, "padded": padded_v}, x, a)
        rows.append({"widths": "varied 50-100%", "input": what, "ideal_ms": 1e3 * t["ideal"],
                     "split_ms": 1e3 * t["split"], "padded_ms": 1e3 * t["padded"],
                     "split_over_ideal": t["split"] / t["ideal"], "padded_over_ideal": t["padded"] / t["ideal"]})
    result = {
        "command": "python benchmarks/moe_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}",
        "shape": {"hidden": a.hidden, "intermediate": inter, "experts": E, "top_k": a.top_k, "layers": a.layers},
        "hf_experts_implementation": impl or "eager (default)",
        "widths_varied": varied, "mean_width": mean_w,
        "max_rel_err": {"split vs ideal (uniform)": err_u, "split vs padded (varied)": err_v},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    table = _markdown(result)
    print(table)
    if a.doc:
        _write_section(a.doc, table)
    return result


def _markdown(r: Dict) -> str:
    s = r["shape"]
    lines = [
        f"Mixtral-shaped, hidden {s['hidden']}, {s['experts']} experts of {s['intermediate']} channels, top-{s['top_k']}, "
        f"{s['layers']} layers, float32, {r['machine']}; Hugging Face's experts run as "
        f"`{r['hf_experts_implementation']}`. Varied widths: {r['widths_varied']} (mean {r['mean_width']}). "
        f"Same logits checked first: rel. err {r['max_rel_err']['split vs ideal (uniform)']:.1e} (split vs ideal), "
        f"{r['max_rel_err']['split vs padded (varied)']:.1e} (split vs padded). Medians, ms.",
        "",
        "| widths | input | ideal | split (ours) | padded | split / ideal | padded / ideal |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        pad = f"{row['padded_ms']:.2f}" if "padded_ms" in row else "-"
        pr = f"{row['padded_over_ideal']:.3f}" if "padded_over_ideal" in row else "-"
        lines.append(f"| {row['widths']} | {row['input']} | {row['ideal_ms']:.2f} | {row['split_ms']:.2f} | {pad} | "
                     f"{row['split_over_ideal']:.3f} | {pr} |")
    lines.append("")
    lines.append(f"Command: `{r['command'].strip()}`")
    return "\n".join(lines)


def _write_section(path: str, table: str) -> None:
    start, end = "<!-- moe-latency -->", "<!-- /moe-latency -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
