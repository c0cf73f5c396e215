"""Streaming export of Hugging Face checkpoints (channelcut.hf.prune_pretrained)
and loading the result (channelcut.hf.load_pretrained).

Every written checkpoint is compared bit for bit (``torch.equal``, every
tensor) with the in-memory export of the same request: the source loaded
with ``from_pretrained`` and pruned with ``PruningManager.compute().prune()``
(which verifies itself against the unpruned model with the request zeroed).
The sources are tiny random Llama / Qwen2 / Mistral checkpoints saved with
``save_pretrained(max_shard_size=...)`` so that they are sharded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from channelcut import ChannelcutError, PruningManager, UnknownParameterError  # noqa: E402
from channelcut.hf import load_pretrained, prune_pretrained  # noqa: E402
from channelcut.hf_stream import CheckpointError  # noqa: E402
from channelcut.pruning.modules import is_subselect  # noqa: E402
from channelcut.pruning.pruner import applied_specs  # noqa: E402
from channelcut.safetensors_stream import Entry, SafetensorsError, ShardWriter, read_header  # noqa: E402

LAYERS, HIDDEN, INTER, HEADS, KV, VOCAB = 3, 64, 96, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
IDS = {"input_ids": torch.tensor([[5, 17, 99, 3, 64, 8, 120, 42]])}


def _config(arch: str, tie: bool = False, kv: int = KV):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=kv, max_position_embeddings=64,
                  tie_word_embeddings=tie)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    raise ValueError(arch)


def _randomise_norms(model: torch.nn.Module) -> None:
    """Norm weights (and Qwen2's q/k/v biases) are 1 / 0 at init: randomise them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _save(folder: Path, arch: str, dtype: torch.dtype, tie: bool = False, shard: str = "40KB", kv: int = KV) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, tie, kv))
    _randomise_norms(model)
    model = model.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _load_hf(folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _weights(folder: Path) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _mlp(per_layer: List[int]) -> List[Tuple[str, int]]:
    """Drop per_layer[i] MLP channels of layer i (spread over the width)."""
    out = []
    for i, n in enumerate(per_layer):
        step = INTER / max(n, 1)
        out += [(f"model.layers.{i}.mlp.down_proj.weight", int(j * step) + i) for j in range(n)]
    return out


def _kv_group(layer: int, group: int) -> List[Tuple[str, int]]:
    """The query heads that share key/value head ``group`` (with it, they go together)."""
    per = HEADS // KV
    return [(f"model.layers.{layer}.self_attn.o_proj.weight", c)
            for h in range(group * per, (group + 1) * per) for c in range(h * HEAD_DIM, (h + 1) * HEAD_DIM)]


HETERO = _mlp([10, 24, 0]) + _kv_group(1, 0)  # every layer its own MLP width, one layer a head group less
UNIFORM = _mlp([16, 16, 16]) + [p for i in range(LAYERS) for p in _kv_group(i, 1)]


def _in_memory(src: Path, request: List[Tuple[str, int]], **kw) -> Tuple[torch.nn.Module, PruningManager]:
    model = _load_hf(src)
    manager = PruningManager(model).compute(IDS, pruned_inputs=request, **kw)
    manager.prune()
    return model, manager


def _assert_identical(dst: Path, src: Path, model: torch.nn.Module) -> None:
    got, want = _weights(dst), model.state_dict()
    source = _weights(src)
    assert set(got) == set(source), "the pruned checkpoint holds other tensor names than the source"
    for k, v in got.items():
        assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k
    # sharded like the source: same files, same index (total_size updated)
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    index_src = src / "model.safetensors.index.json"
    if index_src.is_file():
        a = json.loads(index_src.read_text())
        b = json.loads((dst / "model.safetensors.index.json").read_text())
        assert a["weight_map"] == b["weight_map"]
        assert b["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())


# ----------------------------------------------------------------------------
# bit-identical to the in-memory export
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_bit_identical_to_in_memory_export(tmp_path, arch, dtype) -> None:
    src = _save(tmp_path / "src", arch, dtype)
    assert len(list(src.glob("*.safetensors"))) > 2
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO)
    model, manager = _in_memory(src, HETERO)
    assert report.spec.slices == manager.spec.slices  # planned on meta == planned on the loaded model
    _assert_identical(tmp_path / "dst", src, model)
    assert report.tensors_sliced > 0 and report.tensors_copied > 0


def test_constrained_and_pruned_outputs(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    outs = [("model.layers.0.mlp.up_proj.weight", c) for c in range(0, INTER, 5)]
    request = [("model.layers.2.mlp.down_proj.weight", c) for c in range(7)]
    prune_pretrained(src, tmp_path / "dst", pruned_inputs=request, pruned_outputs=outs, constrained=True)
    model = _load_hf(src)
    PruningManager(model).compute(IDS, pruned_inputs=request, pruned_outputs=outs, constrained=True).prune()
    _assert_identical(tmp_path / "dst", src, model)


# ----------------------------------------------------------------------------
# what loads the result
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_uniform_widths_load_with_from_pretrained(tmp_path, arch) -> None:
    src = _save(tmp_path / "src", arch, torch.float32)
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=UNIFORM)
    assert (report.config, report.loads_with) == ("pruned", "transformers")
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (INTER - 16, 2, 1)
    model, _ = _in_memory(src, UNIFORM)
    back = _load_hf(tmp_path / "dst")
    with torch.no_grad():
        assert torch.equal(back(**IDS).logits, model(**IDS).logits)
    assert type(load_pretrained(tmp_path / "dst")) is type(back)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_per_layer_widths_round_trip_and_generate(tmp_path, arch, dtype) -> None:
    src = _save(tmp_path / "src", arch, dtype)
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO)
    assert (report.config, report.loads_with) == ("source", "channelcut.hf.load_pretrained")
    assert "does not build per-layer widths" in report.why
    with pytest.raises(Exception, match="ignore_mismatched_sizes|size mismatch"):
        _load_hf(tmp_path / "dst")  # the source config with pruned weights: refused, never loaded wrong
    model, manager = _in_memory(src, HETERO)
    back = load_pretrained(tmp_path / "dst")
    assert not back.training and all(not p.is_meta for p in back.parameters())
    assert [layer.mlp.down_proj.in_features for layer in back.model.layers] == [INTER - 10, INTER - 24, INTER]
    assert back.model.layers[1].self_attn.q_proj.out_features == HIDDEN // 2
    assert {k: v.dtype for k, v in back.state_dict().items()} == {k: v.dtype for k, v in model.state_dict().items()}
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(back(**IDS).logits, model(**IDS).logits)
    want = model.generate(**IDS, max_new_tokens=8, do_sample=False)
    got = back.generate(**IDS, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    # the plan re-applied on meta is remembered like any export (channelcut.save reads it)
    (step,) = applied_specs(back)
    assert step.spec.slices == manager.spec.slices


def test_uniform_heads_that_transformers_config_refuses(tmp_path) -> None:
    """One of four heads in every layer: 3 heads of 16 channels. The widths
    are uniform, but LlamaConfig refuses hidden_size 64 with 3 heads (even
    with head_dim set): the source config and the plan, load_pretrained."""
    src = _save(tmp_path / "src", "llama", torch.float32, kv=HEADS)
    request = [(f"model.layers.{i}.self_attn.o_proj.weight", c) for i in range(LAYERS) for c in range(HEAD_DIM)]
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=request)
    assert report.config == "source" and "not a multiple of the number of attention heads (3)" in report.why
    model, _ = _in_memory(src, request)
    _assert_identical(tmp_path / "dst", src, model)
    back = load_pretrained(tmp_path / "dst")
    assert back.model.layers[0].self_attn.q_proj.out_features == 3 * HEAD_DIM
    want = model.generate(**IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(back.generate(**IDS, max_new_tokens=6, do_sample=False), want)


def test_subset_reads_round_trip(tmp_path) -> None:
    """Unconstrained input channels of one layer's q_proj: that layer reads a
    subset of the residual stream (a Subselect layer), which no config holds."""
    src = _save(tmp_path / "src", "llama", torch.float32)
    request = [("model.layers.1.self_attn.q_proj.weight", c) for c in range(48, 64)]
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=request)
    assert report.config == "source" and "read a subset of their input (e.g. 'model.layers.1" in report.why
    model, _ = _in_memory(src, request)
    _assert_identical(tmp_path / "dst", src, model)
    back = load_pretrained(tmp_path / "dst")
    assert is_subselect(back.model.layers[1].self_attn.q_proj)
    assert back.model.layers[1].self_attn.q_proj.weight.shape == (HIDDEN, HIDDEN - 16)
    with torch.no_grad():
        assert torch.equal(back(**IDS).logits, model(**IDS).logits)


def test_zero_columns_kept(tmp_path) -> None:
    """Three scattered input channels of one q_proj, without reordering (the
    stream's channels are free since RMS norms no longer couple them, and
    reordering would make them one view): the cost model keeps the layer
    whole and zeroes the columns (spec.zeros), so the shapes and the config
    stay, and the written weights carry the zeros."""
    src = _save(tmp_path / "src", "llama", torch.bfloat16)
    request = [("model.layers.1.self_attn.q_proj.weight", c) for c in (3, 9, 40)]
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=request, reorder=False)
    assert report.spec.zeros and not report.spec.slices and report.config == "pruned"
    model, _ = _in_memory(src, request, reorder=False)
    _assert_identical(tmp_path / "dst", src, model)
    w = _weights(tmp_path / "dst")["model.layers.1.self_attn.q_proj.weight"]
    assert not w[:, [3, 9, 40]].any() and w[:, 4].any()


def _per_layer_llama_class():
    """A Llama whose decoder layers are built from config.per_layer_config[i]
    (as transformers' own heterogeneous architectures do): stands in for an
    architecture whose modeling code honours per-layer widths."""
    from transformers.models.llama import modeling_llama as ml

    class PerLayerLlamaModel(ml.LlamaModel):
        def __init__(self, config):
            ml.LlamaPreTrainedModel.__init__(self, config)
            self.padding_idx = config.pad_token_id
            self.vocab_size = config.vocab_size
            self.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
            layer = config.per_layer_config if config.is_heterogeneous else [config] * config.num_hidden_layers
            self.layers = torch.nn.ModuleList(ml.LlamaDecoderLayer(layer[i], i) for i in range(config.num_hidden_layers))
            self.norm = ml.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.rotary_emb = ml.LlamaRotaryEmbedding(config=config)
            self.gradient_checkpointing = False
            self.post_init()

    class PerLayerLlamaForCausalLM(ml.LlamaForCausalLM):
        def __init__(self, config):
            ml.LlamaPreTrainedModel.__init__(self, config)
            self.model = PerLayerLlamaModel(config)
            self.vocab_size = config.vocab_size
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

    return PerLayerLlamaForCausalLM


def test_per_layer_config_where_the_modeling_code_builds_it(tmp_path) -> None:
    cls = _per_layer_llama_class()
    src = _save(tmp_path / "src", "llama", torch.float32)
    request = _mlp([10, 24, 0])
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=request, model_class=cls)
    assert (report.config, report.loads_with) == ("per-layer", "transformers")
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["per_layer_config"] == {"0": {"intermediate_size": INTER - 10}, "1": {"intermediate_size": INTER - 24}}
    assert cfg["intermediate_size"] == INTER
    model, _ = _in_memory(src, request)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = cls.from_pretrained(tmp_path / "dst").eval()
    with torch.no_grad():
        assert torch.equal(back(**IDS).logits, model(**IDS).logits)


# ----------------------------------------------------------------------------
# checkpoint layouts
# ----------------------------------------------------------------------------
def test_tied_embeddings(tmp_path) -> None:
    src = _save(tmp_path / "src", "qwen2", torch.bfloat16, tie=True)
    assert "lm_head.weight" not in _weights(src)
    prune_pretrained(src, tmp_path / "dst", pruned_inputs=UNIFORM)
    model, _ = _in_memory(src, UNIFORM)
    _assert_identical(tmp_path / "dst", src, model)
    back = _load_hf(tmp_path / "dst")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(**IDS).logits, model(**IDS).logits)


def test_tied_weight_stored_under_its_other_name(tmp_path) -> None:
    """A checkpoint that stores the tied embedding as lm_head.weight: the key
    maps to the model's tensor through its tied name, and keeps its name."""
    src = _save(tmp_path / "src", "qwen2", torch.float32, tie=True, shard="10GB")
    w = load_file(str(src / "model.safetensors"))
    w["lm_head.weight"] = w.pop("model.embed_tokens.weight")
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO)
    out = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert "lm_head.weight" in out and "model.embed_tokens.weight" not in out
    assert torch.equal(out["lm_head.weight"], w["lm_head.weight"])
    back = load_pretrained(tmp_path / "dst")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.model.embed_tokens.weight, w["lm_head.weight"])
    assert report.files == ["model.safetensors"]


def test_single_file_stays_single_file(tmp_path) -> None:
    src = _save(tmp_path / "src", "mistral", torch.bfloat16, shard="10GB")
    assert [p.name for p in src.glob("*.safetensors")] == ["model.safetensors"]
    prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO)
    assert not (tmp_path / "dst" / "model.safetensors.index.json").exists()
    model, _ = _in_memory(src, HETERO)
    _assert_identical(tmp_path / "dst", src, model)
    assert read_header(tmp_path / "dst" / "model.safetensors").metadata == {"format": "pt"}


def test_other_files_are_copied_and_other_weight_formats_skipped(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    files = {"tokenizer.json": '{"v": 1}', "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
             "README.md": "# model\n", "original/params.json": '{"dim": 64}'}
    for name, text in files.items():
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_text(text)
    (src / "pytorch_model.bin").write_bytes(b"unpruned weights")
    (src / "original" / "consolidated.00.pth").write_bytes(b"unpruned weights")
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=UNIFORM)
    dst = tmp_path / "dst"
    for name, text in files.items():
        assert (dst / name).read_text() == text
    assert (dst / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert not (dst / "pytorch_model.bin").exists() and not (dst / "original" / "consolidated.00.pth").exists()
    assert sorted(report.skipped) == ["original/consolidated.00.pth", "pytorch_model.bin"]


def test_explicit_inputs_and_overwrite(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    dst = tmp_path / "dst"
    prune_pretrained(src, dst, pruned_inputs=UNIFORM, inputs={"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    with pytest.raises(FileExistsError):
        prune_pretrained(src, dst, pruned_inputs=HETERO)
    prune_pretrained(src, dst, pruned_inputs=HETERO, overwrite=True)
    model, _ = _in_memory(src, HETERO)
    _assert_identical(dst, src, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporary folders left


# ----------------------------------------------------------------------------
# errors leave dst absent
# ----------------------------------------------------------------------------
def _no_dst(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unknown_parameter(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    with pytest.raises(UnknownParameterError, match="model.layers.0.mlp.down_proj.weight"):
        prune_pretrained(src, tmp_path / "dst", pruned_inputs=[("model.layers.0.mlp.down_prj.weight", 1)])
    _no_dst(tmp_path)


def test_checkpoint_key_the_model_lacks(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32, shard="10GB")
    w = load_file(str(src / "model.safetensors"))
    w["model.layers.0.mlp.extra.weight"] = torch.ones(3)
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.extra\.weight'.*LlamaForCausalLM"):
        prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO)
    _no_dst(tmp_path)


def test_checkpoint_that_does_not_fit_its_config(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = INTER + 8
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight. has shape \((64, 96|96, 64)\) in .*the model built from config.json has \((64, 104|104, 64)\)"):
        prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO)
    _no_dst(tmp_path)


def test_a_request_is_needed_and_weights_must_be_safetensors(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    with pytest.raises(ChannelcutError, match="pruned_inputs or pruned_outputs"):
        prune_pretrained(src, tmp_path / "dst")
    for f in list(src.glob("model*.safetensors*")):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors.*pytorch_model.bin"):
        prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO)
    assert not (tmp_path / "dst").exists()


def test_failure_while_writing_leaves_no_dst(tmp_path, monkeypatch) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    from channelcut import hf_stream

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_stream, "_copy_other_files", broken)
    with pytest.raises(OSError, match="disk full"):
        prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO)
    _no_dst(tmp_path)


def test_a_pruned_checkpoint_that_needs_its_plan_is_not_pruned_again(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    prune_pretrained(src, tmp_path / "once", pruned_inputs=HETERO)
    with pytest.raises(CheckpointError, match="pruning it again"):
        prune_pretrained(tmp_path / "once", tmp_path / "twice", pruned_inputs=HETERO)
    # a uniform result is an ordinary checkpoint: it can be pruned again
    prune_pretrained(src, tmp_path / "u1", pruned_inputs=UNIFORM)
    again = [(f"model.layers.{i}.mlp.down_proj.weight", c) for i in range(LAYERS) for c in (0, 1)]
    prune_pretrained(tmp_path / "u1", tmp_path / "u2", pruned_inputs=again)
    assert json.loads((tmp_path / "u2" / "config.json").read_text())["intermediate_size"] == INTER - 18


# ----------------------------------------------------------------------------
# the shard writer
# ----------------------------------------------------------------------------
def test_shard_writer_checks_the_announced_header(tmp_path) -> None:
    entries = [Entry("a", "F32", (2,)), Entry("b", "BF16", (3,))]
    with pytest.raises(SafetensorsError, match="'c' written, but the header does not announce it"):
        with ShardWriter(tmp_path / "x.safetensors", entries) as w:
            w.write("c", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(SafetensorsError, match=r"'a' is F32 \(3,\), the header announced F32 \(2,\)"):
        with ShardWriter(tmp_path / "x.safetensors", entries) as w:
            w.write("a", torch.zeros(3))
    with pytest.raises(SafetensorsError, match="'a' written twice"):
        with ShardWriter(tmp_path / "x.safetensors", entries) as w:
            w.write("a", torch.zeros(2))
            w.write("a", torch.zeros(2))
    with pytest.raises(SafetensorsError, match="never written"):
        with ShardWriter(tmp_path / "x.safetensors", entries) as w:
            w.write("a", torch.zeros(2))
    with ShardWriter(tmp_path / "x.safetensors", entries, {"format": "pt"}) as w:  # any order
        w.write("b", torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
        w.write("a", torch.tensor([1.0, 2.0]))
    got = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(got["a"], torch.tensor([1.0, 2.0])) and got["b"].dtype == torch.bfloat16
    assert read_header(tmp_path / "x.safetensors").data_start % 8 == 0


def test_progress_and_report(tmp_path) -> None:
    src = _save(tmp_path / "src", "llama", torch.float32)
    calls = []
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=HETERO, progress=lambda d, t: calls.append((d, t)))
    total = sum(v.numel() * v.element_size() for v in _weights(src).values())
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert report.source_bytes == total and report.files == sorted(p.name for p in src.glob("*.safetensors"))
    assert report.bytes_written == sum(v.numel() * v.element_size() for v in _weights(tmp_path / "dst").values())
    slices = report.spec.slices
    in_memory = [k for k in slices if set(slices[k]) != {0}]  # kept rows only: copied by the kernel
    assert report.rows_copied == len(slices) - len(in_memory) > 0 and report.tensors_sliced == len(slices)
    biggest = max(v.numel() * v.element_size() for k, v in _weights(src).items() if k in in_memory)
    assert report.largest_sliced == biggest
    assert "shard(s)" in report.summary()


def test_plan_step_is_channelcut_io_format(tmp_path) -> None:
    """plan.json's step (built without dataclasses.asdict, for speed) is what
    channelcut.io writes for the same spec, and reads back as the spec."""
    from channelcut import PruningSpec
    from channelcut.hf_stream import _step_dict
    from channelcut.io import _step, read_plan

    src = _save(tmp_path / "src", "llama", torch.float32)
    request = HETERO + [("model.layers.1.self_attn.q_proj.weight", c) for c in range(48, 64)]
    request += [("model.layers.2.self_attn.k_proj.weight", c) for c in (3, 9)]
    report = prune_pretrained(src, tmp_path / "dst", pruned_inputs=request, reorder=False)  # (zero columns: unordered)
    spec = report.spec
    assert spec.subselections and spec.zeros and spec.slices
    assert json.loads(json.dumps(_step_dict(spec, {}))) == json.loads(json.dumps(_step(spec, {})))
    (step,) = read_plan(tmp_path / "dst")["steps"]
    back = PruningSpec.from_dict({k: v for k, v in step.items() if k != "shapes_before"})
    assert (back.slices, back.zeros, back.subselections) == (spec.slices, spec.zeros, spec.subselections)


def test_default_inputs_follow_the_modality() -> None:
    from channelcut.hf_stream import default_inputs

    assert default_inputs(_config("llama"))["input_ids"].shape == (1, 8)
    vit = transformers.ViTConfig(image_size=32, num_channels=3)
    assert default_inputs(vit)["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ChannelcutError, match="pass inputs="):
        default_inputs(transformers.PretrainedConfig())


def test_a_config_that_loses_an_attribute_the_export_sets_is_not_used(tmp_path) -> None:
    """Where the spec sets a module attribute (e.g. a parameterless module's
    channel count), a config is used only if the model it builds has it."""
    from channelcut.hf_stream import describe_config, plan_on_meta

    src = _save(tmp_path / "src", "llama", torch.float32)
    config = transformers.AutoConfig.from_pretrained(src)
    model, spec, _ = plan_on_meta(config, pruned_inputs=UNIFORM)
    source = json.loads((src / "config.json").read_text())
    assert describe_config(model, source, spec.attributes)[1] == "pruned"
    raw, kind, loads_with, why = describe_config(model, source, {"model.layers.0.self_attn": {"num_key_value_groups": 7}})
    assert (kind, loads_with) == ("source", "channelcut.hf.load_pretrained") and "num_key_value_groups = 7" in why
    assert raw["channelcut"]["plan"] == "plan.json"


def test_command_line_prune_pretrained(tmp_path, capsys) -> None:
    """``channelcut prune-pretrained SRC --out DST --pruned-inputs JSON``:
    the same checkpoint as the function; a bad request is a usage error."""
    from channelcut.cli import main

    src = _save(tmp_path / "src", "llama", torch.float32)
    request = [("model.layers.0.mlp.down_proj.weight", c) for c in range(8)]
    assert main(["prune-pretrained", str(src), "--out", str(tmp_path / "dst"), "--quiet", "--json",
                 "--pruned-inputs", json.dumps(request)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] in ("pruned", "per-layer", "source") and out["files"]
    model, _ = _in_memory(src, request)
    _assert_identical(tmp_path / "dst", src, model)
    assert main(["prune-pretrained", str(src), "--out", str(tmp_path / "x"), "--pruned-inputs", "[oops"]) == 2
    assert main(["prune-pretrained", str(src), "--out", str(tmp_path / "x")]) == 2
