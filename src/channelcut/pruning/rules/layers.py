"""Layers with weights, and contractions: conv, linear, embedding, matmul,
addmm, einsum.

A conv or linear layer whose weight is a parameter is a **consumer** of its
input channels (they can be cut by slicing the weight) and a **producer** of
fresh output channels; a depthwise conv passes channels through; a grouped
conv keeps its groups uniform. A contraction of two activations couples the
contracted dims.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..counts import ChannelCount
from ..graph import NO_SOURCE, Consumer, Producer
from ..recorder import CompactTrace, Recorder
from ..shape_only import Shape, empty, plain
from .registry import OpCall, Unsupported, rule


def _weighted(args: tuple, kwargs: dict, names: Tuple[str, ...]) -> Optional[Dict[str, Any]]:
    """The arguments of a conv / linear call by name (``names`` in signature
    order), when input and weight are contiguous float tensors of one dtype
    and the bias, if any, is one value per output channel; else None."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    a = dict(zip(names, args), **kwargs)
    x, w, b = a.get("input"), a.get("weight"), a.get("bias")
    if not (plain(x) and plain(w)) or x.dtype != w.dtype or w.dim() < 1:
        return None
    if b is not None and not (plain(b) and b.dtype == x.dtype and tuple(b.shape) == (w.shape[0],)):
        return None
    return a


def conv_shape(n: int) -> Shape:
    """``conv{n}d`` on contiguous float tensors (the real kernel then returns
    a contiguous output): the standard output-size formula."""

    def _tuple(v: Any) -> Optional[Tuple[int, ...]]:
        if isinstance(v, int):
            return (v,) * n
        if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
            return tuple(v)
        return None

    def shape(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        a = _weighted(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
        if a is None:
            return None
        x, w = a["input"], a["weight"]
        if x.dim() not in (n + 1, n + 2) or w.dim() != n + 2:
            return None
        groups = a.get("groups", 1)
        stride, dilation = _tuple(a.get("stride", 1)), _tuple(a.get("dilation", 1))
        pad = a.get("padding", 0)
        if type(groups) is not int or groups < 1 or stride is None or dilation is None:
            return None
        if x.shape[-n - 1] != w.shape[1] * groups or w.shape[0] % groups:
            return None
        kernel = tuple(w.shape[2:])
        span = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if pad == "valid":
            pad = (0,) * n
        elif pad == "same":
            if any(s != 1 for s in stride):
                return None
            pad = None
        else:
            pad = _tuple(pad)
            if pad is None:
                return None
        size = []
        for i in range(n):
            L = int(x.shape[x.dim() - n + i])
            o = L if pad is None else (L + 2 * pad[i] - span[i] - 1) // stride[i] + 1
            if o < 1 or (pad is None and L < 1):
                return None
            size.append(o)
        return empty(tuple(x.shape[: x.dim() - n - 1]) + (int(w.shape[0]),) + tuple(size), x.dtype)

    return shape


def linear_shape(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Shape function of ``linear`` on contiguous float tensors."""
    a = _weighted(args, kwargs, ("input", "weight", "bias"))
    if a is None:
        return None
    x, w = a["input"], a["weight"]
    if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        return None
    return empty(tuple(x.shape[:-1]) + (int(w.shape[0]),), x.dtype)


def _conv(rec: Recorder, call: OpCall, transposed: bool, groups: Any) -> None:
    """A convolution of ``call.args[0]`` with the weight (and bias) of ``call``."""
    name, x, out = call.name, call.args[0], call.out
    w, bias = call.arg(1, "weight"), call.arg(2, "bias")
    wname = rec.param_name(w)
    bname = rec.param_name(bias) if isinstance(bias, torch.Tensor) else None
    in_ids = rec.ids_along(x, 1)
    cin, cout = x.shape[1], out.shape[1]
    module = rec.graph.param_modules.get(wname) if wname else None
    op = rec.new_op(name, preferred=module if module is not None else None)
    if wname is None:
        # a computed weight (e.g. weight standardisation): nothing to slice
        rec.pin_ids(in_ids, f"read by {name} with a computed weight")
        rec.set(out, rec.fresh_pinned(op, out.dim(), f"output of {name} with a computed weight"))
        return
    physical = rec.module == module
    atoms_l: Optional[List[int]] = None
    if groups == 1:
        atoms = rec.new_atom_ids(op, cout)
        atoms_l = atoms.tolist()
        rec.graph.add_consumer(Consumer(op, wname, module, in_ids.tolist(), 0 if transposed else 1, 1, 1, physical, name,
                                        out.numel() // max(cout, 1)))
        rec.graph.add_producer(Producer(op, wname, atoms_l, name, 1 if transposed else 0, bname))
        rec.record_param_use(wname, 1 if transposed else 0, list(range(cout)), atoms_l)
    elif not transposed and w.shape[1] == 1:  # depthwise: channels pass through
        atoms = in_ids.repeat_interleave(cout // cin)
        _depthwise(rec, name, wname, module, groups, in_ids, atoms)
    elif not transposed:  # grouped conv: keep groups uniform
        atoms = _grouped(rec, call, op, wname, module, groups, in_ids, cout)
    else:
        rec.pin_ids(in_ids, "read by a grouped transposed conv")
        atoms = rec.new_atom_ids(op, cout)
        rec.pin_ids(atoms, "output of a grouped transposed conv")
    if bname is not None:
        rec.record_param_use(bname, 0, list(range(cout)), atoms if atoms_l is None else atoms_l)
    elif isinstance(bias, torch.Tensor):
        _computed_bias(rec, bias, atoms, name)
    rec.set(out, CompactTrace.along(atoms, 1, out.dim()) if cout > 1 else CompactTrace.scalar(int(atoms[0]), out.dim()))


def _depthwise(rec: Recorder, name: str, wname: str, module: Optional[str], groups: Any,
               in_ids: torch.Tensor, atoms: torch.Tensor) -> None:
    """A depthwise conv: output channel ``o`` is input channel ``o // m``."""
    cout = atoms.numel()
    rec.record_param_use(wname, 0, list(range(cout)), atoms)
    rec.graph.depthwise.append((wname, atoms.tolist()))
    if module is None or rec.modules.running_name_if(torch.nn.modules.conv._ConvNd) != module:
        # a functional depthwise conv: its group count must follow the channels
        names = rec.modules.int_attrs_equal(groups)
        if len(names) == 1 and not isinstance(groups, ChannelCount):
            rec.add_module_size((rec.module, names[0], in_ids.tolist(), 1))
        elif not isinstance(groups, ChannelCount):
            rec.pin_ids(in_ids, f"depthwise {name} with a fixed group count ({rec.module or '<model>'})")


def _grouped(rec: Recorder, call: OpCall, op: str, wname: str, module: Optional[str], groups: int,
             in_ids: torch.Tensor, cout: int) -> torch.Tensor:
    """A grouped conv: position ``j`` of every group is coupled with position
    ``j`` of group 0, on both sides (one vectorised union per side: RegNet
    has convs of ~50 groups). Returns the output atoms."""
    name = call.name
    k = in_ids.numel() // groups
    ko = cout // groups
    rec.union_pairs(in_ids[:k].expand(groups - 1, k), in_ids[k:].reshape(groups - 1, k))
    atoms = rec.new_atom_ids(op, cout)
    rec.union_pairs(atoms[:ko].expand(groups - 1, ko), atoms[ko:].reshape(groups - 1, ko))
    rec.graph.add_consumer(Consumer(op, wname, module, in_ids.tolist(), 1, groups, 1, False, name))
    rec.graph.add_producer(Producer(op, wname, atoms.tolist(), name, 0, rec.param_name(call.arg(2, "bias"))))
    rec.record_param_use(wname, 1, list(range(k)), in_ids[:k])
    rec.record_param_use(wname, 0, list(range(cout)), atoms)
    return atoms


@rule("conv1d", shape=conv_shape(1))
@rule("conv2d", shape=conv_shape(2))
@rule("conv3d", shape=conv_shape(3))
def conv(rec: Recorder, call: OpCall) -> None:
    """``F.conv{1,2,3}d(input, weight, bias, stride, padding, dilation, groups)``."""
    _conv(rec, call, False, call.arg(6, "groups", 1))


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(rec: Recorder, call: OpCall) -> None:
    """``F.conv_transpose{1,2,3}d(input, weight, bias, stride, padding,
    output_padding, groups, dilation)``: the weight holds input channels in dim 0."""
    _conv(rec, call, True, call.arg(6, "groups", 1))


@rule("convolution")
def convolution(rec: Recorder, call: OpCall) -> None:
    """``torch.convolution(input, weight, bias, stride, padding, dilation,
    transposed, output_padding, groups)``."""
    _conv(rec, call, bool(call.arg(6, "transposed", False)), call.arg(8, "groups", 1))


@rule("linear", shape=linear_shape)
def linear(rec: Recorder, call: OpCall) -> None:
    """``F.linear(input, weight, bias)``."""
    _linear_like(rec, "linear", call.args[0], call.arg(1, "weight"), call.arg(2, "bias"), call.out, weight_in_dim=1)


def _computed_bias(rec: Recorder, bias: torch.Tensor, atoms: torch.Tensor, name: str) -> None:
    """A bias computed from parameters (BEiT's ``cat((q_bias, k_bias, v_bias))``)
    is sliced through its provenance; anything else keeps the outputs."""
    if rec.get(bias) is None and bias.dim() == 1 and bias.shape[0] == atoms.numel() and rec.param_ref(bias):
        rec.align_operand(bias, 1, 0, atoms, f"the bias of {name}")
    else:
        rec.pin_ids(atoms, f"{name} with a computed bias")


def _linear_like(rec: Recorder, name: str, x, w, bias, out, weight_in_dim: int, wname: Optional[str] = None) -> None:
    """``x @ W`` (+ bias) with a parameter ``W`` holding input channels along
    ``weight_in_dim``: a consumer of ``x``'s last dim and a producer of new
    channels (``name``: the op, as reported; ``wname``: the parameter's name
    when ``w`` is a view of it, e.g. ``weight.T``)."""
    t = rec.get(x)
    last = x.dim() - 1
    if t.vdim is not None and t.vdim != last:
        # mixes along a dim that carries no channels (e.g. token mixing): pass through
        wn = wname or rec.param_name(w)
        if wn is None and rec.get(w) is not None:
            raise Unsupported("weight is an activation")
        rec.set(out, CompactTrace(t.atoms, t.vdim))
        return
    wname = wname or rec.param_name(w)
    bname = rec.param_name(bias) if isinstance(bias, torch.Tensor) else None
    in_ids = rec.ids_along(x, last)
    cout = out.shape[-1] if out.dim() else 1
    module = rec.graph.param_modules.get(wname) if wname else None
    op = rec.new_op(name, preferred=module if module is not None else None)
    if wname is None or rec.get(w) is not None:
        rec.pin_ids(in_ids, f"read by {name} with a computed weight")
        if rec.get(w) is not None:
            rec.pin_all([w], f"used as the weight of {name}")
        rec.set(out, rec.fresh_pinned(op, out.dim(), f"output of {name} with a computed weight"))
        return
    physical = rec.module == module and name == "linear"  # matmul/addmm: read outside a Linear: zero columns
    atoms = rec.new_atom_ids(op, cout)
    atoms_l = atoms.tolist()
    rec.graph.add_consumer(Consumer(op, wname, module, in_ids.tolist(), weight_in_dim, 1, -1, physical, name,
                                    out.numel() // max(cout, 1)))
    rec.graph.add_producer(Producer(op, wname, atoms_l, name, 1 - weight_in_dim, bname))
    rec.record_param_use(wname, 1 - weight_in_dim, list(range(cout)), atoms_l)
    if bname is not None:
        rec.record_param_use(bname, 0, list(range(cout)), atoms_l)
    elif isinstance(bias, torch.Tensor):
        _computed_bias(rec, bias, atoms, name)
    rec.set(out, CompactTrace.along(atoms, out.dim() - 1, out.dim()) if cout > 1 else CompactTrace.scalar(int(atoms[0]), out.dim()))


@rule("embedding")
def embedding(rec: Recorder, call: OpCall) -> None:
    """A producer: each column of the table is a fresh channel."""
    out = call.out
    w = call.args[0] if call.func is torch.embedding else call.arg(1, "weight")
    wname = rec.param_name(w)
    d = out.shape[-1]
    module = rec.graph.param_modules.get(wname) if wname else None
    op = rec.new_op("embedding", preferred=module)
    atoms = rec.new_atom_ids(op, d)
    if wname is None:
        rec.pin_ids(atoms, "embedding with a computed table")
    else:
        rec.graph.add_producer(Producer(op, wname, atoms.tolist(), "embedding", 1))
        rec.record_param_use(wname, 1, list(range(d)), atoms)
    rec.set(out, CompactTrace.along(atoms, out.dim() - 1, out.dim()))


@rule("matmul", "mm", "bmm", "__matmul__")
def matmul(rec: Recorder, call: OpCall) -> None:
    """``a @ b``: a linear layer when ``b`` is a 2-d parameter; else the
    contracted dims couple and the others pass through."""
    _matmul(rec, call.args[0], call.args[1], call.out)


@rule("__rmatmul__")
def rmatmul(rec: Recorder, call: OpCall) -> None:
    """``b.__rmatmul__(a)`` is ``a @ b``."""
    _matmul(rec, call.args[1], call.args[0], call.out)


def _transposed_param(rec: Recorder, b: torch.Tensor) -> Optional[str]:
    """The name of the 2-d parameter ``W`` when ``b`` is exactly ``W.T``."""
    refs = rec.param_ref(b) if rec.get(b) is None and b.dim() == 2 else None
    if not refs or len(refs) != 1:
        return None
    name, idx = refs[0]
    shape = rec.graph.param_shapes.get(name)
    if shape is None or len(shape) != 2 or tuple(b.shape) != (shape[1], shape[0]):
        return None
    return name if torch.equal(idx, torch.arange(b.numel()).reshape(shape).t()) else None


def _matmul(rec: Recorder, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if rec.get(b) is None and rec.param_name(b) is not None and b.dim() == 2 and a.dim() >= 1:
        return _linear_like(rec, "matmul", a, b, None, out, weight_in_dim=0)
    transposed = _transposed_param(rec, b) if a.dim() >= 1 else None
    if transposed is not None:  # x @ W.T (Falcon's FalconLinear): a linear layer of W
        return _linear_like(rec, "matmul", a, b, None, out, weight_in_dim=1, wname=transposed)
    if a.dim() < 2 or b.dim() < 2:
        raise Unsupported("matmul with a 1-d operand")
    ta = rec.get(a) or CompactTrace.scalar(NO_SOURCE, a.dim())
    tb = rec.get(b) or CompactTrace.scalar(NO_SOURCE, b.dim())
    nd = out.dim()
    # one operand carries no channel dim (attention weights @ v): the other's
    # channels pass through and need it, like a broadcast gate
    if ta.vdim is None and int(ta.ids[0]) >= 0 and tb.vdim == b.dim() - 1 and b.dim() >= 2:
        rec.need(tb.ids, int(ta.ids[0]))
        rec.set(out, CompactTrace.along(tb.ids, nd - 1, nd))
        return
    if tb.vdim is None and int(tb.ids[0]) >= 0 and ta.vdim == a.dim() - 2 and a.dim() >= 2:
        rec.need(ta.ids, int(tb.ids[0]))
        rec.set(out, CompactTrace.along(ta.ids, nd - 2, nd))
        return
    # contracted dims couple; row dim of a and column dim of b pass through
    ca = ta.atoms
    if ta.vdim == a.dim() - 1:
        ca = torch.full((1,) * a.dim(), rec.couple(ta.ids), dtype=torch.long)
    cb = tb.atoms
    if tb.vdim == b.dim() - 2:
        cb = torch.full((1,) * b.dim(), rec.couple(tb.ids), dtype=torch.long)
    ca = ca.reshape((1,) * (nd - ca.dim()) + tuple(ca.shape))
    cb = cb.reshape((1,) * (nd - cb.dim()) + tuple(cb.shape))
    merged = rec.union_pairs(ca, cb)
    res = rec.compress(merged.contiguous())
    rec.set(out, res)


@rule("einsum")
def einsum(rec: Recorder, call: OpCall) -> None:
    """einsum without ellipsis: contracted letters couple, kept letters pass."""
    args, out = call.args, call.out
    eq = args[0]
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if not isinstance(eq, str) or "..." in eq or not isinstance(out, torch.Tensor):
        raise Unsupported("einsum with ellipsis or operand lists")
    eq = eq.replace(" ", "")
    if "->" in eq:
        lhs, rhs = eq.split("->")
    else:
        lhs = eq
        letters = lhs.replace(",", "")
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    specs = lhs.split(",")
    if len(specs) != len(ops):
        raise Unsupported("einsum operand count")
    merged = torch.full((1,) * len(rhs), NO_SOURCE, dtype=torch.long)
    for spec_, x in zip(specs, ops):
        t = rec.get(x)
        if t is None:
            continue
        if t.vdim is None or spec_[t.vdim] not in rhs:
            c = torch.full((1,) * len(rhs), rec.couple(t.ids), dtype=torch.long)
        else:
            shape = [1] * len(rhs)
            shape[rhs.index(spec_[t.vdim])] = t.ids.numel()
            c = t.ids.reshape(shape)
        merged = rec.union_pairs(merged, c)
    rec.set(out, rec.compress(merged.contiguous()))


@rule("baddbmm")
def baddbmm(rec: Recorder, call: OpCall) -> None:
    """``baddbmm(input, b1, b2, beta, alpha)`` = ``beta * input + alpha * (b1 @ b2)``
    (Bloom's attention scores with the ALiBi bias): the batched product's
    trace (:func:`matmul`), then the sum with ``input`` position by position."""
    from .elementwise import elementwise_into

    args, out = call.args, call.out
    inp, b1, b2 = args[0], args[1], args[2]
    if not all(isinstance(t, torch.Tensor) for t in (inp, b1, b2, out)):
        raise Unsupported("baddbmm without tensor operands")
    product = torch.empty(out.shape, dtype=out.dtype, device="meta")
    _matmul(rec, b1, b2, product)
    elementwise_into(rec, "baddbmm", [inp, product], out)


@rule("addmm")
def addmm(rec: Recorder, call: OpCall) -> None:
    """``addmm(bias, x, W)`` = ``bias + x @ W``: with a parameter ``W`` of shape
    (in, out) this is a linear layer (e.g. GPT-2's Conv1D)."""
    args, kwargs, out = call.args, call.kwargs, call.out
    bias, x, w = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if rec.get(w) is None and rec.param_name(w) is not None and rec.get(bias) is None and beta == 1 and alpha == 1:
        return _linear_like(rec, "addmm", x, w, bias, out, weight_in_dim=0)
    raise Unsupported("addmm with an activation weight or scaled terms")
