"""Calibrated importance streamed from a checkpoint, one decoder layer at a
time (channelcut.calibrate.calibrate_pretrained), and selection to a
parameter budget (select_to_budget) feeding prune_pretrained.

References that do not come from the code under test:
- the scores of the in-memory heuristics (``ActivationNorm``/``Wanda`` run
  by ``MaskingManager`` on the whole model loaded with ``from_pretrained``),
  and, for the output head, the RMS of the model's own last hidden state;
- parameter counts of the models the request actually gives (pruned in
  memory, and streamed to disk and loaded back).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import List

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from channelcut import ChannelcutError, CheckpointError, MaskingManager, PruningManager  # noqa: E402
from channelcut.calibrate import Budget, calibrate_pretrained, select_to_budget  # noqa: E402
from channelcut.hf import load_pretrained, prune_pretrained  # noqa: E402
from channelcut.importance import ActivationNorm, Wanda  # noqa: E402
from channelcut.safetensors_stream import Entry, ShardWriter, read_header, read_rows  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV = 128, 64, 96, 3, 4, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64)


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON)
    if arch == "qwen2":  # q/k/v biases
        return transformers.Qwen2Config(**COMMON)
    if arch == "gemma2":  # tied head, scaled embeddings, sliding/full layers with their own masks
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=4)
    if arch == "qwen3":  # q/k norms over the head dim
        return transformers.Qwen3Config(**COMMON, head_dim=16)
    raise ValueError(arch)


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(_config(arch)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms are 1 (Gemma: 0) and biases 0 at init
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _save(model: nn.Module, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, max_shard_size="40KB")
    return folder


def _data(seed: int = 0, batches: int = 3) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(batches)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ("llama", "qwen2", "gemma2", "qwen3"):
        model = _model(arch)
        out[arch] = (model, _save(model, tmp_path_factory.mktemp(arch) / "src"))
    return out


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------
# calibrate_pretrained
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "qwen3"])
@pytest.mark.parametrize("method", ["activation", "wanda"])
def test_streamed_scores_equal_the_in_memory_heuristics(checkpoints, arch, method) -> None:
    model, src = checkpoints[arch]
    data = _data()
    cal = calibrate_pretrained(src, data, method=method)
    heuristic = (ActivationNorm if method == "activation" else Wanda)(data=[{"input_ids": x} for x in data])
    want = MaskingManager(model, {"input_ids": data[0]}).importance(heuristic).scores()
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(want) <= set(cal.scores) <= linears, "every scored layer is an nn.Linear, and none is left out"
    for name, w in want.items():
        got = cal.scores[name]
        assert got.dtype == torch.float64 and got.shape == w.shape, name
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-12, msg=f"{arch} {method} {name}")
    assert cal.layers == LAYERS and cal.batches == 3 and cal.tokens == 3 * 2 * 12


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_head_scores_are_the_rms_of_the_models_last_hidden_state(checkpoints, arch) -> None:
    """The head never runs: its inputs come from the final norm applied to
    the last layer's output, which must be the model's own last hidden state
    (Gemma2: the head is tied to the embedding and scored all the same)."""
    model, src = checkpoints[arch]
    data = _data(seed=3)
    cal = calibrate_pretrained(src, data)
    with torch.no_grad():
        states = [model.model(input_ids=x).last_hidden_state.double().reshape(-1, HIDDEN) for x in data]
    want = torch.cat(states).pow(2).mean(0).sqrt()
    torch.testing.assert_close(cal.scores["lm_head.weight"], want, rtol=1e-5, atol=1e-9)


def test_one_decoder_layer_in_memory_at_a_time(checkpoints, monkeypatch) -> None:
    """While a layer runs, every other layer's parameters are on meta; the
    embedding is read row by row (only the batch's tokens)."""
    from channelcut import calibrate as cal_mod

    _, src = checkpoints["llama"]
    seen = []
    real = cal_mod._materialise

    def spy(module, prefix, reader, dtype, device):
        held = real(module, prefix, reader, dtype, device)
        seen.append((prefix, held))
        return held

    monkeypatch.setattr(cal_mod, "_materialise", spy)
    live = []
    original = nn.Linear.forward

    def forward(self, x):
        live.append(self.weight.is_meta)
        return original(self, x)

    monkeypatch.setattr(nn.Linear, "forward", forward)
    data = [torch.tensor([[1, 2, 3, 1, 2, 3]])]
    cal = calibrate_pretrained(src, data)
    assert [p for p, _ in seen[:LAYERS]] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert not any(live), "a Linear ran with meta weights"
    layer_bytes = sum(p.numel() * 4 for n, p in _model("llama").named_parameters() if n.startswith("model.layers.0."))
    assert cal.largest_layer_bytes == layer_bytes
    # all layers + the final norm + three embedding rows of 64 float32 values, nothing else
    total = sum(p.numel() * 4 for n, p in _model("llama").named_parameters()
                if n.startswith("model.layers.") or n == "model.norm.weight")
    assert cal.bytes_read == total + 3 * HIDDEN * 4


def test_calibration_needs_nothing_but_the_checkpoint(checkpoints, tmp_path) -> None:
    """A batch dict with an attention mask, max_batches, and progress."""
    _, src = checkpoints["qwen2"]
    calls = []
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in _data(batches=4)]
    cal = calibrate_pretrained(src, batches, max_batches=2, progress=lambda a, b: calls.append((a, b)))
    assert cal.batches == 2 and calls == [(i + 1, LAYERS) for i in range(LAYERS)]
    assert "2 batches" in cal.summary()


def test_calibration_errors(checkpoints, tmp_path) -> None:
    _, src = checkpoints["llama"]
    with pytest.raises(ValueError, match="method must be one of 'activation', 'wanda'"):
        calibrate_pretrained(src, _data(), method="taylor")
    with pytest.raises(ValueError, match="floating-point"):
        calibrate_pretrained(src, _data(), dtype=torch.int64)
    with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
        calibrate_pretrained(src, [torch.tensor([[1, 500]])])
    with pytest.raises(ValueError, match="at least one calibration batch"):
        calibrate_pretrained(src, [])
    with pytest.raises(ValueError, match="token ids"):
        calibrate_pretrained(src, [torch.randn(1, 4)])
    with pytest.raises(CheckpointError, match="no config.json"):
        calibrate_pretrained(tmp_path, _data())


# ----------------------------------------------------------------------------
# select_to_budget
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "qwen3"])
@pytest.mark.parametrize("round_to", [None, 8])
def test_budget_reaches_the_target_and_counts_what_the_export_gives(checkpoints, arch, round_to, tmp_path) -> None:
    model, src = checkpoints[arch]
    cal = calibrate_pretrained(src, _data())
    budget = select_to_budget(cal.scores, src, keep=0.7, round_to=round_to)
    assert budget.params_before == _n_params(model)
    assert budget.params_after <= budget.target == int(0.7 * _n_params(model))
    assert budget.params_after >= 0.6 * _n_params(model), budget.summary()
    if round_to:
        assert budget.hidden % round_to == 0 and all(w % round_to == 0 for w in budget.mlp), budget.summary()
    assert all(g >= 1 for g in budget.kv_groups) and budget.hidden < HIDDEN
    # in memory: the parameter count is the one announced, and the export verifies itself
    pruned = copy.deepcopy(model)
    PruningManager(pruned).compute({"input_ids": _data()[0]}, **budget.request()).prune()
    assert _n_params(pruned) == budget.params_after
    mlp = [pruned.model.layers[i].mlp.down_proj.in_features for i in range(LAYERS)]
    assert mlp == budget.mlp
    assert pruned.model.embed_tokens.weight.shape[1] == budget.hidden
    # streamed: the same
    prune_pretrained(src, tmp_path / "dst", **budget.request())
    assert _n_params(load_pretrained(tmp_path / "dst")) == budget.params_after


def test_budget_from_in_memory_scores_and_a_model(checkpoints) -> None:
    """MaskingManager's scores and the model itself work as well; a target
    parameter count is reached from above, one kind at a time."""
    model, _ = checkpoints["llama"]
    scores = MaskingManager(model, {"input_ids": _data()[0]}).importance(ActivationNorm(data=_data())).scores()
    n = _n_params(model)
    for kinds in (("mlp",), ("kv_groups",), ("hidden",)):
        budget = select_to_budget(scores, model, target_params=n - 12000, kinds=kinds)
        assert budget.params_after <= n - 12000 and set(budget.removed) == set(kinds)
        if kinds != ("hidden",):
            assert budget.pruned_outputs == [] and budget.hidden == HIDDEN
        if kinds != ("mlp",):
            assert budget.mlp == [INTER] * LAYERS
        if kinds != ("kv_groups",):
            assert budget.kv_groups == [KV] * LAYERS


def test_the_least_important_units_go_first() -> None:
    """Hand-made scores: MLP channel c of layer i scores c (layer 1 doubled),
    group 1 of every layer scores less than group 0, hidden channel c scores
    64 - c. Local scope removes the same count per layer; global scope ranks
    layers by their scores divided by the mean, which here is the same."""
    model = _model("llama")
    scores = {}
    for i in range(LAYERS):
        scores[f"model.layers.{i}.mlp.down_proj.weight"] = torch.arange(INTER, dtype=torch.float64) * (2 if i == 1 else 1) + 1
        scores[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.cat([torch.full((32,), 2.0), torch.full((32,), 1.0)])
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            scores[f"model.layers.{i}.{m}.weight"] = torch.arange(HIDDEN, 0, -1, dtype=torch.float64)
    for scope in ("local", "global"):
        b = select_to_budget(scores, model, keep=0.8, scope=scope)
        for i in range(LAYERS):
            chans = [c for n, c in b.pruned_inputs if n == f"model.layers.{i}.mlp.down_proj.weight"]
            assert chans == list(range(len(chans))), (scope, i)
            groups = {c // 32 for n, c in b.pruned_inputs if n == f"model.layers.{i}.self_attn.o_proj.weight"}
            assert groups <= {1}
        counts = [len([1 for n, _ in b.pruned_inputs if n == f"model.layers.{i}.mlp.down_proj.weight"])
                  for i in range(LAYERS)]
        assert max(counts) - min(counts) <= 1, "equal normalised scores: every layer loses as many (ties: one more)"
        assert [c for _, c in b.pruned_outputs] == list(range(HIDDEN - len(b.pruned_outputs), HIDDEN))


def test_budget_errors(checkpoints) -> None:
    model, src = checkpoints["llama"]
    scores = calibrate_pretrained(src, _data()).scores
    with pytest.raises(ValueError, match="exactly one of target_params"):
        select_to_budget(scores, model)
    with pytest.raises(ValueError, match="exactly one of target_params"):
        select_to_budget(scores, model, keep=0.5, target_params=10)
    with pytest.raises(ValueError, match=r"keep must be a fraction in \(0, 1\]"):
        select_to_budget(scores, model, keep=1.5)
    with pytest.raises(ValueError, match="kinds must be"):
        select_to_budget(scores, model, keep=0.5, kinds=("experts",))
    with pytest.raises(ValueError, match="above the target"):
        select_to_budget(scores, model, target_params=10)
    with pytest.raises(ChannelcutError, match="no scores for 'model.layers.0.mlp.down_proj.weight'"):
        select_to_budget({}, model, keep=0.5)
    bad = dict(scores)
    bad["model.layers.1.mlp.down_proj.weight"] = torch.ones(5)
    with pytest.raises(ChannelcutError, match="5 scores for 'model.layers.1.mlp.down_proj.weight'"):
        select_to_budget(bad, model, keep=0.5)
    phi = transformers.Phi3Config(**COMMON, pad_token_id=0)
    with pytest.raises(ChannelcutError, match="has no self_attn.q_proj"):
        select_to_budget(scores, phi, keep=0.5)


def test_keep_everything_removes_nothing(checkpoints) -> None:
    model, src = checkpoints["qwen3"]
    b = select_to_budget(calibrate_pretrained(src, _data()).scores, src, keep=1.0)
    assert isinstance(b, Budget) and b.request() == {"pruned_inputs": [], "pruned_outputs": []}
    assert b.params_after == b.params_before


# ----------------------------------------------------------------------------
# read_rows
# ----------------------------------------------------------------------------
def test_read_rows(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    w = torch.arange(24, dtype=torch.bfloat16).reshape(6, 4)
    with ShardWriter(path, [Entry("w", "BF16", (6, 4)), Entry("s", "F32", ())]) as out:
        out.write("w", w)
        out.write("s", torch.tensor(1.0))
    header = read_header(path)
    assert torch.equal(read_rows(path, header, "w", range(2, 5)), w[2:5])
    assert torch.equal(read_rows(path, header, "w", [5, 0, 5]), w[[5, 0, 5]])
    with pytest.raises(IndexError, match="row 6 of 'w', which has 6 rows"):
        read_rows(path, header, "w", [6])
    with pytest.raises(IndexError, match="which has 6 rows"):
        read_rows(path, header, "w", range(4, 8))
    with pytest.raises(ChannelcutError, match="scalar"):
        read_rows(path, header, "s", [0])


# ----------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------
def _word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of 100 words saved next to the checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(99)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_command_line_keep_with_calibration(tmp_path, capsys) -> None:
    """``prune-pretrained SRC --out DST --keep 0.7 --calibration FILE``: the
    checkpoint the functions give, from token ids in JSON or from text and
    the checkpoint's own tokenizer."""
    from channelcut.cli import main

    model = _model("llama")
    src = _save(model, tmp_path / "src")
    ids = [x[0].tolist() for x in _data()]
    (tmp_path / "ids.json").write_text(__import__("json").dumps(ids))
    assert main(["prune-pretrained", str(src), "--out", str(tmp_path / "dst"), "--quiet", "--json", "--keep", "0.7",
                 "--calibration", str(tmp_path / "ids.json"), "--round-to", "8"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    want = select_to_budget(calibrate_pretrained(src, [torch.tensor([r]) for r in ids]).scores, src, keep=0.7,
                            round_to=8)
    assert out["budget"]["params_after"] == want.params_after and out["budget"]["mlp"] == want.mlp
    assert _n_params(load_pretrained(tmp_path / "dst")) == want.params_after

    _word_tokenizer(src)
    g = torch.Generator().manual_seed(5)
    text = " ".join(f"w{int(i)}" for i in torch.randint(0, 99, (200,), generator=g))
    (tmp_path / "calib.txt").write_text(text)
    assert main(["prune-pretrained", str(src), "--out", str(tmp_path / "dst2"), "--quiet", "--target-params", "80000",
                 "--calibration", str(tmp_path / "calib.txt"), "--calibration-tokens", "50",
                 "--kinds", "mlp,hidden", "--method", "wanda"]) == 0
    text_out = capsys.readouterr().out
    assert "parameters (target 80,000)" in text_out and "kv_groups" not in text_out
    assert _n_params(load_pretrained(tmp_path / "dst2")) <= 80000

    bad = [["--keep", "0.7"],  # no calibration
           ["--keep", "0.7", "--calibration", str(tmp_path / "ids.json"), "--pruned-inputs", "[]"],
           ["--keep", "0.7", "--target-params", "9", "--calibration", str(tmp_path / "ids.json")],
           ["--target-params", "9", "--calibration", str(tmp_path / "ids.json")],  # out of reach
           ["--keep", "0.7", "--calibration", str(tmp_path / "missing.txt")]]
    for extra in bad:
        assert main(["prune-pretrained", str(src), "--out", str(tmp_path / "x"), "--quiet", *extra]) == 2, extra
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_whose_names_are_not_the_models_is_refused_clearly(tmp_path) -> None:
    """transformers saves Mixtral's experts under their old per-expert names
    and renames them while loading; streaming reads the model's names, so it
    stops and says which names it found instead."""
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=HEADS, num_key_value_heads=KV, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    src = _save(transformers.AutoModelForCausalLM.from_config(cfg).eval(), tmp_path / "src")
    with pytest.raises(CheckpointError, match=r"no tensor for 'model\.layers\.0\.mlp\..*block_sparse_moe.*not the model's"):
        calibrate_pretrained(src, _data())


def test_streamed_scores_drive_masking_manager(checkpoints) -> None:
    """``importance.Given(cal.scores)``: MaskingManager's own selection
    (modes, scopes, round_to) on scores streamed from disk picks what it
    picks with the in-memory heuristic."""
    from channelcut.importance import Given

    model, src = checkpoints["llama"]
    data = _data()
    cal = calibrate_pretrained(src, data)
    x = {"input_ids": data[0]}
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(LAYERS)]
    got = MaskingManager(model, x).importance(Given(cal.scores)).select(0.3, layers=names, scope="global", round_to=8)
    want = MaskingManager(model, x).importance(ActivationNorm(data=data)).select(0.3, layers=names, scope="global",
                                                                                  round_to=8)
    assert got == want and len(got) > 0
    with pytest.raises(TypeError, match="Given takes a dict"):
        Given([1, 2])
