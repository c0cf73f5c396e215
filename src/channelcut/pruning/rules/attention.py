"""Attention: ``F.scaled_dot_product_attention`` and
``nn.MultiheadAttention``'s ``F.multi_head_attention_forward``.

The fused multi-head attention function is not traced as one op: it is
*decomposed* (``rule(..., decompose=...)``), run as
:func:`channelcut.pruning.attention.mha_forward` under the tracer, so its
projections, per-head reshapes and the scaled dot product are traced op by op.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import mha_forward
from ..graph import NO_SOURCE
from ..recorder import CompactTrace, Recorder
from ..shape_only import empty, plain
from .registry import OpCall, Unsupported, declare, rule


#: (layout of the arguments) -> (shape, stride, dtype) of the meta output:
#: an attention on views (its output's strides depend on the kernel chosen)
#: runs its decomposition on meta once per layout, not once per layer
_SDPA_LAYOUTS: Dict[Any, Tuple[Tuple[int, ...], Tuple[int, ...], torch.dtype]] = {}


def _layout_key(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("t", tuple(v.shape), tuple(v.stride()), v.dtype, v.storage_offset())
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError


def sdpa_shape(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Shape function of ``scaled_dot_product_attention``: q's shape with v's
    last dim; for views, the output layout the op gave last time it met the
    same argument layouts (the op itself, on meta, the first time)."""
    if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in args[:3]) or args[0].dim() < 2:
        return None
    q, v = args[0], args[2]
    if q.dtype != v.dtype:
        return None
    if all(plain(a) for a in args[:3]):
        return empty(tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)
    try:
        key = (tuple(_layout_key(a) for a in args), tuple(sorted((k, _layout_key(w)) for k, w in kwargs.items())))
    except TypeError:  # an argument whose layout is not known
        return None
    known = _SDPA_LAYOUTS.get(key)
    if known is None:
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        mkw = {k: w.to("meta") if isinstance(w, torch.Tensor) else w for k, w in kwargs.items()}
        out = F.scaled_dot_product_attention(*meta, **mkw)
        if len(_SDPA_LAYOUTS) < 256:
            _SDPA_LAYOUTS[key] = (tuple(out.shape), tuple(out.stride()), out.dtype)
        return out
    shape, stride, dtype = known
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


@rule("scaled_dot_product_attention", shape=sdpa_shape)
def sdpa(rec: Recorder, call: OpCall) -> None:
    """``F.scaled_dot_product_attention``: per-head channels (``(B, H, N,
    D)`` with H carrying them) keep heads independent, coupling each head's
    q, k and v; else the value's channels pass through and need q and k."""
    out = call.out
    q, k, v = call.args[0], call.args[1], call.args[2]
    mask = call.arg(3, "attn_mask")
    heads = [rec.get(x) for x in (q, k, v)]
    per_head = all(t is not None and t.vdim == x.dim() - 3 for t, x in zip(heads, (q, k, v)))
    if per_head and heads[1].ids.numel() == heads[2].ids.numel() and heads[0].ids.numel() != heads[1].ids.numel():
        # grouped-query attention (enable_gqa=True): query head h reads
        # key/value head h // (query heads / key-value heads)
        nq, nkv = heads[0].ids.numel(), heads[1].ids.numel()
        if not call.arg(7, "enable_gqa", False) or nq % nkv:
            raise Unsupported("query and key/value head counts differ")
        heads = [heads[0]] + [CompactTrace.along(t.ids.repeat_interleave(nq // nkv), t.vdim, t.atoms.dim()) for t in heads[1:]]
    if per_head and len({t.ids.numel() for t in heads}) == 1:
        # channels vary per head (B, H, N, D): heads are independent; each head's
        # q, k and v are coupled (kept or removed together)
        merged = rec.union_pairs(rec.union_pairs(heads[0].ids, heads[1].ids), heads[2].ids)
        tm = rec.get(mask) if isinstance(mask, torch.Tensor) else None
        if tm is not None:
            rec.need(merged, rec.couple(tm.ids))
        rec.set(out, CompactTrace.along(merged, out.dim() - 3, out.dim()))
        return
    tv = rec.get(v) or CompactTrace.scalar(NO_SOURCE, v.dim())
    if tv.vdim is not None and tv.vdim != v.dim() - 1:
        tv = CompactTrace.scalar(rec.couple(tv.ids), v.dim())
    qk = [rec.get(x).ids for x in (q, k, mask) if isinstance(x, torch.Tensor) and rec.get(x) is not None]
    rep = rec.couple(torch.cat(qk)) if qk else NO_SOURCE
    rec.need(tv.ids, rep)
    if tv.vdim is None:
        ids = tv.ids if int(tv.ids[0]) >= 0 else torch.tensor([rep])
        rec.set(out, CompactTrace.scalar(int(ids[0]), out.dim()))
    else:
        rec.set(out, CompactTrace.along(tv.ids, out.dim() - 1, out.dim()))


def multi_head_attention(call: OpCall, rec: Recorder) -> Optional[Callable[[], Tuple[Tensor, Optional[Tensor]]]]:
    """A ``F.multi_head_attention_forward`` call as :func:`mha_forward` (run
    under the tracer, each op traced), or None for the configurations that
    stay a barrier.

    Called by ``nn.MultiheadAttention``, whose pruned form runs
    :func:`mha_forward` itself, heads and embedding channels are free. Called
    by any other module (CLIP's attention pooling passes its own projection
    weights), the pruned model still runs ``F.multi_head_attention_forward``,
    which takes the embedding width from the query and requires the query,
    key and value projections to produce exactly that width in
    ``num_heads`` equal heads: a count constraint channel groups cannot
    express. There the query, key and value channels and the projected heads
    are pinned, with that reason; the output projection's rows stay free."""
    if call.func is not F.multi_head_attention_forward:
        return None
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
    defaults = {"training": True, "need_weights": True, "use_separate_proj_weight": False,
                "average_attn_weights": True, "is_causal": False, "add_zero_attn": False}
    a = {n: call.arg(i, n, defaults.get(n)) for i, n in enumerate(names)}
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return None
    if a["static_k"] is not None or a["static_v"] is not None:
        return None
    mask = a["attn_mask"]
    if mask is not None and mask.dim() != 2:
        return None  # a per-head mask: its head layout is literal
    query = a["query"]
    embed_dim, num_heads = int(a["embed_dim_to_check"]), int(a["num_heads"])
    if num_heads <= 0 or embed_dim % num_heads or query.shape[-1] != embed_dim:
        return None
    if a["is_causal"] and mask is None:
        return None  # torch raises for this; let it
    separate = bool(a["use_separate_proj_weight"])
    kpm = a["key_padding_mask"]
    if kpm is not None and kpm.dtype != torch.bool:
        kpm = kpm.to(query.dtype)
    run = lambda: mha_forward(  # noqa: E731
        query, a["key"], a["value"], embed_dim // num_heads,
        None if separate else a["in_proj_weight"], a["in_proj_bias"],
        a["q_proj_weight"] if separate else None,
        a["k_proj_weight"] if separate else None,
        a["v_proj_weight"] if separate else None,
        a["out_proj_weight"], a["out_proj_bias"],
        float(a["dropout_p"]), bool(a["training"]), kpm, bool(a["need_weights"]), mask,
        bool(a["average_attn_weights"]), bool(a["is_causal"]),
    )
    if isinstance(rec.modules.running(), torch.nn.MultiheadAttention):
        return run
    return lambda: _pinned_functional_mha(rec, run, [query, a["key"], a["value"]])


FUNCTIONAL_MHA = ("F.multi_head_attention_forward outside nn.MultiheadAttention takes its width from the "
                  "query and needs num_heads equal heads of the query's width")


def _pinned_functional_mha(rec: Recorder, run: Callable[[], Tuple[Tensor, Optional[Tensor]]],
                           inputs: list) -> Tuple[Tensor, Optional[Tensor]]:
    """Run the decomposed call; pin its inputs' channels and every channel it
    created (the projected heads) except the output projection's rows."""
    rec.pin_all(inputs, FUNCTIONAL_MHA)
    start = len(rec.sources)
    result = run()
    t = rec.get(result[0])
    free = set(t.ids.tolist()) if t is not None else set()
    made = [a for a in range(start, len(rec.sources)) if a not in free]
    if made:
        rec.pin_ids(torch.tensor(made, dtype=torch.long), FUNCTIONAL_MHA)
    return result


declare("multi_head_attention_forward", decompose=multi_head_attention)
