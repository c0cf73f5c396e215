"""The op-rule oracle: every rule in ``rules.RULES`` against measured truth.

How to read the tracer's internal representation
------------------------------------------------
(``channelcut.pruning.recorder`` / ``graph`` / ``rules``; the oracle itself is
``tests/op_oracle.py``.)

- An **atom** is an int standing for one channel of one source: a producer's
  output channel (conv/linear/embedding), or a pinned pseudo-channel (model
  input, barrier output). ``graph.sources`` is a :class:`SourceTable`:
  ``find(atom)`` gives the atom's **group** (union-find root); groups are kept
  or removed as a whole; ``is_pinned(atom)`` says the group can never be
  removed and ``pinned_reason`` why. ``-1`` (``NO_SOURCE``) is a constant.
- Each traced tensor ``x`` has a :class:`CompactTrace` in ``rec.get(x)``
  (``rec``: the tracer's :class:`Recorder`): ``.atoms`` is an int64 tensor
  with ``x.dim()`` dims, size 1 everywhere except at most one **varying dim**
  ``.vdim`` (the channel dim, wherever it went), holding one atom per
  position. ``.atoms.expand(x.shape)`` gives the atom of every element.
  ``vdim is None`` means all elements carry one atom (a broadcast scalar, or a
  fully coupled tensor).
- ``graph.needs`` holds ``(a, b)`` edges: "if a's group is kept, b's group is
  kept" (a broadcast scalar feeding many channels).
- ``graph.consumers[op]``: ``in_ids[p]`` is the atom of input position ``p``,
  which can be cut by slicing ``param`` along ``weight_dim`` (grouped convs:
  ``groups``, the mock zeroes columns instead). ``graph.producers[op].out_ids``
  are the fresh atoms of its outputs.
- ``graph.param_uses``: ``ParamUse(param, dim, positions, ids)`` says index
  ``positions[c]`` of ``param`` along ``dim`` belongs to atom ``ids[c]`` and is
  sliced away when that atom's group is removed.

So a rule **claims** that output element ``e`` depends only on the group of
its atom (and the groups that group needs); that input channels read by a
consumer are cut via the weight; and that aligned parameter slices affect
only their atom's group. The oracle (``op_oracle.run_case``) gives every
tracked input fresh atoms along its channel dim, runs the op under a
``Tracer``, perturbs one input channel / parameter slice at a time, and
reports *bugs* (truth depends on something the claims do not cover, or the op
fails / differs when a removable group is physically dropped) and *info*
(claims more than the truth: pins, needless coupling, barriers).

Running ``python tests/test_op_rules.py`` prints the over-claim (info) report.
"""

from __future__ import annotations

import copy
import random
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

from channelcut.pruning import rules
from op_oracle import Case, In, run_case, trace_case

R = random.Random(20241)
D = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def P(*shape, dom: str = "real", seed: int = 0) -> torch.Tensor:
    """A parameter value for a case."""
    g = _g(seed + sum(shape))
    if dom == "pos":
        return torch.rand(shape, generator=g, dtype=D) + 0.5
    return torch.randn(shape, generator=g, dtype=D)


def img(track=1, dom="real", nd=2, c=None) -> In:
    b = R.randint(1, 2)
    c = c or R.randint(2, 5)
    sp = tuple(R.randint(2, 4) for _ in range(nd))
    return In((b, c) + sp, track, dom)


def tok(track=2, dom="real", c=None) -> In:
    return In((R.randint(1, 2), R.randint(2, 4), c or R.randint(2, 5)), track, dom)


CASES: List[Case] = []

# Python operators on tensors dispatch under the aliased op's name in torch 2.x
OPERATOR_ALIASES = {
    "__abs__": "abs", "__add__": "add", "__radd__": "add", "__sub__": "sub", "__mul__": "mul", "__rmul__": "mul",
    "__truediv__": "div", "__rtruediv__": "__rdiv__", "__mod__": "remainder", "__pow__": "pow", "__neg__": "neg",
    "__pos__": "positive", "__matmul__": "matmul", "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge",
    "__ne__": "ne",
}


def case(rule: str, fn: Callable, *ins: In, note: str = "", random: bool = False, **kw) -> None:
    if random:  # random ops draw differently on a smaller input: no removal oracle
        kw["removal"] = False
        note = "random" + (f"; {note}" if note else "")
    if rule in OPERATOR_ALIASES:
        note = f"operator {rule}" + (f"; {note}" if note else "")
        rule = OPERATOR_ALIASES[rule]
    CASES.append(Case(rule, fn, list(ins), note=note, **kw))


# ---------------------------------------------------------------------------
# elementwise: unary math and activations
# ---------------------------------------------------------------------------

UNARY: Dict[str, tuple] = {
    "abs": (torch.abs, "real"), "absolute": (torch.absolute, "real"), "acos": (torch.acos, "unit"),
    "acosh": (torch.acosh, "gt1"), "asin": (torch.asin, "unit"), "asinh": (torch.asinh, "real"),
    "atan": (torch.atan, "real"), "atanh": (torch.atanh, "unit"), "ceil": (torch.ceil, "real"),
    "cos": (torch.cos, "real"), "cosh": (torch.cosh, "real"), "erf": (torch.erf, "real"),
    "erfc": (torch.erfc, "real"), "erfinv": (torch.erfinv, "unit"), "exp": (torch.exp, "real"),
    "exp2": (torch.exp2, "real"), "expm1": (torch.expm1, "real"), "floor": (torch.floor, "real"),
    "frac": (torch.frac, "real"), "log": (torch.log, "pos"), "log10": (torch.log10, "pos"),
    "log1p": (torch.log1p, "pos"), "log2": (torch.log2, "pos"), "logit": (torch.logit, "prob"),
    "neg": (torch.neg, "real"), "negative": (torch.negative, "real"), "reciprocal": (torch.reciprocal, "pos"),
    "round": (lambda x: torch.round(x * 3), "real"), "rsqrt": (torch.rsqrt, "pos"), "sgn": (torch.sgn, "real"),
    "sign": (torch.sign, "real"), "sigmoid": (torch.sigmoid, "real"), "sin": (torch.sin, "real"),
    "sinh": (torch.sinh, "real"), "sqrt": (torch.sqrt, "pos"), "square": (torch.square, "real"),
    "tan": (torch.tan, "unit"), "tanh": (torch.tanh, "real"), "trunc": (lambda x: torch.trunc(x * 3), "real"),
    "nan_to_num": (torch.nan_to_num, "real"), "signbit": (torch.signbit, "real"), "isnan": (torch.isnan, "real"),
    "isinf": (lambda x: torch.isinf(1 / (x.round())), "real"), "isfinite": (torch.isfinite, "real"),
    "logical_not": (torch.logical_not, "bool"), "bitwise_not": (torch.bitwise_not, "int"),
    "relu": (F.relu, "real"), "relu6": (lambda x: F.relu6(x * 4), "real"), "leaky_relu": (F.leaky_relu, "real"),
    "elu": (F.elu, "real"), "selu": (F.selu, "real"), "celu": (F.celu, "real"), "gelu": (F.gelu, "real"),
    "silu": (F.silu, "real"), "mish": (F.mish, "real"), "hardswish": (lambda x: F.hardswish(x * 3), "real"),
    "hardsigmoid": (lambda x: F.hardsigmoid(x * 3), "real"), "hardtanh": (F.hardtanh, "real"),
    "softplus": (F.softplus, "real"), "softsign": (F.softsign, "real"), "tanhshrink": (F.tanhshrink, "real"),
    "threshold": (lambda x: torch.threshold(x, 0.1, 2.0), "real"), "log_sigmoid": (F.logsigmoid, "real"),
    "hardshrink": (F.hardshrink, "real"), "softshrink": (F.softshrink, "real"),
    "rrelu": (lambda x: F.rrelu(x, training=False), "real"), "sigmoid_": (lambda x: x.sigmoid_(), "real"),
    "erf_": (lambda x: x.erf_(), "real"), "__neg__": (lambda x: -x, "real"), "__pos__": (lambda x: +x, "real"),
    "__abs__": (lambda x: abs(x), "real"), "__invert__": (lambda x: ~x, "bool"),
    # dropout: a fixed seed per call makes the masks deterministic
    "dropout": (lambda x: F.dropout(x, 0.5, training=True), "real"),
    "alpha_dropout": (lambda x: F.alpha_dropout(x, 0.5, training=True), "real"),
    "feature_alpha_dropout": (lambda x: F.feature_alpha_dropout(x, 0.5, training=True), "real"),
    "feature_dropout": (lambda x: torch.feature_dropout(x, 0.5, True), "real"),
    "dropout2d": (lambda x: F.dropout2d(x, 0.5, training=True), "real"),
}

RANDOM = {"dropout", "alpha_dropout", "feature_alpha_dropout", "feature_dropout", "dropout1d", "dropout2d",
          "dropout3d", "rand_like", "randn_like", "normal", "uniform", "bernoulli"}
for _name, (_f, _dom) in UNARY.items():
    case(_name, lambda m, x, f=_f: f(x), img(dom=_dom), random=_name in RANDOM)
    case(_name, lambda m, x, f=_f: f(x), tok(dom=_dom), random=_name in RANDOM)
case("relu", lambda m, x: torch.relu_(x), img(), note="in-place variant: base-name rule")
case("relu", lambda m, x: F.relu(x, inplace=True), tok())
case("dropout1d", lambda m, x: F.dropout1d(x, 0.5, training=True), img(nd=1), random=True)
case("dropout3d", lambda m, x: F.dropout3d(x, 0.5, training=True), img(nd=3), random=True)
case("dropout", lambda m, x: F.dropout(x, 0.5, training=False), img(track=2))

# ---------------------------------------------------------------------------
# elementwise: binary / ternary with broadcasting
# ---------------------------------------------------------------------------

BINARY: Dict[str, tuple] = {
    "add": (torch.add, "real", "real"), "sub": (torch.sub, "real", "real"),
    "subtract": (torch.subtract, "real", "real"), "mul": (torch.mul, "real", "real"),
    "multiply": (torch.multiply, "real", "real"), "div": (torch.div, "real", "pos"),
    "divide": (torch.divide, "real", "pos"), "true_divide": (torch.true_divide, "real", "pos"),
    "floor_divide": (torch.floor_divide, "real", "pos"), "remainder": (torch.remainder, "real", "pos"),
    "fmod": (torch.fmod, "real", "pos"), "pow": (torch.pow, "pos", "real"),
    "float_power": (torch.float_power, "pos", "real"), "atan2": (torch.atan2, "real", "real"),
    "maximum": (torch.maximum, "real", "real"), "minimum": (torch.minimum, "real", "real"),
    "fmax": (torch.fmax, "real", "real"), "fmin": (torch.fmin, "real", "real"),
    "hypot": (torch.hypot, "real", "real"), "xlogy": (torch.xlogy, "real", "pos"),
    "copysign": (torch.copysign, "real", "real"), "heaviside": (lambda a, b: torch.heaviside(a.round(), b), "real", "real"),
    "eq": (lambda a, b: torch.eq(a.round(), b.round()), "real", "real"), "ne": (lambda a, b: torch.ne(a.round(), b.round()), "real", "real"),
    "lt": (torch.lt, "real", "real"), "le": (torch.le, "real", "real"), "gt": (torch.gt, "real", "real"),
    "ge": (torch.ge, "real", "real"), "logical_and": (torch.logical_and, "bool", "bool"),
    "logical_or": (torch.logical_or, "bool", "bool"), "logical_xor": (torch.logical_xor, "bool", "bool"),
    "bitwise_and": (torch.bitwise_and, "int", "int"), "bitwise_or": (torch.bitwise_or, "int", "int"),
    "rsub": (torch.rsub, "real", "real"), "clamp_min": (torch.clamp_min, "real", "real"),
    "clamp_max": (torch.clamp_max, "real", "real"), "max": (torch.max, "real", "real"),
    "min": (torch.min, "real", "real"),
    "__add__": (lambda a, b: a + b, "real", "real"), "__radd__": (lambda a, b: a.__radd__(b), "real", "real"),
    "__sub__": (lambda a, b: a - b, "real", "real"), "__rsub__": (lambda a, b: a.__rsub__(b), "real", "real"),
    "__mul__": (lambda a, b: a * b, "real", "real"), "__rmul__": (lambda a, b: a.__rmul__(b), "real", "real"),
    "__truediv__": (lambda a, b: a / b, "real", "pos"), "__rtruediv__": (lambda a, b: a.__rtruediv__(b), "pos", "real"),
    "__rdiv__": (lambda a, b: a.__rdiv__(b), "pos", "real"),
    "__floordiv__": (lambda a, b: a // b, "real", "pos"), "__rfloordiv__": (lambda a, b: a.__rfloordiv__(b), "pos", "real"),
    "__mod__": (lambda a, b: a % b, "real", "pos"), "__rmod__": (lambda a, b: a.__rmod__(b), "pos", "real"),
    "__pow__": (lambda a, b: a ** b, "pos", "real"), "__rpow__": (lambda a, b: a.__rpow__(b), "real", "pos"),
    "__eq__": (lambda a, b: a.round() == b.round(), "real", "real"), "__ne__": (lambda a, b: a.round() != b.round(), "real", "real"),
    "__lt__": (lambda a, b: a < b, "real", "real"), "__le__": (lambda a, b: a <= b, "real", "real"),
    "__gt__": (lambda a, b: a > b, "real", "real"), "__ge__": (lambda a, b: a >= b, "real", "real"),
    "__and__": (lambda a, b: a & b, "bool", "bool"), "__or__": (lambda a, b: a | b, "bool", "bool"),
    "__xor__": (lambda a, b: a ^ b, "bool", "bool"),
}

for _name, (_f, _da, _db) in BINARY.items():
    a = img(dom=_da)
    # same shape, both tracked along the channel dim
    case(_name, lambda m, x, y, f=_f: f(x, y), a, In(a.shape, 1, _db))
    # SE-style broadcast: (B, C, 1, 1) gate
    case(_name, lambda m, x, y, f=_f: f(x, y), a, In(a.shape[:2] + (1, 1), 1, _db))
    # tokens with a per-channel row (B, 1, C), and a scalar-per-token (B, N, 1) operand
    t = tok(dom=_da)
    case(_name, lambda m, x, y, f=_f: f(x, y), t, In((t.shape[0], 1, t.shape[2]), 2, _db))
    case(_name, lambda m, x, y, f=_f: f(x, y), t, In(t.shape[:2] + (1,), 1, _db))

# broadcast against parameters (layer scale), constants and differently-tracked operands
for _name, _f in (("mul", torch.mul), ("add", torch.add), ("__mul__", lambda a, b: a * b), ("sub", torch.sub)):
    a = img()
    c = a.shape[1]
    case(_name, lambda m, x, f=_f: f(x, m.gamma.view(-1, 1, 1)), a, params={"gamma": P(c)}, note="layer scale (C,1,1)")
    t = tok()
    case(_name, lambda m, x, f=_f: f(x, m.gamma), t, params={"gamma": P(t.shape[2])}, note="layer scale (C,)")
    case(_name, lambda m, x, f=_f: f(x, torch.arange(x.shape[1], dtype=x.dtype).view(-1, 1, 1)), img(),
         note="constant per-channel tensor: must pin")
    a = img(c=4)
    case(_name, lambda m, x, y, f=_f: f(x, y), In((a.shape[0], 4, 3, 3), 1), In((a.shape[0], 4, 3, 3), 2),
         note="operands tracked along different dims")
    case(_name, lambda m, x, y, f=_f: f(x, y), In((2, 3, 4, 4), "pin"), In((2, 3, 4, 4), 1),
         note="one operand is a model input (one pinned atom for all its channels)")
    case(_name, lambda m, x, y, f=_f: f(x, y), In((2, 1, 4, 4), 1), In((2, 3, 4, 4), 1),
         note="one operand has a single channel (broadcast)")
    case(_name, lambda m, x, y, f=_f: f(x, y), In((2, 1, 4), 1), In((2, 1, 4), 1),
         note="two single-channel operands")

TERNARY = {
    "lerp": (lambda a, b, c: torch.lerp(a, b, c), ("real", "real", "prob")),
    "addcmul": (lambda a, b, c: torch.addcmul(a, b, c, value=0.5), ("real", "real", "real")),
    "addcdiv": (lambda a, b, c: torch.addcdiv(a, b, c, value=0.5), ("real", "real", "pos")),
    "where": (lambda a, b, c: torch.where(a, b, c), ("bool", "real", "real")),
    "clamp": (lambda a, b, c: torch.clamp(a, min=b, max=c + 2), ("real", "real", "real")),
    "clip": (lambda a, b, c: torch.clip(a, min=b, max=c + 2), ("real", "real", "real")),
}
for _name, (_f, doms) in TERNARY.items():
    a = img()
    case(_name, lambda m, x, y, z, f=_f: f(x, y, z), *[In(a.shape, 1, d) for d in doms])
    case(_name, lambda m, x, y, z, f=_f: f(x, y, z), In(a.shape, 1, doms[0]), In(a.shape[:2] + (1, 1), 1, doms[1]),
         In(a.shape, 1, doms[2]))
_a = img()
case("lerp", lambda m, x, y: torch.lerp(x, y, 0.3), _a, In(_a.shape, 1))
case("clamp", lambda m, x: torch.clamp(x, -0.5, 0.5), img())
case("clip", lambda m, x: x.clip(-0.5, 0.5), tok())
case("masked_fill", lambda m, x, k: x.masked_fill(k, 0.0), In((2, 3, 4, 4), 1), In((2, 3, 4, 4), 1, "bool"))
case("masked_fill", lambda m, x, k: x.masked_fill(k, 0.0), In((2, 3, 4, 4), 1), In((2, 1, 4, 4), None, "bool"))
case("where", lambda m, x, y: torch.where(x > 0, x, y), img(c=3), In((1, 3, 1, 1), 1))
case("where", lambda m, x: torch.where(x > 0, x, m.alpha.view(-1, 1, 1) * x), img(c=4), params={"alpha": P(4)})

# ---------------------------------------------------------------------------
# reductions and ops mixing along a dim
# ---------------------------------------------------------------------------

REDUCE = {
    "sum": lambda x, **k: torch.sum(x, **k), "mean": lambda x, **k: torch.mean(x, **k),
    "amax": lambda x, **k: torch.amax(x, **k), "amin": lambda x, **k: torch.amin(x, **k),
    "max": lambda x, **k: torch.max(x, **k), "min": lambda x, **k: torch.min(x, **k),
    "prod": lambda x, **k: torch.prod(x, **k), "logsumexp": lambda x, **k: torch.logsumexp(x, **k),
    "nansum": lambda x, **k: torch.nansum(x, **k), "nanmean": lambda x, **k: torch.nanmean(x, **k),
    "median": lambda x, **k: torch.median(x, **k), "nanmedian": lambda x, **k: torch.nanmedian(x, **k),
    "std": lambda x, **k: torch.std(x, **k), "var": lambda x, **k: torch.var(x, **k),
    "std_mean": lambda x, **k: torch.std_mean(x, **k), "var_mean": lambda x, **k: torch.var_mean(x, **k),
    "argmax": lambda x, **k: torch.argmax(x, **k), "argmin": lambda x, **k: torch.argmin(x, **k),
    "aminmax": lambda x, **k: torch.aminmax(x, **k), "mode": lambda x, **k: torch.mode(x, **k),
}
SINGLE_DIM = {"max", "min", "median", "nanmedian", "argmax", "argmin", "aminmax", "mode", "prod"}
for _name, _f in REDUCE.items():
    dims = [1, -1] if _name in SINGLE_DIM else [1, (2, 3), (1, 3)]
    for dim in dims:
        for keep in (False, True):
            case(_name, lambda m, x, f=_f, d=dim, k=keep: f(x, dim=d, keepdim=k), img())
    if _name not in ("aminmax", "mode", "logsumexp"):
        case(_name, lambda m, x, f=_f: f(x), img(), note="full reduction")
    case(_name, lambda m, x, f=_f: f(x, dim=1), tok(), note="tokens: reduce over N")
for _name, _f in (("all", torch.all), ("any", torch.any), ("count_nonzero", torch.count_nonzero)):
    dom = "int" if _name == "count_nonzero" else "bool"
    case(_name, lambda m, x, f=_f: f(x, dim=1), img(dom=dom))
    case(_name, lambda m, x, f=_f: f(x, dim=2), img(dom=dom))
    case(_name, lambda m, x, f=_f: f(x), img(dom=dom))
case("sum", lambda m, x: x.sum(1, True), img(), note="positional keepdim")
case("mean", lambda m, x: x.mean([2, 3], True), img())
case("std", lambda m, x: torch.std(x, 2, True), img(), note="positional unbiased")
case("var", lambda m, x: x.var(2, keepdim=True), img())
case("max", lambda m, x: x.max(1).values, img())
case("max", lambda m, x: x.max(), img())
case("norm", lambda m, x: torch.norm(x, dim=1), img())
case("norm", lambda m, x: x.norm(p=2, dim=(2, 3), keepdim=True), img())
case("norm", lambda m, x: x.norm(dim=-1), tok())
case("linalg_vector_norm", lambda m, x: torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True), In((2, 3, 3, 4), 3),
     note="ConvNeXt-V2 GRN (channels last)")
case("linalg_vector_norm", lambda m, x: torch.linalg.vector_norm(x, dim=1), img(), note="over channels")
case("linalg_vector_norm", lambda m, x: torch.linalg.vector_norm(x), img(), note="all dims")
case("norm", lambda m, x: x.norm(), img())

MIX = {
    "softmax": lambda x, d: torch.softmax(x, d), "log_softmax": lambda x, d: F.log_softmax(x, d),
    "softmin": lambda x, d: F.softmin(x, d), "cumsum": lambda x, d: torch.cumsum(x, d),
    "cumprod": lambda x, d: torch.cumprod(x, d), "logcumsumexp": lambda x, d: torch.logcumsumexp(x, d),
    "cummax": lambda x, d: torch.cummax(x, d), "cummin": lambda x, d: torch.cummin(x, d),
    "normalize": lambda x, d: F.normalize(x, dim=d),
}
for _name, _f in MIX.items():
    for d in (1, -1):
        case(_name, lambda m, x, f=_f, d=d: f(x, d), img())
        case(_name, lambda m, x, f=_f, d=d: f(x, d), tok())
case("softmax", lambda m, x: F.softmax(x, dim=1), img(track=2), note="channels on a spatial dim")
case("normalize", lambda m, x: F.normalize(x), img())

# ---------------------------------------------------------------------------
# spatial ops: pooling, resampling, padding
# ---------------------------------------------------------------------------


def sp(nd: int, track=1, size: int = 4) -> In:
    return In((R.randint(1, 2), R.randint(2, 4)) + (size,) * nd, track)


for nd in (1, 2, 3):
    mp = {1: torch.max_pool1d, 2: torch.max_pool2d, 3: torch.max_pool3d}[nd]
    case(f"max_pool{nd}d", lambda m, x, f=mp: f(x, 2), sp(nd))
    fmp = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    case(f"max_pool{nd}d", lambda m, x, f=fmp: f(x, 2), sp(nd, track=2), note="channels on a spatial dim")
    case(f"max_pool{nd}d_with_indices", lambda m, x, f=fmp: f(x, 2, return_indices=True), sp(nd))
    ap = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    case(f"avg_pool{nd}d", lambda m, x, f=ap: f(x, 2), sp(nd))
    case(f"avg_pool{nd}d", lambda m, x, f=ap: f(x, 2, stride=1, padding=1), sp(nd, track=nd + 1))
    aap = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd]
    case(f"adaptive_avg_pool{nd}d", lambda m, x, f=aap: f(x, 1), sp(nd))
    case(f"adaptive_avg_pool{nd}d", lambda m, x, f=aap: f(x, 3), sp(nd))
    amp = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[nd]
    case(f"adaptive_max_pool{nd}d", lambda m, x, f=amp: f(x, 2), sp(nd))
    case(f"adaptive_max_pool{nd}d_with_indices", lambda m, x, f=amp: f(x, 2, return_indices=True), sp(nd))
    lp = {1: F.lp_pool1d, 2: F.lp_pool2d, 3: F.lp_pool3d}[nd]
    case(f"lp_pool{nd}d", lambda m, x, f=lp: f(x.abs() + 0.1, 2.0, 2), sp(nd))
case("fractional_max_pool2d", lambda m, x: F.fractional_max_pool2d(x, 2, output_size=2, _random_samples=torch.full((x.shape[0], x.shape[1], 2), 0.5, dtype=x.dtype)), sp(2))
case("fractional_max_pool3d", lambda m, x: F.fractional_max_pool3d(x, 2, output_size=2, _random_samples=torch.full((x.shape[0], x.shape[1], 3), 0.5, dtype=x.dtype)), sp(3, size=5))
for mode, nd in (("nearest", 2), ("bilinear", 2), ("bicubic", 2), ("linear", 1), ("trilinear", 3), ("area", 2)):
    kw = {} if mode in ("nearest", "area") else {"align_corners": False}
    case("interpolate", lambda m, x, mo=mode, kw=kw: F.interpolate(x, scale_factor=2, mode=mo, **kw), sp(nd, size=3))
case("interpolate", lambda m, x: F.interpolate(x, size=(5, 2)), sp(2, size=3))
case("interpolate", lambda m, x: F.interpolate(x, scale_factor=2), In((2, 3, 4), 2), note="channels last (B, N, C): resamples them")
case("grid_sample", lambda m, x, g: F.grid_sample(x, g * 1.8 - 0.9, align_corners=False), In((2, 3, 4, 4), 1),
     In((2, 3, 3, 2), None, "prob"))
case("grid_sample", lambda m, x, g: F.grid_sample(x, g * 1.8 - 0.9, align_corners=True), In((2, 3, 4, 4), 1),
     In((2, 3, 3, 2), 3, "prob"), note="a tracked grid")
case("pad", lambda m, x: F.pad(x, (1, 2)), img())
case("pad", lambda m, x: F.pad(x, (1, 1, 1, 1), mode="reflect"), img())
case("pad", lambda m, x: F.pad(x, (0, 0, 0, 0, 1, 0)), img(), note="pads channels")
case("pad", lambda m, x: F.pad(x, (1, 0)), tok(), note="pads channels of tokens")

# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------

for nd in (1, 2, 3):
    x = sp(nd, size=3)
    c = x.shape[1]
    bufs = {"rm": P(c) * 0.1, "rv": P(c, dom="pos")}
    case("batch_norm", lambda m, x: F.batch_norm(x, m.rm, m.rv, m.w, m.b, training=False), x,
         params={"w": P(c), "b": P(c)}, buffers=bufs)
case("batch_norm", lambda m, x: F.batch_norm(x, None, None, training=True), img(), note="batch statistics")
case("batch_norm", lambda m, x: F.batch_norm(x, m.rm, m.rv, training=False), In((3, 4), 1),
     buffers={"rm": P(4), "rv": P(4, dom="pos")})
case("instance_norm", lambda m, x: F.instance_norm(x, weight=m.w, bias=m.b), In((2, 3, 4, 4), 1),
     params={"w": P(3), "b": P(3)})
case("instance_norm", lambda m, x: F.instance_norm(x), img(nd=1))
case("layer_norm", lambda m, x: F.layer_norm(x, x.shape[-1:], m.w, m.b), In((2, 3, 5), 2),
     params={"w": P(5), "b": P(5)}, note="over the channels: couples them")
case("layer_norm", lambda m, x: F.layer_norm(x, x.shape[-2:]), img(), note="over spatial dims: per channel")
case("layer_norm", lambda m, x: F.layer_norm(x, x.shape[-2:], m.w), In((2, 3, 4, 5), 1),
     params={"w": P(4, 5)}, note="over spatial dims, with a weight")
case("layer_norm", lambda m, x: F.layer_norm(x, x.shape[1:]), img(), note="over (C, H, W)")
case("rms_norm", lambda m, x: F.rms_norm(x, x.shape[-1:], m.w), In((2, 3, 5), 2), params={"w": P(5)})
case("rms_norm", lambda m, x: F.rms_norm(x, x.shape[-2:]), img())
case("group_norm", lambda m, x: F.group_norm(x, 2, m.w, m.b), In((2, 6, 3, 3), 1), params={"w": P(6), "b": P(6)})
case("group_norm", lambda m, x: F.group_norm(x, 3), In((2, 6, 3), 1), removal=False,
     note="literal num_groups (the pruner fixes nn.GroupNorm.num_groups; a literal cannot change)")
case("group_norm", lambda m, x: F.group_norm(x, 1), img())
case("group_norm", lambda m, x: F.group_norm(x, x.shape[1]), img())
case("local_response_norm", lambda m, x: F.local_response_norm(x, 2), img())
case("prelu", lambda m, x: F.prelu(x, m.w), In((2, 4, 3, 3), 1), params={"w": P(4)})
case("prelu", lambda m, x: F.prelu(x, m.w), img(), params={"w": P(1)})
case("glu", lambda m, x: F.glu(x, 1), In((2, 6, 3, 3), 1), note="halves the channels")
case("glu", lambda m, x: F.glu(x, -1), In((2, 3, 4, 4), 1))

# ---------------------------------------------------------------------------
# producers and consumers
# ---------------------------------------------------------------------------

for nd in (1, 2, 3):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    convT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    k = (2,) * nd
    case(f"conv{nd}d", lambda m, x, f=conv: f(x, m.w, m.b, padding=1), In((2, 3) + (3,) * nd, 1),
         params={"w": P(4, 3, *k), "b": P(4)})
    case(f"conv{nd}d", lambda m, x, f=conv: f(x, m.w, groups=4), In((1, 4) + (3,) * nd, 1),
         params={"w": P(8, 1, *k)}, note="depthwise, multiplier 2")
    case(f"conv{nd}d", lambda m, x, f=conv: f(x, m.w, m.b, groups=3), In((1, 3) + (3,) * nd, 1),
         params={"w": P(3, 1, *k), "b": P(3)}, note="depthwise")
    case(f"conv{nd}d", lambda m, x, f=conv: f(x, m.w, groups=2), In((1, 4) + (3,) * nd, 1),
         params={"w": P(6, 2, *k)}, note="grouped")
    case(f"conv_transpose{nd}d", lambda m, x, f=convT: f(x, m.w, m.b, stride=2), In((1, 3) + (3,) * nd, 1),
         params={"w": P(3, 5, *k), "b": P(5)})
    case(f"conv_transpose{nd}d", lambda m, x, f=convT: f(x, m.w, groups=2), In((1, 4) + (2,) * nd, 1),
         params={"w": P(4, 3, *k)}, note="grouped transposed")
case("conv2d", lambda m, x: F.conv2d(x, m.w * 2), In((1, 3, 4, 4), 1), params={"w": P(2, 3, 1, 1)},
     note="computed weight")
case("conv2d", lambda m, x: F.conv2d(x, m.w), In((1, 3, 4, 4), 2), params={"w": P(2, 3, 1, 1)},
     note="channels traced along H")
case("convolution", lambda m, x: torch.convolution(x, m.w, m.b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
     In((1, 3, 3, 3), 1), params={"w": P(2, 3, 1, 1), "b": P(2)})
case("convolution", lambda m, x: torch.convolution(x, m.w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1),
     In((1, 3, 3, 3), 1), params={"w": P(3, 2, 2, 2)}, note="transposed")
case("linear", lambda m, x: F.linear(x, m.w, m.b), In((3, 4), 1), params={"w": P(5, 4), "b": P(5)})
case("linear", lambda m, x: F.linear(x, m.w), In((2, 3, 4), 2), params={"w": P(5, 4)})
case("linear", lambda m, x: F.linear(x, m.w), In((2, 3, 4), 1), params={"w": P(5, 4)}, note="token mixing")
case("linear", lambda m, x: F.linear(x, m.w * 1.0), In((3, 4), 1), params={"w": P(5, 4)}, note="computed weight")
case("linear", lambda m, x, w: F.linear(x, w), In((3, 4), 1), In((5, 4), 1), note="weight is an activation")
case("addmm", lambda m, x: torch.addmm(m.b, x, m.w), In((3, 4), 1), params={"w": P(4, 5), "b": P(5)},
     note="GPT-2 Conv1D: weight (in, out)")
case("addmm", lambda m, x: torch.addmm(m.b, x, m.w, beta=0.5), In((3, 4), 1), params={"w": P(4, 5), "b": P(5)},
     note="scaled bias: barrier")
case("embedding", lambda m, i: F.embedding(i, m.w), In((2, 3), "pin", "long_idx:5"), params={"w": P(5, 4)})
case("embedding", lambda m, i: torch.embedding(m.w, i), In((2, 3), "pin", "long_idx:5"), params={"w": P(5, 4)})
case("matmul", lambda m, x: torch.matmul(x, m.w), In((2, 3, 4), 2), params={"w": P(4, 5)}, note="x @ W")
case("matmul", lambda m, x, y: x @ y.transpose(-2, -1), In((2, 3, 4), 2), In((2, 5, 4), 2), note="q @ k^T")
case("matmul", lambda m, a, v: a @ v, In((2, 3, 5), None, "prob"), In((2, 5, 4), 2), note="attn @ v")
case("matmul", lambda m, a, v: torch.matmul(a, v), In((2, 3, 5), 2), In((2, 5, 4), 2), note="both tracked")
case("matmul", lambda m, x: torch.matmul(x, m.w), In((3, 4), 1), params={"w": P(4)}, note="matrix @ vector")
case("matmul", lambda m, x: x @ m.w.T, In((2, 3, 4), 2), params={"w": P(5, 4)}, note="x @ W.T (Falcon's FalconLinear)")
case("matmul", lambda m, x: x @ m.w.t(), In((3, 4), 1), params={"w": P(5, 4)}, note="x @ W.t()")
case("mm", lambda m, x: torch.mm(x, m.w), In((3, 4), 1), params={"w": P(4, 2)})
case("mm", lambda m, x, y: torch.mm(x, y), In((3, 4), 1), In((4, 2), 1))
case("bmm", lambda m, x, y: torch.bmm(x, y), In((2, 3, 4), 2), In((2, 4, 5), 2))
case("bmm", lambda m, x, y: torch.bmm(x, y), In((2, 3, 4), 1), In((2, 4, 5), 1))
case("baddbmm", lambda m, b, q, k: torch.baddbmm(b, q, k, beta=1.0, alpha=0.5), In((2, 3, 5), None, "real"),
     In((2, 3, 4), 2), In((2, 4, 5), 1), note="Bloom: ALiBi bias + scaled q @ k")
case("baddbmm", lambda m, b, x, y: torch.baddbmm(b, x, y), In((2, 3, 5), 2), In((2, 3, 4), 1), In((2, 4, 5), 2),
     note="channels pass through the product")
case("__matmul__", lambda m, x, y: x.__matmul__(y), In((2, 3, 4), 2), In((2, 4, 5), 2))
case("__rmatmul__", lambda m, x, y: x.__rmatmul__(y), In((2, 4, 5), 2), In((2, 3, 4), 2))
case("scaled_dot_product_attention", lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v),
     In((2, 3, 4), 2), In((2, 5, 4), 2), In((2, 5, 6), 2))
case("scaled_dot_product_attention", lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
     In((1, 2, 3, 4), 3), In((1, 2, 3, 4), 3), In((1, 2, 3, 4), 1), note="v tracked along heads")
case("einsum", lambda m, x: torch.einsum("bnc,dc->bnd", x, m.w), In((2, 3, 4), 2), params={"w": P(5, 4)})
case("einsum", lambda m, x, y: torch.einsum("bnc,bmc->bnm", x, y), In((2, 3, 4), 2), In((2, 5, 4), 2))
case("einsum", lambda m, x, y: torch.einsum("bchw,bc->bchw", x, y), In((2, 3, 2, 2), 1), In((2, 3), 1))
case("einsum", lambda m, x: torch.einsum("bchw->bhwc", x), img())

# ---------------------------------------------------------------------------
# data movement
# ---------------------------------------------------------------------------


def mv(rule: str, fn: Callable, *ins: In, note: str = "") -> None:
    case(rule, fn, *ins, note=note)


mv("reshape", lambda m, x: x.reshape(x.shape[0], x.shape[1], -1), img())
mv("reshape", lambda m, x: x.reshape(x.shape[0], -1), img(), note="flatten channels with space")
mv("reshape", lambda m, x: x.reshape(x.shape[0], 2, x.shape[1] // 2, *x.shape[2:]), In((2, 6, 2, 2), 1), note="split channels")
mv("view", lambda m, x: x.view(x.shape[0], x.shape[1], -1), img())
mv("view", lambda m, x: x.view(-1, x.shape[-1]), tok())
mv("view", lambda m, x: x.view(x.shape[0], 2, x.shape[1] // 2, x.shape[2]).transpose(1, 2).reshape(x.shape),
   In((2, 6, 3), 1), note="channel shuffle by view")
mv("view", lambda m, x: x.view(x.shape[0], 2, x.shape[1] // 2, x.shape[2]).transpose(1, 2).reshape(x.shape),
   In((2, 2, 3), 1), note="channel shuffle by view, one channel per group")
mv("flatten", lambda m, x: x.flatten(1), img())
mv("flatten", lambda m, x: x.flatten(2), img())
mv("flatten", lambda m, x: torch.flatten(x, 0, 1), tok())
mv("unflatten", lambda m, x: x.unflatten(1, (2, x.shape[1] // 2)), In((2, 6, 3), 1))
mv("unflatten", lambda m, x: x.unflatten(2, (2, 2)), In((2, 3, 4), 1))
mv("ravel", lambda m, x: x.ravel(), In((1, 3, 2), 1))
for rule, fn in (("permute", lambda m, x: x.permute(0, 2, 3, 1)), ("transpose", lambda m, x: x.transpose(1, 3)),
                 ("swapaxes", lambda m, x: x.swapaxes(1, 2)), ("swapdims", lambda m, x: x.swapdims(1, -1)),
                 ("movedim", lambda m, x: x.movedim(1, -1)), ("moveaxis", lambda m, x: torch.moveaxis(x, 1, 2)),
                 ("get:mT", lambda m, x: x.mT), ("get:mH", lambda m, x: x.mH)):
    mv(rule, fn, img())
mv("t", lambda m, x: x.t(), In((3, 4), 1))
mv("get:T", lambda m, x: x.T, In((3, 4), 1))
mv("get:H", lambda m, x: x.H, In((3, 4), 0))
mv("squeeze", lambda m, x: x.squeeze(2), In((2, 3, 1, 4), 1))
mv("squeeze", lambda m, x: x.squeeze(), In((1, 3, 1, 4), 1))
mv("unsqueeze", lambda m, x: x.unsqueeze(1), img())
mv("expand", lambda m, x: x.expand(-1, -1, 3, 3), In((2, 3, 1, 1), 1))
mv("expand", lambda m, x: x.expand(-1, 4, -1), In((2, 1, 3), 1), note="expands a single channel")
mv("expand_as", lambda m, x, y: x.expand_as(y), In((2, 3, 1, 1), 1), In((2, 3, 2, 2), None))
mv("broadcast_to", lambda m, x: x.broadcast_to((2,) + tuple(x.shape)), img())
mv("repeat", lambda m, x: x.repeat(1, 1, 2, 2), img())
mv("repeat", lambda m, x: x.repeat(1, 2, 1, 1), img(), note="tiles channels")
mv("tile", lambda m, x: x.tile((1, 2)), tok())
mv("repeat_interleave", lambda m, x: x.repeat_interleave(2, dim=1), img())
mv("repeat_interleave", lambda m, x: x.repeat_interleave(2, dim=2), img())
mv("__getitem__", lambda m, x: x[:, :, 1:], img())
mv("__getitem__", lambda m, x: x[:, 1:3], In((2, 4, 2, 2), 1), note="literal channel slice")
mv("__getitem__", lambda m, x: x[..., 0], tok(), note="selects one channel")
mv("__getitem__", lambda m, x: x[:, 0], tok(), note="cls token")
mv("__getitem__", lambda m, x: x[:, None], img())
mv("__getitem__", lambda m, x: x[:, torch.tensor([2, 0])], In((2, 3, 2), 1), note="index tensor on channels")
mv("__getitem__", lambda m, x: x[:, :, torch.tensor([1, 0])], In((2, 3, 2), 1))
mv("__getitem__", lambda m, x: x[:, ::2], In((2, 4, 2), 1), note="strided channel slice")
mv("__getitem__", lambda m, x, k: x[k], In((3, 4), 1), In((3,), None, "bool"), note="boolean row mask")
mv("narrow", lambda m, x: x.narrow(2, 0, 2), img())
mv("narrow", lambda m, x: x.narrow(1, 1, 2), In((2, 4, 2), 1))
mv("narrow_copy", lambda m, x: torch.narrow_copy(x, 2, 0, 2), img())
mv("select", lambda m, x: x.select(2, 0), img())
mv("select", lambda m, x: x.select(1, 1), img())
mv("index_select", lambda m, x: x.index_select(2, torch.tensor([1, 0])), img())
mv("index_select", lambda m, x: x.index_select(1, torch.tensor([1, 0])), In((2, 3, 2), 1))
for rule, fn in (("cat", torch.cat), ("concat", torch.concat), ("concatenate", torch.concatenate)):
    mv(rule, lambda m, x, y, f=fn: f([x, y], 1), In((2, 3, 2, 2), 1), In((2, 4, 2, 2), 1))
    mv(rule, lambda m, x, y, f=fn: f([x, y], 2), In((2, 3, 2, 2), 1), In((2, 3, 3, 2), 1))
mv("cat", lambda m, x, y: torch.cat([x, y, x], -1), In((2, 3, 2), 2), In((2, 3, 4), 2), note="the same tensor twice")
mv("cat", lambda m, x, y: torch.cat([x, y], 1), In((2, 3, 2), 1), In((2, 2, 2), None), note="with a constant")
mv("cat", lambda m, x, y: torch.cat([x, y], 1), In((2, 3, 2), 1), In((2, 2, 2), 2), note="operands tracked along different dims")
mv("stack", lambda m, x, y: torch.stack([x, y], 1), In((2, 3, 2), 1), In((2, 3, 2), 1))
mv("stack", lambda m, x, y: torch.stack([x, y], -1), In((2, 3, 4), 2), In((2, 3, 4), 2))
mv("hstack", lambda m, x, y: torch.hstack([x, y]), In((2, 3), 1), In((2, 4), 1))
mv("vstack", lambda m, x, y: torch.vstack([x, y]), In((2, 3), 1), In((2, 3), 1))
mv("dstack", lambda m, x, y: torch.dstack([x, y]), In((2, 3, 2), 2), In((2, 3, 1), 2))
for rule, fn in (("split", lambda x: x.split(2, 1)), ("chunk", lambda x: x.chunk(2, 1)),
                 ("tensor_split", lambda x: x.tensor_split(2, 1)), ("unbind", lambda x: x.unbind(1)),
                 ("split_with_sizes", lambda x: x.split_with_sizes([1, 3], 1)),
                 ("split_copy", lambda x: torch.split_copy(x, 2, 1)), ("unsafe_split", lambda x: torch.unsafe_split(x, 2, 1)),
                 ("unsafe_chunk", lambda x: torch.unsafe_chunk(x, 2, 1))):
    mv(rule, lambda m, x, f=fn: f(x), In((2, 4, 3), 1), note="along channels")
    mv(rule, lambda m, x, f=fn: f(x.transpose(1, 2).contiguous()), In((2, 4, 4), 1), note="along a non-channel dim")
mv("flip", lambda m, x: x.flip(2), img())
mv("flip", lambda m, x: x.flip(1), img(), note="reverses channels")
mv("fliplr", lambda m, x: x.fliplr(), In((3, 4), 1))
mv("flipud", lambda m, x: x.flipud(), In((3, 4), 1))
mv("roll", lambda m, x: x.roll(1, 2), img())
mv("roll", lambda m, x: x.roll(1, 1), img(), note="rolls channels")
mv("rot90", lambda m, x: torch.rot90(x, 1, (2, 3)), img())
mv("gather", lambda m, x: x.gather(2, torch.zeros(x.shape[0], x.shape[1], 1, x.shape[3], dtype=torch.long)), img())
mv("gather", lambda m, x: x.gather(1, torch.zeros(x.shape[0], 1, x.shape[2], dtype=torch.long)), In((2, 3, 2), 1))
mv("take_along_dim", lambda m, x: torch.take_along_dim(x, x.argmax(2, keepdim=True), 2), img())
mv("view_as", lambda m, x, y: x.view_as(y), In((2, 3, 4), 1), In((2, 3, 2, 2), None))
mv("reshape_as", lambda m, x, y: x.reshape_as(y), In((2, 3, 4), 1), In((2, 3, 2, 2), None))
mv("pixel_shuffle", lambda m, x: F.pixel_shuffle(x, 2), In((1, 8, 2, 2), 1))
mv("pixel_unshuffle", lambda m, x: F.pixel_unshuffle(x, 2), In((1, 2, 4, 4), 1))
mv("channel_shuffle", lambda m, x: F.channel_shuffle(x, 2), In((1, 6, 2, 2), 1))
mv("channel_shuffle", lambda m, x: F.channel_shuffle(x, 2), In((1, 2, 2, 2), 1), note="one channel per group")
mv("native_channel_shuffle", lambda m, x: torch.native_channel_shuffle(x, 3), In((1, 6, 2, 2), 1))
mv("unfold", lambda m, x: x.unfold(2, 2, 1), img(), note="Tensor.unfold over a spatial dim")
mv("unfold", lambda m, x: F.unfold(x, 2), In((1, 3, 3, 3), 1), note="F.unfold (im2col)")
mv("fold", lambda m, x: F.fold(x, (3, 3), 2), In((1, 12, 4), 1), note="F.fold (col2im): 3 channels of 2x2 blocks")
mv("fold", lambda m, x: F.fold(x, (3, 4), 2, stride=(1, 2)), In((8, 4), 0), note="unbatched, 2 channels, channel dim 0")
mv("atleast_1d", lambda m, x: torch.atleast_1d(x), img())
mv("atleast_2d", lambda m, x: torch.atleast_2d(x), In((4,), 0))
mv("atleast_3d", lambda m, x: torch.atleast_3d(x), In((3, 4), 1))
mv("diagonal", lambda m, x: x.diagonal(0, 2, 3), In((2, 3, 3, 3), 1))
mv("masked_select", lambda m, x, k: x.masked_select(k), In((2, 3), 1), In((2, 3), None, "bool"))
mv("as_strided", lambda m, x: x.as_strided((2, 2), (1, 1)), In((2, 3), 1))

# ---------------------------------------------------------------------------
# in-place writes
# ---------------------------------------------------------------------------


def _setitem(x, y):
    x = x.clone()
    x[:, 1:3] = y
    return x


def _setitem_const(x):
    x = x.clone()
    x[:, 0] = 0.0
    return x


case("__setitem__", lambda m, x, y: _setitem(x, y), In((2, 4, 3), 1), In((2, 2, 3), 1), note="x[:, 1:3] = y")
case("__setitem__", lambda m, x: _setitem_const(x), In((2, 4, 3), 1), note="x[:, 0] = 0")
case("copy", lambda m, x, y: x.clone().copy_(y), In((2, 3, 2), 1), In((2, 3, 2), 1))
case("copy", lambda m, x, y: x.clone().copy_(y), In((2, 3, 2), 1), In((2, 3, 2), None), note="copy from a constant")
case("index_put", lambda m, x, v: x.clone().index_put_((torch.tensor([0]), torch.tensor([1])), v), In((2, 3, 2), 1), In((2,), None))
case("masked_scatter", lambda m, x, k, y: x.clone().masked_scatter_(k, y), In((2, 3), 1), In((2, 3), None, "bool"), In((2, 3), 1))
case("scatter", lambda m, x, y: x.clone().scatter_(2, torch.zeros(x.shape[0], x.shape[1], 1, dtype=torch.long), y[:, :, :1]),
     In((2, 3, 2), 1), In((2, 3, 2), 1))
case("scatter_add", lambda m, x, y: x.clone().scatter_add_(1, torch.zeros(x.shape[0], 1, x.shape[2], dtype=torch.long), y[:, :1]),
     In((2, 3, 2), 1), In((2, 3, 2), 1))
case("index_add", lambda m, x, y: x.clone().index_add_(1, torch.tensor([0, 2]), y), In((2, 3, 2), 1), In((2, 2, 2), 1))
case("index_copy", lambda m, x, y: x.clone().index_copy_(1, torch.tensor([2, 0]), y), In((2, 3, 2), 1), In((2, 2, 2), 1))
case("add", lambda m, x, y: x.clone().add_(y), In((2, 3, 2), 1), In((2, 3, 2), 1), note="in-place add_")
case("index_add", lambda m, x, y: x.clone().index_add_(0, torch.tensor([2, 0]), y), In((3, 4), 1), In((2, 4), 1),
     note="routed tokens added back along a non-channel dim")
case("index_add", lambda m, x, y: x.index_add(0, torch.tensor([1, 1]), y), In((3, 4), 1), In((2, 4), 1),
     note="out of place, repeated index")
case("index_copy", lambda m, x, y: x.clone().index_copy_(0, torch.tensor([2, 0]), y), In((3, 4), 1), In((2, 4), 1),
     note="along a non-channel dim")

# ---------------------------------------------------------------------------
# selection by value: top-k, sort, positions of nonzeros (expert routing)
# ---------------------------------------------------------------------------

case("topk", lambda m, x: x.topk(2, dim=2)[0], In((2, 3, 4), 1), note="along a non-channel dim")
case("topk", lambda m, x: x.gather(2, x.topk(2, dim=2)[1]), In((2, 3, 4), 1), note="its indices gather")
case("topk", lambda m, x: x.topk(2, dim=1)[0], In((2, 3, 4), 1), note="along the channel dim: pinned")
case("topk", lambda m, x: x[torch.where(x.topk(1, dim=1)[1] == 0)[0]], In((5, 3), 1),
     note="tokens routed by a top-k over channels")
case("sort", lambda m, x: x.sort(dim=2)[0], In((2, 3, 4), 1))
case("sort", lambda m, x: x.sort(dim=1, descending=True)[0], In((2, 3, 4), 1), note="along the channel dim")
case("argsort", lambda m, x: x.gather(2, x.argsort(dim=2)), In((2, 3, 4), 1))
case("msort", lambda m, x: torch.msort(x), In((3, 4), 1))
case("nonzero", lambda m, x: x[torch.nonzero((x * 0).sum(1) == 0)[:, 0]], In((3, 4), 1), note="rows selected")
case("argwhere", lambda m, x: x[:, torch.argwhere((x * 0).sum(0) == 0)[:, 0]], In((3, 4), 0),
     note="channels counted by position: pinned")
case("nonzero_static", lambda m, x: x[torch.nonzero_static((x * 0).sum(1) == 0, size=2)[:, 0]], In((3, 4), 1))

# ---------------------------------------------------------------------------
# same-shape conversions, copies, creation
# ---------------------------------------------------------------------------

SAME = {
    "to": lambda x: x.to(torch.float32), "type": lambda x: x.type(torch.float32), "float": lambda x: x.float(),
    "double": lambda x: x.double(), "half": lambda x: x.half(), "bfloat16": lambda x: x.bfloat16(),
    "int": lambda x: (x * 3).int(), "long": lambda x: (x * 3).long(), "bool": lambda x: x.round().bool(),
    "cpu": lambda x: x.cpu(), "contiguous": lambda x: x.transpose(2, 3).contiguous(), "clone": lambda x: x.clone(),
    "detach": lambda x: x.detach(), "requires_grad": lambda x: x.detach().requires_grad_(),
    "get:data": lambda x: x.data, "zeros_like": torch.zeros_like, "ones_like": torch.ones_like,
    "full_like": lambda x: torch.full_like(x, 2.0), "rand_like": torch.rand_like, "randn_like": torch.randn_like,
    "empty_like": lambda x: torch.empty_like(x).fill_(1.0), "fill": lambda x: x.clone().fill_(2.0),
    "zero": lambda x: x.clone().zero_(), "normal": lambda x: x.clone().normal_(),
    "uniform": lambda x: x.clone().uniform_(), "bernoulli": lambda x: torch.bernoulli(x),
    "positive": torch.positive, "resolve_conj": lambda x: x.resolve_conj(), "resolve_neg": lambda x: x.resolve_neg(),
    "__deepcopy__": lambda x: copy.deepcopy(x), "type_as": lambda x: x.type_as(torch.zeros(1)),
}
for _name, _f in SAME.items():
    case(_name, lambda m, x, f=_f: f(x), img(dom="prob" if _name == "bernoulli" else "real"), random=_name in RANDOM)
case("bernoulli", lambda m, x: x.clone().bernoulli_(0.5), img(), note="in place", random=True)
for _name, _f in (("new_zeros", lambda x: x.new_zeros(x.shape)), ("new_ones", lambda x: x.new_ones(3)),
                  ("new_full", lambda x: x.new_full((2, 2), 1.5)), ("new_empty", lambda x: x.new_empty(x.shape).fill_(0)),
                  ("new_tensor", lambda x: x.new_tensor([1.0, 2.0]))):
    case(_name, lambda m, x, f=_f: f(x), img())

for _i, _c in enumerate(CASES):
    _c.id = f"{_c.rule}-{_i}" + (f"-{_c.note.split(':')[0].replace(' ', '_')[:30]}" if _c.note else "")

# ---------------------------------------------------------------------------
# what needs no oracle case (justified)
# ---------------------------------------------------------------------------

ALLOW_NO_CASE = {
    # metadata: these return sizes, dtypes, Python numbers or strings; dispatch
    # returns before any rule when an op yields no tensor, so there is nothing
    # to trace and no channel dependency to check
    **{k: "metadata only" for k in (
        "get:shape", "size", "dim", "numel", "get:device", "get:dtype", "get:is_cuda", "get:requires_grad",
        "get:grad_fn", "get:ndim", "item", "tolist", "stride", "is_contiguous", "data_ptr", "element_size",
        "get:grad", "__len__", "__bool__", "__format__", "__repr__", "get:layout", "nelement")},
    # need a CUDA device; same rule ("same_shape") as "cpu"/"to", which are covered
    "cuda": "needs a CUDA device; same_shape rule, covered via 'cpu' and 'to'",
    "pin_memory": "needs a CUDA-enabled build; same_shape rule, covered via 'cpu'",
    # aliases that torch 2.x never dispatches under (the public functional
    # dispatches under the covered name), kept for other torch versions
    "_max_pool1d": "alias: F.max_pool1d dispatches as 'max_pool1d' (covered)",
    "_max_pool2d": "alias: F.max_pool2d dispatches as 'max_pool2d' (covered)",
    "_max_pool3d": "alias: F.max_pool3d dispatches as 'max_pool3d' (covered)",
    "_adaptive_max_pool1d": "alias: dispatches as 'adaptive_max_pool1d' (covered)",
    "_adaptive_max_pool2d": "alias: dispatches as 'adaptive_max_pool2d' (covered)",
    "_adaptive_max_pool3d": "alias: dispatches as 'adaptive_max_pool3d' (covered)",
    "_fractional_max_pool2d": "alias: dispatches as 'fractional_max_pool2d' (covered)",
    "_fractional_max_pool3d": "alias: dispatches as 'fractional_max_pool3d' (covered)",
    "upsample": "alias: F.upsample dispatches as 'interpolate' (covered)",
    "upsample_nearest": "alias: F.upsample_nearest dispatches as 'interpolate' (covered)",
    "upsample_bilinear": "alias: F.upsample_bilinear dispatches as 'interpolate' (covered)",
    "__div__": "alias: Tensor.__div__ is Tensor.div and dispatches as 'div' (covered)",
    # Python operators on tensors dispatch under the aliased op's name in torch 2.x
    **{k: f"alias: the operator dispatches as {v!r} (covered)" for k, v in OPERATOR_ALIASES.items()},
    "movedim_copy": "no such function in torch 2.x",
    "empty_like_strided": "no such function in torch 2.x (torch.empty_strided takes no tensor)",
}

# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_against_oracle(case):
    """A rule may claim more than the truth (info), never less (bug)."""
    rep = run_case(case)
    assert case.rule in rep.hits, (
        f"case did not exercise rule {case.rule!r} (rules run: {sorted(rep.hits)}; "
        f"barriers: {rep.info})"
    )
    assert not rep.bugs, f"{case.id} ({case.note}):\n  " + "\n  ".join(rep.bugs)


def test_every_rule_has_an_oracle_case():
    """Enumerate ``rules.RULES``: every key needs a case that reaches it."""
    reached = set()
    declared = {c.rule for c in CASES}
    for c in CASES:
        try:
            reached |= trace_case(c).hits
        except Exception:
            pass  # reported by test_rule_against_oracle
    traced = [k for k, entry in rules.RULES.items() if entry.trace is not None]
    missing = sorted(k for k in traced if k not in reached and k not in ALLOW_NO_CASE)
    unreachable = [k for k in missing if k in declared]
    no_case = [k for k in missing if k not in declared]
    stale = sorted(k for k in ALLOW_NO_CASE if k not in traced)
    msg = []
    if no_case:
        msg.append(f"rules with no oracle case: {no_case}")
    if unreachable:
        msg.append(f"rules whose cases never reach them (dead registry key? the op dispatches under another name): {unreachable}")
    if stale:
        msg.append(f"allow-list entries that are no longer rules: {stale}")
    assert not msg, "\n".join(msg)


def test_allow_listed_aliases_are_not_dispatched():
    """The aliases above really are not what torch dispatches (else they need cases)."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Names(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(rules.func_name(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(1, 2, 4, 4)
    with Names():
        F.max_pool1d(x[0], 2), F.max_pool2d(x, 2), F.max_pool3d(x[None], 2)
        F.adaptive_max_pool1d(x[0], 2), F.adaptive_max_pool2d(x, 2), F.adaptive_max_pool3d(x[None], 2)
        F.fractional_max_pool2d(x, 2, output_size=2), F.fractional_max_pool3d(torch.randn(1, 2, 5, 5, 5), 2, output_size=2)
        F.interpolate(x, scale_factor=2)
        x.__div__(x)
        y = x + 1
        abs(x), x + y, 2 + x, x - y, x * y, 2 * x, x / y, 2 / x, x % y, x ** y, -x, +x, x[0, 0] @ x[0, 0]
        x < y, x <= y, x > y, x >= y, x != y, x.__radd__(y), x.__rmul__(y), x.__rtruediv__(y)
    for k, why in ALLOW_NO_CASE.items():
        if why.startswith("alias"):
            assert k not in seen, f"{k} is dispatched after all: it needs an oracle case"


def overclaim_report() -> str:
    lines = []
    for c in CASES:
        rep = run_case(c)
        if rep.info:
            lines.append(f"{c.id}: " + "; ".join(rep.info))
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(overclaim_report())
