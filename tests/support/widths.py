"""Widths stay consistent (DESIGN.md, invariant 8): every integer attribute
that describes a width agrees with the tensors it describes. Start at
:func:`check_widths`.

A forward pass does not read most of these attributes: ``F.batch_norm``
never looks at ``num_features``; a pruned ``nn.MultiheadAttention`` derives
its head count from the projection weights. So a pruner that forgets one
exports a model whose outputs are right and whose attributes lie (to the next
``repr``, ``copy.deepcopy`` + re-init, ``torch.fx``, a fused kernel, a
second export). Outputs can not see that; this check can.

Modules of known types, checked against their own tensors:

- ``nn.Conv*d`` / ``nn.ConvTranspose*d``: ``in_channels``, ``out_channels``
  and ``groups`` against the weight (``(out, in // groups, *k)``, transposed
  ``(in, out // groups, *k)``), both divisible by ``groups``, the bias;
- ``nn.Linear``: ``in_features`` / ``out_features`` against the weight, the
  bias;
- BatchNorm / InstanceNorm: ``num_features`` against every per-channel
  tensor (affine parameters, running statistics);
- ``nn.GroupNorm``: ``num_channels`` against its tensors, ``num_groups``
  divides it;
- ``nn.LayerNorm`` / ``nn.RMSNorm``: ``normalized_shape`` is the affine
  tensors' shape;
- ``nn.Embedding``: ``num_embeddings`` / ``embedding_dim`` against the weight;
- ``nn.PReLU``: ``num_parameters`` is the weight's size;
- ``nn.MultiheadAttention`` (pruned or not): ``embed_dim`` is the output
  projection's width, ``num_heads * head_dim`` the width of the q, k and v
  projections and of the output projection's input, ``kdim`` / ``vdim`` the
  widths the k / v projections read (an unpruned layer: also
  ``head_dim == embed_dim // num_heads`` and the query's width);
- Subselect layers (``channelcut.pruning.subselect``): the selection is
  well formed (start, length, contiguity, the index tensor), every index is
  within the recorded input width ``subselect_input_channels``, and the layer
  reads as many channels as it selects; with ``inputs``, the model is run
  once and each Subselect layer's actual input has the recorded width.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn


def _shape(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else tuple(t.shape)


def _conv(m: nn.Module) -> List[str]:
    w, g = m.weight, m.groups
    out = []
    if not isinstance(g, int) or g < 1:
        return [f"groups={g!r} is not a positive int"]
    if m.in_channels % g or m.out_channels % g:
        out.append(f"in_channels={m.in_channels} / out_channels={m.out_channels} not divisible by groups={g}")
    if m.transposed:
        want = (m.in_channels, m.out_channels // g)
    else:
        want = (m.out_channels, m.in_channels // g)
    if tuple(w.shape[:2]) != want:
        what = "(in, out // groups)" if m.transposed else "(out, in // groups)"
        out.append(f"in_channels={m.in_channels}, out_channels={m.out_channels}, groups={g}: weight {tuple(w.shape)} "
                   f"should start with {what} = {want}")
    if m.bias is not None and _shape(m.bias) != (m.out_channels,):
        out.append(f"bias {_shape(m.bias)} for out_channels={m.out_channels}")
    return out


def _linear(m: nn.Linear) -> List[str]:
    out = []
    if tuple(m.weight.shape) != (m.out_features, m.in_features):
        out.append(f"in_features={m.in_features}, out_features={m.out_features}: weight {tuple(m.weight.shape)}")
    if m.bias is not None and _shape(m.bias) != (m.out_features,):
        out.append(f"bias {_shape(m.bias)} for out_features={m.out_features}")
    return out


def _per_channel(m: nn.Module, n: int, attr: str, names: tuple) -> List[str]:
    out = []
    for name in names:
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor) and _shape(t) != (n,):
            out.append(f"{attr}={n}: {name} {_shape(t)}")
    return out


def _group_norm(m: nn.GroupNorm) -> List[str]:
    out = _per_channel(m, m.num_channels, "num_channels", ("weight", "bias"))
    if m.num_groups < 1 or m.num_channels % m.num_groups:
        out.append(f"num_groups={m.num_groups} does not divide num_channels={m.num_channels}")
    return out


def _normalized_shape(m: nn.Module) -> List[str]:
    shape = tuple(m.normalized_shape)
    return [f"normalized_shape={shape}: {name} {_shape(t)}"
            for name in ("weight", "bias") for t in [getattr(m, name, None)]
            if isinstance(t, torch.Tensor) and _shape(t) != shape]


def _embedding(m: nn.Embedding) -> List[str]:
    if tuple(m.weight.shape) != (m.num_embeddings, m.embedding_dim):
        return [f"num_embeddings={m.num_embeddings}, embedding_dim={m.embedding_dim}: weight {tuple(m.weight.shape)}"]
    return []


def _prelu(m: nn.PReLU) -> List[str]:
    if m.weight.numel() != m.num_parameters:
        return [f"num_parameters={m.num_parameters}: weight {tuple(m.weight.shape)}"]
    return []


def _attention(m: nn.MultiheadAttention) -> List[str]:
    from channelcut.pruning.attention import PrunedMultiheadAttention

    out = []
    h, d = m.num_heads, m.head_dim
    if not isinstance(h, int) or not isinstance(d, int) or h < 1 or d < 1:
        return [f"num_heads={h!r}, head_dim={d!r}: not positive ints"]
    width = h * d
    o = m.out_proj.weight
    if m.embed_dim != o.shape[0]:
        out.append(f"embed_dim={m.embed_dim}: out_proj writes {o.shape[0]} channels")
    if o.shape[1] != width:
        out.append(f"num_heads * head_dim = {h} * {d} = {width}: out_proj reads {o.shape[1]} channels")
    if m.in_proj_weight is not None:
        w = m.in_proj_weight
        if w.shape[0] != 3 * width:
            out.append(f"num_heads * head_dim = {width}: in_proj_weight {tuple(w.shape)} holds q, k, v of {w.shape[0] / 3:g}")
        q_in = k_in = v_in = w.shape[1]
        if m.in_proj_bias is not None and _shape(m.in_proj_bias) != (w.shape[0],):
            out.append(f"in_proj_bias {_shape(m.in_proj_bias)} for in_proj_weight {tuple(w.shape)}")
    else:
        ws = {n: getattr(m, f"{n}_proj_weight") for n in "qkv"}
        for n, w in ws.items():
            if w is None:
                return out + [f"{n}_proj_weight is None and there is no in_proj_weight"]
            if w.shape[0] != width:
                out.append(f"num_heads * head_dim = {width}: {n}_proj_weight {tuple(w.shape)}")
        q_in, k_in, v_in = (ws[n].shape[1] for n in "qkv")
        if m.in_proj_bias is not None and _shape(m.in_proj_bias) != (3 * width,):
            out.append(f"in_proj_bias {_shape(m.in_proj_bias)} for num_heads * head_dim = {width}")
    if m.kdim != k_in:
        out.append(f"kdim={m.kdim}: the k projection reads {k_in} channels")
    if m.vdim != v_in:
        out.append(f"vdim={m.vdim}: the v projection reads {v_in} channels")
    if m._qkv_same_embed_dim and not (m.in_proj_weight is not None and m.kdim == m.vdim == m.embed_dim == q_in):
        out.append(f"_qkv_same_embed_dim=True with embed_dim={m.embed_dim}, kdim={m.kdim}, vdim={m.vdim}, "
                   f"query width {q_in}")
    if not isinstance(m, PrunedMultiheadAttention):
        # the stock layer: one width for everything, split into equal heads
        if m.embed_dim != width or d != m.embed_dim // h:
            out.append(f"nn.MultiheadAttention with embed_dim={m.embed_dim}, num_heads={h}, head_dim={d}")
        if q_in != m.embed_dim:
            out.append(f"nn.MultiheadAttention with embed_dim={m.embed_dim} reads a query of {q_in} channels")
    return out


def _reads(m: nn.Module) -> Optional[int]:
    """How many input channels the layer itself reads (after the selection),
    for the layer types whose weight says so."""
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        return m.weight.shape[1] * m.groups
    if isinstance(m, nn.Linear):
        return m.weight.shape[1]
    if isinstance(m, nn.MultiheadAttention):
        w = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
        return None if w is None else w.shape[1]
    return None


def _subselect(m: nn.Module) -> List[str]:
    out = []
    idx = list(m.subselect_indices)
    n_in = m.subselect_input_channels
    if not idx:
        return ["selects no channel"]
    if not all(isinstance(i, int) for i in idx) or min(idx) < 0:
        out.append(f"subselect_indices {idx[:8]} are not channel indices")
    if not isinstance(n_in, int) or max(idx) >= n_in:
        out.append(f"subselect_input_channels={n_in!r}: reads channel {max(idx)}")
    if m.subselect_length != len(idx) or m.subselect_start != idx[0]:
        out.append(f"subselect_start={m.subselect_start}, subselect_length={m.subselect_length} "
                   f"for indices starting at {idx[0]} ({len(idx)} of them)")
    if m.subselect_contiguous and idx != list(range(idx[0], idx[0] + len(idx))):
        out.append(f"subselect_contiguous=True for indices that are not one range: {idx[:8]}")
    if m.subselect_index.tolist() != idx:
        out.append(f"subselect_index {m.subselect_index.tolist()[:8]} is not subselect_indices {idx[:8]}")
    reads = _reads(m)
    if reads is not None and reads != len(idx):
        out.append(f"selects {len(idx)} channels for a layer that reads {reads}")
    return out


def _module_problems(m: nn.Module) -> List[str]:
    from channelcut.pruning.subselect import SubselectMixin

    out: List[str] = []
    if isinstance(m, nn.modules.conv._ConvNd):
        out += _conv(m)
    elif isinstance(m, nn.Linear):
        out += _linear(m)
    elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        out += _per_channel(m, m.num_features, "num_features", ("weight", "bias", "running_mean", "running_var"))
    elif isinstance(m, nn.GroupNorm):
        out += _group_norm(m)
    elif isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
        out += _normalized_shape(m)
    elif isinstance(m, nn.Embedding):
        out += _embedding(m)
    elif isinstance(m, nn.PReLU):
        out += _prelu(m)
    elif isinstance(m, nn.MultiheadAttention):
        out += _attention(m)
    if isinstance(m, SubselectMixin):
        out += _subselect(m)
    return out


def _input_widths(model: nn.Module, inputs: Any) -> List[str]:
    """Run ``model`` once on ``inputs`` (eval mode, no grad; modes put back):
    each Subselect layer's actual input has ``subselect_input_channels``
    channels along ``subselect_dim``."""
    from channelcut.pruning.subselect import SubselectMixin

    seen: Dict[str, int] = {}
    problems: List[str] = []

    def hook(name: str):
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                n = x.shape[mod.subselect_dim]
                if n != mod.subselect_input_channels and name not in seen:
                    problems.append(f"{name or '<model>'}: subselect_input_channels={mod.subselect_input_channels}, "
                                    f"but its input has {n} channels along dim {mod.subselect_dim}")
                seen[name] = n
        return pre

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True)
               for name, m in model.named_modules() if isinstance(m, SubselectMixin)]
    if not handles:
        return []
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(inputs, dict):
                model(**inputs)
            else:
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return problems


def check_widths(model: nn.Module, inputs: Any = None) -> List[str]:
    """Every way a width attribute of ``model`` disagrees with its tensors,
    one line each, prefixed with the module's name (empty: consistent). With
    ``inputs`` (a list of positional inputs or a dict of keyword inputs), the
    model is also run once to check the Subselect layers' input widths (see
    the module docstring). The model is left as it was.

    >>> conv = nn.Conv2d(4, 6, 3)
    >>> conv.weight.data = conv.weight.data[:, :3]
    >>> check_widths(nn.Sequential(conv))
    ['0: in_channels=4, out_channels=6, groups=1: weight (6, 3, 3, 3) should start with (out, in // groups) = (6, 4)']
    """
    problems = []
    for name, m in model.named_modules():
        problems += [f"{name or '<model>'}: {p}" for p in _module_problems(m)]
    if inputs is not None:
        problems += _input_widths(model, inputs)
    return problems
