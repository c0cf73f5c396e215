"""Shared helpers for the end-to-end export tests in this folder.

- :func:`prepare` makes a test network deterministic and non-trivial: every
  parameter or buffer that its initialiser left constant (BatchNorm weight 1 /
  bias 0, running statistics, zero biases, layer-scale 1e-6, ...) gets random
  values, so a mis-sliced or mis-ordered per-channel tensor changes the output.
- :func:`export` runs compute -> mock -> prune(verify=True) and checks that the
  pruned model equals the mock on the example inputs and on a second input,
  and that its width attributes agree with its tensors (``support.widths``).
- :func:`snapshot` / :func:`assert_unchanged` hold "the model is exactly as
  before" (values, parameter objects, attributes, hooks, structure); they
  live in ``tests/support/unchanged.py``, with ``raises_unchanged``, and the
  output comparison in ``tests/support/compare.py``, for all tests.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from channelcut import PruningManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.compare import assert_close, max_rel_difference, n_params, rel_error  # noqa: E402,F401  (one comparison for all tests)
from support.unchanged import assert_unchanged, snapshot  # noqa: E402,F401  (one "unchanged" for all tests)
from support.widths import check_widths  # noqa: E402

Inputs = Union[List[Any], Dict[str, Any]]

MODES = {
    # (copy_cost=0: always gather, the reads the hand-derived expectations describe)
    "unconstrained": dict(constrained=False, reorder=True, baseline=False, copy_cost=0),
    "noreorder": dict(constrained=False, reorder=False, baseline=False, copy_cost=0),
    # the cost model with copies infinitely expensive: wider views + zero columns
    "superset": dict(constrained=False, reorder=True, baseline=False, copy_cost=1e12),
    "constrained": dict(constrained=True),
    "baseline": dict(baseline=True),
}


# ---------------------------------------------------------------------------
# building test networks
# ---------------------------------------------------------------------------


@torch.no_grad()
def randomize_constants_(net: nn.Module, seed: int) -> nn.Module:
    """Give random values to every floating parameter/buffer that is constant."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        if not t.is_floating_point() or t.numel() <= 1:
            continue
        first = t.reshape(-1)[0].item()
        if not bool((t == first).all()):
            continue  # already random (conv / linear weights)
        u = torch.rand(t.shape, generator=g, dtype=torch.float64)
        if "running_var" in name:
            new = 0.5 + u  # must stay positive
        elif first == 0.0:
            new = (u - 0.5) * 0.4  # biases, running means
        elif abs(first) < 1e-3:
            new = 0.1 + 0.4 * u  # layer scale 1e-6: make the branch matter
        else:
            new = first * (0.5 + u)  # norm weights 1, ...
        t.copy_(new.to(t.dtype))
    return net


def prepare(net: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Randomize constants, cast to ``dtype``, eval mode."""
    randomize_constants_(net, seed)
    return net.to(dtype).eval()


def rand_inputs(shapes: Sequence[Sequence[int]], seed: int, dtype=torch.float64) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(s), generator=g, dtype=dtype) for s in shapes]


# ---------------------------------------------------------------------------
# running and comparing
# ---------------------------------------------------------------------------


def call(model: nn.Module, inputs: Inputs) -> Any:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs)


def leaves(out: Any) -> List[torch.Tensor]:
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def structure(out: Any) -> Any:
    """The container structure of an output (types, keys), tensors as shapes."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape))
    if isinstance(out, dict):
        return ("dict", tuple((k, structure(v)) for k, v in out.items()))
    if isinstance(out, (list, tuple)):
        return (type(out).__name__, tuple(structure(v) for v in out))
    return (type(out).__name__, out)


def attr(obj: Any, path: str) -> Any:
    """``attr(net, "layer1.0.conv1.in_channels")``, ``attr(net, "gamma.shape")``."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------
# structural consistency of a (pruned) model
# ---------------------------------------------------------------------------


def assert_module_attributes_consistent(net: nn.Module, inputs: Optional[Inputs] = None) -> None:
    """Every width attribute agrees with the tensors it describes (DESIGN.md,
    invariant 8: ``support.widths.check_widths``); with ``inputs``, each
    Subselect layer also gets an input of the width it recorded."""
    problems = check_widths(net, inputs)
    assert not problems, "widths: " + "\n".join(problems)


def producer_out_channels(net: nn.Module, param: str) -> int:
    """Output channels of the producer that owns weight ``param``."""
    mod_name = param.rpartition(".")[0]
    m = net.get_submodule(mod_name) if mod_name else net
    w = attr(net, param)
    if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:
        return w.shape[1] * m.groups
    if isinstance(m, nn.Embedding):
        return w.shape[1]
    return w.shape[0]


# ---------------------------------------------------------------------------
# "exactly as before"
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# the export itself
# ---------------------------------------------------------------------------


@dataclass
class Export:
    manager: PruningManager
    net: nn.Module
    y_orig: Any
    y_mock: Any
    y_pruned: Any
    params_before: int
    params_after: int
    y_pruned_other: Any = None  # on ``other_inputs`` (before the train-mode check updates running stats)

    @property
    def spec(self):
        return self.manager.spec


def export(
    net: nn.Module,
    inputs: Inputs,
    *,
    other_inputs: Optional[Inputs] = None,
    rtol: float = 1e-10,
    what: str = "",
    train_check: bool = True,
    **compute_kwargs: Any,
) -> Export:
    """compute -> mock -> prune(verify=True); assert pruned == mock.

    Also checks that compute() and get_mock_model() leave the model untouched,
    that the pruned model matches the mock on ``other_inputs`` (a different
    batch size / resolution than the traced one), and that every module's
    width attributes agree with its tensors (``support.widths``: conv/linear,
    norms, ``nn.MultiheadAttention``'s heads, Subselect layers). With ``train_check``, the pruned
    model and the mock also agree in train mode (batch statistics) and the
    pruned model back-propagates into every parameter.
    """
    y_orig = call(net, inputs)
    before = snapshot(net)
    m = PruningManager(net).compute(inputs, **compute_kwargs)
    mock = m.get_mock_model()
    assert_unchanged(net, before, f"{what}: compute()/get_mock_model()")
    y_mock = call(mock, inputs)
    y_mock2 = call(mock, other_inputs) if other_inputs is not None else None
    p0 = n_params(net)
    m.prune(verify=True)
    y = call(net, inputs)
    assert_close(y, y_mock, rtol, f"{what}: pruned vs mock")
    y2 = None
    if other_inputs is not None:
        y2 = call(net, other_inputs)
        assert_close(y2, y_mock2, rtol, f"{what}: pruned vs mock on a second input")
    assert_module_attributes_consistent(net, inputs)
    if train_check:
        net.train(), mock.train()
        assert_close(call(net, inputs), call(mock, inputs), rtol, f"{what}: pruned vs mock in train mode")
        net.eval()
        out = net(**inputs) if isinstance(inputs, dict) else net(*inputs)
        sum(t.double().sum() for t in leaves(out) if t.is_floating_point()).backward()
        for name, p in net.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.shape == p.shape, f"{what}: no gradient for {name}"
                p.grad = None
    del mock
    for name, (n_before, n_after) in m.spec.kept().items():
        if "/" not in name and "." in name:  # a weight name (not an op id)
            assert producer_out_channels(net, name) == n_after, (
                f"{what}: spec.kept() says {name} keeps {n_after} of {n_before} outputs, "
                f"the pruned weight has {producer_out_channels(net, name)}")
    return Export(m, net, y_orig, y_mock, y, p0, n_params(net), y2)


