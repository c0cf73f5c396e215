"""``nn.MultiheadAttention`` is traced op by op (not a barrier): its input and
output channels and whole heads are pruned, the pruned layer runs as a
``PrunedMultiheadAttention`` with the same parameter names, and the pruned
model equals the mock in float64 in every mode and configuration."""

from __future__ import annotations

import random
import warnings
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import nn

import channelcut
from channelcut import PruningManager
from channelcut.pruning.attention import PrunedMultiheadAttention

from ._helpers import MODES, export, prepare, rand_inputs

D = torch.float64


class Block(nn.Module):
    """A pre-norm-free transformer block around one nn.MultiheadAttention."""

    def __init__(self, dim: int = 16, heads: int = 4, batch_first: bool = True, **mha: Any) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.att = nn.MultiheadAttention(dim, heads, batch_first=batch_first, **mha)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.out = nn.Linear(dim, 5)
        self.batch_first = batch_first
        self.call: Dict[str, Any] = {"need_weights": False}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x if self.batch_first or x.dim() == 2 else x.transpose(0, 1))
        a, _ = self.att(h, h, h, **self.call)
        h = h + a
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.out(h)


def _random_request(m: PruningManager, seed: int, amount: float = 0.4) -> List[Tuple[str, int]]:
    rng = random.Random(seed)
    return [(name, c) for name, n in m.consumers().items() for c in rng.sample(range(n), max(1, int(amount * n)))]


def _head_request(heads: List[int], head_dim: int = 4) -> List[Tuple[str, int]]:
    """Drop whole heads from the output projection's input (what a head
    importance criterion asks for)."""
    return [("att.out_proj.weight", h * head_dim + j) for h in heads for j in range(head_dim)]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("mode", list(MODES))
def test_random_channels_and_heads(mode: str, batch_first: bool) -> None:
    for seed in range(3):
        torch.manual_seed(seed)
        net = prepare(Block(batch_first=batch_first), seed)
        x, x2 = rand_inputs([(2, 7, 8)], seed), rand_inputs([(3, 5, 8)], seed + 100)
        m = PruningManager(net)
        m.trace(x)
        assert not m.graph.barriers, f"seed {seed}: {m.graph.barriers}"
        request = _random_request(m, seed) + _head_request([seed % 4])
        e = export(net, x, other_inputs=x2, what=f"seed {seed}", pruned_inputs=request, **MODES[mode])
        assert e.params_after < e.params_before
        if mode != "constrained":  # heads go from q, k and v together
            assert net.att.num_heads == 3, f"seed {seed}"
            assert net.att.in_proj_weight.shape[0] == 3 * 3 * 4
            assert isinstance(net.att, PrunedMultiheadAttention)


def test_removing_two_heads_shrinks_every_projection() -> None:
    torch.manual_seed(0)
    net = prepare(Block())
    x = rand_inputs([(2, 7, 8)], 0)
    e = export(net, x, pruned_inputs=_head_request([1, 3]))
    att = net.att
    assert (att.num_heads, att.head_dim) == (2, 4)
    assert att.in_proj_weight.shape == (24, 16) and att.in_proj_bias.shape == (24,)
    assert att.out_proj.weight.shape == (16, 8) and att.out_proj.in_features == 8
    assert e.manager.spec.kept()["att.in_proj_weight"] == (48, 24)
    # parameter names are those of nn.MultiheadAttention: the state dict loads into a fresh pruned copy
    assert set(net.state_dict()) == set(prepare(Block()).state_dict())


@pytest.mark.parametrize("case", ["need_weights", "per_head_weights", "masks", "bool_masks", "causal", "unbatched"])
def test_call_variants(case: str) -> None:
    torch.manual_seed(1)
    net = prepare(Block())
    shape = (2, 7, 8)
    if case == "need_weights":  # averaged weights: heads are counted, so they stay
        net.call = {"need_weights": True}
    elif case == "per_head_weights":
        net.call = {"need_weights": True, "average_attn_weights": False}
    elif case == "masks":
        net.call = {"need_weights": False, "attn_mask": torch.randn(7, 7, dtype=D),
                    "key_padding_mask": torch.randn(2, 7, dtype=D)}
    elif case == "bool_masks":
        pad = torch.zeros(2, 7, dtype=torch.bool)
        pad[1, 5:] = True
        net.call = {"need_weights": False, "attn_mask": torch.triu(torch.ones(7, 7, dtype=torch.bool), 1),
                    "key_padding_mask": pad}
    elif case == "causal":
        net.call = {"need_weights": False, "attn_mask": nn.Transformer.generate_square_subsequent_mask(7, dtype=D),
                    "is_causal": True}
    elif case == "unbatched":
        shape = (7, 8)
    x = rand_inputs([shape], 1)
    m = PruningManager(net)
    m.trace(x)
    assert not m.graph.barriers
    export(net, x, what=case, pruned_inputs=_random_request(m, 1) + _head_request([2]))
    assert isinstance(net.att, PrunedMultiheadAttention)
    if case == "need_weights":
        assert net.att.num_heads == 4
    else:
        assert net.att.num_heads == 3


class Cross(nn.Module):
    """Cross-attention with kdim/vdim != embed_dim: separate q/k/v projection weights."""

    def __init__(self) -> None:
        super().__init__()
        self.q_in, self.kv_in = nn.Linear(8, 16), nn.Linear(8, 12)
        self.att = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        kv = self.kv_in(mem)
        a, _ = self.att(self.q_in(x), kv, kv, need_weights=False)
        return self.out(a)


def test_separate_key_and_value_widths() -> None:
    """kdim/vdim != embed_dim: q, k and v have their own projection weights."""

    for mode in MODES:
        torch.manual_seed(2)
        net = prepare(Cross(), 2)
        x = rand_inputs([(2, 5, 8), (2, 6, 8)], 2)
        m = PruningManager(net)
        m.trace(x)
        assert not m.graph.barriers
        request = _random_request(m, 2) + _head_request([0])
        export(net, x, what=mode, pruned_inputs=request, **MODES[mode])
        assert net.att.q_proj_weight.shape[0] == net.att.k_proj_weight.shape[0] == net.att.v_proj_weight.shape[0]


def test_only_the_query_input_of_separate_projections_shrinks() -> None:
    """kdim/vdim layer where only q_proj_weight's input columns go: the layer
    must still become a PrunedMultiheadAttention (torch checks the query
    width against embed_dim)."""

    torch.manual_seed(6)
    net = prepare(Cross(), 6)
    x = rand_inputs([(2, 5, 8), (2, 6, 8)], 6)
    export(net, x, pruned_inputs=[("att.q_proj_weight", 3)])
    assert isinstance(net.att, PrunedMultiheadAttention) and net.att.q_proj_weight.shape == (16, 15)


def test_unsupported_configuration_is_a_safe_barrier() -> None:
    """add_bias_kv appends learned keys: not traced, the layer keeps its channels."""
    torch.manual_seed(3)
    net = prepare(Block(add_bias_kv=True), 3)
    x = rand_inputs([(2, 7, 8)], 3)
    m = PruningManager(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.trace(x)
    assert [b[0] for b in m.graph.barriers] == ["multi_head_attention_forward"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(net, x, pruned_inputs=_random_request(m, 3))
    assert type(net.att) is nn.MultiheadAttention and net.att.in_proj_weight.shape == (48, 16)


def test_transformer_encoder_fast_path_model() -> None:
    """nn.TransformerEncoder in eval mode takes a fused kernel that assumes the
    original widths; the pruned layers must not."""
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3))
    net = prepare(enc, 4)
    x = rand_inputs([(2, 7, 8)], 4)
    for mode in ("unconstrained", "constrained"):
        model = prepare(nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3)), 4)
        model.load_state_dict(net.state_dict())
        m = PruningManager(model)
        m.trace(x)
        assert not m.graph.barriers
        request = _random_request(m, 4, 0.3) + [("1.layers.0.self_attn.out_proj.weight", c) for c in range(4)]
        export(model, x, what=mode, pruned_inputs=request, **MODES[mode])
        # constrained mode removes a head when any consumer drops one of its channels
        heads = model[1].layers[0].self_attn.num_heads
        assert heads == 3 if mode == "unconstrained" else heads < 3
        with torch.no_grad():  # the fused path is taken without gradients in eval mode
            model(*x)


def test_scripted_saved_loaded_and_undone(tmp_path) -> None:
    torch.manual_seed(5)
    net = prepare(Block(), 5)
    x = rand_inputs([(2, 7, 8)], 5)
    ref = net(*x).detach()
    fresh = prepare(Block(), 5)
    fresh.load_state_dict(net.state_dict())
    m = PruningManager(net)
    m.trace(x)
    m.compute(x, pruned_inputs=_random_request(m, 5) + _head_request([0, 1]))
    y_mock = m.get_mock_model()(*x).detach()
    m.prune()
    y = net(*x).detach()
    torch.testing.assert_close(y, y_mock, rtol=1e-10, atol=1e-12)
    # TorchScript compiles the pruned layer (it reads a subset of its input here)
    assert type(net.att).__name__ == "SubselectMultiheadAttention"
    h = net.inp(x[0]).detach()
    scripted = torch.jit.script(net.att)
    torch.testing.assert_close(scripted(h, h, h, need_weights=False)[0], net.att(h, h, h, need_weights=False)[0],
                               rtol=1e-10, atol=1e-12)
    # channelcut.save / load re-applies the plan to a fresh model (classes and heads included)
    channelcut.save(net, tmp_path / "plan")
    loaded = channelcut.load(tmp_path / "plan", fresh)
    assert isinstance(loaded.att, PrunedMultiheadAttention) and loaded.att.num_heads == 2
    torch.testing.assert_close(loaded(*x), y, rtol=1e-10, atol=1e-12)
    # undo restores the original class, attributes and values
    m.undo()
    assert type(net.att) is nn.MultiheadAttention and net.att.num_heads == 4 and net.att.embed_dim == 16
    torch.testing.assert_close(net(*x), ref, rtol=0, atol=0)
