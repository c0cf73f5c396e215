"""The ``channelcut`` command line. Start at :func:`main`.

Commands (``channelcut <command> --help`` for options)::

    channelcut prune MODEL --amount 0.3 --heuristic l1 [--constrained] --out DIR
    channelcut inspect MODEL
    channelcut bench MODEL_OR_SAVED
    channelcut export SAVED --format onnx --out model.onnx  (or --check)
    channelcut demo

``MODEL`` is a torchvision model name (``resnet50``), a timm model name
(``timm:resnet50`` or a plain name torchvision does not know), or
``package.module:factory`` (a function building the model, called with the
``--model-kwargs`` JSON object as keyword arguments). Models are built with
random weights unless ``--weights FILE`` (a state_dict) is given.
``MODEL_OR_SAVED`` may also be a directory written by ``channelcut prune``.

Every command prints a readable table, or one JSON object with ``--json``;
progress goes to stderr. Exit codes: 0 success, 1 failure (the export or a
check failed), 2 usage error (bad arguments, unknown model, bad shape).

Each command is an object with ``add_arguments(parser)`` and ``run(args) -> int``
listed in :data:`SUBCOMMANDS`; ``demo`` lives in :mod:`channelcut.demo`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import ChannelcutError

__all__ = ["main", "build_parser", "build_model", "parse_shape", "CLIError", "SUBCOMMANDS"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
HEURISTICS = ("l1", "l2", "lamp", "fpgm", "bnscale", "hrank")


class CLIError(Exception):
    """An error the command line reports in one line (plus a hint) and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


# ----------------------------------------------------------------------------
# models and inputs
# ----------------------------------------------------------------------------
def parse_shape(text: str) -> Tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``.

    >>> parse_shape("1,3,32,32")
    (1, 3, 32, 32)
    """
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise CLIError(f"bad input shape {text!r}", EXIT_USAGE, "write it as comma-separated positive sizes, e.g. --input-shape 1,3,224,224")
    return shape


def _model_kwargs(text: Optional[str]) -> Dict[str, Any]:
    if not text:
        return {}
    try:
        kw = json.loads(text)
    except ValueError as exc:
        raise CLIError(f"--model-kwargs is not valid JSON: {exc}", EXIT_USAGE, "e.g. --model-kwargs '{\"num_classes\": 10}'") from exc
    if not isinstance(kw, dict):
        raise CLIError("--model-kwargs must be a JSON object", EXIT_USAGE, "e.g. --model-kwargs '{\"num_classes\": 10}'")
    return kw


def build_model(name: str, kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build ``name`` (see the module docstring) with random weights.

    Returns the model (in eval mode) and facts about it: ``source``
    (torchvision / timm / factory) and, where the library says so,
    ``input_shape``.
    """
    kwargs = dict(kwargs or {})
    info: Dict[str, Any] = {"model": name}
    if ":" in name and not name.startswith(("timm:", "torchvision:")):
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CLIError(f"cannot import {module_name!r}: {exc}", EXIT_USAGE, "MODEL as package.module:factory needs the module on PYTHONPATH") from exc
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise CLIError(f"{module_name!r} has no attribute {attr!r}", EXIT_USAGE, "check the factory's name")
            obj = getattr(obj, part)
        model = _call_factory(obj, kwargs, name)
        info["source"] = "factory"
    else:
        lib, _, bare = name.rpartition(":")
        model = None
        if lib in ("", "torchvision"):
            model = _torchvision_model(bare, kwargs, required=lib == "torchvision")
            info["source"] = "torchvision"
        if model is None:
            model, shape = _timm_model(bare, kwargs, required=lib == "timm")
            info["source"] = "timm"
            if shape:
                info["input_shape"] = shape
        if model is None:
            known = _known_names()
            close = difflib.get_close_matches(bare, known, n=3, cutoff=0.6)
            raise CLIError(
                f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""),
                EXIT_USAGE,
                "give a torchvision model name (e.g. resnet50), timm:NAME, or package.module:factory",
            )
    if not isinstance(model, nn.Module):
        raise CLIError(f"{name!r} built a {type(model).__name__}, not a torch.nn.Module", EXIT_USAGE)
    info.setdefault("input_shape", [1, 3, 224, 224])
    return model.eval(), info


def _call_factory(fn: Any, kwargs: Dict[str, Any], name: str) -> Any:
    if isinstance(fn, nn.Module):
        return fn
    if not callable(fn):
        raise CLIError(f"{name!r} is not callable", EXIT_USAGE, "MODEL as package.module:factory must name a function or class")
    try:
        return fn(**kwargs)
    except TypeError as exc:
        raise CLIError(f"calling {name} failed: {exc}", EXIT_USAGE, "check --model-kwargs") from exc


def _torchvision_model(name: str, kwargs: Dict[str, Any], required: bool) -> Optional[nn.Module]:
    try:
        import torchvision
    except ImportError:
        if required:
            raise CLIError("torchvision is not installed", EXIT_USAGE, "pip install torchvision") from None
        return None
    if name not in torchvision.models.list_models():
        if required:
            close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3, cutoff=0.6)
            raise CLIError(f"torchvision has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""), EXIT_USAGE)
        return None
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as exc:
        raise CLIError(f"building torchvision {name} failed: {exc}", EXIT_USAGE, "check --model-kwargs") from exc


def _timm_model(name: str, kwargs: Dict[str, Any], required: bool) -> Tuple[Optional[nn.Module], Optional[List[int]]]:
    try:
        import timm
    except ImportError:
        if required:
            raise CLIError("timm is not installed", EXIT_USAGE, "pip install timm") from None
        return None, None
    if not timm.is_model(name):
        if required:
            raise CLIError(f"timm has no model {name!r}", EXIT_USAGE, "see timm.list_models()")
        return None, None
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise CLIError(f"building timm {name} failed: {exc}", EXIT_USAGE, "check --model-kwargs") from exc
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    return model, ([1, *size] if size else None)


def _known_names() -> List[str]:
    names: List[str] = []
    with contextlib.suppress(ImportError):
        import torchvision

        names += torchvision.models.list_models()
    return names


def _load_weights(model: nn.Module, path: Optional[str]) -> None:
    if not path:
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"cannot read --weights {path}: {exc}", EXIT_USAGE, "pass a state_dict saved with torch.save(model.state_dict(), path)") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise CLIError(f"--weights {path} does not fit the model: {exc}", EXIT_USAGE, "build the model with the same arguments (--model-kwargs)") from exc


def _inputs(args: argparse.Namespace, info: Dict[str, Any]) -> List[torch.Tensor]:
    shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else [tuple(info["input_shape"])]
    gen = torch.Generator().manual_seed(args.seed)
    return [torch.rand(*s, generator=gen) for s in shapes]


def _model_from_args(args: argparse.Namespace) -> Tuple[nn.Module, Dict[str, Any], List[torch.Tensor]]:
    torch.manual_seed(args.seed)
    model, info = build_model(args.model, _model_kwargs(args.model_kwargs))
    _load_weights(model, getattr(args, "weights", None))
    inputs = _inputs(args, info)
    info["input_shape"] = [list(x.shape) for x in inputs]
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CLIError(
            f"{args.model} does not run on random inputs of shape {info['input_shape']}: {type(exc).__name__}: {first}",
            EXIT_USAGE,
            "check --input-shape (batch, channels, height, width), e.g. --input-shape 1,3,224,224",
        ) from exc
    info["model_kwargs"] = _model_kwargs(args.model_kwargs)
    return model, info, inputs


# ----------------------------------------------------------------------------
# progress and tables
# ----------------------------------------------------------------------------
class Progress:
    """One line per step on stderr (a tqdm bar when tqdm is installed and
    stderr is a terminal); silent when disabled."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = total
        self.done = 0
        self.bar = None
        self.times: Dict[str, float] = {}
        if enabled and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, leave=False, bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}]")

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(what)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[what] = time.perf_counter() - start
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned.

    >>> print(format_table(["layer", "in"], [["conv1", 64], ["fc", 512]]))
    layer   in
    -----  ---
    conv1   64
    fc     512
    """
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _emit(args: argparse.Namespace, report: Dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(text)


def _fmt_int(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.1%}" if a is not None and b else "-"


# ----------------------------------------------------------------------------
# choosing channels
# ----------------------------------------------------------------------------
def choose_channels(
    model: nn.Module, inputs: List[torch.Tensor], amount: float, heuristic: str, constrained: bool
) -> Tuple[List[Tuple[str, int]], str]:
    """``(weight name, input channel)`` pairs to prune, and how they were chosen.

    Uses :mod:`channelcut.importance` with :class:`channelcut.MaskingManager`
    when they are available, else a local L1 magnitude choice (only ``l1``).
    """
    try:
        imp: Any = importlib.import_module("channelcut.importance")
        MaskingManager = importlib.import_module("channelcut.masking").MaskingManager
    except (ImportError, AttributeError):
        imp = None
    if imp is not None:
        classes = {"l1": "L1", "l2": "L2", "lamp": "LAMP", "fpgm": "FPGM", "bnscale": "BNScale", "hrank": "HRank"}
        cls = getattr(imp, classes[heuristic], None)
        if cls is not None:
            mm = MaskingManager(model, inputs).importance(cls())
            pairs = mm.select(amount, mode="constrained" if constrained else "unconstrained")
            return list(pairs), f"{cls.__name__} via channelcut.importance"
    if heuristic != "l1":
        raise CLIError(f"heuristic {heuristic!r} needs channelcut.importance, which is not available here", EXIT_USAGE, "use --heuristic l1")
    return _local_l1(model, inputs, amount), "L1 magnitude of consumer input columns (local fallback)"


def _local_l1(model: nn.Module, inputs: List[torch.Tensor], amount: float) -> List[Tuple[str, int]]:
    """Per consumer, the ``amount`` fraction of input channels with the smallest
    L1 weight column (dense layers only; grouped convs are left alone)."""
    from .pruning import PruningManager

    probe = PruningManager(model)
    probe.trace(inputs)
    params = dict(model.named_parameters())
    out: List[Tuple[str, int]] = []
    for name, n in probe.consumers().items():
        w = params.get(name)
        if w is None or w.dim() < 2 or w.shape[1] != n or n < 2:
            continue
        k = min(int(math.floor(n * amount)), n - 1)
        if k <= 0:
            continue
        score = w.detach().abs().transpose(0, 1).reshape(n, -1).sum(1)
        out += [(name, int(c)) for c in torch.argsort(score, stable=True)[:k].tolist()]
    return out


# ----------------------------------------------------------------------------
# prune
# ----------------------------------------------------------------------------
class PruneCommand:
    """``channelcut prune``: choose channels, export, verify, save."""

    help = "prune a model and save it (weights + plan) to a directory"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        _model_arguments(p)
        p.add_argument("--amount", type=float, default=0.3, help="fraction of each layer's input channels to remove, in [0, 1) (default 0.3)")
        p.add_argument("--heuristic", default="l1", type=str.lower, choices=HEURISTICS, help="channel importance (default l1)")
        p.add_argument("--constrained", action="store_true", help="constrained export: whole channel groups, no copies at inference")
        p.add_argument("--out", required=True, help="directory to write (plan.json, weights, report.json)")
        p.add_argument("--no-verify", action="store_true", help="skip comparing the pruned model with the mock model")
        _output_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .io import save
        from .pruning import PruningManager
        from .stats import count_macs, count_parameters

        if not 0.0 <= args.amount < 1.0:
            raise CLIError(f"--amount must be in [0, 1), got {args.amount}", EXIT_USAGE)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out} exists and is not a directory", EXIT_USAGE, "choose a new directory name")
        progress = Progress(6, enabled=not args.quiet)
        with progress.step(f"building {args.model}"):
            model, info, inputs = _model_from_args(args)
            params_before = count_parameters(model)
            macs_before = count_macs(model, inputs)
        with progress.step(f"choosing {args.amount:.0%} of channels ({args.heuristic})"):
            pairs, how = choose_channels(model, inputs, args.amount, args.heuristic, args.constrained)
        manager = PruningManager(model)
        with progress.step("tracing and resolving the export"):
            manager.compute(inputs, pruned_inputs=pairs, constrained=args.constrained)
        with progress.step("pruning" + ("" if args.no_verify else " and verifying against the mock")):
            manager.prune(verify=not args.no_verify)
        with progress.step("measuring"):
            params_after = count_parameters(model)
            macs_after = count_macs(model, inputs)
        spec = manager.spec
        assert spec is not None
        metadata = {
            "model": args.model,
            "model_kwargs": info["model_kwargs"],
            "input_shape": info["input_shape"],
            "amount": args.amount,
            "heuristic": args.heuristic,
            "constrained": bool(args.constrained),
            "weights": args.weights,
            "seed": args.seed,
        }
        with progress.step(f"saving to {out}"):
            save(model, out, manager=manager, metadata=metadata)
        progress.close()
        report = {
            "command": "prune",
            "model": args.model,
            "out": str(out),
            "mode": spec.mode,
            "heuristic": how,
            "requested_channels": len(pairs),
            "params": {"before": params_before, "after": params_after},
            "macs": {"before": macs_before, "after": macs_after},
            "removed_channel_groups": spec.removed_groups,
            "total_channel_groups": spec.total_groups,
            "subselections": {"views": spec.view_ops, "copies": spec.copy_ops},
            "copied_channels_per_inference": spec.copied_channels,
            "verified": not args.no_verify,
            "layers": [{"name": p.name, "kind": p.kind, "out_before": p.before, "out_after": p.after} for p in spec.producers],
            "seconds": {k: round(v, 3) for k, v in progress.times.items()},
        }
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        changed = [p for p in spec.producers if p.after != p.before]
        rows = [[p.name, p.kind, p.before, p.after, _ratio(p.after, p.before)] for p in changed[: args.max_rows]]
        text = "\n".join(
            [
                f"pruned {args.model} ({spec.mode}, {how}): saved to {out}",
                "",
                format_table(
                    ["", "before", "after", "kept"],
                    [
                        ["parameters", _fmt_int(params_before), _fmt_int(params_after), _ratio(params_after, params_before)],
                        ["MACs", _fmt_int(macs_before), _fmt_int(macs_after), _ratio(macs_after, macs_before)],
                    ],
                ),
                "",
                f"channel groups removed: {spec.removed_groups} of {spec.total_groups}; consumers reading a subset: "
                f"{spec.view_ops} views, {spec.copy_ops} copies ({spec.copied_channels} channels copied per inference)",
                "" if args.no_verify else "verified: the pruned model computes what the mock (masked) model computes",
                "",
                format_table(["layer (producer)", "kind", "out before", "out after", "kept"], rows)
                + (f"\n... {len(changed) - args.max_rows} more (see report.json)" if len(changed) > args.max_rows else ""),
                "",
                f"load it with: channelcut.load({str(out)!r}, <the unpruned model>)",
            ]
        )
        _emit(args, report, text)
        return EXIT_OK


# ----------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------
class InspectCommand:
    """``channelcut inspect``: what can be pruned, and what stops the rest."""

    help = "show producers, consumers, channel groups, barrier ops and how much is prunable"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        _model_arguments(p)
        _output_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .pruning import PruningManager

        progress = Progress(2, enabled=not args.quiet)
        with progress.step(f"building {args.model}"):
            model, info, inputs = _model_from_args(args)
        manager = PruningManager(model)
        with progress.step("tracing"):
            graph = manager.trace(inputs)
        progress.close()
        consumers = manager.consumers()
        producers = manager.producers()
        groups = manager.channel_groups()
        pinned = [g for g in groups if g.pinned]
        reasons: Dict[str, int] = {}
        for g in pinned:
            key = str(g.pinned)
            reasons[key] = reasons.get(key, 0) + 1
        prunable_in: Dict[str, int] = {name: 0 for name in consumers}
        for g in groups:
            if g.pinned is None:
                for name, _ in g.consumers:
                    prunable_in[name] = prunable_in.get(name, 0) + 1
        prunable_out: Dict[str, int] = {name: 0 for name in producers}
        for g in groups:
            if g.pinned is None:
                for name, _ in g.producers:
                    prunable_out[name] = prunable_out.get(name, 0) + 1
        barriers: Dict[Tuple[str, str, str], int] = {}
        for func, module, reason in graph.barriers:
            key = (func, module or "<model>", reason)
            barriers[key] = barriers.get(key, 0) + 1
        kinds = {c.param: c.kind for c in graph.consumers.values()}
        pkinds = {p.param: p.kind for p in graph.producers.values() if p.param}
        total_in = sum(consumers.values())
        total_prunable_in = sum(prunable_in.values())
        total_out = sum(producers.values())
        total_prunable_out = sum(prunable_out.values())
        removable_groups = len(groups) - len(pinned)
        report = {
            "command": "inspect",
            "model": args.model,
            "input_shape": info["input_shape"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "producers": len(producers),
            "consumers": len(consumers),
            "channel_groups": len(groups),
            "pinned_channel_groups": len(pinned),
            "removable_channel_groups": removable_groups,
            "pinned_reasons": reasons,
            "consumer_input_channels": total_in,
            "prunable_consumer_input_channels": total_prunable_in,
            "prunable_fraction": total_prunable_in / total_in if total_in else 0.0,
            "producer_output_channels": total_out,
            "prunable_producer_output_channels": total_prunable_out,
            "barriers": [{"op": k[0], "module": k[1], "reason": k[2], "count": n} for k, n in barriers.items()],
            "layers": [
                {
                    "name": name,
                    "kind": kinds.get(name, pkinds.get(name, "?")),
                    "in": consumers.get(name),
                    "prunable_in": prunable_in.get(name),
                    "out": producers.get(name),
                    "prunable_out": prunable_out.get(name),
                }
                for name in list(dict.fromkeys(list(producers) + list(consumers)))
            ],
        }
        rows = [
            [l["name"], l["kind"], _cell(l["in"]), _cell(l["prunable_in"]), _cell(l["out"]), _cell(l["prunable_out"])]
            for l in report["layers"][: args.max_rows]
        ]
        more = len(report["layers"]) - args.max_rows
        lines = [
            f"{args.model}: {len(producers)} producers, {len(consumers)} consumers, input {info['input_shape']}",
            f"channel groups: {len(groups)} ({removable_groups} removable, {len(pinned)} pinned)",
            f"prunable: {total_prunable_in} of {total_in} consumer input channels ({report['prunable_fraction']:.1%}), "
            f"{total_prunable_out} of {total_out} producer output channels",
            "",
            format_table(["layer", "kind", "in", "prunable in", "out", "prunable out"], rows)
            + (f"\n... {more} more layers (--max-rows, or --json for all)" if more > 0 else ""),
        ]
        if reasons:
            lines += ["", "why channels are pinned (channel groups):"]
            lines += [f"  {n:>6}  {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:15]]
        if barriers:
            lines += ["", "barrier ops (no rule: channels around them are kept):"]
            lines += [f"  {n:>3}x {op} in {module}: {reason}" for (op, module, reason), n in list(barriers.items())[:20]]
        else:
            lines += ["", "barrier ops: none (the tracer understood every op)"]
        _emit(args, report, "\n".join(lines))
        return EXIT_OK


def _cell(v: Optional[int]) -> str:
    return "-" if v is None else str(v)


# ----------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------
class BenchCommand:
    """``channelcut bench``: dense vs pruned size, MACs, latency and copies."""

    help = "compare a dense model with its pruned version: params, MACs, latency, copies"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL_OR_SAVED", help="model name (pruned here first) or a directory written by 'channelcut prune'")
        p.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for the model builder")
        p.add_argument("--weights", default=None, help="state_dict file to load into the dense model")
        p.add_argument("--input-shape", action="append", default=None, help="input shape, e.g. 1,3,224,224 (repeat for several inputs)")
        p.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
        p.add_argument("--amount", type=float, default=0.3, help="when MODEL is a name: fraction to prune (default 0.3)")
        p.add_argument("--heuristic", default="l1", type=str.lower, choices=HEURISTICS, help="when MODEL is a name: heuristic (default l1)")
        p.add_argument("--constrained", action="store_true", help="when MODEL is a name: constrained export")
        p.add_argument("--repeats", type=int, default=20, help="timed calls per model (default 20)")
        p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
        p.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
        _output_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .io import load, read_plan
        from .pruning import PruningManager
        from .pruning.modules import subselection_of
        from .stats import compare_latency, count_macs, count_parameters

        if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
            raise CLIError("--repeats and --threads must be >= 1, --warmup >= 0", EXIT_USAGE)
        saved = Path(args.model)
        progress = Progress(3 if saved.is_dir() else 4, enabled=not args.quiet)
        if saved.is_dir():
            plan = read_plan(saved)
            meta = plan.get("metadata") or {}
            if "model" not in meta:
                raise CLIError(f"{saved} does not say which model it was pruned from", EXIT_USAGE, "it was not written by 'channelcut prune'")
            args.model = meta["model"]
            if args.model_kwargs is None and meta.get("model_kwargs"):
                args.model_kwargs = json.dumps(meta["model_kwargs"])
            if args.input_shape is None and meta.get("input_shape"):
                args.input_shape = [",".join(str(d) for d in s) for s in meta["input_shape"]]
            if args.weights is None:
                args.weights = meta.get("weights")
            with progress.step(f"building {args.model} and loading {saved}"):
                dense, info, inputs = _model_from_args(args)
                pruned, _, _ = _model_from_args(args)
                pruned = load(saved, pruned).eval()
            source = str(saved)
        else:
            if not 0.0 <= args.amount < 1.0:
                raise CLIError(f"--amount must be in [0, 1), got {args.amount}", EXIT_USAGE)
            with progress.step(f"building {args.model}"):
                dense, info, inputs = _model_from_args(args)
                pruned, _, _ = _model_from_args(args)
            with progress.step(f"pruning {args.amount:.0%} ({args.heuristic})"):
                pairs, _ = choose_channels(pruned, inputs, args.amount, args.heuristic, args.constrained)
                PruningManager(pruned).compute(inputs, pruned_inputs=pairs, constrained=args.constrained).prune()
            source = f"{args.model} pruned here ({args.amount:.0%}, {args.heuristic}{', constrained' if args.constrained else ''})"
        with progress.step("counting parameters and MACs"):
            params = {"dense": count_parameters(dense), "pruned": count_parameters(pruned)}
            macs = {"dense": count_macs(dense, inputs), "pruned": count_macs(pruned, inputs)}
        with progress.step(f"timing 2 models x {args.repeats} calls, {args.threads} thread(s)"):
            latency = compare_latency({"dense": dense, "pruned": pruned}, inputs, repeats=args.repeats, warmup=args.warmup, threads=args.threads)
        progress.close()
        gathers = [s for _, m in pruned.named_modules() if (s := subselection_of(m)) is not None]
        copied = sum(len(s["indices"]) for s in gathers if not s["contiguous"])
        speedup = latency["dense"]["median_ms"] / latency["pruned"]["median_ms"] if latency["pruned"]["median_ms"] > 0 else float("nan")
        report = {
            "command": "bench",
            "source": source,
            "model": args.model,
            "input_shape": info["input_shape"],
            "threads": args.threads,
            "repeats": args.repeats,
            "params": params,
            "macs": macs,
            "latency_ms": latency,
            "speedup": speedup,
            "subselections": {"views": sum(s["contiguous"] for s in gathers), "copies": sum(not s["contiguous"] for s in gathers)},
            "copied_channels_per_inference": copied,
        }
        rows = [
            ["parameters", _fmt_int(params["dense"]), _fmt_int(params["pruned"]), _ratio(params["pruned"], params["dense"])],
            ["MACs", _fmt_int(macs["dense"]), _fmt_int(macs["pruned"]), _ratio(macs["pruned"], macs["dense"])],
            [
                "latency median (ms)",
                f"{latency['dense']['median_ms']:.2f}",
                f"{latency['pruned']['median_ms']:.2f}",
                _ratio(latency["pruned"]["median_ms"], latency["dense"]["median_ms"]),
            ],
            [
                "latency p10-p90 (ms)",
                f"{latency['dense']['p10_ms']:.2f}-{latency['dense']['p90_ms']:.2f}",
                f"{latency['pruned']['p10_ms']:.2f}-{latency['pruned']['p90_ms']:.2f}",
                "",
            ],
            ["channels copied / inference", "0", str(copied), ""],
        ]
        text = "\n".join(
            [
                f"bench: {source}; input {info['input_shape']}, {args.threads} thread(s), median of {args.repeats} interleaved calls",
                "",
                format_table(["", "dense", "pruned", "pruned/dense"], rows),
                "",
                f"speed-up: {speedup:.2f}x",
            ]
        )
        _emit(args, report, text)
        return EXIT_OK


# ----------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------
class ExportCommand:
    """``channelcut export``: a saved pruned model to ONNX / TorchScript / .pt2, checked."""

    help = "export a saved pruned model to ONNX, TorchScript or torch.export (.pt2), or check every exporter"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("saved", metavar="SAVED", help="a directory written by 'channelcut prune' (or channelcut.save with metadata 'model')")
        p.add_argument("--format", choices=("onnx", "torchscript", "pt2"), default=None, help="what to write to --out")
        p.add_argument("--out", default=None, help="file to write")
        p.add_argument("--check", action="store_true", help="run every exporter (and torch.compile) and compare with the eager model")
        p.add_argument("--no-verify", action="store_true", help="write --out without comparing it with the eager model")
        p.add_argument("--model", default=None, help="MODEL to build (default: the one recorded in the plan)")
        p.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for the model builder")
        p.add_argument("--input-shape", action="append", default=None, help="example input shape (default: the one recorded in the plan)")
        p.add_argument("--seed", type=int, default=0, help="seed for the example inputs (default 0)")
        _output_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from . import export as ex
        from .io import load, read_plan

        if args.format is None and not args.check:
            raise CLIError("nothing to do", EXIT_USAGE, "pass --format onnx|torchscript|pt2 with --out FILE, and/or --check")
        if args.format is not None and not args.out:
            raise CLIError(f"--format {args.format} needs --out FILE", EXIT_USAGE)
        saved = Path(args.saved)
        plan = read_plan(saved)
        meta = plan.get("metadata") or {}
        args.model = args.model or meta.get("model")
        if not args.model:
            raise CLIError(f"{saved} does not say which model it was pruned from", EXIT_USAGE, "pass --model MODEL")
        if args.model_kwargs is None and meta.get("model_kwargs"):
            args.model_kwargs = json.dumps(meta["model_kwargs"])
        if args.input_shape is None and meta.get("input_shape"):
            args.input_shape = [",".join(str(d) for d in s) for s in meta["input_shape"]]
        args.weights = None
        progress = Progress(1 + bool(args.format) + bool(args.check), enabled=not args.quiet)
        with progress.step(f"building {args.model} and loading {saved}"):
            model, info, inputs = _model_from_args(args)
            model = load(saved, model).eval()
        report: Dict[str, Any] = {"command": "export", "saved": str(saved), "input_shape": info["input_shape"]}
        lines: List[str] = []
        failed = False
        if args.format:
            with progress.step(f"writing {args.format} to {args.out}"):
                verify = not args.no_verify
                if args.format == "onnx":
                    ex.to_onnx(model, inputs, args.out, verify=verify)
                elif args.format == "torchscript":
                    ex.to_torchscript(model, inputs, args.out, verify=verify)
                else:
                    ex.to_exported_program(model, inputs, args.out, verify=verify)
            report["written"] = {"format": args.format, "path": args.out, "verified": verify}
            lines.append(f"wrote {args.out} ({args.format})" + (", verified against the eager model" if verify else ""))
        if args.check:
            with progress.step("checking every exporter"):
                results = ex.check_backends(model, inputs, backends=list(ex.BACKENDS))
            report["backends"] = [vars(r) for r in results]
            failed = not all(r.ok for r in results)
            rows = [
                [r.backend, "ok" if r.ok else "FAILED", "-" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}", f"{r.seconds:.1f}", r.error or ""]
                for r in results
            ]
            lines += ["", format_table(["backend", "result", "max rel diff", "s", "error"], rows)]
        progress.close()
        _emit(args, report, "\n".join(lines).strip())
        return EXIT_FAILURE if failed else EXIT_OK


# ----------------------------------------------------------------------------
# shared options, registry, main
# ----------------------------------------------------------------------------
def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="torchvision name (resnet50), timm:NAME, or package.module:factory")
    p.add_argument("--model-kwargs", default=None, help='JSON keyword arguments for the model builder, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--weights", default=None, help="state_dict file to load before pruning (default: random weights)")
    p.add_argument("--input-shape", action="append", default=None, help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and example inputs (default 0)")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--max-rows", type=int, default=30, help="rows shown in tables (default 30)")


# (command, "module" or "module:attribute" providing add_arguments/run, help or None to use its .help)
SUBCOMMANDS: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("prune", "channelcut.cli:PruneCommand", None),
    ("inspect", "channelcut.cli:InspectCommand", None),
    ("bench", "channelcut.cli:BenchCommand", None),
    ("export", "channelcut.cli:ExportCommand", None),
    ("demo", "channelcut.demo", "prune a torchvision resnet three ways and report size, MACs, copies and latency"),
)


def _resolve(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    return getattr(obj, attr) if attr else obj


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nhint: run '{self.prog} --help' for the options\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`SUBCOMMANDS`."""
    from . import __version__

    parser = _Parser(prog="channelcut", description="channelcut: export channel-pruned PyTorch models that are genuinely smaller.")
    parser.add_argument("--version", action="version", version=f"channelcut {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    sub.required = True
    for name, target, help_text in SUBCOMMANDS:
        command = _resolve(target)
        text = help_text or getattr(command, "help", None)
        p = sub.add_parser(name, help=text, description=text)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args._run(args))
    except CLIError as exc:
        _report_error(str(exc), exc.hint)
        return exc.code
    except ChannelcutError as exc:
        _report_error(f"{type(exc).__name__}: {exc}", _hint_for(exc))
        return EXIT_FAILURE
    except ImportError as exc:
        _report_error(str(exc), "install the missing package (pip install 'channelcut[export]' for ONNX)")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _report_error("interrupted", None)
        return 130
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        _report_error(f"{type(exc).__name__}: {exc}", "this looks like a bug or an unsupported model: please report it with the command you ran")
        return EXIT_FAILURE


def _hint_for(exc: ChannelcutError) -> Optional[str]:
    from .errors import ExportError, TracingError
    from .io import PlanError

    if isinstance(exc, TracingError):
        return "check --input-shape: the model must run on a random tensor of that shape"
    if isinstance(exc, ExportError):
        return "try --constrained, a smaller --amount, or report the model"
    if isinstance(exc, PlanError):
        return "pass the directory written by 'channelcut prune' and the same model arguments"
    return None


def _report_error(message: str, hint: Optional[str]) -> None:
    print(f"channelcut: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
