"""``nn.MultiheadAttention`` with pruned heads and pruned embedding channels.

``F.multi_head_attention_forward`` checks that the query is exactly
``embed_dim`` wide and splits ``embed_dim`` into ``num_heads`` equal heads, so a
pruned attention layer (fewer heads, a narrower residual stream in or out) can
not run through it. This module holds one implementation of the same
computation, :func:`mha_forward`, written from ops the tracer understands and
that work for any widths:

- the tracer runs it in place of ``F.multi_head_attention_forward`` (see
  ``rules/attention.py``), so the q/k/v projections, the per-head
  split (heads are whole: ``reshape(..., -1, head_dim)``), the scaled dot
  product attention and the output projection are traced op by op instead of
  being a barrier;
- the pruner gives a pruned ``nn.MultiheadAttention`` the class
  :class:`PrunedMultiheadAttention`, whose ``forward`` calls the same function
  (parameter names, ``state_dict`` keys and ``isinstance`` stay those of
  ``nn.MultiheadAttention``; it scripts, traces and exports).

Configurations it does not cover (``add_bias_kv``, ``add_zero_attn``,
``static_k``/``static_v``, a 3-D per-head ``attn_mask``) stay a barrier: the
layer keeps all its channels and runs unchanged.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
>>> x = torch.randn(1, 5, 8)
>>> ref, _ = mha(x, x, x, need_weights=False)
>>> out, _ = mha_forward(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 4,
...     mha.in_proj_weight, mha.in_proj_bias, None, None, None,
...     mha.out_proj.weight, mha.out_proj.bias, 0.0, False, None, False, None, True, False)
>>> torch.allclose(out.transpose(0, 1), ref, atol=1e-6)
True
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention", "mha_forward", "fix_multihead_attention"]


def _float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean "masked out" mask as an additive float mask (-inf where True)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    head_dim: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    q_proj_weight: Optional[Tensor],
    k_proj_weight: Optional[Tensor],
    v_proj_weight: Optional[Tensor],
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    dropout_p: float,
    training: bool,
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    average_attn_weights: bool,
    is_causal: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Multi-head attention on sequence-first inputs (``(L, N, E)`` or unbatched
    ``(L, E)``), for any projection widths: the number of heads is the q
    projection's width divided by ``head_dim``.

    Same arguments and results as ``F.multi_head_attention_forward`` without
    ``bias_k``/``bias_v``/``add_zero_attn``/``static_k``/``static_v``; the packed
    ``in_proj_weight`` (rows: q, k, v, equal thirds) is used when given, else the
    three separate projection weights.
    """
    unbatched = query.dim() == 2
    if unbatched:
        same_kv = key is value
        same_qk = query is key
        query = query.unsqueeze(1)
        if same_qk and same_kv:
            key = query
            value = query
        else:
            key = key.unsqueeze(1)
            value = key if same_kv else value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz = query.shape[0], query.shape[1]
    src_len = key.shape[0]
    bq: Optional[Tensor] = None
    bk: Optional[Tensor] = None
    bv: Optional[Tensor] = None
    if in_proj_bias is not None:
        bq, bk, bv = in_proj_bias.chunk(3)
    if in_proj_weight is not None:
        if query is key and key is value:
            q, k, v = F.linear(query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
        else:
            wq, wk, wv = in_proj_weight.chunk(3)
            q = F.linear(query, wq, bq)
            k = F.linear(key, wk, bk)
            v = F.linear(value, wv, bv)
    else:
        assert q_proj_weight is not None and k_proj_weight is not None and v_proj_weight is not None
        q = F.linear(query, q_proj_weight, bq)
        k = F.linear(key, k_proj_weight, bk)
        v = F.linear(value, v_proj_weight, bv)
    # (L, N, H*d) -> (N, H, L, d); heads are whole: the head count is what is left
    q = q.reshape(tgt_len, bsz, -1, head_dim).permute(1, 2, 0, 3)
    k = k.reshape(src_len, bsz, -1, head_dim).permute(1, 2, 0, 3)
    v = v.reshape(src_len, bsz, -1, head_dim).permute(1, 2, 0, 3)
    mask: Optional[Tensor] = None
    if attn_mask is not None:
        mask = _float_mask(attn_mask, q.dtype)
        if mask.dim() == 2:
            mask = mask.view(1, 1, tgt_len, src_len)
        else:
            mask = mask.view(bsz, -1, tgt_len, src_len)
    if key_padding_mask is not None:
        kpm = _float_mask(key_padding_mask, q.dtype).view(bsz, 1, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    use_causal = is_causal and key_padding_mask is None and not need_weights
    if use_causal:
        mask = None
    p = dropout_p if training else 0.0
    weights: Optional[Tensor] = None
    if need_weights:
        scores = torch.matmul(q * (float(head_dim) ** -0.5), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        if p > 0.0:
            attn = F.dropout(attn, p=p)
        out = torch.matmul(attn, v)
        weights = attn.mean(dim=1) if average_attn_weights else attn
        if unbatched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=use_causal)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, -1)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if unbatched:
        out = out.squeeze(1)
    return out, weights


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose widths need not match its constructor's.

    ``head_dim`` is that of the original layer; ``num_heads`` is what is left of
    them; ``embed_dim`` is the output width. Calls :func:`mha_forward`.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        return self.run_attention(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)

    def run_attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        need_weights: bool,
        attn_mask: Optional[Tensor],
        average_attn_weights: bool,
        is_causal: bool,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Attention on inputs whose channels are already selected."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = query.transpose(1, 0), key.transpose(1, 0)
                    value = key
            else:
                query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask.to(query.dtype)
        out, weights = mha_forward(
            query, key, value, self.head_dim,
            self.in_proj_weight, self.in_proj_bias,
            self.q_proj_weight, self.k_proj_weight, self.v_proj_weight,
            self.out_proj.weight, self.out_proj.bias,
            self.dropout, self.training, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


def fix_multihead_attention(m: nn.MultiheadAttention, set_attr: Any) -> None:
    """After its parameters were sliced: give ``m`` the class and the
    attributes that describe its new widths (``set_attr(module, name, value)``
    records each change so it can be undone)."""
    w = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
    if w is None:
        return
    head_dim = m.head_dim
    q_rows = w.shape[0] // 3 if m.in_proj_weight is not None else w.shape[0]
    out_dim = m.out_proj.weight.shape[0]
    # (w.shape[1]: the query's width, packed or separate projections alike)
    unchanged = q_rows == m.embed_dim and out_dim == m.embed_dim and w.shape[1] == m.embed_dim
    if unchanged and type(m) is nn.MultiheadAttention:
        return
    if not isinstance(m, PrunedMultiheadAttention):
        set_attr(m, "__class__", PrunedMultiheadAttention)
    set_attr(m, "num_heads", q_rows // head_dim)
    set_attr(m, "embed_dim", out_dim)
    if m.in_proj_weight is not None:
        set_attr(m, "kdim", m.in_proj_weight.shape[1])
        set_attr(m, "vdim", m.in_proj_weight.shape[1])
    else:
        set_attr(m, "kdim", m.k_proj_weight.shape[1])
        set_attr(m, "vdim", m.v_proj_weight.shape[1])
    # keep the fused kernels of nn.TransformerEncoderLayer off: they assume
    # the original widths
    set_attr(m, "_qkv_same_embed_dim", False)
