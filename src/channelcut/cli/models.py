"""Building the model a command works on: ``MODEL`` names, ``--model-kwargs``,
``--weights``, ``--input-shape``, and the defaults a saved plan records.

Start at :func:`model_from_args`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..io import read_plan
from .common import EXIT_USAGE, CLIError


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


def model_kwargs(text: Optional[str]) -> Dict[str, Any]:
    """The ``--model-kwargs`` JSON object (``{}`` when not given)."""
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
    """Build ``name`` (see :mod:`channelcut.cli`) with random weights.

    Returns the model (in eval mode) and facts about it: ``source``
    (torchvision / timm / factory) and, where the library says so,
    ``input_shape``.
    """
    kwargs = dict(kwargs or {})
    info: Dict[str, Any] = {"model": name}
    if ":" in name and not name.startswith(("timm:", "torchvision:")):
        model = _factory_model(name, kwargs)
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
            close = difflib.get_close_matches(bare, _known_names(), n=3, cutoff=0.6)
            raise CLIError(
                f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""),
                EXIT_USAGE,
                "give a torchvision model name (e.g. resnet50), timm:NAME, or package.module:factory",
            )
    if not isinstance(model, nn.Module):
        raise CLIError(f"{name!r} built a {type(model).__name__}, not a torch.nn.Module", EXIT_USAGE)
    info.setdefault("input_shape", [1, 3, 224, 224])
    return model.eval(), info


def _factory_model(name: str, kwargs: Dict[str, Any]) -> Any:
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
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CLIError(f"{name!r} is not callable", EXIT_USAGE, "MODEL as package.module:factory must name a function or class")
    try:
        return obj(**kwargs)
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


def model_from_args(args: argparse.Namespace) -> Tuple[nn.Module, Dict[str, Any], List[torch.Tensor]]:
    """The model ``args`` describe (seeded, ``--weights`` loaded), facts about it
    (``info``: ``input_shape``, ``model_kwargs``, ``source``) and random example
    inputs, checked by one forward call."""
    torch.manual_seed(args.seed)
    model, info = build_model(args.model, model_kwargs(args.model_kwargs))
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
    info["model_kwargs"] = model_kwargs(args.model_kwargs)
    return model, info, inputs


def defaults_from_plan(args: argparse.Namespace, saved: Path) -> Dict[str, Any]:
    """Read the plan in ``saved`` and fill ``--model-kwargs`` and ``--input-shape``
    from its metadata where they were not given; returns the metadata."""
    meta = read_plan(saved).get("metadata") or {}
    if args.model_kwargs is None and meta.get("model_kwargs"):
        args.model_kwargs = json.dumps(meta["model_kwargs"])
    if args.input_shape is None and meta.get("input_shape"):
        args.input_shape = [",".join(str(d) for d in s) for s in meta["input_shape"]]
    return meta
