"""Mixture-of-experts blocks: fused expert weights split into one MLP per expert.

Hugging Face stores the routed experts of a mixture-of-experts block as 3-D
parameters (``gate_up_proj`` of shape ``(experts, 2 * intermediate, hidden)``
and ``down_proj`` of shape ``(experts, hidden, intermediate)``) and runs them
with data-dependent dispatch (``topk``, ``sort``, ``histc``, ``_grouped_mm``).
One 3-D parameter can not hold experts of different widths, and its rows are
not channels of any one layer, so channelcut exports such a block by first
rewriting it as :class:`SplitExperts`: one :class:`ExpertMLP` of plain
``nn.Linear`` layers per expert, computing the same function (the same
routing weights, the same accumulation order per token, in the hidden
states' dtype). From there every expert is an ordinary gated MLP:

- each expert's intermediate channels are pruned on their own (experts may
  keep different widths: they are stored split, one module per expert);
- the hidden channels the experts read and write follow the residual stream,
  like any dense MLP's;
- whole experts are removed with :func:`remove_experts`, which also drops
  their router rows (see there for when that is exact).

:func:`split_experts` does the rewrite in place and returns the names of the
blocks it rewrote; :class:`~channelcut.MaskingManager` and
:meth:`~channelcut.PruningManager.compute` call it, so the documented workflow
needs no model surgery. Parameter names change from
``mlp.experts.gate_up_proj`` to ``mlp.experts.<e>.gate_proj.weight`` (and
``up_proj``, ``down_proj``), as in the per-expert layout of older Mixtral
checkpoints.

A block is rewritten when it follows Hugging Face's fused-experts pattern
(``transformers.integrations.moe.use_experts_implementation``): gated or not,
transposed or not, concatenated or interleaved gate/up rows, with or without
biases, and the default gate (``act(gate) * up``). Blocks with a custom gate
or a norm after each expert are left fused; they stay a barrier (their
channels are kept, everything around them is still pruned).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .importance import _as_batches, _run

__all__ = ["ExpertMLP", "SplitExperts", "split_experts", "fused_experts_reason", "remove_experts", "removed_experts",
           "expert_usage"]


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, or ``down(act(up(x)))``
    without a gate. Plain ``nn.Linear`` layers, so its intermediate channels
    are pruned like any MLP's."""

    def __init__(self, gate_proj: Optional[nn.Linear], up_proj: nn.Linear, down_proj: nn.Linear,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SplitExperts(nn.ModuleList):
    """The routed experts of one block, one :class:`ExpertMLP` each.

    Called like the fused module it replaces, ``(hidden_states (tokens,
    hidden), top_k_index (tokens, k), top_k_weights (tokens, k))``. Expert
    ``i`` of the list answers to router index ``expert_ids[i]`` (the identity
    until :func:`remove_experts` drops some). An expert runs on the tokens
    routed to it; under a torch function mode (channelcut's tracer) every
    expert runs, also on no tokens, so each one is traced.
    """

    def __init__(self, experts: Iterable[ExpertMLP], expert_ids: Optional[Sequence[int]] = None,
                 num_experts: Optional[int] = None) -> None:
        super().__init__(experts)
        self.expert_ids: List[int] = list(range(len(self))) if expert_ids is None else [int(e) for e in expert_ids]
        if len(self.expert_ids) != len(self):
            raise ValueError(f"{len(self)} experts but {len(self.expert_ids)} expert ids")
        #: the router's width when the block was split (its original expert count)
        self.num_experts = len(self) if num_experts is None else int(num_experts)
        #: each expert's router index in the model as it was split (kept by
        #: :func:`remove_experts`, recorded by ``channelcut.save``)
        self.original_ids: List[int] = list(self.expert_ids)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        every = _observed()
        for expert_id, expert in zip(self.expert_ids, self):
            token_idx, slot = torch.where(top_k_index == expert_id)
            if not every and token_idx.numel() == 0:
                continue  # no token for this expert: nothing to add
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"router width {self.num_experts}, expert ids {self.expert_ids}"


def _observed() -> bool:
    """A torch function mode is active (channelcut's tracer or zero probe):
    run every expert, also those no token is routed to, so each is seen."""
    return bool(torch.overrides._get_current_function_mode_stack())


def fused_experts_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` is not a fused-experts block :func:`split_experts` can
    rewrite, or None when it is one. Modules that are no experts block at all
    get ``"not a fused-experts block"``."""
    down = module._parameters.get("down_proj") if hasattr(module, "_parameters") else None
    if not isinstance(down, torch.Tensor) or down.dim() != 3 or not hasattr(module, "has_gate"):
        return "not a fused-experts block"
    if getattr(module, "has_post_expert_norm", False):
        return "it applies a norm after each expert"
    if getattr(module, "_is_expert_parallel", False):
        return "its experts are sharded across devices (expert parallelism)"
    gate = getattr(type(module), "_apply_gate", None)
    if bool(module.has_gate) and getattr(gate, "__name__", "") != "_default_apply_gate":
        return f"it gates with its own {type(module).__name__}._apply_gate"
    first = "gate_up_proj" if module.has_gate else "up_proj"
    w = module._parameters.get(first)
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != down.shape[0]:
        return f"it has no 3-D {first} with one entry per expert"
    if not callable(getattr(module, "act_fn", None)):
        return "it has no act_fn"
    return None


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (out, in) and ``bias`` as they are (no init)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=bias.requires_grad)
    return lin


def _split(module: nn.Module) -> SplitExperts:
    """One fused-experts block as :class:`SplitExperts` (same function)."""
    transposed = bool(getattr(module, "is_transposed", False))
    gated = bool(module.has_gate)
    bias = bool(getattr(module, "has_bias", False))
    first = "gate_up_proj" if gated else "up_proj"
    w_in: torch.Tensor = module._parameters[first].detach()
    w_out: torch.Tensor = module._parameters["down_proj"].detach()
    b_in = module._parameters.get(first + "_bias") if bias else None
    b_out = module._parameters.get("down_proj_bias") if bias else None
    experts = []
    for e in range(w_in.shape[0]):
        wi = w_in[e].t() if transposed else w_in[e]  # (out, in)
        wo = w_out[e].t() if transposed else w_out[e]
        bi = None if b_in is None else b_in[e].detach()
        bo = None if b_out is None else b_out[e].detach()
        if gated:
            inter = wi.shape[0] // 2
            if getattr(module, "is_concatenated", True):
                rows_g, rows_u = slice(0, inter), slice(inter, 2 * inter)
            else:  # interleaved [g0, u0, g1, u1, ...]
                rows_g, rows_u = slice(0, None, 2), slice(1, None, 2)
            gate = _linear(wi[rows_g], None if bi is None else bi[rows_g])
            up = _linear(wi[rows_u], None if bi is None else bi[rows_u])
        else:
            gate, up = None, _linear(wi, bi)
        experts.append(ExpertMLP(gate, up, _linear(wo, bo), module.act_fn))
    split = SplitExperts(experts, num_experts=int(getattr(module, "num_experts", len(experts))))
    split.train(module.training)
    return split


def split_experts(model: nn.Module) -> List[str]:
    """Rewrite every fused-experts block of ``model`` as :class:`SplitExperts`,
    in place; return the names of the blocks rewritten.

    The model computes the same function afterwards (same routing weights,
    same per-token sums in the same order, in the hidden states' dtype); its
    parameter names change from ``<block>.gate_up_proj`` to
    ``<block>.<e>.gate_proj.weight``, ``.up_proj.weight`` and
    ``.down_proj.weight``. Blocks :func:`fused_experts_reason` turns down
    are left as they are. A model without fused experts is untouched.
    """
    found: List[tuple] = []
    for name, module in model.named_modules():
        if fused_experts_reason(module) is None:
            found.append((name, module))
    done: List[str] = []
    for name, module in found:
        if not name:
            continue  # the model itself is the block: nothing to put it into
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        split = _split(module)
        for pname, p in parent._modules.items():
            if p is module:
                parent._modules[pname] = split
        done.append(name)
    return done


def _router_of(model: nn.Module, block_name: str, block: SplitExperts) -> Tuple[str, nn.Module]:
    """The router of ``block``: the one sibling module whose 2-D ``weight``
    has one row per expert the block answers to."""
    parent_name = block_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    width = max(block.expert_ids) + 1 if block.expert_ids else 0
    found = []
    for name, m in parent.named_children():
        w = m._parameters.get("weight")
        if m is not block and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == width:
            found.append((f"{parent_name}.{name}" if parent_name else name, m))
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise ValueError(f"can not tell the router of {block_name}: modules beside it with a {width}-row weight: "
                         f"{names}. Name it: remove_experts(model, experts, routers={{'{block_name}': <router>}})")
    return found[0]


def expert_usage(model: nn.Module, data: Iterable[Any]) -> Dict[str, torch.Tensor]:
    """How much each routed expert is used on calibration data: per
    :class:`SplitExperts` block (call :func:`split_experts` first, or let a
    manager do it), the routing weight each expert gets, summed over the
    tokens and divided by their number (float64, indexed by the router's
    index as it is now: after :func:`remove_experts`, ``block.original_ids``
    names the experts; an expert no token picks scores 0). The weights are the ones the block
    multiplies its experts' outputs by, so an expert with a small score
    contributes little to the model's output on that data: a score to
    choose experts for :func:`remove_experts` by, e.g. the two least used
    of each block::

        usage = expert_usage(model, batches)
        remove_experts(model, {b: u.argsort()[:2].tolist() for b, u in usage.items()})

    ``data``: model inputs (a tensor, a list of positional inputs or a dict
    of keyword inputs each). The model runs in eval mode without gradients.
    """
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, SplitExperts)}
    if not blocks:
        raise ValueError("the model has no SplitExperts block: call channelcut.moe.split_experts(model) first "
                         "(a model without fused experts has none to score)")
    width = {n: max(b.expert_ids, default=-1) + 1 for n, b in blocks.items()}  # the router's width now
    mass: Dict[str, torch.Tensor] = {n: torch.zeros(width[n], dtype=torch.float64) for n in blocks}
    tokens: Dict[str, int] = {n: 0 for n in blocks}

    def hook_for(name: str) -> Any:
        def pre(module: nn.Module, args: Any) -> None:
            _, index, weights = args[:3]
            m = torch.zeros(width[name], dtype=torch.float64, device=index.device)
            m.index_add_(0, index.reshape(-1).long(), weights.detach().reshape(-1).double())
            mass[name] += m.cpu()
            tokens[name] += index.shape[0]

        return pre

    handles = [b.register_forward_pre_hook(hook_for(n)) for n, b in blocks.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in _as_batches(data, "data"):
                _run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not any(tokens.values()):
        raise ValueError("expert_usage needs at least one batch of data")
    return {n: mass[n] / max(1, tokens[n]) for n in blocks}


def remove_experts(model: nn.Module, experts: Dict[str, Sequence[int]],
                   routers: Optional[Dict[str, str]] = None) -> Dict[str, List[int]]:
    """Remove whole routed experts, with their router rows, in place.

    ``experts`` maps a :class:`SplitExperts` block's name (as
    :func:`split_experts` returned it; call that first, or let a manager do
    it) to the router indices of the experts to remove. The router (found
    beside the block: the module whose ``weight`` has one row per expert, or
    named in ``routers``) loses those rows, and those entries of every buffer
    or bias of one entry per expert (DeepSeek's ``e_score_correction_bias``);
    its int attributes equal to the expert count (``num_experts``) follow.
    Returns, per block, the router indices kept.

    What it computes: exactly the model whose router never picks the removed
    experts (their logits set to ``-inf``). That equals the original model on
    every token whose top-k held none of them when the routing weights are
    renormalised over the top-k (Mixtral; Qwen-MoE and DeepSeek with
    ``norm_topk_prob``) or scored per expert (a sigmoid router); with a
    softmax over all experts and no renormalisation (Qwen2-MoE's default) the
    kept experts' weights grow by the removed ones' share, so the output
    changes on every token. Group-limited routing (``n_group > 1``) is
    refused: removing experts would break its equal groups.
    """
    routers = routers or {}
    plan = []
    for block_name, ids in experts.items():
        block = model.get_submodule(block_name)
        if not isinstance(block, SplitExperts):
            raise TypeError(f"{block_name} is a {type(block).__name__}, not SplitExperts: call "
                            "channelcut.moe.split_experts(model) first")
        drop = sorted({int(i) for i in ids})
        bad = [i for i in drop if i not in block.expert_ids]
        if bad:
            raise ValueError(f"{block_name} has no expert {bad[0]}; its experts: {block.expert_ids}")
        if block_name in routers:
            rname = routers[block_name]
            router = model.get_submodule(rname)
        else:
            rname, router = _router_of(model, block_name, block)
        groups = int(getattr(router, "num_group", getattr(router, "n_group", 1)) or 1)
        if groups > 1:
            raise ValueError(f"{rname} routes within {groups} expert groups: removing experts would "
                             "leave unequal groups; remove none, or a whole group's experts in every group")
        width = router.weight.shape[0]
        left = width - len(drop)
        top_k = int(getattr(router, "top_k", 1) or 1)
        if left < max(top_k, 1):
            raise ValueError(f"{block_name}: removing {len(drop)} of {width} experts leaves {left}, fewer than the "
                             f"{top_k} each token is routed to")
        plan.append((block_name, block, router, drop, width))
    kept_out: Dict[str, List[int]] = {}
    for block_name, block, router, drop, width in plan:
        dropped = set(drop)
        keep = [i for i in range(width) if i not in dropped]
        index = torch.tensor(keep, dtype=torch.long)
        for table in (router._parameters, router._buffers):
            for k, t in list(table.items()):
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == width:
                    new = t.detach().index_select(0, index.to(t.device))
                    table[k] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        for k, v in list(vars(router).items()):
            if type(v) is int and v == width and not k.startswith("_"):
                setattr(router, k, len(keep))
        new_index = {old: i for i, old in enumerate(keep)}
        triples = [(new_index[e], m, o) for e, m, o in zip(block.expert_ids, block, block.original_ids) if e in new_index]
        for i in range(len(block) - 1, -1, -1):
            del block[i]
        for _, m, _ in triples:
            block.append(m)
        block.expert_ids = [e for e, _, _ in triples]
        block.original_ids = [o for _, _, o in triples]
        kept_out[block_name] = keep
    return kept_out


def removed_experts(model: nn.Module) -> Dict[str, List[int]]:
    """Per :class:`SplitExperts` block with experts removed: the original
    router indices of those removed (what ``channelcut.save`` records and
    ``channelcut.load`` replays)."""
    out: Dict[str, List[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, SplitExperts):
            kept = set(m.original_ids)
            gone = [i for i in range(m.num_experts) if i not in kept]
            if gone:
                out[name] = gone
    return out
