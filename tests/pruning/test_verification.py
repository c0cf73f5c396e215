"""``prune(verify=True)`` checks the export against a reference that does not
come from the plan: the unpruned model with the request (and the additions
the spec reports) zeroed by hand, in place, with no copy of the model; for
bfloat16/float16 against a float64 run, at a tolerance derived from the
dtype's epsilon."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from channelcut import ExportError, PruningManager
from channelcut.pruning import manager as manager_mod
from channelcut.pruning import pruner, verify


def _net(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    return net.to(dtype).eval()


REQUEST = [("6.weight", 1), ("6.weight", 4), ("3.weight", 0), ("9.weight", 2)]


def test_reference_is_the_request_zeroed_by_hand_and_leaves_the_model_as_it_was():
    net = _net()
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    pm = PruningManager(net).compute([x], pruned_inputs=REQUEST)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ref = verify.reference_outputs(net, [x], pm.spec, pm.graph)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    hand = copy.deepcopy(net)
    with torch.no_grad():
        hand[6].weight[:, [1, 4]] = 0
        hand[9].weight[:, 2] = 0
        hand[3].weight[0:4, 0] = 0  # grouped conv: input 0 is column 0 of group 0's rows
        assert torch.equal(ref.outputs, hand(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_verification_makes_no_copy_of_the_model(monkeypatch, dtype):
    """Not even in bfloat16, whose float64 reference run upcasts one module's
    tensors at a time (``verify.run_in_float64``)."""
    net = _net(dtype)
    x = torch.rand(2, 3, 10, 10, dtype=dtype)
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def no_copy(*a, **k):
        raise AssertionError("verification copied the model")

    monkeypatch.setattr(manager_mod, "make_mock", no_copy)
    monkeypatch.setattr(verify.copy, "deepcopy", no_copy)
    with verify.columns_zeroed(net, PruningManager(net).trace([x]), []):
        y64 = verify.run_in_float64(net, [x])
    assert y64.dtype == torch.float64
    assert all(torch.equal(v, state[k]) and v.dtype == state[k].dtype for k, v in net.state_dict().items())
    PruningManager(net).compute([x], pruned_inputs=REQUEST).prune()
    assert net[9].in_features == 5


def _resolve_one_extra_channel(monkeypatch, extra=("9.weight", 3)) -> None:
    """Make resolve also remove input channel ``extra`` (default: channel 3
    of ``9.weight``) without reporting it (the request it reports stays the
    caller's)."""
    real = manager_mod.resolve

    def one_extra(graph, pruned_inputs, *a, **k):
        spec = real(graph, list(pruned_inputs) + [extra], *a, **k)
        spec.requested = real(graph, pruned_inputs, *a, **k).requested
        return spec

    monkeypatch.setattr(manager_mod, "resolve", one_extra)


def test_an_unreported_extra_channel_fails_verification(monkeypatch):
    """A resolve that removes a channel nobody asked for and does not report
    it (so the mock agrees with the pruned model) is caught."""
    _resolve_one_extra_channel(monkeypatch)
    net = _net()
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    pm = PruningManager(net).compute([x], pruned_inputs=REQUEST)
    y_mock = pm.get_mock_model()(x)
    with pytest.raises(ExportError, match="verification failed"):
        pm.prune()
    assert net[9].in_features == 6  # restored
    pm.prune(verify=False)
    assert torch.allclose(net(x), y_mock, rtol=0, atol=1e-12)  # the mock would not have seen it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_is_checked_against_float64(dtype):
    net = _net(torch.float32, seed=1).to(dtype)
    x = torch.rand(2, 3, 10, 10).to(dtype)
    pm = PruningManager(net).compute([x], pruned_inputs=REQUEST)
    ref = verify.reference_outputs(net, [x], pm.spec, pm.graph)
    assert ref.outputs.dtype == dtype and ref.outputs64.dtype == torch.float64
    pm.prune()  # passes
    assert net[9].in_features == 5
    # the check has no absolute floor: an error of 30 epsilons of a small output fails
    small = ref.outputs64 * 1e-3
    wrong = verify.Reference(ref.outputs * 1e-3, small)
    eps = torch.finfo(dtype).eps
    assert verify.check((small + 30 * eps * small.abs().max()).to(dtype), wrong) is not None


def test_a_wrong_bfloat16_model_fails_verification(monkeypatch):
    """A pruner that slices a BatchNorm's statistics in the wrong order
    (real, randomised statistics) is caught in bfloat16."""
    real = pruner.shrink

    def reversed_norm(t, dims, *args):
        if t.dim() == 1 and 0 in dims and t.numel() == 8 and not isinstance(t, torch.nn.Parameter):  # 1.running_mean
            dims = {0: dims[0][::-1]}
        return real(t, dims, *args)

    monkeypatch.setattr(pruner, "shrink", reversed_norm)
    net = _net(torch.float32, seed=2).to(torch.bfloat16)
    x = torch.rand(2, 3, 10, 10).to(torch.bfloat16)
    pm = PruningManager(net).compute([x], pruned_outputs=[("0.weight", 3)])
    with pytest.raises(ExportError, match="float64 reference"):
        pm.prune()
    assert net[0].out_channels == 8


@pytest.mark.parametrize("spilled", [False, True], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("kind", ["inputs", "outputs", "constrained", "superset"])
def test_undo_rebuilds_every_tensor_bit_for_bit(kind, spilled, monkeypatch):
    """The pruner keeps only the removed values; undo (and a failed
    verification) rebuilds the model exactly: values, objects, attributes.
    ``spilled``: every kept value in a file-backed map (``spill.py``), as for
    a model that fills the machine's memory."""
    from channelcut.pruning import spill
    from support.unchanged import assert_unchanged, snapshot

    if spilled:
        monkeypatch.setattr(spill, "SPILL_BYTES", 0)
        monkeypatch.setattr(spill, "SPILL_BELOW_AVAILABLE", 1.0)

    net = _net()
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    kw = {"inputs": dict(pruned_inputs=REQUEST), "outputs": dict(pruned_outputs=[("0.weight", 3), ("6.weight", 2)]),
          "constrained": dict(pruned_inputs=REQUEST, constrained=True),
          "superset": dict(pruned_inputs=[("9.weight", 1), ("9.weight", 3)], copy_cost=1e12)}[kind]
    before = snapshot(net)
    y0 = net(x)
    pm = PruningManager(net).compute([x], **kw).prune()
    assert pm.spec.slices
    pm.undo()
    assert_unchanged(net, before, "after undo")
    assert torch.equal(net(x), y0)


def test_spilled_reference_columns_are_restored_after_a_failed_verification(monkeypatch):
    """With every saved value in a file-backed map, a failed verification
    still leaves the model bit for bit as it was."""
    from channelcut.pruning import spill
    from support.unchanged import assert_unchanged, snapshot

    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    monkeypatch.setattr(spill, "SPILL_BELOW_AVAILABLE", 1.0)
    _resolve_one_extra_channel(monkeypatch)
    net = _net()
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    before = snapshot(net)
    with pytest.raises(ExportError, match="verification failed"):
        PruningManager(net).compute([x], pruned_inputs=REQUEST).prune()
    assert_unchanged(net, before, "after a failed verification")


class _Tokens(nn.Module):
    """Linear layers on a few tokens (inputs smaller than weights: the
    reference zeroes their inputs), one called by keyword (it does not fit
    the input hook: the reference falls back to zeroing weight columns)."""

    def __init__(self, by_keyword: bool = False) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.up(x))
        h = self.down(input=h) if self.by_keyword else self.down(h)
        return self.head(h + x)


TOKEN_REQUEST = [("down.weight", c) for c in (0, 5, 9, 31)] + [("up.weight", 3), ("head.weight", 7)]


@pytest.mark.parametrize("by_keyword", [False, True], ids=["input-hooks", "fallback-to-columns"])
def test_reference_zeroes_inputs_where_cheaper_and_equals_the_model_zeroed_by_hand(by_keyword, monkeypatch):
    torch.manual_seed(1)
    net = _Tokens(by_keyword).double().eval()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    pm = PruningManager(net).compute([x], pruned_inputs=TOKEN_REQUEST)
    hand = copy.deepcopy(net)
    with torch.no_grad():
        hand.down.weight[:, [0, 5, 9, 31]] = 0
        hand.up.weight[:, 3] = 0
        hand.head.weight[:, 7] = 0
    hooked = []
    real = verify._zero_input_hook
    monkeypatch.setattr(verify, "_zero_input_hook", lambda *a: hooked.append(a) or real(*a))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ref = verify.reference_outputs(net, [x], pm.spec, pm.graph)
    assert len(hooked) >= 3  # every linear was tried with its input zeroed
    assert torch.allclose(ref.outputs, hand(x), rtol=0, atol=1e-14)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_pre_hooks for m in net.modules())
    pm.prune()
    assert net.down.in_features == 28


def test_input_zeroing_still_catches_an_unreported_channel(monkeypatch):
    """A plan that removes one more input of a hooked linear than it reports
    fails verification (the reference zeroes only what was asked)."""
    _resolve_one_extra_channel(monkeypatch, ("down.weight", 2))
    torch.manual_seed(2)
    net = _Tokens().double().eval()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    with pytest.raises(ExportError, match="verification failed"):
        PruningManager(net).compute([x], pruned_inputs=TOKEN_REQUEST).prune()
    assert net.down.in_features == 32


def test_large_embeddings_and_linears_are_never_upcast_whole(monkeypatch):
    """The float64 reference of a bfloat16 model with a large embedding and
    head (an LLM's 128k vocabulary: 4 GiB each in float64) looks the
    embedding rows up first and upcasts the head a chunk of rows at a time:
    the same outputs as a float64 copy of the model, and no tensor as large
    as either weight is ever upcast."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(500, 32), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 500)).to(torch.bfloat16)
    ids = torch.randint(0, 500, (2, 7))
    monkeypatch.setattr(verify, "LARGE_FLOAT64_BYTES", 100 * 32 * 8)
    monkeypatch.setattr(verify, "CHUNK_FLOAT64_BYTES", 64 * 32 * 8)
    upcast = []
    real = torch.Tensor.double

    def spy(self, *a, **k):
        upcast.append(self.numel())
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "double", spy)
    got = verify.run_in_float64(net, [ids])
    monkeypatch.setattr(torch.Tensor, "double", real)
    want = copy.deepcopy(net).double()(ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert max(upcast) <= 2 * 7 * 500 and 500 * 32 not in upcast, "a large weight was upcast whole"
    assert "forward" not in net[0].__dict__ and "forward" not in net[3].__dict__
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())


class _Attention(nn.Module):
    """Self- or cross-attention (``nn.MultiheadAttention``, called by keyword
    or position), a linear layer whose weight its parent reads with
    ``F.linear`` (never called as a module: zeroed in place)."""

    def __init__(self, cross: bool, by_keyword: bool) -> None:
        super().__init__()
        self.cross, self.by_keyword = cross, by_keyword
        self.inp = nn.Linear(12, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mix = _ReadsWeight()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        kv = h.flip(1) * 0.5 if self.cross else h
        if self.by_keyword:
            a, _ = self.attn(query=h, key=kv, value=kv, need_weights=False)
        else:
            a, _ = self.attn(h, kv, kv, need_weights=False)
        return self.head(self.mix(a + h))


class _ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.proj.weight, self.proj.bias) + x


ATTENTION_REQUEST = {"attn.in_proj_weight": [0, 3, 4, 9, 15], "attn.out_proj.weight": [1, 2, 7, 8, 12],
                     "mix.proj.weight": [0, 5, 6, 10, 11], "head.weight": [4]}


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("by_keyword", [False, True], ids=["positional", "keyword"])
def test_reference_of_attention_and_weights_read_by_a_parent_equals_the_model_zeroed_by_hand(cross, by_keyword, monkeypatch):
    """The reference zeroes an attention's packed q/k/v columns in its
    inputs and its out_proj columns as value rows: the same outputs as the
    weights zeroed by hand, and every tensor as it was after."""
    torch.manual_seed(3)
    net = _Attention(cross, by_keyword).double().eval()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    # cross-attention splits the packed weight (q apart from k, v): not a consumer
    request = {k: v for k, v in ATTENTION_REQUEST.items() if not (cross and k == "attn.in_proj_weight")}
    pm = PruningManager(net).compute([x], pruned_inputs=request)
    hand = copy.deepcopy(net)
    with torch.no_grad():
        for name, chans in request.items():
            hand.get_parameter(name)[:, chans] = 0
    state = {k: v.clone() for k, v in net.state_dict().items()}
    qkv = []
    real_hook = verify._zero_qkv_hook
    monkeypatch.setattr(verify, "_zero_qkv_hook", lambda *a: qkv.append(1) or real_hook(*a))
    ref = verify.reference_outputs(net, [x], pm.spec, pm.graph)
    assert qkv or cross, "the q/k/v input zeroing was not used"
    torch.testing.assert_close(ref.outputs, hand(x), rtol=0, atol=1e-13)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())
    pm.prune()
    if not cross:  # (cross: the flipped tokens pin the stream; zero columns only)
        assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in hand.parameters())
    torch.testing.assert_close(net(x), hand(x), rtol=0, atol=1e-12)


def test_attention_shortcuts_still_catch_an_unreported_channel(monkeypatch):
    """A plan that removes one more input of the attention's out_proj (its
    reference zeroes value rows), of its packed q/k/v weight (inputs
    zeroed) or of a weight its parent reads than it reports fails
    verification."""
    for extra in [("attn.out_proj.weight", 3), ("mix.proj.weight", 1), ("attn.in_proj_weight", 1)]:
        monkeypatch.undo()
        _resolve_one_extra_channel(monkeypatch, extra)
        torch.manual_seed(4)
        net = _Attention(False, False).double().eval()
        x = torch.randn(2, 7, 12, dtype=torch.float64)
        with pytest.raises(ExportError, match="verification failed"):
            PruningManager(net).compute([x], pruned_inputs=ATTENTION_REQUEST).prune()


class _ReadsOnlyWhenReal(nn.Module):
    """Reads its layer's weight again outside the layer's call, but only
    when run on real values: the shape-only trace never sees that read."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.lin(x)
        if not x.is_meta:
            h = h + self.lin.weight.sum()
        return self.head(h)


def test_a_mismatch_is_confirmed_against_weights_zeroed_in_place(monkeypatch):
    """Where the real run reads a weight where the trace did not see it,
    zeroing the layer's input is not the same computation; the failed check
    is run again against weights zeroed in place, which the export matches."""
    torch.manual_seed(5)
    net = _ReadsOnlyWhenReal().double().eval()
    x = torch.randn(1, 16, dtype=torch.float64)  # smaller than the weight: its input is zeroed
    request = {"lin.weight": [0, 3, 7, 12]}
    hand = copy.deepcopy(net)
    with torch.no_grad():
        hand.lin.weight[:, request["lin.weight"]] = 0
    calls = []
    real = manager_mod.reference_outputs
    monkeypatch.setattr(manager_mod, "reference_outputs", lambda *a, **k: calls.append(k["shortcuts"]) or real(*a, **k))
    PruningManager(net).compute([x], pruned_inputs=request).prune()
    assert calls == [True, False]
    assert net.lin.in_features < 16
    torch.testing.assert_close(net(x), hand(x), rtol=0, atol=1e-12)
