"""Read the masks that ``torch.nn.utils.prune`` leaves on a model.

``torch.nn.utils.prune`` replaces a parameter ``weight`` by ``weight_orig``
(the parameter) and ``weight_mask`` (a buffer), and a forward pre-hook that
recomputes ``weight = weight_orig * weight_mask`` on every call. A structured
mask (``prune.ln_structured(module, "weight", amount, n, dim)``) zeroes whole
slices: ``dim=1`` input channels of a conv/linear weight, ``dim=0`` its output
channels (filters).

:func:`from_torch_prune` turns such masks into the ``(weight name, channel)``
lists that :meth:`channelcut.PruningManager.compute` takes and, by default,
makes them permanent (plain, zeroed ``weight`` parameters), which the export
needs: it can only slice real parameters.

>>> import torch
>>> from torch import nn
>>> from torch.nn.utils import prune
>>> from channelcut import PruningManager
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> _ = prune.ln_structured(net[2], "weight", amount=0.5, n=1, dim=1)
>>> masks = from_torch_prune(net)
>>> len(masks.pruned_inputs), hasattr(net[2], "weight_orig")
(4, False)
>>> _ = PruningManager(net).compute([torch.rand(1, 3, 8, 8)], pruned_inputs=masks.pruned_inputs).prune()
>>> net[2].in_channels, net[0].out_channels
(4, 4)
"""

from __future__ import annotations

import warnings
from typing import List, NamedTuple, Tuple

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

Pair = Tuple[str, int]


class TorchPruneMasks(NamedTuple):
    """Channels that ``torch.nn.utils.prune`` masks remove entirely."""

    pruned_inputs: List[Pair]  # (consumer weight name, input channel)
    pruned_outputs: List[Pair]  # (producer weight name, output channel)


def _dims(module: nn.Module) -> Tuple[int, int, int]:
    """(input-channel dim, output-channel dim, groups) of a conv/linear weight."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return 0, 1, module.groups
        return 1, 0, module.groups
    return 1, 0, 1


def _all_zero_along(mask: torch.Tensor, dim: int) -> torch.Tensor:
    other = tuple(d for d in range(mask.dim()) if d != dim)
    return (mask == 0).all(dim=other) if other else (mask == 0)


def from_torch_prune(model: nn.Module, remove: bool = True) -> TorchPruneMasks:
    """Channels fully masked by ``torch.nn.utils.prune`` on conv/linear weights.

    Args:
        model: a model with ``weight_orig``/``weight_mask`` pairs.
        remove: make the masks permanent with ``torch.nn.utils.prune.remove``
            (``weight`` becomes a plain parameter equal to ``weight_orig *
            weight_mask``, hooks and buffers are gone; the same for masked
            biases). Export needs this; with ``remove=False`` the model is left
            as it is and only the lists are returned.

    Returns:
        :class:`TorchPruneMasks`: input channels whose weight column is masked
        everywhere (``pruned_inputs``) and output channels whose weight row
        is masked everywhere and whose bias is absent, masked or zero
        (``pruned_outputs``). A fully masked row whose bias is not zero still
        outputs that bias, so it is not a removed channel; it is skipped with
        a warning. Unstructured masks count only where they happen to zero a
        whole row or column. Grouped convs contribute output channels only.

        To export exactly what the masked model computes, call
        ``PruningManager(model).compute(inputs)`` with no lists after this
        function: the zeros are found in the weights, a zeroed filter that a
        BatchNorm shift, a bias or an activation turns into a non-zero
        constant is folded into its reader's bias where that is exact (kept
        and reported elsewhere), and ``prune()`` verifies against your model.
        Passing ``pruned_outputs`` explicitly instead removes those channel
        groups at every reader (the request's meaning), which differs from
        the masked model wherever such a constant follows.

    Raises:
        ValueError: if the model has no ``torch.nn.utils.prune`` masks.
    """
    inputs: List[Pair] = []
    outputs: List[Pair] = []
    skipped: List[str] = []
    found = False
    to_remove = []
    for mname, module in model.named_modules():
        masked = [n[: -len("_mask")] for n, _ in module.named_buffers(recurse=False) if n.endswith("_mask")]
        masked = [n for n in masked if isinstance(getattr(module, n + "_orig", None), torch.Tensor)]
        if not masked:
            continue
        found = True
        to_remove.extend((module, n) for n in masked)
        if "weight" not in masked or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        prefix = f"{mname}." if mname else ""
        wname = prefix + "weight"
        mask = module.weight_mask.detach()
        in_dim, out_dim, groups = _dims(module)
        if groups == 1:
            cols = torch.nonzero(_all_zero_along(mask, in_dim)).flatten().tolist()
            if len(cols) < mask.shape[in_dim]:
                inputs.extend((wname, int(c)) for c in cols)
        rows = torch.nonzero(_all_zero_along(mask, out_dim)).flatten().tolist()
        if rows and len(rows) < mask.shape[out_dim]:
            bias = getattr(module, "bias", None)
            for r in rows:
                if bias is None or float(bias.detach()[r]) == 0.0:
                    outputs.append((wname, int(r)))
                else:
                    skipped.append(f"{wname}[{r}]")
    if not found:
        raise ValueError(
            "the model has no torch.nn.utils.prune masks (no <name>_orig/<name>_mask pairs); "
            "for zeroed weights use PruningManager(model).compute(inputs) directly"
        )
    if skipped:
        shown = ", ".join(skipped[:6]) + (", ..." if len(skipped) > 6 else "")
        warnings.warn(
            f"{len(skipped)} masked output channel(s) keep a non-zero bias and are not removed: {shown} "
            "(also mask the bias, e.g. prune the bias with the same mask, to remove them)",
            stacklevel=2,
        )
    if remove:
        for module, name in to_remove:
            torch_prune.remove(module, name)
    return TorchPruneMasks(inputs, outputs)
