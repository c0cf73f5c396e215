"""Pruned models are plain modules: TorchScript, torch.export, ONNX, torch.compile.

Two parts:

1. Subselect layers (``channelcut.pruning.subselect``): class swap and undo,
   state_dict keys, repr, devices, composition, pickling, scriptability.
2. Export of pruned models, each compared with the pruned eager model:
   a small model with non-contiguous subselections (gathers) and views, in
   every backend (fast), and the torchvision zoo models resnet50,
   densenet121, mobilenet_v3_large, efficientnet_b0 and vit_b_16 (slow).

ONNX files are run in onnxruntime; Subselect layers must appear there as
plain ``Slice``/``Gather`` ops. ``torch.compile`` runs with the inductor
backend (C++ code generation) on the small model and with ``aot_eager``
(graph capture, no code generation) on the zoo models, to keep CI time sane.
"""

from __future__ import annotations

import copy
import io
import pickle
import random
import shutil
import warnings
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.compare import assert_close as support_assert_close
from channelcut import PruningManager
from channelcut.pruning.subselect import (
    SubselectConv2d,
    SubselectLinear,
    install_subselection,
    is_subselect,
    subselect_class,
    subselection_of,
)
from channelcut.pruning.pruner import prune_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

RTOL = 1e-4  # float32: different backends sum in different orders


def assert_close(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """An exported model's output (a tensor or an onnxruntime array) against the eager one."""
    support_assert_close(torch.as_tensor(y).detach(), ref.detach(), RTOL, what)


# ----------------------------------------------------------------------------
# 1. Subselect layers
# ----------------------------------------------------------------------------
def _sliced_conv(idx: List[int]) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 3, 3, padding=1)
    conv.weight.data = conv.weight.data[:, idx].contiguous()
    conv.in_channels = len(idx)
    return conv


@pytest.mark.parametrize("idx", [[1, 2, 3], [0, 2, 5], [5, 0, 3]])
def test_subselect_conv_matches_manual_slice(idx):
    conv = _sliced_conv(idx)
    x = torch.rand(2, 6, 5, 5)
    ref = F.conv2d(x[:, idx], conv.weight, conv.bias, padding=1)
    keys = list(conv.state_dict())
    undo = install_subselection(conv, 1, idx, input_channels=6)
    assert type(conv) is SubselectConv2d and isinstance(conv, nn.Conv2d) and is_subselect(conv)
    assert list(conv.state_dict()) == keys  # the index is not part of the state
    assert torch.equal(conv(x), ref)
    assert torch.equal(torch.jit.script(conv)(x), ref)
    sel = subselection_of(conv)
    assert sel["indices"] == idx and sel["contiguous"] == (idx == [1, 2, 3])
    assert ("narrow" if idx == [1, 2, 3] else "gather") in repr(conv)
    undo()
    assert type(conv) is nn.Conv2d and not is_subselect(conv)
    assert not any(k.startswith("subselect") for k in vars(conv))


def test_subselect_linear_on_tokens_dim_minus_one():
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    x = torch.rand(2, 7, 10)
    install_subselection(lin, -1, [9, 0, 4], input_channels=10)
    assert type(lin) is SubselectLinear
    ref = F.linear(x[..., [9, 0, 4]], lin.weight, lin.bias)
    assert torch.equal(lin(x), ref)
    assert torch.equal(torch.jit.script(lin)(x), ref)
    # contiguous 3-D+ inputs gather columns of the 2-D view; others index_select
    for y in (torch.rand(2, 3, 7, 10), torch.rand(10, 7, 2).permute(2, 1, 0), torch.rand(7, 10)):
        ref = F.linear(y[..., [9, 0, 4]], lin.weight, lin.bias)
        assert torch.equal(lin(y), ref) and torch.equal(torch.jit.script(lin)(y), ref)


def test_non_contiguous_indices_can_not_be_a_view():
    with pytest.raises(ValueError, match="one ascending range"):
        install_subselection(nn.Linear(2, 2), 1, [0, 2], contiguous=True)
    with pytest.raises(ValueError, match="at least one"):
        install_subselection(nn.Linear(2, 2), 1, [])


def test_contiguous_indices_may_be_forced_to_gather():
    lin = nn.Linear(2, 2)
    install_subselection(lin, 1, [1, 2], contiguous=False, input_channels=4)
    assert not lin.subselect_contiguous and "gather" in repr(lin)


def test_composed_selection():
    conv = _sliced_conv([0, 2, 5])
    install_subselection(conv, 1, [0, 2, 3, 5], input_channels=6)  # model pruned once
    undo = install_subselection(conv, 1, [0, 1, 3])  # then again: positions in what it read
    assert conv.subselect_indices == [0, 2, 5]
    undo()
    assert conv.subselect_indices == [0, 2, 3, 5] and is_subselect(conv)


def test_index_follows_the_module_to_another_dtype_and_device():
    lin = nn.Linear(2, 2)
    install_subselection(lin, 1, [0, 3], input_channels=4)
    lin.double()
    assert lin.subselect_index.dtype == torch.long
    x = torch.rand(1, 4, dtype=torch.float64)
    assert torch.equal(lin(x), F.linear(x[:, [0, 3]], lin.weight, lin.bias))
    lin.to("meta")
    assert lin.subselect_index.device.type == "meta" and lin.subselect_indices == [0, 3]


class HalfConv(nn.Conv2d):
    """A user layer with its own forward: gets a generic Subselect class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x * 0.5, self.weight, self.bias)


class PlainSubclass(nn.Linear):
    """A subclass that keeps nn.Linear's forward: gets a scriptable class."""


def test_generic_subclass_pickles_traces_and_exports():
    conv = HalfConv(6, 3, 1)
    conv.weight.data = conv.weight.data[:, [0, 4]].contiguous()
    install_subselection(conv, 1, [0, 4], input_channels=6)
    cls = type(conv)
    assert cls.__name__ == "SubselectHalfConv" and isinstance(conv, HalfConv)
    assert subselect_class(HalfConv) is cls  # made once
    x = torch.rand(1, 6, 4, 4)
    ref = F.conv2d(x[:, [0, 4]] * 0.5, conv.weight, conv.bias)
    assert torch.equal(conv(x), ref)
    assert torch.equal(pickle.loads(pickle.dumps(conv))(x), ref)
    assert torch.equal(copy.deepcopy(conv)(x), ref)
    assert torch.equal(torch.jit.trace(conv, (x,))(x), ref)
    assert torch.equal(torch.export.export(conv, (x,)).module()(x), ref)


def test_plain_subclass_stays_scriptable():
    lin = PlainSubclass(2, 3)
    install_subselection(lin, 1, [1, 3], input_channels=4)
    assert isinstance(lin, PlainSubclass) and type(lin).forward is SubselectLinear.forward
    x = torch.rand(2, 4)
    assert torch.equal(torch.jit.script(lin)(x), lin(x))


def test_failed_prune_restores_classes():
    """prune_model stays all-or-nothing with class swaps: a failing step
    after the subselections were installed restores every module."""
    net = SubsetNet().eval()
    x = torch.rand(2, 3, 8, 8)
    m = PruningManager(net).compute([x], pruned_inputs=SubsetNet.REQUEST, reorder=False)
    spec = copy.deepcopy(m.spec)
    assert spec.subselections
    spec.subselections.append(copy.deepcopy(spec.subselections[0]))
    spec.subselections[-1].indices = [0]  # same module, another subset: rejected
    before = [(n, type(mod)) for n, mod in net.named_modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(Exception, match="two different input subsets"):
        prune_model(net, spec)
    assert [(n, type(mod)) for n, mod in net.named_modules()] == before
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------
# 2. export backends
# ----------------------------------------------------------------------------
class SubsetNet(nn.Module):
    """Three conv consumers and two linear consumers of shared producers, each
    dropping other channels: with reorder=False most of them gather."""

    REQUEST = (
        [("b.weight", c) for c in (1, 5, 9, 12)]
        + [("c.weight", c) for c in (2, 6, 10, 12)]
        + [("d.weight", c) for c in (0, 3, 6, 15)]
        + [("h1.weight", c) for c in (0, 3, 7)]
        + [("h2.weight", c) for c in (1, 4, 7, 10)]
    )

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 8, 1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.d = nn.Conv2d(16, 8, 1)
        self.tok = nn.Linear(8, 12)
        self.h1 = nn.Linear(12, 5)
        self.h2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn(self.stem(x)))
        y = self.b(s) + self.c(s) * self.d(s)
        t = torch.relu(self.tok(y.flatten(2).transpose(1, 2)))  # tokens (B, N, 12)
        return self.h1(t).mean(1) + self.h2(t.mean(1))


def _run_onnx(model: nn.Module, x: torch.Tensor, path) -> Tuple[torch.Tensor, List[str]]:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y, *_) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(y), ops


def _compile(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "inductor" and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's inductor backend needs a C compiler")
    torch._dynamo.reset()
    try:
        return torch.compile(model, backend=backend, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()


BACKENDS: Dict[str, Callable] = {
    "jit.trace": lambda m, x, tmp: torch.jit.trace(m, (x,), check_trace=False)(x),
    "jit.script": lambda m, x, tmp: torch.jit.script(m)(x),
    "torch.export": lambda m, x, tmp: torch.export.export(m, (x,)).module()(x),
    "onnx": lambda m, x, tmp: _run_onnx(m, x, tmp / "model.onnx")[0],
    "compile.aot_eager": lambda m, x, tmp: _compile(m, x, "aot_eager"),
}


@pytest.fixture(scope="module")
def subset_net():
    net = SubsetNet().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # copy_cost=0: this test wants gathers (the cost model would read some as wider views)
    m = PruningManager(net).compute([x], pruned_inputs=SubsetNet.REQUEST, reorder=False, copy_cost=0).prune()
    assert m.spec.copy_ops >= 2 and m.spec.view_ops + m.spec.copy_ops >= 4, m.spec.summary()
    with torch.no_grad():
        ref = net(x)
    return net, x, ref


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_small_model_with_gathers(subset_net, backend, tmp_path):
    net, x, ref = subset_net
    with torch.no_grad():
        y = BACKENDS[backend](net, x, tmp_path)
    assert_close(y, ref, backend)


def test_small_model_onnx_uses_plain_slice_and_gather(subset_net, tmp_path):
    net, x, ref = subset_net
    y, ops = _run_onnx(net, x, tmp_path / "m.onnx")
    assert_close(y, ref, "onnx")
    assert "Gather" in ops, ops
    assert set(ops) <= {
        "Conv", "Gemm", "MatMul", "Add", "Mul", "Relu", "Gather", "Slice", "Reshape", "Transpose", "ReduceMean",
        "Flatten", "Constant", "BatchNormalization", "Shape", "Concat", "Unsqueeze", "Squeeze", "Identity",
    }, ops


def test_small_model_script_save_and_load(subset_net, tmp_path):
    net, x, ref = subset_net
    scripted = torch.jit.script(net)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    assert torch.equal(torch.jit.load(buf)(x), scripted(x))
    program = torch.export.export(net, (x,))
    torch.export.save(program, tmp_path / "m.pt2")
    assert_close(torch.export.load(tmp_path / "m.pt2").module()(x), ref, "export save/load")


@pytest.mark.slow
def test_small_model_compile_inductor(subset_net):
    net, x, ref = subset_net
    with torch.no_grad():
        assert_close(_compile(net, x, "inductor"), ref, "inductor")


def test_gradients_flow_through_subselections(subset_net):
    net, x, _ = subset_net
    trained = copy.deepcopy(net).train()
    trained(x).sum().backward()
    assert all(p.grad is not None for p in trained.parameters())


# -- channelcut.export helpers ------------------------------------------------------
def test_check_backends_reports_every_backend(subset_net):
    from channelcut.export import check_backends

    net, x, _ = subset_net
    results = check_backends(net, [x], backends=["jit.trace", "jit.script", "torch.export", "onnx", "compile.aot_eager"])
    assert [r.backend for r in results] == ["jit.trace", "jit.script", "torch.export", "onnx", "compile.aot_eager"]
    bad = [(r.backend, r.error) for r in results if not r.ok]
    assert not bad
    assert all(r.max_rel_diff is not None and r.max_rel_diff <= RTOL for r in results)


def test_export_helpers_write_checked_files(subset_net, tmp_path):
    from channelcut.export import to_exported_program, to_onnx, to_torchscript

    pytest.importorskip("onnxruntime")
    net, x, ref = subset_net
    assert to_onnx(net, [x], tmp_path / "m.onnx").is_file()
    to_torchscript(net, [x], tmp_path / "m.ts")
    assert torch.equal(torch.jit.load(str(tmp_path / "m.ts"))(x), net(x))
    to_exported_program(net, [x], tmp_path / "m.pt2")
    assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x), ref, "pt2")


class DiffersWhenScripted(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return x + 1.0
        return x


def test_export_check_catches_a_mismatch():
    from channelcut.export import ExportCheckError, check_backends, to_torchscript

    x = torch.rand(2, 3)
    with pytest.raises(ExportCheckError, match="TorchScript"):
        to_torchscript(DiffersWhenScripted(), [x])
    (res,) = check_backends(DiffersWhenScripted(), [x], backends=["jit.script"])
    assert not res.ok and "relative difference" in res.error
    with pytest.raises(ValueError, match="unknown backend"):
        check_backends(DiffersWhenScripted(), [x], backends=["tflite"])


# -- the torchvision zoo ----------------------------------------------------------
torchvision = pytest.importorskip("torchvision")

ZOO = {
    # name: (builder, input)
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (1, 3, 32, 32)),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (1, 3, 32, 32)),
    "mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(num_classes=10), (1, 3, 32, 32)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (1, 3, 32, 32)),
    "vit_b_16": (
        # vit_b_16's architecture at toy size (torchvision's VisionTransformer class)
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=96, mlp_dim=192, num_classes=10
        ),
        (1, 3, 32, 32),
    ),
}


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_model(request):
    name = request.param
    build, shape = ZOO[name]
    torch.manual_seed(0)
    net = build().eval()
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    m = PruningManager(net)
    m.trace([x])
    rng = random.Random(0)
    request_ = [(p, c) for p, n in m.consumers().items() for c in rng.sample(range(n), int(n * 0.3))]
    m.compute([x], pruned_inputs=request_).prune()
    assert any(is_subselect(mod) for mod in net.modules()), f"{name}: no subselection to export"
    with torch.no_grad():
        ref = net(x)
    return name, net, x, ref


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_zoo_export(zoo_model, backend, tmp_path):
    name, net, x, ref = zoo_model
    with torch.no_grad():
        y = BACKENDS[backend](net, x, tmp_path)
    assert_close(y, ref, f"{name} {backend}")
