"""RMSNorm over channels, pruned exactly. Start at :func:`rms_norm_modules`.

A root-mean-square norm ``y = x * rsqrt(mean(x^2) + eps) * w`` over ``d``
channels couples every channel through its statistic, but not irreversibly:
with zeros in the removed channels, the mean of squares over ``d`` channels
is ``d'/d`` times the mean over the ``d'`` kept ones. So over the pruned
channels, with ``eps`` scaled by ``d/d'`` and ``w`` by ``sqrt(d/d')``, the
norm gives exactly the output it gave with those channels zeroed. The stream
of an RMSNorm LLM (its hidden size) can therefore be narrowed exactly, as
long as the removed channels are zero where they are made: the reference
(and the mock) zero the removed channels' producer rows.

The tracer treats such a norm as one op whose channels pass through
(``rules/norms.py`` for ``F.rms_norm``; :func:`rms_norm_modules` finds the
modules that compute one in Python, as Hugging Face's ``LlamaRMSNorm``,
``GemmaRMSNorm`` (``x * r * (1 + w)``) and their relatives do, by running
each candidate once on a probe input and comparing with the formula).
LayerNorm subtracts a mean over the channels: no rescaling makes it exact,
so its channels stay coupled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
_NAME = re.compile(r"rms_?norm|t5layernorm", re.IGNORECASE)


@dataclass(frozen=True)
class RmsForm:
    """How a module computes its RMS norm: the attribute holding ``eps`` and
    whether the weight enters as ``1 + w`` (Gemma) instead of ``w``."""

    eps_attr: str
    plus_one: bool
    float32: bool = False  # it computes in float32 whatever its input (Hugging Face's norms)


def rescaled_weight(w: torch.Tensor, factor: float, plus_one: bool) -> torch.Tensor:
    """The weight that gives a norm over fewer channels the output of the
    norm over all of them: ``w * factor`` (``factor = sqrt(d / d')``), or for
    ``1 + w`` norms ``(1 + w) * factor - 1``.

    >>> rescaled_weight(torch.tensor([1.0, 2.0]), 2.0, False).tolist()
    [2.0, 4.0]
    >>> rescaled_weight(torch.tensor([0.0, 1.0]), 2.0, True).tolist()
    [1.0, 3.0]
    """
    return (w + 1) * factor - 1 if plus_one else w * factor


def rms_norm_modules(model: nn.Module) -> Dict[int, RmsForm]:
    """``id(module)`` -> :class:`RmsForm` for every module of ``model`` that
    computes an RMS norm over its last dim with a 1-D ``weight`` in Python
    (``nn.RMSNorm`` is traced through ``F.rms_norm`` instead). Each candidate
    (a class named like an RMS norm, with a float ``eps`` attribute and no
    other parameter or buffer) is run once on a small float64 probe, outside
    any tracing, and kept only when its output matches the formula."""
    out: Dict[int, RmsForm] = {}
    for m in model.modules():
        if isinstance(m, nn.RMSNorm) or not _NAME.search(type(m).__name__):
            continue
        w = m._parameters.get("weight")
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or len(m._parameters) != 1 or m._buffers:
            continue
        form = _classify(m, w.numel())
        if form is not None:
            out[id(m)] = form
    return out


def _classify(m: nn.Module, d: int) -> Optional[RmsForm]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, d, dtype=torch.float64, generator=g, device="cpu") * 2  # (whatever the default device)
    w = torch.rand(d, dtype=torch.float64, generator=g, device="cpu") + 0.5
    for attr in EPS_ATTRS:
        eps = getattr(m, attr, None)
        if not isinstance(eps, float):
            continue
        try:
            y_small, y_big = _run(m, x, w, attr, eps), _run(m, x, w, attr, 10.0)
        except Exception:
            return None
        for plus_one in (False, True):
            if _matches(y_small, x, w, eps, plus_one) and _matches(y_big, x, w, 10.0, plus_one):
                return RmsForm(attr, plus_one, not _matches(y_small, x, w, eps, plus_one, rtol=1e-12))
    return None


def _run(m: nn.Module, x: torch.Tensor, w: torch.Tensor, attr: str, eps: float) -> torch.Tensor:
    """The module's output on ``x`` with weight ``w`` and ``eps``; the module
    is put back as it was."""
    old = getattr(m, attr)
    try:
        setattr(m, attr, eps)
        with torch.no_grad():
            y = torch.func.functional_call(m, {"weight": w}, (x,))
    finally:
        setattr(m, attr, old)
    return y.double()


def _matches(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float, plus_one: bool, rtol: float = 1e-4) -> bool:
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ((1 + w) if plus_one else w)
    return y.shape == ref.shape and bool(torch.allclose(y, ref, rtol=rtol, atol=rtol / 100))


def rescale_factor(d: int, kept: int) -> float:
    """``sqrt(d / d')``: what the weight of a norm over ``kept`` of ``d``
    channels is multiplied by.

    >>> rescale_factor(8, 2)
    2.0
    """
    return math.sqrt(d / kept)
