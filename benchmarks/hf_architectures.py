"""Hugging Face transformers architectures for the coverage sweep: encoders,
decoders, encoder-decoders, vision and audio models, each a small random
config (hidden 32-64, 2 layers, 4 heads, vocabulary 512; no download), named
by its config class (``BertConfig``, ``WhisperConfig``, ...).

``cases(Case)`` returns the sweep's cases (``benchmarks/coverage.py`` passes
its ``Case``); without transformers it returns none, with a message. The
sweep casts each model to float64 and puts it in eval mode (no dropout);
float inputs are made in float64 here, token ids int64, all from a seeded
generator. Decoders and encoder-decoders run with ``use_cache=False`` (the
model returns no key/value cache); encoder-decoders get ``decoder_input_ids``.

An architecture that the installed transformers lacks (a renamed or removed
class) is left out with a message, the others still run.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

SEED = 0
BATCH = 2
SEQ = 16  # tokens per sequence
DECODER_SEQ = 8  # decoder tokens of the encoder-decoders
VOCAB = 512

# the common small sizes, spelled in each config's own field names
_BERT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, use_cache=False)
_VIT = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128)
_WAV2VEC2 = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def tokens(_net: nn.Module) -> Dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=_gen())}


def seq2seq_tokens(_net: nn.Module) -> Dict[str, torch.Tensor]:
    g = _gen()
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=g),
            "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, DECODER_SEQ), generator=g)}


def pixels(size: int, channels: int = 3) -> Callable[[nn.Module], Dict[str, torch.Tensor]]:
    def make(_net: nn.Module) -> Dict[str, torch.Tensor]:
        return {"pixel_values": torch.rand(BATCH, channels, size, size, generator=_gen(), dtype=torch.float64)}

    return make


def waveform(samples: int = 1600) -> Callable[[nn.Module], Dict[str, torch.Tensor]]:
    def make(_net: nn.Module) -> Dict[str, torch.Tensor]:
        return {"input_values": torch.randn(BATCH, samples, generator=_gen(), dtype=torch.float64)}

    return make


def whisper_inputs(net: nn.Module) -> Dict[str, torch.Tensor]:
    cfg = net.config  # the encoder takes exactly 2 x max_source_positions frames (its convs halve them)
    g = _gen()
    return {"input_features": torch.randn(BATCH, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g,
                                          dtype=torch.float64),
            "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, DECODER_SEQ), generator=g)}


def spectrogram(net: nn.Module) -> Dict[str, torch.Tensor]:
    cfg = net.config  # AST: (batch, frames, mel bins)
    return {"input_values": torch.randn(BATCH, cfg.max_length, cfg.num_mel_bins, generator=_gen(),
                                        dtype=torch.float64)}


# ---------------------------------------------------------------------------
# the architectures: (config class, model class, config fields, inputs)
# ---------------------------------------------------------------------------

ARCHITECTURES: List[tuple] = [
    # encoders
    ("BertConfig", "BertModel", _BERT, tokens),
    ("RobertaConfig", "RobertaModel", _BERT, tokens),
    ("XLMRobertaConfig", "XLMRobertaModel", _BERT, tokens),
    ("CamembertConfig", "CamembertModel", _BERT, tokens),
    ("DistilBertConfig", "DistilBertModel",
     dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64), tokens),
    ("AlbertConfig", "AlbertModel", dict(_BERT, embedding_size=32), tokens),
    ("ElectraConfig", "ElectraModel", dict(_BERT, embedding_size=32), tokens),
    ("DebertaConfig", "DebertaModel",
     dict(_BERT, relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=32), tokens),
    ("DebertaV2Config", "DebertaV2Model",  # DeBERTa-v3 style: shared keys, log buckets
     dict(_BERT, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=32,
          max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True), tokens),
    ("MPNetConfig", "MPNetModel", dict(_BERT, relative_attention_num_buckets=32), tokens),
    ("RoFormerConfig", "RoFormerModel", dict(_BERT, embedding_size=64), tokens),
    ("ModernBertConfig", "ModernBertModel",
     dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=2, pad_token_id=0,
          bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), tokens),
    # decoders
    ("GPT2Config", "GPT2Model", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=2, use_cache=False), tokens),
    ("LlamaConfig", "LlamaModel", _LLAMA, tokens),
    ("MistralConfig", "MistralModel", dict(_LLAMA, sliding_window=8), tokens),
    ("Qwen2Config", "Qwen2Model", _LLAMA, tokens),
    ("Qwen3Config", "Qwen3Model", dict(_LLAMA, head_dim=16), tokens),
    ("GemmaConfig", "GemmaModel", dict(_LLAMA, head_dim=16), tokens),
    ("Gemma2Config", "Gemma2Model", dict(_LLAMA, head_dim=16, sliding_window=8, query_pre_attn_scalar=16), tokens),
    ("Gemma3TextConfig", "Gemma3TextModel",
     dict(_LLAMA, head_dim=16, sliding_window=8, query_pre_attn_scalar=16), tokens),
    ("Phi3Config", "Phi3Model", dict(_LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2), tokens),
    ("PhiConfig", "PhiModel", dict(_LLAMA, partial_rotary_factor=0.5), tokens),
    ("StableLmConfig", "StableLmModel", dict(_LLAMA, partial_rotary_factor=0.25), tokens),
    ("Olmo2Config", "Olmo2Model", dict(_LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2), tokens),
    ("CohereConfig", "CohereModel", dict(_LLAMA, pad_token_id=0, bos_token_id=1, eos_token_id=2), tokens),
    ("Starcoder2Config", "Starcoder2Model", dict(_LLAMA, bos_token_id=1, eos_token_id=2), tokens),
    ("OPTConfig", "OPTModel", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64,
                                   pad_token_id=1, bos_token_id=2, eos_token_id=2, use_cache=False), tokens),
    ("GPTNeoXConfig", "GPTNeoXModel",
     dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
          max_position_embeddings=64, rotary_pct=0.25, bos_token_id=0, eos_token_id=2, use_cache=False), tokens),
    ("GPTNeoConfig", "GPTNeoModel",
     dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
          max_position_embeddings=64, attention_types=[[["global", "local"], 1]], window_size=8,
          bos_token_id=0, eos_token_id=2, use_cache=False), tokens),
    ("GPTJConfig", "GPTJModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, rotary_dim=8,
                                     n_positions=64, bos_token_id=0, eos_token_id=2, use_cache=False), tokens),
    ("CodeGenConfig", "CodeGenModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                           rotary_dim=8, n_positions=64, n_ctx=64, bos_token_id=0, eos_token_id=2,
                                           use_cache=False), tokens),
    ("FalconConfig", "FalconModel",  # the 40B/180B layout: grouped KV, parallel attention + MLP, two norms
     dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
          new_decoder_architecture=True, bos_token_id=0, eos_token_id=2, use_cache=False), tokens),
    ("BloomConfig", "BloomModel", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, bos_token_id=0,
                                       eos_token_id=2, pad_token_id=1, use_cache=False), tokens),
    # encoder-decoders
    ("T5Config", "T5Model", dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False),
     seq2seq_tokens),
    ("BartConfig", "BartModel", _SEQ2SEQ, seq2seq_tokens),
    ("MBartConfig", "MBartModel", _SEQ2SEQ, seq2seq_tokens),
    ("MarianConfig", "MarianModel", dict(_SEQ2SEQ, eos_token_id=0, bos_token_id=0, decoder_start_token_id=1,
                                         decoder_vocab_size=VOCAB), seq2seq_tokens),
    ("PegasusConfig", "PegasusModel", dict(_SEQ2SEQ, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
     seq2seq_tokens),
    ("WhisperConfig", "WhisperModel",
     dict(vocab_size=VOCAB, num_mel_bins=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, d_model=64, max_source_positions=32,
          max_target_positions=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
          begin_suppress_tokens=None, suppress_tokens=None, use_cache=False), whisper_inputs),
    # vision
    ("ViTConfig", "ViTModel", _VIT, pixels(32)),
    ("DeiTConfig", "DeiTModel", _VIT, pixels(32)),
    ("BeitConfig", "BeitModel", dict(_VIT, use_relative_position_bias=True), pixels(32)),
    ("Dinov2Config", "Dinov2Model", _VIT, pixels(32)),
    ("CLIPVisionConfig", "CLIPVisionModel", dict(_VIT, projection_dim=32), pixels(32)),
    ("SiglipVisionConfig", "SiglipVisionModel", _VIT, pixels(32)),
    ("SwinConfig", "SwinModel", dict(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1],
                                     num_heads=[2, 4], window_size=4, mlp_ratio=2.0), pixels(32)),
    ("ConvNextConfig", "ConvNextModel", dict(num_channels=3, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
     pixels(64)),
    ("ConvNextV2Config", "ConvNextV2Model",
     dict(num_channels=3, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]), pixels(64)),
    ("ResNetConfig", "ResNetModel", dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                         depths=[1, 1, 1, 1], layer_type="bottleneck"), pixels(64)),
    ("RegNetConfig", "RegNetModel", dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                         depths=[1, 1, 1, 1], groups_width=8, layer_type="y"), pixels(64)),
    ("SegformerConfig", "SegformerForSemanticSegmentation",  # the all-MLP decode head included
     dict(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
          decoder_hidden_size=32, num_labels=4), pixels(32)),
    ("MobileViTConfig", "MobileViTModel",  # mobilevit-xx-small's widths
     dict(image_size=64, num_channels=3, hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
          expand_ratio=2.0, num_attention_heads=4), pixels(64)),
    # audio
    ("Wav2Vec2Config", "Wav2Vec2Model", _WAV2VEC2, waveform()),
    ("HubertConfig", "HubertModel", _WAV2VEC2, waveform()),
    ("WavLMConfig", "WavLMModel", dict(_WAV2VEC2, num_buckets=32, max_bucket_distance=64), waveform()),
    ("ASTConfig", "ASTModel", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   patch_size=16, frequency_stride=8, time_stride=8, max_length=48, num_mel_bins=32),
     spectrogram),
]


def builder(config_name: str, model_name: str, fields: Dict[str, Any]) -> Callable[[Optional[int]], nn.Module]:
    """``ModelClass(ConfigClass(**fields))`` (random weights; the size is ignored)."""

    def build(_size: Optional[int] = None) -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**fields)
        return getattr(transformers, model_name)(config)

    return build


def cases(Case) -> List[Any]:
    """The sweep's cases, one per architecture of the installed transformers (``Case``: coverage's dataclass)."""
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: skipping the Hugging Face architectures", file=sys.stderr)
        return []
    out: List[Any] = []
    for config_name, model_name, fields, inputs in ARCHITECTURES:
        missing = [n for n in (config_name, model_name) if not hasattr(transformers, n)]
        if missing:
            print(f"transformers {transformers.__version__} has no {', '.join(missing)}: skipping {config_name}",
                  file=sys.stderr)
            continue
        out.append(Case("transformers", config_name, builder(config_name, model_name, fields), inputs, sizes=(0,)))
    return out
