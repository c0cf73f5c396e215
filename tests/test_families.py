"""Families outside the classification zoos, exact in both modes (issue 16):
diffusers' conditional UNet (up-samplers assert their input width against
``self.channels``), CLIP's ResNet tower (functional multi-head attention with
its own projection weights) and SAM's image encoder. Small random configs
(``benchmarks/families.py``), float64, norms randomised, each export compared
with the original model with the request zeroed by hand.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import families  # noqa: E402

from channelcut import PruningManager  # noqa: E402
from support.compare import assert_close, n_params  # noqa: E402
from support.randomize import randomize_norms  # noqa: E402
from support.reference import zeroed_reference  # noqa: E402


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64), "timestep": torch.tensor([3, 17]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g, dtype=torch.float64)}


def _image(size):
    return lambda: [torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]


CASES = {
    "diffusers-UNet2DConditionModel": ("diffusers", families.unet2d_condition, _unet_inputs),
    "open_clip-RN50.visual": ("open_clip", lambda: families.open_clip_visual("RN50", 64), _image(64)),
    "segment_anything-ImageEncoderViT": ("segment_anything", families.sam_image_encoder, _image(64)),
}


def _call(net, inputs):
    with torch.no_grad():
        out = net(**inputs) if isinstance(inputs, dict) else net(*inputs)
    return out.sample if hasattr(out, "sample") else out


@pytest.mark.parametrize("mode", ["unconstrained", "constrained"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_exports_exactly(case: str, mode: str) -> None:
    package, build, make_inputs = CASES[case]
    pytest.importorskip(package)
    torch.manual_seed(0)
    net = randomize_norms(build().double().eval(), 0)
    inputs = make_inputs()
    m = PruningManager(net)
    m.trace(inputs)
    rng = random.Random(0)
    pairs = [(k, c) for k, n in sorted(m.consumers().items()) for c in rng.sample(range(n), int(0.3 * n))]
    m.compute(inputs, pruned_inputs=pairs, constrained=(mode == "constrained"))
    ref = _call(zeroed_reference(net, m.spec.removed_inputs()), inputs)
    before = n_params(net)
    m.prune()
    assert n_params(net) < before
    assert_close(_call(net, inputs), ref, rtol=1e-10, what=case)
