"""Decode and prefill latency of pruned Llama-shaped models vs the ideal model.

For each kind of width pruning (MLP channels, whole KV groups with their
query heads, hidden size through the RMS norms, and all three), a random
Llama-shaped model is pruned by channelcut (``compute`` traces on meta, so
planning costs no device memory), and an *ideal* model of the same widths
is built fresh from the pruned config (``transformers``' own modules, no
Subselect layer: the physical limit of that pruning). Both run:

- **prefill**: one forward pass over ``--prefill`` tokens (batch 1);
- **decode**: one new token against a KV cache of ``--prefill`` tokens
  (the cache is built once per model; every timed call appends one token to
  a copy-free cache that is cropped back afterwards).

Timing is round-robin over the models of one configuration, the order
rotating each round, CUDA events between two synchronizations on a GPU
(wall clock on a CPU); medians. Writes a markdown table and the raw JSON::

    python benchmarks/llm_latency.py --device cuda --shape 8b --dtype bfloat16 --out docs/llm-latency-gpu.md
    python benchmarks/llm_latency.py --device cpu --shape tiny --out /tmp/llm.md      # a smoke run
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
from typing import Any, Callable, Dict, List

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head dim, vocab
    "tiny": (256, 688, 2, 8, 2, 32, 512),
    "1b": (2048, 8192, 16, 32, 8, 64, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128, 128256),
}
KINDS = ("mlp", "kv_groups", "hidden", "all")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (keeps time in check)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--amount", type=float, default=0.25, help="fraction of each width removed")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="docs/llm-latency.md")
    return ap.parse_args(argv)


def _config(shape: str, layers=None):
    import transformers

    h, i, n, heads, kv, hd, vocab = SHAPES[shape]
    return transformers.LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers or n,
                                    num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, vocab_size=vocab,
                                    max_position_embeddings=4096, tie_word_embeddings=False)


def request(cfg, kind: str, amount: float) -> Dict[str, Any]:
    """The same request in every layer: the first channels of each width."""
    out: Dict[str, Any] = {"pruned_inputs": [], "pruned_outputs": []}
    n_layers = cfg.num_hidden_layers
    if kind in ("mlp", "all"):
        k = int(cfg.intermediate_size * amount)
        out["pruned_inputs"] += [(f"model.layers.{i}.mlp.down_proj.weight", c) for i in range(n_layers) for c in range(k)]
    if kind in ("kv_groups", "all"):
        # at least ``amount`` of the KV groups, rounded up to a count whose
        # remaining query heads divide the hidden size (transformers' configs
        # refuse anything else, and the ideal model is built from one)
        per = cfg.num_attention_heads // cfg.num_key_value_heads
        hidden = cfg.hidden_size - (_hidden_cut(cfg, amount) if kind == "all" else 0)
        groups = max(1, int(cfg.num_key_value_heads * amount))
        while groups < cfg.num_key_value_heads - 1 and hidden % (per * (cfg.num_key_value_heads - groups)):
            groups += 1
        out["pruned_outputs"] += [(f"model.layers.{i}.self_attn.k_proj.weight", g * cfg.head_dim)
                                  for i in range(n_layers) for g in range(groups)]
    if kind in ("hidden", "all"):
        out["pruned_outputs"] += [("model.embed_tokens.weight", c) for c in range(_hidden_cut(cfg, amount))]
    return out


def _hidden_cut(cfg, amount: float) -> int:
    """Stream channels removed: ``amount`` of them, a multiple of the head count."""
    return int(cfg.hidden_size * amount) // cfg.num_attention_heads * cfg.num_attention_heads


def build(cfg, kind: str, amount: float, device: torch.device, dtype: torch.dtype):
    """(pruned model, ideal model of its widths, seconds to plan, seconds to prune)."""
    import transformers

    from channelcut import PruningManager
    from channelcut.hf import pruned_config

    torch.manual_seed(0)
    with torch.device(device):
        net = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    ids = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=device)}
    t0 = time.perf_counter()
    pm = PruningManager(net).compute(ids, **request(cfg, kind, amount))
    t1 = time.perf_counter()
    pm.prune(verify=False)
    t2 = time.perf_counter()
    cfg_pruned = pruned_config(net)
    with torch.device(device):
        ideal = transformers.LlamaForCausalLM(cfg_pruned).to(dtype).eval()
    return net, ideal, t1 - t0, t2 - t1


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def timed(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return timed


def measure(models: Dict[str, torch.nn.Module], prefill: int, repeats: int, warmup: int, device: torch.device) -> Dict[str, Dict[str, float]]:
    from transformers import DynamicCache

    timed = _timer(device)
    x = torch.randint(0, 100, (1, prefill), device=device)
    tok = torch.randint(0, 100, (1, 1), device=device)
    caches = {}
    with torch.no_grad():
        for name, m in models.items():
            cache = DynamicCache(config=m.config)
            m(input_ids=x, past_key_values=cache, use_cache=True)
            caches[name] = cache
    names = list(models)
    times: Dict[str, Dict[str, List[float]]] = {n: {"prefill": [], "decode": []} for n in names}

    def decode(name):
        m, cache = models[name], caches[name]
        m(input_ids=tok, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the token it appended (negative: remove that many, in every transformers version)

    with torch.no_grad():
        for r in range(warmup + repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                tp = timed(lambda n=n: models[n](input_ids=x, use_cache=False))
                td = timed(lambda n=n: decode(n))
                if r >= warmup:
                    times[n]["prefill"].append(tp)
                    times[n]["decode"].append(td)
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = _config(args.shape, args.layers)
    results: Dict[str, Any] = {"meta": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "shape": args.shape, "layers": cfg.num_hidden_layers, "dtype": args.dtype,
        "amount": args.amount, "prefill": args.prefill, "repeats": args.repeats}, "kinds": {}}
    for kind in args.kinds.split(","):
        net, ideal, plan_s, prune_s = build(cfg, kind, args.amount, device, dtype)
        lat = measure({"pruned": net, "ideal": ideal}, args.prefill, args.repeats, args.warmup, device)
        results["kinds"][kind] = {"plan_s": plan_s, "prune_s": prune_s, "latency_ms": lat,
                                  "prefill_ratio": lat["pruned"]["prefill"] / lat["ideal"]["prefill"],
                                  "decode_ratio": lat["pruned"]["decode"] / lat["ideal"]["decode"],
                                  "params": sum(p.numel() for p in net.parameters())}
        print(kind, json.dumps(results["kinds"][kind]), flush=True)
        del net, ideal
        if device.type == "cuda":
            torch.cuda.empty_cache()
    m = results["meta"]
    lines = [f"# LLM latency: pruned vs ideal ({m['device']})\n",
             f"Llama-{args.shape}-shaped ({m['layers']} layers), random weights, {m['dtype']}, {int(args.amount * 100)}% of each "
             f"width removed, batch 1; prefill {m['prefill']} tokens, decode 1 token against a {m['prefill']}-token cache; "
             f"median of {m['repeats']} round-robin rounds; torch {m['torch']}.\n",
             f"`python benchmarks/llm_latency.py {' '.join(sys.argv[1:])}`\n",
             "| pruned | parameters | plan s | prune s | prefill ms (pruned / ideal) | ratio | decode ms (pruned / ideal) | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, r in results["kinds"].items():
        lat = r["latency_ms"]
        lines.append(f"| {kind} | {r['params'] / 1e9:.3f} B | {r['plan_s']:.2f} | {r['prune_s']:.2f} | "
                     f"{lat['pruned']['prefill']:.2f} / {lat['ideal']['prefill']:.2f} | {r['prefill_ratio']:.3f} | "
                     f"{lat['pruned']['decode']:.3f} / {lat['ideal']['decode']:.3f} | {r['decode_ratio']:.3f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
