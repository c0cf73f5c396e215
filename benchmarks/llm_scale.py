"""Streaming export at LLM scale: plan on meta, write the pruned checkpoint
tensor by tensor, compare with a plain copy of the files.

For one checkpoint shape (``--shape``):

1. writes a random Llama-shaped bfloat16 checkpoint to ``--dir`` once
   (sharded like the Hub's: ``--shard-gb``), tensor by tensor with
   ``channelcut.safetensors_stream`` (never the whole model in memory); a
   later run reuses it (``--keep`` keeps it; else it is deleted at the end);
2. times, side by side and alternating which goes first, a plain copy of the
   checkpoint directory (``shutil.copytree``) and
   ``channelcut.hf.prune_pretrained`` of it (in a fresh process, timed from
   the call; imports, of transformers' Llama module too, excluded), each followed by an ``fsync`` of every file
   it wrote, each started with the source files evicted from the page cache
   (``posix_fadvise(DONTNEED)``, so both read from disk); median of
   ``--repeats``;
3. reports the peak resident-set growth of ``prune_pretrained`` (VmHWM,
   reset through ``/proc/self/clear_refs``), split into the plan (build on
   meta, trace, resolve) and the write (from the first progress call, when
   the plan is done, to the end), against the largest tensor;
4. checks the result: ``--verify full`` loads the source in memory, prunes it
   with ``PruningManager`` and compares every tensor with ``torch.equal``,
   and loads the result with ``from_pretrained`` (for checkpoints that fit in
   memory); ``--verify shapes`` (the default for 8B) checks every written
   shape against a model built from the written config on meta and a few
   tensors against the source read directly;
5. plans larger shapes on meta only (``--plan-shapes``): time and peak RSS of
   building on meta + ``compute`` + applying the spec to the meta model.

The request: in every layer, a random 25% of the MLP channels (inputs of
``down_proj``), so every layer keeps the same widths and the result loads
with ``from_pretrained``. ``--hetero`` draws 10-40% per layer and drops one
key/value head group (with its query heads) in every other layer: per-layer
widths, loaded with ``channelcut.hf.load_pretrained``. (Uniform head pruning
is not the default because transformers' LlamaConfig refuses a head count
that does not divide ``hidden_size``: 28 of Llama-3-8B's 32 heads would load
with ``load_pretrained`` only.)

Writes ``docs/llm.json`` (results by shape, merged with earlier runs) and
``docs/llm.md``::

    python benchmarks/llm_scale.py --shape small --repeats 3            # ~0.75 GB, a few minutes
    python benchmarks/llm_scale.py --shape 8b --repeats 3 --plan-shapes 8b,70b,405b   # ~16 GB on disk
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memstat import reset_peak, status_kb  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Llama shapes: name -> (LlamaConfig fields, shard size in GB)
SHAPES: Dict[str, Dict[str, Any]] = {
    "small": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, shard_gb=0.2),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, shard_gb=5.0),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, shard_gb=5.0),
    "405b": dict(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                 num_attention_heads=128, num_key_value_heads=8, shard_gb=5.0),
}
DONE = "llm_scale.done"


def llama_config(shape: str):
    import transformers

    fields = {k: v for k, v in SHAPES[shape].items() if k != "shard_gb"}
    return transformers.LlamaConfig(**fields, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                                    dtype="bfloat16", architectures=["LlamaForCausalLM"])


def request(config, seed: int = 0, hetero: bool = False) -> List[Tuple[str, int]]:
    """A random 25% of every layer's MLP channels; with ``hetero``, 10-40%
    per layer and one key/value head group (with its query heads) in every
    other layer."""
    rng = random.Random(seed)
    inter, layers = config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    per = heads // kv
    out: List[Tuple[str, int]] = []
    for i in range(layers):
        frac = rng.uniform(0.10, 0.40) if hetero else 0.25
        out += [(f"model.layers.{i}.mlp.down_proj.weight", c) for c in sorted(rng.sample(range(inter), round(frac * inter)))]
        if hetero and i % 2:
            g = (i // 2) % kv
            out += [(f"model.layers.{i}.self_attn.o_proj.weight", c) for c in range(g * per * head_dim, (g + 1) * per * head_dim)]
    return out


# ----------------------------------------------------------------------------
# the random checkpoint
# ----------------------------------------------------------------------------
def write_checkpoint(folder: Path, shape: str, seed: int = 0) -> Dict[str, Any]:
    """A random bf16 checkpoint of ``shape``, sharded like save_pretrained's,
    written one tensor at a time. Reused when ``folder`` holds a complete one."""
    import transformers

    from channelcut.safetensors_stream import Entry, ShardWriter

    marker = folder / DONE
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == shape:
        return json.loads(marker.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = llama_config(shape)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config)
    tensors = [(k, tuple(v.shape)) for k, v in meta.state_dict().items()]
    limit = int(SHAPES[shape]["shard_gb"] * 1e9)
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensors:
        n = 2 * _numel(shp)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += n
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    weight_map, total = {}, 0
    for f, shard in zip(files, shards):
        with ShardWriter(folder / f, [Entry(n, "BF16", s) for n, s in shard], {"format": "pt"}) as w:
            for name, shp in shard:
                w.write(name, _random(shp, gen, norm=name.endswith("norm.weight")))
                weight_map[name] = f
                total += 2 * _numel(shp)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"note": "placeholder: a tokenizer file is copied like any other"}\n')
    info = {"shape": shape, "seed": seed, "bytes": total, "files": len(files), "tensors": len(tensors),
            "largest_tensor_bytes": max(2 * _numel(s) for _, s in tensors), "write_s": time.perf_counter() - t0}
    marker.write_text(json.dumps(info) + "\n")
    return info


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random(shape: Tuple[int, ...], gen: torch.Generator, norm: bool) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        chunk = torch.randn(min(step, flat.numel() - i), generator=gen)
        flat[i:i + step] = (chunk * 0.1 + 1.0) if norm else chunk * 0.02
    return out


# ----------------------------------------------------------------------------
# measurements (children)
# ----------------------------------------------------------------------------
def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (they are clean)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def child_prune(src: str, dst: str, shape: str, seed: int, hetero: bool) -> None:
    """Print one prune_pretrained run as JSON: time, RSS by phase, report."""
    warnings.simplefilter("ignore")
    import transformers

    from channelcut.hf import prune_pretrained

    transformers.LlamaForCausalLM  # noqa: B018 - import the modeling module (lazy) before the clock starts
    config = llama_config(shape)
    pairs = request(config, seed, hetero)
    phase: Dict[str, int] = {}

    def progress(done: int, total: int) -> None:
        if "plan_peak_kb" not in phase:  # called first with done == 0, when the plan is complete
            phase["plan_peak_kb"] = status_kb("VmHWM")
            phase["write_start_kb"] = status_kb("VmRSS")
            reset_peak()

    before = status_kb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    report = prune_pretrained(src, dst, pruned_inputs=pairs, progress=progress)
    t1 = time.perf_counter()
    write_peak = status_kb("VmHWM")
    _fsync_tree(Path(dst))
    t2 = time.perf_counter()
    print(json.dumps({
        "call_s": t1 - t0, "total_s": t2 - t0, "plan_s": report.plan_s, "write_s": report.write_s,
        "rss_before_mb": before / 1024,
        "plan_rss_growth_mb": (phase["plan_peak_kb"] - before) / 1024,
        "write_rss_growth_mb": (write_peak - phase["write_start_kb"]) / 1024,
        "peak_rss_growth_mb": (max(phase["plan_peak_kb"], write_peak) - before) / 1024,
        "rss_at_write_start_mb": phase["write_start_kb"] / 1024,
        "largest_sliced_mb": report.largest_sliced / 2**20,
        "bytes_written": report.bytes_written, "source_bytes": report.source_bytes,
        "tensors_sliced": report.tensors_sliced, "tensors_copied": report.tensors_copied, "rows_copied": report.rows_copied,
        "config": report.config, "loads_with": report.loads_with, "pairs": len(pairs),
    }))


def child_plan(shape: str, seed: int) -> None:
    """Print the plan of ``shape`` on meta: time and peak RSS growth."""
    warnings.simplefilter("ignore")
    import transformers

    from channelcut.hf_stream import plan_on_meta

    transformers.LlamaForCausalLM  # noqa: B018 - as in child_prune
    config = llama_config(shape)
    pairs = request(config, seed)
    before = status_kb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    model, spec, _ = plan_on_meta(config, pruned_inputs=pairs)
    t1 = time.perf_counter()
    peak = status_kb("VmHWM")
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(json.dumps({"plan_s": t1 - t0, "rss_growth_mb": (peak - before) / 1024, "rss_before_mb": before / 1024,
                      "pairs": len(pairs), "params_after": params,
                      "intermediate_after": model.model.layers[0].mlp.down_proj.in_features}))


def _run_child(args: List[str], timeout: int = 3600) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------
def verify_full(src: Path, dst: Path, shape: str, seed: int, hetero: bool) -> Dict[str, Any]:
    """In-memory export of the same request, every tensor compared; the
    result loaded by from_pretrained (or load_pretrained) gives the same logits."""
    import transformers
    from safetensors.torch import load_file

    from channelcut import PruningManager
    from channelcut.hf import load_pretrained

    warnings.simplefilter("ignore")
    config = llama_config(shape)
    pairs = request(config, seed, hetero)
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    x = {"input_ids": torch.tensor([[128000 % config.vocab_size, 5, 17, 99, 3, 64, 8, 120]])}
    PruningManager(model).compute(x, pruned_inputs=pairs).prune()
    want = model.state_dict()
    equal = n = 0
    for f in sorted(dst.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            n += 1
            equal += int(v.dtype == want[k].dtype and torch.equal(v, want[k]))
    back = load_pretrained(dst)
    with torch.no_grad():
        same_logits = bool(torch.equal(back(**x).logits, model(**x).logits))
    return {"tensors": n, "identical": equal, "state_dict_tensors": len(want), "loaded_with": type(back).__name__,
            "logits_equal": same_logits}


def verify_shapes(src: Path, dst: Path, shape: str, seed: int) -> Dict[str, Any]:
    """Every written shape against a model built from the written config (on
    meta); a few tensors against the source, sliced here by index_select."""
    import transformers

    from channelcut.safetensors_stream import read_header, read_tensor

    config = transformers.AutoConfig.from_pretrained(dst)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got: Dict[str, Tuple[int, ...]] = {}
    headers = {f.name: read_header(f) for f in sorted(dst.glob("*.safetensors"))}
    for h in headers.values():
        got.update({k: e.shape for k, e in h.entries.items()})
    shapes_ok = got == want
    plan = json.loads((dst / "plan.json").read_text())
    slices = plan["steps"][0]["slices"]
    checked = []
    last = config.num_hidden_layers - 1
    for name in ("model.layers.0.mlp.gate_proj.weight", f"model.layers.{last}.mlp.down_proj.weight",
                 f"model.layers.{last}.self_attn.k_proj.weight", "model.embed_tokens.weight"):
        f = next(f for f, h in headers.items() if name in h.entries)
        out = read_tensor(dst / f, headers[f], name)
        sh = read_header(src / f)
        ref = read_tensor(src / f, sh, name)
        for dim, kept in sorted(slices.get(name, {}).items()):
            ref = ref.index_select(int(dim), torch.tensor(kept))
        checked.append((name, bool(torch.equal(out, ref))))
        del out, ref
    kept_mlp = set(slices["model.layers.0.mlp.down_proj.weight"]["1"])
    asked = {c for p, c in request(llama_config(shape), seed) if p == "model.layers.0.mlp.down_proj.weight"}
    return {"shapes_match_config": shapes_ok, "tensors": len(got), "spot_checks": checked,
            "kept_is_complement_of_request": kept_mlp == set(range(llama_config(shape).intermediate_size)) - asked}


# ----------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------
def side_by_side(src: Path, work: Path, shape: str, seed: int, hetero: bool, repeats: int) -> Dict[str, Any]:
    copies: List[float] = []
    prunes: List[Dict[str, Any]] = []
    for r in range(repeats):
        order = ["copy", "prune"] if r % 2 == 0 else ["prune", "copy"]
        for what in order:
            dst = work / f"{what}-{r}"
            _evict(src)
            if what == "copy":
                t0 = time.perf_counter()
                shutil.copytree(src, dst)
                _fsync_tree(dst)
                copies.append(time.perf_counter() - t0)
            else:
                prunes.append(_run_child(["--child-prune", str(src), str(dst), shape, str(seed)] + (["--hetero"] if hetero else [])))
            print(f"  run {r + 1}/{repeats} {what}: "
                  + (f"{copies[-1]:.1f} s" if what == "copy" else f"{prunes[-1]['total_s']:.1f} s "
                     f"(plan {prunes[-1]['plan_s']:.1f} s), peak RSS +{prunes[-1]['peak_rss_growth_mb']:.0f} MB"), flush=True)
            if not (what == "prune" and r == repeats - 1):
                shutil.rmtree(dst)
    med = statistics.median
    return {
        "copy_s": copies, "prune_s": [p["total_s"] for p in prunes], "plan_s": [p["plan_s"] for p in prunes],
        "copy_median_s": med(copies), "prune_median_s": med([p["total_s"] for p in prunes]),
        "ratio": med([p["total_s"] for p in prunes]) / med(copies),
        "runs": prunes,
        "max_plan_rss_growth_mb": max(p["plan_rss_growth_mb"] for p in prunes),
        "max_write_rss_growth_mb": max(p["write_rss_growth_mb"] for p in prunes),
        "max_peak_rss_growth_mb": max(p["peak_rss_growth_mb"] for p in prunes),
    }


def render(results: Dict[str, Any]) -> str:
    """docs/llm.md from docs/llm.json."""
    gb = 1e9
    lines = [
        "# LLM scale: streaming export of Hugging Face checkpoints",
        "",
        "Written by `benchmarks/llm_scale.py` from `llm.json` (`python benchmarks/llm_scale.py --report-only` redraws it).",
        "",
        "`channelcut.hf.prune_pretrained(src, dst, pruned_inputs=..., pruned_outputs=..., constrained=...)` prunes a",
        "checkpoint on disk without loading it: the model is built on the meta device and planned there (no weight",
        "is read), then every output shard is written tensor by tensor from the source shards: a tensor the plan",
        "leaves alone, or only keeps rows of, is copied file to file by the kernel (never in memory); any other is",
        "read, passed through `pruner.sliced` (what `prune()` does to it) and written. See",
        "[the module docstring](../src/channelcut/hf_stream.py).",
        "",
    ]
    for key, r in results.items():
        run, ck, sbs = r["run"], r["checkpoint"], r["side_by_side"]
        runs = sbs["runs"]
        writes = [x["write_s"] for x in runs]
        med = statistics.median
        lines += [
            f"## {key}: {ck['bytes'] / gb:.2f} GB random Llama-shaped bfloat16 checkpoint, {ck['files']} shards",
            "",
            f"- command: `{run['command']}`",
            f"- machine: {run['machine']}; {run['versions']}; channelcut at commit {run['commit']}; disk `{run['disk']}`",
            f"- started {run['started']}, took {run['minutes']:.1f} min; 1-minute load average {run['load_start']:.2f} "
            f"at the start, {run['load_end']:.2f} at the end (a shared machine: other jobs ran meanwhile)",
            f"- request: {runs[0]['pairs']} `(consumer weight, input channel)` pairs"
            + (" (10-40% of each layer's MLP channels, one key/value head group in every other layer)" if run.get("hetero")
               else " (a random 25% of every layer's MLP channels)")
            + f"; result config: {runs[0]['config']}, loads with {runs[0]['loads_with']}",
            f"- {run['repeats']} rounds, alternating which goes first; before each, the source files are evicted from the "
            "page cache; each timing ends with an fsync of every file written",
            "",
            "| | median | runs |",
            "|---|---|---|",
            f"| plain copy (`shutil.copytree` + fsync) | {sbs['copy_median_s']:.1f} s | {', '.join(f'{x:.1f}' for x in sbs['copy_s'])} |",
            f"| `prune_pretrained` + fsync | {sbs['prune_median_s']:.1f} s | {', '.join(f'{x:.1f}' for x in sbs['prune_s'])} |",
            f"| of which plan (config, meta model, trace, resolve, shapes, config) | {med(sbs['plan_s']):.1f} s | {', '.join(f'{x:.1f}' for x in sbs['plan_s'])} |",
            f"| of which write (shards, index, config, plan.json, other files) | {med(writes):.1f} s | {', '.join(f'{x:.1f}' for x in writes)} |",
            f"| **`prune_pretrained` / copy** | **{sbs['ratio']:.2f}x** | |",
            "",
            f"Tensors: {runs[0]['tensors_sliced']} changed ({runs[0].get('rows_copied', '?')} of them by copying their kept "
            f"rows in the kernel), {runs[0]['tensors_copied']} copied through; {runs[0]['source_bytes'] / gb:.2f} GB of "
            f"source tensors, {runs[0]['bytes_written'] / gb:.2f} GB written.",
            "",
            "Peak resident set growth of `prune_pretrained` (VmHWM over VmRSS before the call, in the process that runs it; "
            "the peak is reset through `/proc/self/clear_refs` when the plan is complete and writing starts):",
            "",
            "| phase | peak RSS growth (max over runs) |",
            "|---|---|",
            f"| plan | {sbs['max_plan_rss_growth_mb']:.0f} MB |",
            f"| write (over the RSS when writing starts) | {sbs['max_write_rss_growth_mb']:.0f} MB |",
            f"| whole call | {sbs['max_peak_rss_growth_mb']:.0f} MB |",
            f"| largest tensor in the checkpoint | {ck['largest_tensor_bytes'] / 2**20:.0f} MiB (copied by the kernel) |",
            f"| largest tensor held in memory (read to be sliced) | {runs[0]['largest_sliced_mb']:.0f} MiB |",
            "",
        ]
        v = r.get("verify")
        if v and "identical" in v:
            lines += [f"Check: the same request exported in memory (`from_pretrained` + `PruningManager.compute().prune()`): "
                      f"{v['identical']} of {v['tensors']} written tensors `torch.equal` to its state_dict "
                      f"({v['state_dict_tensors']} tensors); loaded back with `channelcut.hf.load_pretrained` "
                      f"({v['loaded_with']}), logits equal: {v['logits_equal']}.", ""]
        elif v:
            spots = ", ".join(f"`{n}` {'equal' if ok else 'DIFFERENT'}" for n, ok in v["spot_checks"])
            lines += [f"Check (the model does not fit in this machine's memory twice): every written shape equals the "
                      f"model built from the written `config.json` on meta: {v['shapes_match_config']} "
                      f"({v['tensors']} tensors); tensors read back against the source sliced here by `index_select` with "
                      f"the plan's kept indices: {spots}; the kept MLP channels of layer 0 are exactly those not "
                      f"requested: {v['kept_is_complement_of_request']}.", ""]
        if r.get("plans"):
            lines += ["Planning only, on meta (build the model on meta, `compute`, apply the spec to the meta model), "
                      "each in a fresh process, same request pattern:", "",
                      "| shape | parameters after | request pairs | plan | peak RSS growth |", "|---|---|---|---|---|"]
            for shape, p in r["plans"].items():
                lines.append(f"| {shape} | {p['params_after'] / 1e9:.1f} B | {p['pairs']} | {p['plan_s']:.1f} s | {p['rss_growth_mb'] / 1024:.2f} GB |")
            lines.append("")
    lines += [
        "## Notes",
        "",
        "- **Memory while writing** is one source tensor (read into one reused buffer) and its slice: at most about "
        "twice the largest tensor that has to be sliced in memory, plus a constant. Tensors the plan leaves alone "
        "(the 1 GB embedding of 8B) and tensors it only keeps rows of (gate/up projections) are copied by the kernel "
        "and never enter the process. Reading goes through `preadv` into that buffer, not through "
        "`safetensors.safe_open(...).get_tensor`, whose tensors are backed by a memory map: their pages count as "
        "resident until the file is closed, a whole 5 GB shard by its end.",
        "- **Memory while planning** is the plan itself (the traced graph and the spec), which grows with layers "
        "times widths, not with the weights: the planning-only table above.",
        "- **Time**: on 8B the write is disk-bound and within a few seconds of the copy; the rest is the plan. On a "
        "checkpoint of under a GB the fixed costs (the plan, a fresh process's first calls) dominate a sub-second "
        "copy. Imports (torch, transformers and its Llama module) are outside the timings.",
        "- **What loads the result**: one width per field for every layer writes the pruned `config.json`, and "
        "`AutoModelForCausalLM.from_pretrained` loads it. Per-layer widths: transformers 5.25 has "
        "`config.per_layer_config`, but Llama's (Mistral's, Qwen2's) modeling code refuses per-layer attributes, "
        "and LlamaConfig refuses a head count that does not divide `hidden_size` even with `head_dim` set; those "
        "results keep the source `config.json` (with a `channelcut` entry pointing at `plan.json`), "
        "`from_pretrained` stops with a size-mismatch error, and `channelcut.hf.load_pretrained` builds the model "
        "on meta, applies the plan there and assigns the saved tensors (`--hetero` above, and "
        "`tests/test_hf_stream.py`, which also checks that `generate()` gives the tokens of the in-memory export).",
        "",
    ]
    return "\n".join(lines)


def write_md(md: Path, text: str) -> None:
    """Write ``md``, keeping the section ``benchmarks/llm_quality.py`` writes
    (between its ``<!-- quality -->`` markers)."""
    begin, end = "<!-- quality -->", "<!-- /quality -->"
    old = md.read_text() if md.exists() else ""
    if begin in old and end in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index(begin): old.index(end) + len(end)]
    md.write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=[s for s in SHAPES if s in ("small", "8b")], default="small")
    ap.add_argument("--dir", default="/tmp/channelcut-llm", help="where the random checkpoint (and the copies) go")
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoint for a later run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hetero", action="store_true", help="a different MLP width in every layer")
    ap.add_argument("--verify", choices=["full", "shapes", "none"], default=None)
    ap.add_argument("--plan-shapes", default="", help="comma-separated shapes to plan on meta only, e.g. 8b,70b,405b")
    ap.add_argument("--out", default=str(ROOT / "docs" / "llm.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "llm.md"))
    ap.add_argument("--report-only", action="store_true", help="redraw --md from --out")
    ap.add_argument("--child-prune", nargs=4, metavar=("SRC", "DST", "SHAPE", "SEED"))
    ap.add_argument("--child-plan", nargs=2, metavar=("SHAPE", "SEED"))
    args = ap.parse_args()
    if args.child_prune:
        src, dst, shape, seed = args.child_prune
        return child_prune(src, dst, shape, int(seed), args.hetero)
    if args.child_plan:
        return child_plan(args.child_plan[0], int(args.child_plan[1]))
    if args.report_only:
        write_md(Path(args.md), render(json.loads(Path(args.out).read_text())))
        return print(f"wrote {args.md}")

    started = time.time()
    base = Path(args.dir)
    src = base / f"llama-{args.shape}"
    shutil.rmtree(base / "work", ignore_errors=True)
    work = base / "work"
    work.mkdir(parents=True)
    load1 = os.getloadavg()[0]
    print(f"checkpoint {src} ...", flush=True)
    ckpt = write_checkpoint(src, args.shape, args.seed)
    print(f"  {ckpt['bytes'] / 1e9:.2f} GB in {ckpt['files']} shard(s), largest tensor {ckpt['largest_tensor_bytes'] / 2**20:.0f} MiB", flush=True)
    result: Dict[str, Any] = {"checkpoint": ckpt}
    result["side_by_side"] = sbs = side_by_side(src, work, args.shape, args.seed, args.hetero, args.repeats)
    print(f"copy {sbs['copy_median_s']:.1f} s, prune_pretrained {sbs['prune_median_s']:.1f} s ({sbs['ratio']:.2f}x)", flush=True)
    dst = work / f"prune-{args.repeats - 1}"
    verify = args.verify or ("full" if args.shape == "small" else "shapes")
    if verify == "full":
        result["verify"] = verify_full(src, dst, args.shape, args.seed, args.hetero)
    elif verify == "shapes":
        result["verify"] = verify_shapes(src, dst, args.shape, args.seed)
    print(f"verify ({verify}): {result.get('verify')}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    plans = {}
    for shape in [s for s in args.plan_shapes.split(",") if s]:
        plans[shape] = _run_child(["--child-plan", shape, str(args.seed)])
        print(f"plan {shape} on meta: {plans[shape]['plan_s']:.1f} s, peak RSS +{plans[shape]['rss_growth_mb']:.0f} MB", flush=True)
    result["plans"] = plans
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
    result["run"] = {
        "command": "python benchmarks/llm_scale.py " + " ".join(sys.argv[1:]),
        "hetero": args.hetero, "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": _versions(), "commit": _commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "minutes": (time.time() - started) / 60, "load_start": load1, "load_end": os.getloadavg()[0],
        "disk": _disk(base),
    }
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    old[args.shape + ("-hetero" if args.hetero else "")] = result
    out.write_text(json.dumps(old, indent=1) + "\n")
    write_md(Path(args.md), render(old))
    print(f"wrote {out} and {args.md}")


def _versions() -> str:
    import safetensors
    import transformers

    return f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, safetensors {safetensors.__version__}"


def _commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def _disk(path: Path) -> str:
    try:
        r = subprocess.run(["df", "-h", str(path)], capture_output=True, text=True)
        return r.stdout.strip().splitlines()[-1]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    main()
