"""Ship a pruned model: ONNX, TorchScript, ``torch.export`` — each checked. Start at :func:`check_backends`.

A pruned model is a plain ``nn.Module`` (its Subselect layers are ordinary
``narrow``/``index_select`` code), so the usual torch exporters work on it
directly. This module wraps them with the check that matters: the exported
artifact computes what the pruned eager model computes.

- :func:`to_onnx` writes an ONNX file and (with onnxruntime installed) runs it
  against PyTorch;
- :func:`to_torchscript` scripts (or traces) and optionally saves;
- :func:`to_exported_program` runs ``torch.export.export`` and optionally saves a ``.pt2``;
- :func:`check_backends` tries each exporter (and ``torch.compile``) and
  reports the largest relative difference or the error, per backend.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
>>> results = check_backends(net, [torch.rand(1, 3, 4, 4)], backends=["jit.script", "torch.export"])
>>> [(r.backend, r.ok) for r in results]
[('jit.script', True), ('torch.export', True)]
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ExportCheckError  # defined in errors.py; re-exported here

__all__ = [
    "BACKENDS",
    "BackendResult",
    "ExportCheckError",
    "check_backends",
    "to_exported_program",
    "to_onnx",
    "to_torchscript",
]

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_RTOL = 1e-4


@dataclass
class BackendResult:
    """Outcome of one backend in :func:`check_backends`."""

    backend: str
    ok: bool
    max_rel_diff: Optional[float] = None  # max |y - ref| / max |ref|, over all outputs
    seconds: float = 0.0
    error: Optional[str] = None  # why it failed (exception or mismatch)


def _as_args(inputs: Any) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    raise TypeError(f"inputs must be a tensor or a list/tuple of positional inputs, got {type(inputs).__name__}")


def _flat(out: Any) -> List[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(out)
    return [torch.as_tensor(t).detach() for t in leaves if isinstance(t, torch.Tensor) or hasattr(t, "__array__")]


def _rel_diff(out: Any, ref: Any) -> float:
    a, b = _flat(out), _flat(ref)
    if len(a) != len(b):
        raise ExportCheckError(f"the export returned {len(a)} tensors, the eager model {len(b)}")
    worst = 0.0
    for x, y in zip(a, b):
        if tuple(x.shape) != tuple(y.shape):
            raise ExportCheckError(f"output shape {tuple(x.shape)} differs from the eager model's {tuple(y.shape)}")
        if not y.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x.to(y.dtype), y) else float("inf"))
            continue
        scale = float(y.abs().max()) if y.numel() else 0.0
        err = float((x.to(y.dtype) - y).abs().max()) if y.numel() else 0.0
        worst = max(worst, err / max(scale, 1e-30) if err == err else float("inf"))
    return worst


def _check(out: Any, ref: Any, rtol: float, what: str) -> float:
    diff = _rel_diff(out, ref)
    if not diff <= rtol:
        raise ExportCheckError(f"{what} differs from the eager model: max relative difference {diff:.3g} > {rtol:g}")
    return diff


# ----------------------------------------------------------------------------
# exporters
# ----------------------------------------------------------------------------
def to_onnx(
    model: nn.Module,
    inputs: Any,
    path: PathLike,
    verify: bool = True,
    rtol: float = DEFAULT_RTOL,
    dynamo: bool = True,
    **kwargs: Any,
) -> Path:
    """Export ``model`` to ONNX at ``path``; with ``verify``, run the file in
    onnxruntime and compare with the eager model (:class:`ExportCheckError`
    on a mismatch). ``kwargs`` go to ``torch.onnx.export``.

    Needs ``onnx`` and ``onnxscript`` (``pip install channelcut[export]``);
    verification needs ``onnxruntime``.
    """
    args = _as_args(inputs)
    path = Path(path)
    kwargs.setdefault("verbose", False)
    # the exporter reports its progress on stdout; keep stdout for results
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=dynamo, **kwargs)
    if verify:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("verifying an ONNX export needs onnxruntime: pip install onnxruntime (or pass verify=False)") from exc
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
        outs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
        with torch.no_grad():
            ref = model(*args)
        _check(outs, ref, rtol, f"the ONNX file {path}")
    return path


def to_torchscript(
    model: nn.Module,
    inputs: Any = None,
    path: Optional[PathLike] = None,
    method: str = "script",
    verify: bool = True,
    rtol: float = DEFAULT_RTOL,
) -> torch.jit.ScriptModule:
    """``torch.jit.script`` (or ``method="trace"``, which needs ``inputs``) the
    model, check it on ``inputs`` when given, and save it to ``path`` if given."""
    if method not in ("script", "trace"):
        raise ValueError(f"method must be 'script' or 'trace', got {method!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "trace":
            if inputs is None:
                raise ValueError("method='trace' needs example inputs")
            module = torch.jit.trace(model, _as_args(inputs), check_trace=False)
        else:
            module = torch.jit.script(model)
        if verify and inputs is not None:
            args = _as_args(inputs)
            with torch.no_grad():
                _check(module(*args), model(*args), rtol, f"the TorchScript ({method}) module")
        if path is not None:
            torch.jit.save(module, str(path))
    return module


def to_exported_program(
    model: nn.Module, inputs: Any, path: Optional[PathLike] = None, verify: bool = True, rtol: float = DEFAULT_RTOL
) -> "torch.export.ExportedProgram":
    """``torch.export.export`` the model on ``inputs``, check it, save a ``.pt2`` if ``path``."""
    args = _as_args(inputs)
    program = torch.export.export(model, args)
    if verify:
        with torch.no_grad():
            _check(program.module()(*args), model(*args), rtol, "the exported program")
    if path is not None:
        torch.export.save(program, str(path))
    return program


def _compiled(model: nn.Module, args: tuple, backend: str) -> Any:
    torch._dynamo.reset()
    try:
        return torch.compile(model, backend=backend)(*args)
    finally:
        torch._dynamo.reset()


def _onnx_outputs(model: nn.Module, args: tuple) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        to_onnx(model, args, path, verify=False)
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
        return [torch.from_numpy(o) for o in sess.run(None, feeds)]


#: backend name -> function (model, positional inputs) -> outputs
BACKENDS: Dict[str, Callable[[nn.Module, tuple], Any]] = {
    "jit.trace": lambda m, a: to_torchscript(m, a, method="trace", verify=False)(*a),
    "jit.script": lambda m, a: to_torchscript(m, method="script", verify=False)(*a),
    "torch.export": lambda m, a: to_exported_program(m, a, verify=False).module()(*a),
    "onnx": _onnx_outputs,
    "compile": lambda m, a: _compiled(m, a, "inductor"),
    "compile.aot_eager": lambda m, a: _compiled(m, a, "aot_eager"),
}


def check_backends(
    model: nn.Module,
    inputs: Any,
    backends: Optional[Sequence[str]] = None,
    rtol: float = DEFAULT_RTOL,
) -> List[BackendResult]:
    """Run ``model`` through each backend of :data:`BACKENDS` (default: all but
    the slow inductor ``compile``) and compare with the eager model.

    Never raises for a backend's failure: each :class:`BackendResult` says
    whether it worked and why not.
    """
    names = list(backends) if backends is not None else [b for b in BACKENDS if b != "compile"]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {sorted(BACKENDS)}")
    args = _as_args(inputs)
    was_training = model.training
    results: List[BackendResult] = []
    try:
        with torch.no_grad():
            ref = model(*args)
            for name in names:
                start = time.perf_counter()
                try:
                    out = BACKENDS[name](model, args)
                    diff = _rel_diff(out, ref)
                    ok = diff <= rtol
                    err = None if ok else f"max relative difference {diff:.3g} > {rtol:g}"
                    results.append(BackendResult(name, ok, diff, time.perf_counter() - start, err))
                except Exception as exc:  # report, do not raise: the point is the table
                    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    results.append(BackendResult(name, False, None, time.perf_counter() - start, f"{type(exc).__name__}: {msg}"))
    finally:
        model.train(was_training)
    return results
