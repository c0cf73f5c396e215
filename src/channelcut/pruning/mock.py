"""The mock pruned model: the user's model with pruned channels masked to zero.

Start at :func:`make_mock`. The mock is a deep copy of the model whose
consumer weights are parametrised as ``weight * mask`` (and a bias that absorbs
a folded constant as ``bias + delta``): it masks on every call,
in train and eval mode, with gradients, and never touches the user's model.
Its outputs are what the pruned model must reproduce.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch
from torch import nn
from torch.nn.utils import parametrize

from .spec import MaskEntry, PruningSpec


class ChannelMask(nn.Module):
    """Parametrisation ``w -> w * mask`` (the mask is a non-trainable buffer)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


class AddConstant(nn.Module):
    """Parametrisation ``b -> b + delta`` (a folded constant, see ``zeros.py``)."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("delta", delta)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b + self.delta.to(b.dtype)


def build_mask(weight: torch.Tensor, entry: MaskEntry) -> torch.Tensor:
    """0/1 tensor shaped like ``weight`` that zeroes the entry's input channels."""
    mask = torch.ones(weight.shape, dtype=weight.dtype, device=weight.device)
    zero_input_channels(mask, entry)
    return mask


def zero_input_channels(w: torch.Tensor, entry: MaskEntry) -> None:
    """Set the given activation input channels of a consumer weight to zero."""
    if not entry.channels:
        return
    with torch.no_grad():
        if entry.groups == 1:
            idx = torch.tensor(entry.channels, dtype=torch.long, device=w.device)
            w.index_fill_(entry.weight_dim, idx, 0)
        else:
            k = w.shape[1]
            ko = w.shape[0] // entry.groups
            for ch in entry.channels:
                q, local = divmod(ch, k)
                w[q * ko:(q + 1) * ko, local] = 0


def _owner(model: nn.Module, param: str):
    mod_name, _, attr = param.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def make_mock(model: nn.Module, spec: PruningSpec) -> nn.Module:
    """A deep copy of ``model`` that masks the spec's pruned input channels."""
    mock = copy.deepcopy(model)
    holders: Dict[int, List[str]] = {}  # a tied weight is held by several modules
    for name, p in mock.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    for entry in spec.masks:
        module, attr = _owner(mock, entry.param)
        w = getattr(module, attr)
        mask = build_mask(w.detach(), entry)
        for name in holders.get(id(w), [entry.param]):
            module, attr = _owner(mock, name)
            parametrize.register_parametrization(module, attr, ChannelMask(mask), unsafe=True)
    for fold in spec.folds:
        module, attr = _owner(mock, fold.bias)
        b = getattr(module, attr)
        delta = torch.tensor(fold.delta, dtype=b.dtype, device=b.device)
        parametrize.register_parametrization(module, attr, AddConstant(delta), unsafe=True)
    return mock
