"""The shape-only trace (``channelcut.pruning.shape_only``): ops on meta tensors.

It must give the very graph a pass with real values gives, or hand over to a
real pass; never leave anything on the model; and warn once. The random
networks (``export_props`` property 6) and the zoo
(``test_zoo_shape_only_trace_is_the_real_trace``) check the graph on many
models; these tests cover each hand-over and the fast shape functions.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from channelcut import PruningManager
from channelcut.pruning import rules, shape_only
from channelcut.pruning.tracing import _trace_once, trace

from ._helpers import assert_unchanged, prepare, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export_props  # noqa: E402


def _kept(net: nn.Module, inputs: Any) -> bool:
    kept, problems = export_props.check_shape_only_trace(net, inputs)
    assert not problems, "\n".join(problems)
    return bool(kept)


def _exact(net: nn.Module, inputs: List[torch.Tensor], pruned: List[Tuple[str, int]]) -> None:
    with torch.no_grad():
        net(*inputs)
    m = PruningManager(net).compute(inputs, pruned_inputs=pruned)
    mock = m.get_mock_model()
    with torch.no_grad():
        ref = mock(*inputs)
    m.prune(verify=True)
    with torch.no_grad():
        out = net(*inputs)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        return self.c(y + self.b(y))


class ValueBranch(Plain):
    """Control flow that depends on a value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        if y.mean().item() > 0:
            y = y + self.b(y)
        return self.c(y)


class MaskBranch(Plain):
    """Control flow on a mask made from an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        if (y > 0).any():
            y = y + self.b(y)
        return self.c(y)


class CachesInForward(Plain):
    """Keeps tensors computed in forward on itself (an attribute, a list)."""

    def __init__(self) -> None:
        super().__init__()
        self.last = None
        self.history: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.last is None:
            self.last = y
        self.history = [y]
        return y


class CachesByDevice(Plain):
    """A dict cache keyed by device, filled in forward (timm's LeViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: Dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.b.bias.detach().clone()[None, :, None, None]
        y = F.relu(self.bn(self.a(x)))
        return self.c(y + self.b(y) * 0 + self.cache[key])


class HooksOnFirstCall(Plain):
    """Installs a forward hook on a child at its first call, and marks that
    with a flag (Hugging Face's output capturing): every hook appends the
    child's output, and forward sums what was captured."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "_installed", False):
            self.b.register_forward_hook(self._capture)
            self._installed = True
        self.captured = []
        y = F.relu(self.bn(self.a(x)))
        self.b(y)
        return self.c(y + sum(self.captured))

    def _capture(self, _m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        self.captured.append(out)


class WritesIntoFactory(Plain):
    """``out = torch.zeros(...)``; ``out[:, :8] = y``: a write into a real tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        out = torch.zeros(y.shape[0], 8, y.shape[2], y.shape[3], dtype=y.dtype)
        out[:, :8] = y
        return self.c(out + self.b(out))


class IndexFromActivation(Plain):
    """An index computed from an activation's values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        z = self.c(y + self.b(y))
        idx = z.mean((2, 3)).argmax(1, keepdim=True)[:, :, None, None].expand(-1, 1, z.shape[2], z.shape[3])
        return torch.cat([z, z.gather(1, idx)], 1)


class TokenModel(nn.Module):
    """Integer inputs stay real: ids, positions made with ``device=x.device``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.pos = nn.Embedding(10, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        positions = torch.arange(ids.shape[1], device=h.device)
        h = h + self.pos(positions)[None]
        return h + self.fc2(F.gelu(self.fc1(h)))


def _img(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


PRUNE = [("b.weight", 1), ("b.weight", 5), ("c.weight", 2)]


def test_compute_can_trace_for_real_with_the_same_spec():
    net = prepare(Plain().double().eval())
    a = PruningManager(net).compute([_img()], pruned_inputs=PRUNE).spec
    b = PruningManager(net).compute([_img()], pruned_inputs=PRUNE, shapes_only=False).spec
    assert a.summary() == b.summary() and a.slices == b.slices and a.masks == b.masks
    seen = []
    h = net.a.register_forward_hook(lambda m, i, o: seen.append(o.is_meta))
    PruningManager(net).trace([_img()], shapes_only=False)
    PruningManager(net).trace([_img()])
    h.remove()
    assert seen == [False, True]


def test_plain_model_keeps_the_shape_only_pass_and_outputs_meta():
    net = prepare(Plain().double().eval())
    assert _kept(net, [_img()])
    _, out = trace(net, [_img()])
    assert out.is_meta and out.shape == (2, 4, 8, 8)
    _, out = trace(net, [_img()], shapes_only=False)
    assert not out.is_meta


@pytest.mark.parametrize("cls", [ValueBranch, MaskBranch, WritesIntoFactory, IndexFromActivation])
def test_models_that_need_values_are_traced_for_real(cls):
    net = prepare(cls().double().eval())
    before = snapshot(net)
    assert not _kept(net, [_img()])
    assert_unchanged(net, before)
    _exact(net, [_img()], PRUNE)


def test_why_each_model_needs_values():
    """Each hand-over happens for the stated reason, not by accident."""
    cases = [
        (ValueBranch, RuntimeError, "item() cannot be called on meta tensors"),
        (MaskBranch, shape_only.NeedsValues, "'gt' makes an index or mask from an activation"),
        (WritesIntoFactory, shape_only.NeedsValues, "writes into a tensor made outside the traced ops"),
        (IndexFromActivation, shape_only.NeedsValues, "makes an index or mask from an activation"),
    ]
    for cls, kind, text in cases:
        net = prepare(cls().double().eval())
        with pytest.raises(Exception) as info:
            _trace_once(net, [_img()], True)
        exc = info.value
        while exc.__cause__ is not None and not isinstance(exc, kind):
            exc = exc.__cause__
        assert isinstance(exc, kind) and text in str(exc), f"{cls.__name__}: {info.value!r}"


def test_a_cache_set_in_forward_is_not_left_meta():
    net = prepare(CachesInForward().double().eval())
    assert not _kept(net, [_img()])  # the cache would have held a meta tensor
    assert net.last is not None and not net.last.is_meta  # set by the real pass
    net.last = None
    trace(net, [_img()])
    assert net.last is not None and not net.last.is_meta
    assert not any(t.is_meta for t in net.history)
    for name, v in list(net.named_buffers()) + list(net.named_parameters()):
        assert not v.is_meta, name
    with torch.no_grad():
        net(_img())  # still runs
    _exact(net, [_img()], PRUNE)


def test_a_cache_filled_in_place_is_emptied_again():
    net = prepare(CachesByDevice().double().eval())
    assert not _kept(net, [_img()])
    assert list(net.cache) == ["cpu"] and not net.cache["cpu"].is_meta  # the real pass's entry only
    net.cache.clear()
    trace(net, [_img()])
    assert list(net.cache) == ["cpu"]


def test_a_hook_installed_in_forward_is_removed_with_the_meta_pass():
    """A cold trace of a model that installs a hook at its first call: the
    meta pass's hook goes with it, the real pass installs one (it was two,
    and the model then added its capture twice: SegformerConfig)."""
    net = prepare(HooksOnFirstCall().double().eval())
    ref = copy.deepcopy(net)
    trace(net, [_img()])
    assert len(net.b._forward_hooks) == 1
    with torch.no_grad():
        assert torch.equal(net(_img(1)), ref(_img(1)))
    cold = prepare(HooksOnFirstCall().double().eval())
    cold.load_state_dict(ref.state_dict())
    _exact(cold, [_img()], PRUNE)


def test_integer_inputs_and_positions_stay_real():
    torch.manual_seed(0)
    net = prepare(TokenModel().double().eval())
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    assert _kept(net, [ids])
    _exact(net, [ids], [("fc2.weight", 3), ("fc2.weight", 9), ("fc1.weight", 0)])


class Barrier(Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        y = torch.fft.fft2(y).real  # no rule: a barrier, warned about
        return self.c(y + self.b(y))


class BarrierAndValueBranch(Barrier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        y = torch.fft.fft2(y).real
        if y.sum() > -1e9:
            y = y + self.b(y)
        return self.c(y)


@pytest.mark.parametrize("cls,kept", [(Barrier, True), (BarrierAndValueBranch, False)])
def test_barrier_warning_is_given_once(cls, kept):
    net = prepare(cls().double().eval())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph, out = trace(net, [_img()])
    assert out.is_meta == kept
    ours = [w for w in caught if "fft" in str(w.message) and "barrier" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert graph.barriers


# ---------------------------------------------------------------------------
# the fast shape functions build what the real kernel builds
# ---------------------------------------------------------------------------

def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


FAST_CASES: Dict[str, List[Tuple[Callable[..., Any], Callable[[], Tuple[tuple, dict]]]]] = {
    "batch_norm": [(F.batch_norm, lambda: ((_x(2, 4, 3, 3), _x(4), _x(4).abs(), _x(4), _x(4)), {"training": False}))],
    "layer_norm": [(F.layer_norm, lambda: ((_x(2, 5, 8), (8,), _x(8), _x(8)), {}))],
    "group_norm": [(F.group_norm, lambda: ((_x(2, 4, 3, 3), 2), {}))],
    "instance_norm": [(F.instance_norm, lambda: ((_x(2, 4, 3, 3),), {}))],
    "rms_norm": [(F.rms_norm, lambda: ((_x(2, 5, 8), (8,)), {}))],
    "relu": [(F.relu, lambda: ((_x(2, 3),), {})), (torch.relu, lambda: ((_x(2, 3, dtype=torch.float64),), {}))],
    "relu6": [(F.relu6, lambda: ((_x(2, 3),), {}))],
    "hardtanh": [(F.hardtanh, lambda: ((_x(2, 3), -1.0, 2.0), {}))],
    "gelu": [(F.gelu, lambda: ((_x(2, 3),), {"approximate": "tanh"}))],
    "silu": [(F.silu, lambda: ((_x(2, 3),), {}))],
    "sigmoid": [(torch.sigmoid, lambda: ((_x(2, 3),), {}))],
    "tanh": [(torch.tanh, lambda: ((_x(2, 3),), {}))],
    "hardswish": [(F.hardswish, lambda: ((_x(2, 3),), {}))],
    "hardsigmoid": [(F.hardsigmoid, lambda: ((_x(2, 3),), {}))],
    "mish": [(F.mish, lambda: ((_x(2, 3),), {}))],
    "leaky_relu": [(F.leaky_relu, lambda: ((_x(2, 3), 0.2), {}))],
    "elu": [(F.elu, lambda: ((_x(2, 3),), {}))],
    "selu": [(F.selu, lambda: ((_x(2, 3),), {}))],
    "celu": [(F.celu, lambda: ((_x(2, 3),), {}))],
    "softplus": [(F.softplus, lambda: ((_x(2, 3),), {}))],
    "exp": [(torch.exp, lambda: ((_x(2, 3),), {}))],
    "sqrt": [(torch.sqrt, lambda: ((_x(2, 3).abs(),), {}))],
    "rsqrt": [(torch.rsqrt, lambda: ((_x(2, 3).abs(),), {}))],
    "erf": [(torch.erf, lambda: ((_x(2, 3),), {}))],
    "neg": [(torch.neg, lambda: ((_x(2, 3),), {}))],
    "__neg__": [(torch.Tensor.__neg__, lambda: ((_x(2, 3),), {}))],
    "add": [(torch.add, lambda: ((_x(2, 4, 3, 3), _x(1, 4, 1, 1)), {"alpha": 2})),
            (torch.add, lambda: ((_x(2, 4), 1.5), {}))],
    "sub": [(torch.sub, lambda: ((_x(4, 1), _x(4, 1)), {}))],
    "mul": [(torch.mul, lambda: ((_x(1, 4, 1, 1), _x(2, 4, 3, 3)), {}))],
    "div": [(torch.div, lambda: ((_x(2, 4), 3), {}))],
    "true_divide": [(torch.true_divide, lambda: ((_x(2, 4), _x(2, 4)), {}))],
    "__add__": [(torch.Tensor.__add__, lambda: ((_x(2, 4, 5), _x(5)), {}))],
    "__radd__": [(torch.Tensor.__radd__, lambda: ((_x(2, 4), 1), {}))],
    "__sub__": [(torch.Tensor.__sub__, lambda: ((_x(2, 4), _x(2, 4)), {}))],
    "__rsub__": [(torch.Tensor.__rsub__, lambda: ((_x(2, 4), 1.0), {}))],
    "__mul__": [(torch.Tensor.__mul__, lambda: ((_x(3, 1, 4), _x(3, 5, 4)), {}))],
    "__rmul__": [(torch.Tensor.__rmul__, lambda: ((_x(2, 4), 0.5), {}))],
    "__truediv__": [(torch.Tensor.__truediv__, lambda: ((_x(2, 4), _x(1, 4)), {}))],
    "__rtruediv__": [(torch.Tensor.__rtruediv__, lambda: ((_x(2, 4), 2.0), {}))],
    "cat": [(torch.cat, lambda: (([_x(2, 3, 4), _x(2, 5, 4)], 1), {})),
            (torch.cat, lambda: (([_x(2, 3), _x(4, 3)],), {}))],
    "concat": [(torch.concat, lambda: (([_x(2, 3), _x(2, 1)],), {"dim": -1}))],
    "concatenate": [(torch.concatenate, lambda: (([_x(1, 3), _x(2, 3)],), {}))],
    "adaptive_avg_pool1d": [(F.adaptive_avg_pool1d, lambda: ((_x(2, 4, 9), 1), {}))],
    "adaptive_avg_pool2d": [(F.adaptive_avg_pool2d, lambda: ((_x(2, 4, 9, 9), (2, 3)), {})),
                            (F.adaptive_avg_pool2d, lambda: ((_x(4, 9, 9), 1), {}))],
    "adaptive_avg_pool3d": [(F.adaptive_avg_pool3d, lambda: ((_x(2, 4, 5, 5, 5), 1), {}))],
    "conv1d": [(F.conv1d, lambda: ((_x(2, 4, 17), _x(6, 2, 5), None, 3, 2, 1, 2), {}))],
    "conv2d": [(F.conv2d, lambda: ((_x(2, 4, 9, 9), _x(6, 4, 3, 3), _x(6), 2, 1), {})),
               (F.conv2d, lambda: ((_x(4, 9, 9), _x(6, 4, 3, 3)), {"stride": (2, 1), "padding": (1, 0), "dilation": (2, 1)})),
               (F.conv2d, lambda: ((_x(1, 4, 8, 8), _x(8, 1, 3, 3)), {"groups": 4, "padding": "same"})),
               (F.conv2d, lambda: ((_x(1, 4, 8, 8), _x(8, 1, 3, 3)), {"groups": 4, "padding": "valid", "dilation": 2}))],
    "conv3d": [(F.conv3d, lambda: ((_x(1, 4, 5, 6, 7), _x(3, 4, 1, 2, 3), _x(3), 1, (0, 1, 0)), {}))],
    "linear": [(F.linear, lambda: ((_x(2, 5, 8), _x(3, 8), _x(3)), {})), (F.linear, lambda: ((_x(8), _x(3, 8)), {}))],
    "mean": [(torch.mean, lambda: ((_x(2, 4, 3, 3), (2, 3)), {"keepdim": True})),
             (torch.Tensor.mean, lambda: ((_x(2, 4, 3), -1), {}))],
    "scaled_dot_product_attention": [
        (F.scaled_dot_product_attention, lambda: ((_x(2, 3, 5, 8), _x(2, 3, 7, 8), _x(2, 3, 7, 6)), {}))],
}


def test_every_fast_shape_function_has_a_case():
    assert set(FAST_CASES) == {name for name, entry in rules.RULES.items() if entry.shape is not None}


@pytest.mark.parametrize("name", sorted(FAST_CASES))
def test_fast_shape_function_matches_the_real_kernel(name):
    for func, make in FAST_CASES[name]:
        args, kwargs = make()
        real = func(*args, **kwargs)
        margs = shape_only.to_meta(args, {})
        # every tensor on meta, or only the first (an activation, with real
        # parameters: run hands those over as they are)
        for given in (margs, (margs[0],) + tuple(args[1:])):
            fast = rules.RULES[name].shape(given, dict(kwargs))
            assert fast is not None, f"{name}: the fast path declined a plain case"
            assert fast.is_meta
            assert (tuple(fast.shape), fast.dtype, fast.stride()) == (tuple(real.shape), real.dtype, real.stride()), name
            assert shape_only.run(func, name, given, dict(kwargs), {}, torch.device("cpu"), rules.facts).shape == real.shape


def test_fast_shape_functions_decline_what_they_do_not_know():
    x = torch.randn(2, 4, device="meta")
    assert rules.RULES["add"].shape((x, torch.randn(2, 4, device="meta", dtype=torch.float64)), {}) is None  # promotion
    assert rules.RULES["add"].shape((x, torch.randn(3, 1, 4, device="meta")), {}) is None  # a new shape
    assert rules.RULES["relu"].shape((x.t(),), {}) is None  # not contiguous
    assert rules.RULES["cat"].shape(([x, torch.randn(2, 4, device="meta", dtype=torch.float16)],), {}) is None
    assert rules.RULES["mean"].shape((x, (0, 0)), {}) is None
    img, w = torch.randn(1, 4, 8, 8, device="meta"), torch.randn(8, 4, 3, 3, device="meta")
    assert rules.RULES["conv2d"].shape((img.to(memory_format=torch.channels_last), w), {}) is None  # layout follows the input
    assert rules.RULES["conv2d"].shape((img, w, None, 2), {"padding": "same"}) is None  # torch refuses this
    assert rules.RULES["conv2d"].shape((img, w[:, :2]), {}) is None  # wrong channel count: the kernel's error
    assert rules.RULES["linear"].shape((x, torch.randn(3, 5, device="meta")), {}) is None


def test_in_place_ops_on_meta_return_their_target():
    x = torch.randn(2, 4, device="meta")
    for func, name, args, kwargs in [
        (F.relu, "relu", (x,), {"inplace": True}),
        (F.hardtanh, "hardtanh", (x, 0.0, 6.0, True), {}),
        (torch.Tensor.add_, "add_", (x, torch.randn(4, device="meta")), {}),
        (torch.Tensor.__imul__, "__imul__", (x, 2.0), {}),
    ]:
        assert shape_only.run(func, name, args, kwargs, {}, torch.device("cpu"), rules.facts) is x, name


def test_creation_ops_make_real_constants_only_from_templates():
    x = torch.randn(2, 4, device="meta")
    cpu = torch.device("cpu")
    for func, name, args, kwargs in [
        (torch.zeros_like, "zeros_like", (x,), {}),
        (torch.Tensor.new_ones, "new_ones", (x, (3,)), {}),
        (torch.arange, "arange", (5,), {"device": x.device}),
        (torch.full, "full", ((2,), 1.5), {"device": "meta"}),
    ]:
        out = shape_only.run(func, name, args, kwargs, {}, cpu, rules.facts)
        assert not out.is_meta, name
    assert torch.equal(shape_only.run(torch.zeros_like, "zeros_like", (x,), {}, {}, cpu, rules.facts), torch.zeros(2, 4))
    # the values of an activation are not a constant: meta, or a hand-over
    for func, name, args in [(torch.as_tensor, "as_tensor", (x,)), (torch.Tensor.new_tensor, "new_tensor", (x, x)),
                             (torch.full_like, "full_like", (x, torch.randn((), device="meta")))]:
        try:
            out = shape_only.run(func, name, args, {}, {}, cpu, rules.facts)
        except (RuntimeError, NotImplementedError, shape_only.NeedsValues):
            continue
        assert out.is_meta, name


def test_graph_fingerprint_tells_graphs_apart():
    a = prepare(Plain().double().eval())
    b = prepare(ValueBranch().double().eval())
    ga = export_props.graph_fingerprint(_trace_once(a, [_img()], False)[0])
    gb = export_props.graph_fingerprint(_trace_once(b, [_img()], False)[0])
    assert export_props.fingerprint_diff(ga, gb)
    assert not export_props.fingerprint_diff(ga, export_props.graph_fingerprint(_trace_once(a, [_img()], True)[0]))


def test_id_table_forgets_dead_tensors():
    """The tracer's side tables are keyed by tensor identity without holding
    tensors alive: a new tensor that gets a dead one's id finds nothing."""
    import gc

    from channelcut.pruning.recorder import IdTable

    table = IdTable()
    x = torch.zeros(2)
    table[x] = "trace of x"
    assert table.get(x) == "trace of x"
    assert table.get(torch.zeros(2)) is None and table.get(torch.zeros(2), 7) == 7  # equal values, other tensor
    dead = id(x)
    del x
    gc.collect()
    y = torch.zeros(2)
    table._d[id(y)] = table._d.pop(dead)  # as if y had been given x's id
    assert table.get(y) is None
