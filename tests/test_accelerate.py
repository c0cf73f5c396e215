"""Models dispatched by accelerate (``device_map`` with offloaded layers).

The plan needs no weights: ``compute()`` on a dispatched model (layers
offloaded to disk, loaded by accelerate's hooks for each forward) gives the
same spec as on the model in memory. ``prune()`` slices tensors in place,
which an offloaded layer does not run from, so it is refused up front with
the paths that work (``channelcut.hf.prune_pretrained`` streams the
checkpoint instead), the model unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch

from channelcut import ExportError, PruningManager

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")


def test_dispatched_model_plans_like_the_model_in_memory_and_refuses_to_prune(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    net = transformers.LlamaForCausalLM(cfg).eval()
    plain = copy.deepcopy(net)
    x = {"input_ids": torch.randint(0, 64, (1, 8))}
    drop = [(f"model.layers.{i}.mlp.down_proj.weight", c) for i in range(2) for c in range(8)]
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    net = accelerate.dispatch_model(net, device_map=device_map, offload_dir=str(tmp_path))
    assert net.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    with torch.no_grad():
        y0 = net(**x).logits
    pm = PruningManager(net).compute(x, pruned_inputs=drop)
    want = PruningManager(plain).compute(x, pruned_inputs=drop).spec
    assert pm.spec.slices == want.slices and pm.spec.requested == want.requested
    with pytest.raises(ExportError, match="offloaded by accelerate.*prune_pretrained"):
        pm.prune()
    with torch.no_grad():
        assert torch.equal(net(**x).logits, y0)
    assert net.model.layers[0].mlp.down_proj.weight.shape == (32, 48)
