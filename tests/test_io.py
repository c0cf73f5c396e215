"""channelcut.save / channelcut.load, and plain torch.save of pruned models.

Every round trip is checked bit-exactly (``torch.equal``) against the saved
model; every error case also checks that the model passed in is untouched.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import channelcut
from channelcut import (
    MissingTensorError,
    PlanError,
    PlanFormatError,
    PlanMismatchError,
    PruningManager,
)
from channelcut.pruning.subselect import is_subselect
from support.unchanged import assert_unchanged, snapshot

torchvision = pytest.importorskip("torchvision")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def random_request(manager: PruningManager, fraction: float, seed: int) -> List[Tuple[str, int]]:
    """``fraction`` of every consumer's input channels, chosen at random."""
    rng = random.Random(seed)
    out = []
    for param, n in manager.consumers().items():
        k = int(n * fraction)
        out += [(param, c) for c in rng.sample(range(n), k)]
    return out


def prune(net: nn.Module, x: torch.Tensor, fraction: float = 0.3, seed: int = 0, **kw) -> PruningManager:
    m = PruningManager(net)
    m.trace([x])
    return m.compute([x], pruned_inputs=random_request(m, fraction, seed), **kw).prune()


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pruned_resnet():
    net = resnet18()
    manager = prune(net, X)
    assert manager.spec.copy_ops > 0, "the test wants non-contiguous subselections"
    return net, manager


# ----------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------
def test_round_trip_is_bit_exact(pruned_resnet, tmp_path):
    net, manager = pruned_resnet
    folder = channelcut.save(net, tmp_path / "m")
    assert (folder / "plan.json").is_file() and (folder / "weights.safetensors").is_file()
    fresh = resnet18()
    loaded = channelcut.load(folder, fresh)
    assert loaded is fresh
    with torch.no_grad():
        assert torch.equal(loaded(X), net(X))
    # same keys as the unpruned class: a plain state_dict of it loads too
    assert list(loaded.state_dict()) == list(resnet18().state_dict())
    assert [type(m) for m in loaded.modules()] == [type(m) for m in net.modules()]
    assert loaded.layer1[0].conv1.in_channels == net.layer1[0].conv1.in_channels


def test_plan_is_readable_json(pruned_resnet, tmp_path):
    net, manager = pruned_resnet
    channelcut.save(net, tmp_path, manager=manager, metadata={"amount": 0.3})
    text = (tmp_path / "plan.json").read_text()
    plan = json.loads(text)
    assert plan["format_version"] == channelcut.io.FORMAT_VERSION
    assert plan["channelcut_version"] == channelcut.__version__
    assert plan["model_class"] == "torchvision.models.resnet.ResNet"
    assert plan["metadata"] == {"amount": 0.3}
    (step,) = plan["steps"]
    assert step["mode"] == "unconstrained"
    # per parameter, per dim: the kept indices of the original tensor
    spec = manager.spec
    for name, dims in spec.slices.items():
        assert step["slices"][name] == {str(d): kept for d, kept in dims.items()}
    assert len(step["subselections"]) == len(spec.subselections)
    assert plan["subselections"].keys() == {s.module for s in spec.subselections}
    gathers = [s for s in plan["subselections"].values() if not s["contiguous"]]
    assert gathers and plan["summary"]["copied_channels_per_inference"] == sum(len(s["indices"]) for s in gathers)
    # lists of indices stay on one line: the file is meant for people
    assert len(text.splitlines()) < 2000


def test_spec_round_trips_through_json(pruned_resnet):
    _, manager = pruned_resnet
    spec = manager.spec
    again = channelcut.PruningSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_load_with_factory_and_constrained_mode(tmp_path):
    net = resnet18()
    prune(net, X, seed=3, constrained=True)
    channelcut.save(net, tmp_path)
    loaded = channelcut.load(tmp_path, resnet18)
    with torch.no_grad():
        assert torch.equal(loaded(X), net(X))
    assert not any(is_subselect(m) for m in loaded.modules())


def test_spec_argument_and_manager_argument_agree(pruned_resnet, tmp_path):
    net, manager = pruned_resnet
    channelcut.save(net, tmp_path / "a", spec=manager.spec)
    channelcut.save(net, tmp_path / "b", manager=manager)
    channelcut.save(net, tmp_path / "c")  # remembered: this model object was pruned here
    texts = {(tmp_path / d / "plan.json").read_text() for d in "abc"}
    assert len(texts) == 1


def test_copy_of_pruned_model_saves_with_derived_plan(pruned_resnet, tmp_path):
    net, _ = pruned_resnet
    clone = copy.deepcopy(net)  # no record of the spec: plan holds shapes + subsets
    channelcut.save(clone, tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["steps"] == []
    loaded = channelcut.load(tmp_path, resnet18())
    with torch.no_grad():
        assert torch.equal(loaded(X), net(X))


def test_iterative_pruning_saves_every_step(tmp_path):
    net = resnet18()
    prune(net, X, fraction=0.2, seed=1)
    prune(net, X, fraction=0.2, seed=2)
    channelcut.save(net, tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["steps"]) == 2
    loaded = channelcut.load(tmp_path, resnet18())
    with torch.no_grad():
        assert torch.equal(loaded(X), net(X))
    # and the loaded model remembers its plan: saving it again gives the same plan
    channelcut.save(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "plan.json").read_text())["steps"] == plan["steps"]


def test_unpruned_model_round_trips(tmp_path):
    net = resnet18()
    channelcut.save(net, tmp_path)
    loaded = channelcut.load(tmp_path, resnet18())
    with torch.no_grad():
        assert torch.equal(loaded(X), net(X))


def test_torch_save_fallback_without_safetensors(pruned_resnet, tmp_path, monkeypatch):
    net, _ = pruned_resnet
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    channelcut.save(net, tmp_path)
    assert (tmp_path / "weights.pt").is_file() and not (tmp_path / "weights.safetensors").exists()
    loaded = channelcut.load(tmp_path, resnet18())
    with torch.no_grad():
        assert torch.equal(loaded(X), net(X))


def test_plain_torch_save_and_load(pruned_resnet, tmp_path):
    net, _ = pruned_resnet
    torch.save(net, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(X), net(X))
    assert any(is_subselect(m) for m in again.modules())
    # and a pruned state_dict loads into a pruned model of the same plan
    other = channelcut.load(_save(net, tmp_path / "d"), resnet18())
    other.load_state_dict(net.state_dict())


def _save(net: nn.Module, path) -> object:
    return channelcut.save(net, path)


# -- a user's layer with its own forward (generic Subselect class) ----------------
class ScaledConv(nn.Conv2d):
    """A conv subclass with its own forward: gets the generic Subselect class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x * 0.5, self.weight, self.bias, self.stride, self.padding)


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = ScaledConv(8, 6, 1)
        self.d = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)
        self.out = nn.Linear(5, 7)
        self.out2 = self.out  # tied: the same module twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x) + self.b(x))
        y = self.c(h) + self.d(h)
        return self.out2(self.head(y.mean((2, 3))))


def build_tied() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet().eval()


def test_user_layer_subclass_and_tied_modules(tmp_path):
    net = build_tied()
    x = torch.rand(2, 3, 8, 8)
    PruningManager(net).compute([x], pruned_inputs=[("c.weight", 1), ("c.weight", 4), ("d.weight", 2), ("d.weight", 6)]).prune()
    assert type(net.c).__name__ == "SubselectScaledConv" and isinstance(net.c, ScaledConv)
    ref = net(x)
    channelcut.save(net, tmp_path / "s")
    loaded = channelcut.load(tmp_path / "s", build_tied())
    assert torch.equal(loaded(x), ref)
    # pickling the dynamically made class (torch.save and deepcopy)
    torch.save(net, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), ref)
    assert torch.equal(copy.deepcopy(net)(x), ref)


# ----------------------------------------------------------------------------
# errors: clear, typed, and the model is left untouched
# ----------------------------------------------------------------------------
@pytest.fixture()
def saved_resnet(pruned_resnet, tmp_path):
    net, _ = pruned_resnet
    return channelcut.save(net, tmp_path / "saved")


def _fails_untouched(path, model: nn.Module, error: type, match: str) -> None:
    before = snapshot(model)
    with pytest.raises(error, match=match):
        channelcut.load(path, model)
    assert_unchanged(model, before, "after a failed load")


def test_wrong_architecture(saved_resnet):
    torch.manual_seed(0)
    _fails_untouched(saved_resnet, torchvision.models.resnet34(num_classes=10), PlanMismatchError, "resnet.ResNet")


def test_wrong_layer_shape(saved_resnet):
    other = resnet18()
    other.layer3[1].conv2 = nn.Conv2d(256, 256, 5, padding=2, bias=False)  # same names, other shape
    _fails_untouched(saved_resnet, other, PlanMismatchError, "layer3.1.conv2.weight")


def test_wrong_head_size(saved_resnet):
    torch.manual_seed(0)
    # same trunk, other number of classes: only fc differs
    _fails_untouched(saved_resnet, torchvision.models.resnet18(num_classes=11), PlanMismatchError, "fc")


def test_other_class_entirely(saved_resnet):
    _fails_untouched(saved_resnet, nn.Sequential(nn.Conv2d(3, 4, 3)), PlanMismatchError, "saved model did not")


def test_already_pruned_model_is_rejected(saved_resnet, pruned_resnet):
    net, _ = pruned_resnet
    clone = copy.deepcopy(net)
    _fails_untouched(saved_resnet, clone, PlanMismatchError, "shape")


def test_wrong_format_version(saved_resnet):
    plan = json.loads((saved_resnet / "plan.json").read_text())
    plan["format_version"] = 99
    (saved_resnet / "plan.json").write_text(json.dumps(plan))
    _fails_untouched(saved_resnet, resnet18(), PlanFormatError, "upgrade channelcut")


def test_not_a_plan(tmp_path):
    (tmp_path / "plan.json").write_text('{"hello": 1}')
    _fails_untouched(tmp_path, resnet18(), PlanFormatError, "not a channelcut plan")
    (tmp_path / "plan.json").write_text("{not json")
    _fails_untouched(tmp_path, resnet18(), PlanFormatError, "not valid JSON")
    _fails_untouched(tmp_path / "nothing-here", resnet18(), PlanFormatError, "channelcut.save")


def test_missing_tensor(saved_resnet):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(saved_resnet / "weights.safetensors"))
    del weights["layer2.0.bn1.running_var"]
    save_file(weights, str(saved_resnet / "weights.safetensors"))
    _fails_untouched(saved_resnet, resnet18(), MissingTensorError, "layer2.0.bn1.running_var")


def test_missing_weights_file(saved_resnet):
    (saved_resnet / "weights.safetensors").unlink()
    _fails_untouched(saved_resnet, resnet18(), MissingTensorError, "missing")


def test_damaged_step(saved_resnet):
    plan = json.loads((saved_resnet / "plan.json").read_text())
    name = next(iter(plan["steps"][0]["slices"]))
    plan["steps"][0]["slices"][name]["0"] = [10_000]
    (saved_resnet / "plan.json").write_text(json.dumps(plan))
    _fails_untouched(saved_resnet, resnet18(), PlanMismatchError, "index 10000")


def test_errors_are_channelcut_errors():
    for cls in (PlanFormatError, PlanMismatchError, MissingTensorError):
        assert issubclass(cls, PlanError) and issubclass(cls, channelcut.ChannelcutError)


def test_save_rejects_a_spec_that_does_not_describe_the_model(pruned_resnet, tmp_path):
    _, manager = pruned_resnet
    with pytest.raises(PlanMismatchError, match="spec keeps"):
        channelcut.save(resnet18(), tmp_path, spec=manager.spec)


def test_save_before_prune_is_a_state_error(tmp_path):
    net = resnet18()
    m = PruningManager(net).compute([X], pruned_inputs=[("fc.weight", 3)])
    with pytest.raises(channelcut.StateError, match="prune"):
        channelcut.save(net, tmp_path, manager=m)
