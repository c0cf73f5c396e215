"""Mixture-of-experts models (issue 18).

Fused expert weights (3-D ``gate_up_proj`` / ``down_proj``, dispatched with
``topk`` and per-expert token selection) are rewritten as one MLP per expert
(``channelcut.moe.split_experts``), so each expert's intermediate channels
prune on their own and experts may keep different widths; whole experts are
removed with their router rows (``remove_experts``). The references here do
not come from the plan: a fused forward written out by hand, the masked model
itself, and the unpruned model whose router never picks the removed experts.
Tiny random configs, float32 (Hugging Face's expert dispatch has no float64
grouped matmul)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

transformers = pytest.importorskip("transformers")

from channelcut import MaskingManager, PruningManager  # noqa: E402
from channelcut.importance import L2  # noqa: E402
from channelcut.moe import (ExpertMLP, SplitExperts, expert_usage, fused_experts_reason, remove_experts,  # noqa: E402
                            split_experts)

SEED = 0


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                                      shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                      max_position_embeddings=64, use_cache=False)
    return transformers.Qwen2MoeForCausalLM(cfg)


def _qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                      max_position_embeddings=64, use_cache=False)
    return transformers.Qwen3MoeForCausalLM(cfg)


def _deepseek():
    """DeepSeek-V3 style: a dense first layer, then shared + routed experts
    behind a sigmoid router (one expert group), multi-head latent attention."""
    cfg = transformers.DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
                                        topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                        max_position_embeddings=64, use_cache=False)
    return transformers.DeepseekV3ForCausalLM(cfg)


BUILDS = [_mixtral, _qwen2_moe, _qwen3_moe, _deepseek]
IDS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]


def _net(build):
    """A model with randomised norms, a router that spreads its tokens and
    experts of different magnitudes (expert e's weights scaled by 0.5 + e/E)."""
    torch.manual_seed(SEED)
    net = build().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
            elif p.dim() == 3:  # fused experts: (experts, ., .)
                p.mul_(0.5 + torch.arange(p.shape[0], dtype=p.dtype).view(-1, 1, 1) / p.shape[0])
    return net


def _inputs():
    return {"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(SEED))}


def _expert_params(net: nn.Module) -> int:
    return sum(p.numel() for m in net.modules() if isinstance(m, SplitExperts) for p in m.parameters())


def _fused_expert_params(net: nn.Module) -> int:
    return sum(p.numel() for m in net.modules() if fused_experts_reason(m) is None for p in m.parameters())


@pytest.mark.parametrize("build", BUILDS, ids=IDS)
def test_splitting_the_experts_keeps_the_function(build) -> None:
    net = _net(build)
    x = _inputs()
    fused = _fused_expert_params(net)
    with torch.no_grad():
        before = net(**x).logits
        names = split_experts(net)
        after = net(**x).logits
    assert names and all(isinstance(net.get_submodule(n), SplitExperts) for n in names), f"seed {SEED}"
    assert _expert_params(net) == fused
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6, msg=f"seed {SEED}")
    assert split_experts(net) == []  # nothing fused is left


class _Fused(nn.Module):
    """A fused-experts block written out by hand, in each of Hugging Face's
    layouts; its forward is the reference the split form must match."""

    def __init__(self, transposed: bool, bias: bool, gate: bool, concatenated: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(SEED)
        e, h, i = 3, 8, 5
        self.num_experts, self.has_gate, self.has_bias = e, gate, bias
        self.is_transposed, self.is_concatenated = transposed, concatenated
        rows = 2 * i if gate else i
        w_in = torch.randn(e, rows, h, generator=g)
        w_out = torch.randn(e, h, i, generator=g)
        first = "gate_up_proj" if gate else "up_proj"
        setattr(self, first, nn.Parameter(w_in.transpose(1, 2).contiguous() if transposed else w_in))
        self.down_proj = nn.Parameter(w_out.transpose(1, 2).contiguous() if transposed else w_out)
        if bias:
            setattr(self, first + "_bias", nn.Parameter(torch.randn(e, rows, generator=g)))
            self.down_proj_bias = nn.Parameter(torch.randn(e, h, generator=g))
        self.act_fn = nn.GELU()
        self.first = first

    def _apply_gate(self, y):  # named like Hugging Face's default gate
        return y

    _apply_gate.__name__ = "_default_apply_gate"

    def forward(self, x, idx, w):
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for s in range(idx.shape[1]):
                e = int(idx[t, s])
                wi = getattr(self, self.first)[e]
                wi = wi.t() if self.is_transposed else wi
                y = wi @ x[t]
                if self.has_bias:
                    y = y + getattr(self, self.first + "_bias")[e]
                if self.has_gate:
                    n = y.shape[0] // 2
                    g, u = (y[:n], y[n:]) if self.is_concatenated else (y[0::2], y[1::2])
                    y = self.act_fn(g) * u
                else:
                    y = self.act_fn(y)
                wo = self.down_proj[e].t() if self.is_transposed else self.down_proj[e]
                y = wo @ y
                if self.has_bias:
                    y = y + self.down_proj_bias[e]
                out[t] += y * w[t, s]
        return out


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gate,concatenated", [(True, True), (True, False), (False, True)])
def test_every_fused_layout_splits_into_the_same_function(transposed, bias, gate, concatenated) -> None:
    holder = nn.Sequential(_Fused(transposed, bias, gate, concatenated))
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(6, 8, generator=g)
    idx = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)
    with torch.no_grad():
        ref = holder[0](x, idx, w)
        assert split_experts(holder) == ["0"]
        out = holder[0](x, idx, w)
    assert isinstance(holder[0], SplitExperts)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"seed {SEED}")


def test_a_block_with_its_own_gate_stays_fused_with_the_reason() -> None:
    class CustomGate(_Fused):
        def _apply_gate(self, y):
            return y.clamp(max=7.0)

    holder = nn.Sequential(CustomGate(False, False, True, True))
    assert "its own CustomGate._apply_gate" in fused_experts_reason(holder[0])
    assert split_experts(holder) == []
    assert fused_experts_reason(nn.Linear(2, 2)) == "not a fused-experts block"


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("build", BUILDS, ids=IDS)
def test_masked_moe_model_exports_exact_with_fewer_expert_parameters(build, scope) -> None:
    """The documented workflow: mask 30% with L2, export; the result computes
    what the masked model computes, with at least 20% fewer expert
    parameters (30% of every layer's inputs, or 30% chosen over all layers)."""
    net = _net(build)
    x = _inputs()
    fused = _fused_expert_params(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no op of the expert dispatch is a barrier any more
        mm = MaskingManager(net, x)
    assert mm.split_blocks
    mm.importance(L2()).mask(amount=0.3, scope=scope)
    with torch.no_grad():
        masked = net(**x).logits
    before = sum(p.numel() for p in net.parameters())
    pm = PruningManager(net).compute(x)
    assert not pm.graph.barriers, f"seed {SEED}: {pm.graph.barriers[:3]}"
    pm.prune()  # verified against the masked model itself
    assert sum(p.numel() for p in net.parameters()) < before
    assert _expert_params(net) <= 0.8 * fused, f"seed {SEED}: {_expert_params(net)} of {fused}"
    with torch.no_grad():
        out = net(**x).logits
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5 * float(masked.abs().max()), msg=f"seed {SEED}")



@pytest.mark.parametrize("build", BUILDS, ids=IDS)
def test_each_expert_keeps_its_own_width(build) -> None:
    """Expert e of a block loses e + 1 of its intermediate channels (a
    request on its down projection's inputs): the experts end with four
    different widths, and the export equals the model with those columns
    zeroed by hand."""
    net = _net(build)
    x = _inputs()
    block = split_experts(net)[0]
    request = [(f"{block}.{e}.down_proj.weight", c) for e in range(4) for c in range(2 * e, 3 * e + 1)]
    hand = copy.deepcopy(net)
    with torch.no_grad():
        for name, c in request:
            hand.get_parameter(name)[:, c] = 0
        ref = hand(**x).logits
    PruningManager(net).compute(x, pruned_inputs=request).prune()
    widths = [e.down_proj.in_features for e in net.get_submodule(block)]
    full = hand.get_submodule(block)[0].down_proj.in_features
    assert widths == [full - 1, full - 2, full - 3, full - 4], f"seed {SEED}: {widths}"
    with torch.no_grad():
        out = net(**x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=f"seed {SEED}")


class _NeverPick(TorchFunctionMode):
    """The unpruned model whose routers never pick some experts: their
    router logits are set to -inf (nothing from the plan)."""

    def __init__(self, removed):
        super().__init__()
        self.removed = {id(w): ids for w, ids in removed}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear and len(args) > 1 and id(args[1]) in self.removed:
            out = out.clone()
            out[..., self.removed[id(args[1])]] = float("-inf")
        return out


@pytest.mark.parametrize("build", BUILDS, ids=IDS)
def test_removing_whole_experts_equals_a_router_that_never_picks_them(build) -> None:
    net = _net(build)
    x = _inputs()
    blocks = split_experts(net)
    drop = {name: [1] if i % 2 else [0, 3] for i, name in enumerate(blocks)}
    routers = [net.get_submodule(n.rpartition(".")[0]).gate for n in blocks]
    with torch.no_grad(), _NeverPick([(r.weight, drop[n]) for r, n in zip(routers, blocks)]):
        ref = net(**x).logits
    before = _expert_params(net)
    kept = remove_experts(net, drop)
    assert kept[blocks[0]] == [1, 2]
    assert all(r.weight.shape[0] == 4 - len(drop[n]) for r, n in zip(routers, blocks))
    assert _expert_params(net) < before
    with torch.no_grad():
        out = net(**x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=f"seed {SEED}")
    # and the smaller model still exports (here with nothing more removed)
    PruningManager(net).compute(x).prune()


def test_remove_experts_refuses_what_it_can_not_do() -> None:
    net = _net(_mixtral)
    blocks = split_experts(net)
    with pytest.raises(ValueError, match="has no expert 9"):
        remove_experts(net, {blocks[0]: [9]})
    with pytest.raises(ValueError, match="fewer than the 2 each token is routed to"):
        remove_experts(net, {blocks[0]: [0, 1, 2]})
    with pytest.raises(TypeError, match="split_experts"):
        remove_experts(net, {"model.layers.0.self_attn": [0]})
    assert [len(net.get_submodule(b)) for b in blocks] == [4, 4]  # nothing changed


def test_an_expert_mlp_is_a_plain_gated_mlp() -> None:
    torch.manual_seed(SEED)
    gate, up, down = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False), nn.Linear(3, 4, bias=False)
    e = ExpertMLP(gate, up, down, nn.SiLU())
    x = torch.randn(5, 4)
    torch.testing.assert_close(e(x), down(nn.functional.silu(gate(x)) * up(x)))
    with pytest.raises(ValueError, match="2 experts but 1 expert ids"):
        SplitExperts([e, copy.deepcopy(e)], expert_ids=[0])


def test_a_split_model_saves_with_channelcut_and_refuses_hf_save_pretrained(tmp_path) -> None:
    import channelcut
    from channelcut.errors import ChannelcutError
    from channelcut.hf_config import save_pretrained

    net = _net(_mixtral)
    x = _inputs()
    blocks = split_experts(net)
    PruningManager(net).compute(x, pruned_inputs=[(f"{b}.1.down_proj.weight", 3) for b in blocks]).prune()
    with torch.no_grad():
        ref = net(**x).logits
    with pytest.raises(ChannelcutError, match="channelcut.save"):
        save_pretrained(net, tmp_path / "hf")
    channelcut.save(net, tmp_path / "net")
    back = channelcut.load(tmp_path / "net", lambda: _net(_mixtral)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, ref)


def test_removed_experts_are_saved_and_loaded(tmp_path) -> None:
    import channelcut

    net = _net(_qwen2_moe)
    x = _inputs()
    blocks = split_experts(net)
    remove_experts(net, {blocks[0]: [2], blocks[1]: [0, 3]})
    PruningManager(net).compute(x, pruned_inputs=[(f"{blocks[1]}.0.down_proj.weight", 5)]).prune()
    with torch.no_grad():
        ref = net(**x).logits
    channelcut.save(net, tmp_path / "net")
    back = channelcut.load(tmp_path / "net", lambda: _net(_qwen2_moe)).eval()
    assert [len(back.get_submodule(b)) for b in blocks] == [3, 2]
    assert back.get_submodule(blocks[1]).original_ids == [1, 2]
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, ref)


def test_expert_usage_is_the_routing_weight_each_expert_gets() -> None:
    """Mixtral's routing written out by hand from the router's input: softmax
    over the router logits, top-2, renormalised; summed per expert over the
    tokens. Then the two least used experts of each block go."""
    net = _net(_mixtral)
    blocks = split_experts(net)
    batches = [_inputs(), {"input_ids": torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(9))}]
    seen = {n: [] for n in blocks}
    routers = {n: net.get_submodule(n.rpartition(".")[0]).gate for n in blocks}
    hooks = [r.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, 64)))
             for n, r in routers.items()]
    usage = expert_usage(net, batches)
    for h in hooks:
        h.remove()
    for n, r in routers.items():
        h = torch.cat(seen[n]).double()
        probs = torch.softmax(h @ r.weight.double().t(), dim=-1)
        w, idx = probs.topk(2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        want = torch.zeros(4, dtype=torch.float64).index_add_(0, idx.reshape(-1), w.reshape(-1)) / h.shape[0]
        torch.testing.assert_close(usage[n], want, rtol=1e-5, atol=1e-6, msg=f"seed {SEED}")
        assert abs(float(usage[n].sum()) - 1) < 1e-6  # top-k weights renormalised: one per token
    least = {n: u.argsort()[:2].tolist() for n, u in usage.items()}
    kept = remove_experts(net, least)
    assert all(sorted(set(range(4)) - set(least[n])) == kept[n] for n in blocks)
    after = expert_usage(net, batches)  # two experts left, top-2: every token uses both
    assert all(after[n].shape == (2,) and abs(float(after[n].sum()) - 1) < 1e-6 for n in blocks)
    assert all(net.get_submodule(n).original_ids == kept[n] for n in blocks)
    with pytest.raises(ValueError, match="no SplitExperts block"):
        expert_usage(nn.Linear(2, 2), [torch.randn(1, 2)])
