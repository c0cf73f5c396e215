"""Hugging Face ``save_pretrained`` / ``from_pretrained`` for pruned transformers.

A Hugging Face checkpoint is a ``config.json`` plus weights: ``from_pretrained``
builds the model from the config and loads the weights into it, so a pruned
model can be saved in that format exactly when one config describes all of its
widths. :func:`pruned_config` derives that config from the pruned modules
(MLP width, attention heads, key/value heads, hidden size) and checks it by
building the model from it (on the ``meta`` device: no memory, no compute) and
comparing every tensor shape; :func:`save_pretrained` writes the checkpoint.

What the format can hold, and what it cannot:

- one MLP width (``intermediate_size``; GPT-2: ``n_inner``; the fields other
  architectures use, ``ffn_dim``, ``d_ff``, ``encoder_ffn_dim``, a fused
  gate-up of twice the width, ..., are found by building the model from
  candidate values on the meta device and comparing every shape) and one head count for every
  layer: prune every layer by the same number of MLP channels and heads
  (``MaskingManager(...).mask(amount, scope="local")`` does);
- heads only where the config has a separate head size (Llama, Mistral, Qwen:
  ``head_dim``); BERT and GPT-2 derive the head size from ``hidden_size``, so
  head-pruned BERT/GPT-2 models are saved with :func:`channelcut.save`;
- no Subselect layers (an unconstrained export where consumers read different
  channel subsets): export with ``constrained=True``, or use
  :func:`channelcut.save`, which holds any pruned model.

Everything else raises :class:`NotExpressibleError` saying which layer differs.

>>> import torch, transformers, tempfile
>>> from channelcut import PruningManager
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
>>> net = transformers.LlamaModel(cfg).eval()
>>> x = {"input_ids": torch.randint(0, 64, (1, 8))}
>>> drop = [(f"layers.{i}.mlp.down_proj.weight", c) for i in range(2) for c in range(8)]
>>> _ = PruningManager(net).compute(x, pruned_inputs=drop).prune()
>>> pruned_config(net).intermediate_size
40
>>> path = save_pretrained(net, tempfile.mkdtemp())
>>> back = transformers.LlamaModel.from_pretrained(path).eval()
>>> bool(torch.allclose(back(**x).last_hidden_state, net(**x).last_hidden_state))
True
"""

from __future__ import annotations

from .calibrate import calibrate_pretrained, select_to_budget
from .errors import NotExpressibleError
from .hf_config import pruned_config, save_pretrained
from .hf_stream import load_pretrained, prune_pretrained

__all__ = ["NotExpressibleError", "pruned_config", "save_pretrained", "prune_pretrained", "load_pretrained",
           "calibrate_pretrained", "select_to_budget"]
