"""Exact hidden-size pruning through RMS norms (issue #17 item 2).

Removing channels of an RMSNorm model's residual stream everywhere it flows
(embedding columns, every norm, the q/k/v/gate/up input columns, the
o_proj/down_proj output rows, lm_head, tied or not) is exact: the norms are
rescaled (eps by d/d', weight by sqrt(d/d')). The reference is the original
model with the stream channels zeroed by hand where they are made; Hugging
Face's norms compute in float32, so those models are checked to float32
rounding, a float64 ``nn.RMSNorm`` stream to 1e-10. Norm weights are
randomised.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from support.compare import rel_error
from channelcut import EmptyLayerError, ExportError, PruningManager

transformers = pytest.importorskip("transformers")

DROP = [3, 7, 8, 20, 31]  # of 32 stream channels




def _tiny(family: str, tie: bool, **extra):
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    cfg = cfg_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=32, tie_word_embeddings=tie, **extra)
    torch.manual_seed(0)
    net = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:  # random norm weights: a mis-sliced or unscaled norm shows
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return net


def _stream_zeroed(net):
    """The original model with the stream channels DROP zeroed where they
    are made: embedding columns, o_proj and down_proj rows."""
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, DROP] = 0
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight[DROP] = 0
            layer.mlp.down_proj.weight[DROP] = 0
    return ref


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "qwen3"])
def test_hidden_size_pruning_is_exact(family, tie):
    net = _tiny(family, tie)
    x = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))}
    ref = _stream_zeroed(net)
    with torch.no_grad():
        y_ref = ref(**x).logits
    n0 = sum(p.numel() for p in net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PruningManager(net).compute(x, pruned_outputs=[("model.embed_tokens.weight", j) for j in DROP])
    assert {r.factor for r in pm.spec.rescales} == {(32 / 27) ** 0.5}
    rows = {(a.param, a.dim) for a in pm.spec.additions if a.dim is not None}
    assert ("model.layers.1.mlp.down_proj.weight", 0) in rows and ("model.embed_tokens.weight", 1) in rows
    with torch.no_grad():
        assert rel_error(pm.get_mock_model()(**x).logits, y_ref) <= 1e-5
    pm.prune()  # verified against the reference built from the reported additions
    with torch.no_grad():
        assert rel_error(net(**x).logits, y_ref) <= 1e-5
    assert net.model.embed_tokens.weight.shape == (64, 27)
    assert net.lm_head.weight.shape == (64, 27)
    assert net.model.norm.weight.shape == (27,)
    assert sum(p.numel() for p in net.parameters()) < n0


def test_pruned_llama_config_loads_with_from_pretrained(tmp_path):
    from channelcut.hf import pruned_config, save_pretrained

    net = _tiny("llama", False)
    x = {"input_ids": torch.randint(0, 64, (1, 8))}
    drop = DROP[:4]  # 28 channels: Llama's config wants a multiple of the head count
    PruningManager(net).compute(x, pruned_outputs=[("model.embed_tokens.weight", j) for j in drop]).prune()
    cfg = pruned_config(net)
    assert cfg.hidden_size == 28 and cfg.head_dim == 8
    assert cfg.rms_norm_eps == pytest.approx(net.config.rms_norm_eps * 32 / 28)
    back = transformers.LlamaForCausalLM.from_pretrained(save_pretrained(net, tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(back(**x).logits, net(**x).logits)


def test_qwen3_head_norms_keep_their_eps_so_one_config_can_not_hold_it():
    """Qwen3's q/k norms (over head_dim) share config.rms_norm_eps with the
    stream's norms: after narrowing the stream they differ, which one config
    can not say (channelcut.save holds the model)."""
    from channelcut.errors import NotExpressibleError
    from channelcut.hf import pruned_config

    net = _tiny("qwen3", False)
    x = {"input_ids": torch.randint(0, 64, (1, 8))}
    PruningManager(net).compute(x, pruned_outputs=[("model.embed_tokens.weight", j) for j in DROP]).prune()
    with pytest.raises(NotExpressibleError, match="rms_norm_eps"):
        pruned_config(net)


class Stream(nn.Module):
    """A residual stream of float64 ``nn.RMSNorm`` blocks (``F.rms_norm``)."""

    def __init__(self, d: int = 16, eps=1e-5) -> None:
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.RMSNorm(d, eps=eps), "up": nn.Linear(d, 24),
                                                   "down": nn.Linear(24, d)}) for _ in range(2))
        self.norm = nn.RMSNorm(d, eps=eps)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](b["norm"](h))))
        return self.head(self.norm(h))


@pytest.mark.parametrize("eps", [1e-5, None], ids=["eps", "default-eps"])
def test_float64_rms_norm_stream_is_exact_to_1e_10(eps):
    torch.manual_seed(0)
    net = Stream(eps=eps).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 6, dtype=torch.float64)
    drop = [1, 5, 6, 11]
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref.inp.weight[drop] = 0
        ref.inp.bias[drop] = 0
        for b in ref.blocks:
            b["down"].weight[drop] = 0
            b["down"].bias[drop] = 0
    pm = PruningManager(net).compute([x], pruned_outputs=[("inp.weight", j) for j in drop]).prune()
    with torch.no_grad():
        assert rel_error(net(x), ref(x)) <= 1e-10
    assert net.norm.normalized_shape == (12,) and net.norm.eps == pytest.approx((eps or torch.finfo(torch.float64).eps) * 16 / 12)
    assert len(pm.spec.rescales) == 3


def test_a_wrong_rescale_fails_verification(monkeypatch):
    from channelcut.pruning import resolve

    monkeypatch.setattr(resolve, "rescale_factor", lambda d, kept: 1.0)
    torch.manual_seed(0)
    net = Stream().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    pm = PruningManager(net).compute([x], pruned_outputs=[("inp.weight", 2)])
    with pytest.raises(ExportError, match="verification failed"):
        pm.prune()
    assert net.norm.weight.shape == (16,)


def test_layer_norm_couples_its_channels_and_says_why():
    class LN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(self.n(self.a(x)))

    net = LN()
    with pytest.raises(EmptyLayerError, match="coupled by layer_norm in n, which subtracts a mean"):
        PruningManager(net).compute([torch.randn(2, 8)], pruned_outputs=[("a.weight", 3)])


def test_streamed_hidden_size_export_is_the_in_memory_one(tmp_path):
    """prune_pretrained narrows the stream tensor by tensor, bit-identical to
    the in-memory export (norm weights rescaled alike), and the result loads
    with from_pretrained (its config holds hidden_size and rms_norm_eps)."""
    from channelcut.hf import prune_pretrained

    net = _tiny("llama", False)
    net.save_pretrained(tmp_path / "src")
    drop = DROP[:4]
    report = prune_pretrained(tmp_path / "src", tmp_path / "dst",
                              pruned_outputs=[("model.embed_tokens.weight", j) for j in drop])
    assert report.spec.rescales
    x = {"input_ids": torch.randint(0, 64, (1, 8))}
    PruningManager(net).compute(x, pruned_outputs=[("model.embed_tokens.weight", j) for j in drop]).prune()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert back.config.hidden_size == 28
    want = net.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    with torch.no_grad():
        assert torch.equal(back(**x).logits, net(**x).logits)
