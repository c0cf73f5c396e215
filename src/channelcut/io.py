"""Save and load pruned models. Start at :func:`save` and :func:`load`.

A pruned model no longer fits the class that builds it (its layers are
narrower), so a plain ``state_dict`` can not be loaded back. channelcut saves
two files in a directory instead:

``plan.json``
    the pruning plan, human-readable: for every export step the kept channel
    indices of every parameter it changed (``slices``), the zero columns kept
    (``zeros``), the consumers that read a subset of their input
    (``subselections``), plus the library and format versions, the model
    class and the shape of every tensor of the pruned model.
``weights.safetensors``
    the pruned model's ``state_dict`` (``weights.pt``, written with
    ``torch.save``, when the ``safetensors`` package is not installed).

:func:`load` takes a freshly built, *unpruned* model (or a function that
builds one), re-applies the plan with :func:`channelcut.pruning.pruner.prune_model`
(no tracing, no example inputs), loads the weights and returns the model: it
computes exactly what the saved model computed. If the plan does not fit the
model, a :class:`PlanError` says why and the model is left untouched.

>>> import tempfile, torch
>>> from torch import nn
>>> from channelcut import PruningManager
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
>>> x = torch.rand(1, 3, 8, 8)
>>> _ = PruningManager(net).compute([x], pruned_inputs=[("2.weight", 5)]).prune()
>>> folder = tempfile.mkdtemp()
>>> _ = save(net, folder)
>>> fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> loaded = load(folder, fresh).eval()
>>> loaded[0].out_channels, torch.equal(loaded(x), net(x))
(7, True)

Plain ``torch.save(model)`` / ``torch.load(path, weights_only=False)`` of a
pruned model works as well (its Subselect layers pickle like any module);
:func:`save` is for checkpoints that should not depend on pickled code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import (  # the plan errors live in errors.py; re-exported here for older imports
    ExportError,
    MissingTensorError,
    PlanError,
    PlanFormatError,
    PlanMismatchError,
    StateError,
)
from .pruning.subselect import subselection_of
from .pruning.pruner import Rollback, applied_specs, prune_model
from .pruning.spec import PruningSpec, Subselection
from .moe import remove_experts, removed_experts, split_experts

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PLAN_FILE",
    "PlanError",
    "PlanFormatError",
    "PlanMismatchError",
    "MissingTensorError",
    "save",
    "load",
    "read_plan",
]

FORMAT = "channelcut-pruned-model"
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
SAFETENSORS_FILE = "weights.safetensors"
TORCH_FILE = "weights.pt"

PathLike = Union[str, "os.PathLike[str]"]
ModelOrFactory = Union[nn.Module, Callable[[], nn.Module]]


# ----------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------
def save(
    model: nn.Module,
    path: PathLike,
    spec: Optional[PruningSpec] = None,
    manager: Optional[Any] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Save a (pruned) model as a directory with ``plan.json`` and its weights.

    Args:
        model: the model, typically after ``PruningManager(...).prune()``.
        path: the directory to write (created if needed; channelcut's own files
            in it are replaced, nothing else is touched).
        spec: the :class:`PruningSpec` the model was pruned with. Not needed
            when channelcut pruned (or loaded) this very model object: the
            specs it applied are remembered (also several, in order).
        manager: alternatively, the :class:`~channelcut.PruningManager` that
            pruned the model.
        metadata: extra JSON-serialisable data stored in the plan
            (e.g. ``{"amount": 0.3}``).

    Returns:
        The directory written.

    A model channelcut did not prune here (e.g. a ``copy.deepcopy`` of a
    pruned model) is saved too: its plan then records only the shapes and
    subselections, which is all :func:`load` needs, but not which of the
    original channels were kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save needs a torch.nn.Module, got {type(model).__name__}")
    if manager is not None:
        if spec is not None and spec is not getattr(manager, "spec", None):
            raise ValueError("pass either spec= or manager=, not two different specs")
        spec = getattr(manager, "spec", None)
        if spec is None:
            raise StateError("the manager has no spec yet: call compute(...) and prune() before saving")
        if getattr(manager, "net", None) is model and not getattr(manager, "_pruned", True):
            raise StateError("the manager has not pruned this model yet: call manager.prune() before saving")
    if spec is not None and not isinstance(spec, PruningSpec):
        raise TypeError(f"spec must be a PruningSpec, got {type(spec).__name__}")

    steps = _steps_for(model, spec)
    tensors, aliases = _unique_tensors(model)
    plan: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "channelcut_version": _version(),
        "torch_version": torch.__version__.split("+")[0],
        "model_class": _class_name(model),
        "weights": None,  # filled in below
        "summary": _summary(model, steps),
        "steps": steps,
        "subselections": {name: sel for name, m in model.named_modules() if (sel := subselection_of(m)) is not None},
        "shapes": {name: list(t.shape) for name, t in model.state_dict().items()},
        "aliases": aliases,
        "metadata": dict(metadata or {}),
        # mixture-of-experts blocks -> the original router indices of the experts removed
        "removed_experts": removed_experts(model),
    }
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a directory; channelcut.save writes a directory")
    folder.mkdir(parents=True, exist_ok=True)
    plan["weights"] = _write_weights(folder, tensors)
    text = _dumps(plan) + "\n"
    try:
        json.loads(text)
    except ValueError as exc:  # metadata that is not JSON
        raise TypeError(f"metadata must be JSON-serialisable: {exc}") from exc
    tmp = folder / (PLAN_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / PLAN_FILE)
    return folder


def _steps_for(model: nn.Module, spec: Optional[PruningSpec]) -> List[Dict[str, Any]]:
    history = applied_specs(model)
    if spec is not None:
        idx = next((i for i, a in enumerate(history) if a.spec is spec), None)
        if idx is None:
            _check_spec_fits(model, spec)
            return [_step(spec, None)]
        history = history[: idx + 1]
    return [_step(a.spec, a.shapes_before) for a in history]


def _step(spec: PruningSpec, shapes_before: Optional[Dict[str, Tuple[int, ...]]]) -> Dict[str, Any]:
    d = spec.to_dict()
    d.pop("masks", None)  # the mock's view of the same choice; not needed to re-apply
    d.pop("barriers", None)
    step: Dict[str, Any] = {"mode": d.pop("mode")}
    if shapes_before is not None:
        step["shapes_before"] = {k: list(v) for k, v in shapes_before.items()}
    step.update(d)
    return step


def _check_spec_fits(model: nn.Module, spec: PruningSpec) -> None:
    """A spec passed by hand must describe this pruned model's shapes."""
    tensors = _named_tensors(model)
    for name, dims in spec.slices.items():
        t = tensors.get(name)
        if t is None:
            raise PlanMismatchError(f"the spec slices {name!r}, which the model does not have: is it the spec of another model?")
        for dim, kept in dims.items():
            if t.dim() <= dim or t.shape[dim] != len(kept):
                raise PlanMismatchError(
                    f"the spec keeps {len(kept)} entries of dim {dim} of {name!r}, but the model's tensor has shape "
                    f"{tuple(t.shape)}: save the model after prune(), with the spec it was pruned with"
                )


def _summary(model: nn.Module, steps: List[Dict[str, Any]]) -> Dict[str, Any]:
    copied = 0
    for _, m in model.named_modules():
        sel = subselection_of(m)
        if sel is not None and not sel["contiguous"]:
            copied += len(sel["indices"])
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "modes": [s["mode"] for s in steps],
        "copied_channels_per_inference": copied,
    }


def _unique_tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The state_dict with tied tensors stored once (``aliases``: name -> stored name)."""
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[int, str] = {}
    storages = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in storages:
            t = t.clone()  # a view of another tensor: safetensors stores each buffer once
        elif ptr is not None:
            storages.add(ptr)
        tensors[name] = t
    return tensors, aliases


def _write_weights(folder: Path, tensors: Dict[str, torch.Tensor]) -> Dict[str, str]:
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        tmp = folder / (SAFETENSORS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "plan": PLAN_FILE})
        os.replace(tmp, folder / SAFETENSORS_FILE)
        return {"file": SAFETENSORS_FILE, "format": "safetensors"}
    tmp = folder / (TORCH_FILE + ".tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, folder / TORCH_FILE)
    return {"file": TORCH_FILE, "format": "torch"}


# ----------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------
def read_plan(path: PathLike) -> Dict[str, Any]:
    """Read and check ``plan.json`` of a saved model (``path``: its directory,
    or the plan file itself). Raises :class:`PlanFormatError`."""
    p = Path(path)
    plan_file = p / PLAN_FILE if p.is_dir() else p
    if not plan_file.is_file():
        raise PlanFormatError(
            f"no pruning plan at {plan_file}: pass the directory written by channelcut.save "
            f"(it holds {PLAN_FILE} and the weights)"
        )
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanFormatError(f"{plan_file} is not valid JSON ({exc}); was it written by channelcut.save?") from exc
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise PlanFormatError(f"{plan_file} is not a channelcut plan (its 'format' field should be {FORMAT!r})")
    version = plan.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise PlanFormatError(
            f"{plan_file} has format version {version!r}; this channelcut ({_version()}) reads versions 1 to "
            f"{FORMAT_VERSION}. It was written by channelcut {plan.get('channelcut_version', '?')}: "
            "upgrade channelcut to load it"
        )
    for key, typ in (("steps", list), ("shapes", dict), ("subselections", dict), ("weights", dict)):
        if not isinstance(plan.get(key), typ):
            raise PlanFormatError(f"{plan_file} is damaged: field {key!r} is missing or not a {typ.__name__}")
    return plan


def load(
    path: PathLike,
    model: ModelOrFactory,
    strict: bool = True,
) -> nn.Module:
    """Load a model saved by :func:`save` into a freshly built, unpruned model.

    Args:
        path: the directory written by :func:`save`.
        model: the unpruned model (built exactly as the one that was pruned,
            e.g. ``torchvision.models.resnet50()``), or a function with no
            arguments that builds it. It is pruned in place and returned.
        strict: also fail when the weights file has tensors the model does
            not (like ``load_state_dict(strict=True)``).

    Returns:
        The pruned model with the saved weights; same train/eval mode as given.

    Raises:
        PlanFormatError: no plan, not a channelcut plan, unknown version.
        PlanMismatchError: the plan does not fit the model (other architecture
            or configuration).
        MissingTensorError: the weights file lacks tensors the model needs.

    On any error the model is left exactly as it was.
    """
    plan = read_plan(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"load needs an nn.Module or a function that builds one, got {type(model).__name__}")
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory returned {type(built).__name__}, not an nn.Module")
        model = built
    saved_class = plan.get("model_class", "?")
    hint = f" The plan was saved from a {saved_class}; build the model exactly as before pruning (same class and arguments)."
    if _class_name(model) != saved_class:
        hint += f" You passed a {_class_name(model)}."

    # fused experts are split as the managers split them (same function), and
    # experts removed before saving are removed again (router rows with them)
    split_experts(model)
    gone = plan.get("removed_experts") or {}
    if gone:
        try:
            remove_experts(model, {block: ids for block, ids in gone.items()})
        except (AttributeError, TypeError, ValueError) as exc:
            raise PlanMismatchError(f"the plan removes experts {gone} the model can not lose: {exc}.{hint}") from exc
    steps = [_parse_step(s, i) for i, s in enumerate(plan["steps"])]
    if not steps:  # no recorded spec: derive one from the saved shapes
        steps = [(_derived_spec(model, plan, hint), None)]
    weights = _read_weights(folder, plan)
    _check_keys(model, plan, weights, strict, hint)

    rollbacks: List[Rollback] = []
    try:
        for i, (spec, shapes_before) in enumerate(steps):
            _check_step(model, spec, shapes_before, i, hint)
            try:
                rollbacks.append(prune_model(model, spec))
            except ExportError as exc:
                raise PlanMismatchError(f"step {i + 1} of the plan could not be applied: {exc}.{hint}") from exc
        _check_subselections(model, plan, hint)
        rollbacks.append(_assign_weights(model, plan, weights, strict, hint))
    except BaseException:
        for rb in reversed(rollbacks):
            rb.undo()
        raise
    return model


def _parse_step(step: Any, i: int) -> Tuple[PruningSpec, Optional[Dict[str, Tuple[int, ...]]]]:
    if not isinstance(step, dict):
        raise PlanFormatError(f"step {i + 1} of the plan is not an object")
    shapes = step.get("shapes_before")
    try:
        spec = PruningSpec.from_dict({k: v for k, v in step.items() if k != "shapes_before"})
    except ValueError as exc:
        raise PlanFormatError(f"step {i + 1} of the plan is damaged: {exc}") from exc
    before = {str(k): tuple(int(d) for d in v) for k, v in shapes.items()} if isinstance(shapes, dict) else None
    return spec, before


def _named_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = dict(model.named_buffers(remove_duplicate=False))
    out.update(dict(model.named_parameters(remove_duplicate=False)))
    return out


def _check_step(
    model: nn.Module, spec: PruningSpec, shapes_before: Optional[Dict[str, Tuple[int, ...]]], i: int, hint: str
) -> None:
    """Everything the step names exists with a fitting shape (before it changes anything)."""
    tensors = _named_tensors(model)
    where = f"step {i + 1} of the plan"
    names = list(spec.slices) + [z.param for z in spec.zeros]
    for name in names:
        if name not in tensors:
            raise PlanMismatchError(f"{where} changes {name!r}, but the model has no such parameter or buffer.{hint}")
    for name, shape in (shapes_before or {}).items():
        t = tensors.get(name)
        if t is None:
            raise PlanMismatchError(f"{where} changes {name!r}, but the model has no such parameter or buffer.{hint}")
        if tuple(t.shape) != tuple(shape):
            raise PlanMismatchError(
                f"{name!r} has shape {tuple(t.shape)} in the model, but the plan was made for shape {tuple(shape)}.{hint}"
            )
    for name, dims in spec.slices.items():
        t = tensors[name]
        for dim, kept in dims.items():
            if dim >= t.dim():
                raise PlanMismatchError(f"{where} slices dim {dim} of {name!r}, which has shape {tuple(t.shape)}.{hint}")
            bad = [k for k in kept if not 0 <= k < t.shape[dim]]
            if bad:
                raise PlanMismatchError(
                    f"{where} keeps index {bad[0]} of dim {dim} of {name!r}, which has only {t.shape[dim]} entries there.{hint}"
                )
    modules = dict(model.named_modules())
    for sub in spec.subselections:
        if sub.module not in modules:
            raise PlanMismatchError(f"{where} makes module {sub.module!r} read a subset of its input, but the model has no such module.{hint}")


def _derived_spec(model: nn.Module, plan: Dict[str, Any], hint: str) -> PruningSpec:
    """A spec that gives every tensor its saved shape (keeping leading entries)
    and installs the saved subselections: enough to load the saved weights."""
    tensors = _named_tensors(model)
    spec = PruningSpec(mode="derived")
    for name, shape in plan["shapes"].items():
        t = tensors.get(name)
        if t is None:
            continue  # reported with the weights
        if len(shape) != t.dim():
            raise PlanMismatchError(f"{name!r} has shape {tuple(t.shape)} in the model, the saved one {tuple(shape)}.{hint}")
        for dim, (now, saved) in enumerate(zip(t.shape, shape)):
            if saved > now:
                raise PlanMismatchError(
                    f"the saved {name!r} has {saved} entries in dim {dim}, more than the model's {now}: "
                    f"the model is smaller than the one saved.{hint}"
                )
            if saved != now:
                spec.slices.setdefault(name, {})[dim] = list(range(saved))
    for module, sel in plan["subselections"].items():
        spec.subselections.append(
            Subselection(module, module, "", int(sel["dim"]), [int(i) for i in sel["indices"]], int(sel["input_channels"]), bool(sel.get("contiguous", True)))
        )
    return spec


def _check_subselections(model: nn.Module, plan: Dict[str, Any], hint: str) -> None:
    expected = plan["subselections"]
    actual = {name: sel for name, m in model.named_modules() if (sel := subselection_of(m)) is not None}
    for name in sorted(set(expected) | set(actual)):
        e, a = expected.get(name), actual.get(name)
        if e is None or a is None or [int(i) for i in e["indices"]] != a["indices"] or int(e["dim"]) != a["dim"]:
            raise PlanMismatchError(f"after applying the plan, the input subset of module {name!r} differs from the saved one.{hint}")


def _read_weights(folder: Path, plan: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    info = plan["weights"]
    fmt, name = info.get("format"), info.get("file")
    if not isinstance(name, str) or os.sep in name or "/" in name:
        raise PlanFormatError(f"the plan names no valid weights file (got {name!r})")
    file = folder / name
    if not file.is_file():
        raise MissingTensorError(f"the weights file {file} is missing; the plan needs it next to {PLAN_FILE}")
    if fmt == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise PlanFormatError("these weights are stored as safetensors: pip install safetensors") from exc
        try:
            return load_file(str(file))
        except Exception as exc:
            raise PlanFormatError(f"could not read {file}: {exc}") from exc
    if fmt == "torch":
        try:
            out = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PlanFormatError(f"could not read {file}: {exc}") from exc
        if not isinstance(out, dict):
            raise PlanFormatError(f"{file} does not hold a dict of tensors")
        return out
    raise PlanFormatError(f"unknown weights format {fmt!r} (known: 'safetensors', 'torch')")


def _check_keys(model: nn.Module, plan: Dict[str, Any], weights: Dict[str, torch.Tensor], strict: bool, hint: str) -> None:
    """Same tensor names in the model and the plan; every one in the weights file."""
    aliases: Dict[str, str] = plan.get("aliases", {}) or {}
    model_keys = list(model.state_dict(keep_vars=True))
    saved_keys = list(plan["shapes"])

    def shown(keys: List[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    extra_in_model = [k for k in model_keys if k not in plan["shapes"]]
    if extra_in_model:
        raise PlanMismatchError(f"the model has {len(extra_in_model)} tensor(s) the saved model did not: {shown(extra_in_model)}.{hint}")
    missing_in_model = [k for k in saved_keys if k not in set(model_keys)]
    if missing_in_model and strict:
        raise PlanMismatchError(
            f"the saved model has {len(missing_in_model)} tensor(s) this model does not: {shown(missing_in_model)}.{hint} "
            "(load(..., strict=False) ignores them)"
        )
    lacking = [k for k in model_keys if aliases.get(k, k) not in weights]
    if lacking:
        raise MissingTensorError(f"the weights file lacks {len(lacking)} tensor(s) the model needs: {shown(lacking)}")


def _assign_weights(model: nn.Module, plan: Dict[str, Any], weights: Dict[str, torch.Tensor], strict: bool, hint: str) -> Rollback:
    """Give every state_dict tensor its saved value; undoable, all checks first."""
    aliases: Dict[str, str] = plan.get("aliases", {}) or {}
    state = model.state_dict(keep_vars=True)
    for k, t in state.items():
        w = weights[aliases.get(k, k)]
        if tuple(w.shape) != tuple(t.shape):
            raise PlanMismatchError(f"{k!r} has shape {tuple(t.shape)} after applying the plan, the saved tensor {tuple(w.shape)}.{hint}")
    rb = Rollback()
    done = set()
    with torch.no_grad():
        for k, t in state.items():
            if id(t) in done:
                continue
            done.add(id(t))
            rb.set_data(t, weights[aliases.get(k, k)].to(device=t.device, dtype=t.dtype).clone())
    return rb


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _version() -> str:
    from ._version import __version__

    return __version__


def _class_name(model: nn.Module) -> str:
    cls = getattr(type(model), "subselect_base", type(model))
    return f"{cls.__module__}.{cls.__qualname__}"


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with one key per line but lists of numbers on one line (readable)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return json.dumps(list(obj), separators=(", ", ": "))
        return "[\n" + ",\n".join(inner + _dumps(v, indent + 2) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)
