"""Tests for channelcut.stats: closed-form MACs, parameter counts, latency helpers."""

import pytest
import torch
from torch import nn

from channelcut.stats import compare_latency, count_macs, count_parameters, measure_latency


def test_conv2d_macs_closed_form():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    x = torch.rand(2, 3, 17, 17)
    out_h = out_w = (17 + 2 * 1 - 3) // 2 + 1  # 9
    expected = 2 * 8 * out_h * out_w * 3 * 3 * 3  # batch * out elements * (in * kh * kw)
    assert count_macs(conv, [x]) == expected


def test_grouped_conv_macs_closed_form():
    conv = nn.Conv2d(8, 8, kernel_size=3, groups=8, bias=False)  # depthwise
    x = torch.rand(1, 8, 10, 10)
    assert count_macs(conv, [x]) == 8 * 8 * 8 * 1 * 3 * 3


def test_linear_macs_closed_form_and_input_forms():
    lin = nn.Linear(20, 7)
    x = torch.rand(5, 20)
    assert count_macs(lin, [x]) == 5 * 20 * 7
    assert count_macs(lin, x) == 5 * 20 * 7  # bare tensor
    assert count_macs(lin, {"input": x}) == 5 * 20 * 7  # keyword inputs


def test_count_parameters_shared_and_trainable():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.ReLU(), lin, nn.BatchNorm1d(4))
    assert count_parameters(net) == 4 * 4 + 4 + 2 * 4  # shared linear once, BN affine, no buffers
    lin.bias.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 4 * 4 + 2 * 4


def test_measure_latency_keys_order_and_threads_restored():
    before = torch.get_num_threads()
    stats = measure_latency(nn.Linear(8, 8), [torch.rand(1, 8)], repeats=7, warmup=1, threads=1)
    assert torch.get_num_threads() == before
    assert stats["repeats"] == 7
    assert 0 < stats["min_ms"] <= stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]


def test_compare_latency_interleaves_all_models():
    calls = []

    class Tag(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    res = compare_latency({"a": Tag("a"), "b": Tag("b"), "c": Tag("c")}, [torch.zeros(1)], repeats=3, warmup=0)
    assert list(res) == ["a", "b", "c"]
    assert all(r["repeats"] == 3 for r in res.values())
    # the order rotates from round to round
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"threads": 0}, "threads")],
)
def test_latency_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_latency(nn.Identity(), [torch.zeros(1)], **kwargs)


def test_bad_model_and_inputs_give_clear_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        count_parameters(object())
    with pytest.raises(TypeError, match="inputs must be"):
        count_macs(nn.Identity(), 3)
    with pytest.raises(ValueError, match="non-empty"):
        compare_latency({}, [torch.zeros(1)])
