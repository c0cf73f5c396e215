"""Hugging Face ``save_pretrained`` / ``from_pretrained`` for pruned transformers.

A Hugging Face checkpoint is a ``config.json`` plus weights: ``from_pretrained``
builds the model from the config and loads the weights into it, so a pruned
model can be saved in that format exactly when one config describes all of its
widths. :func:`pruned_config` derives that config from the pruned modules
(MLP width, attention heads, key/value heads, hidden size) and checks it by
building the model from it (on the ``meta`` device: no memory, no compute) and
comparing every tensor shape; :func:`save_pretrained` writes the checkpoint.

What the format can hold, and what it cannot:

- one ``intermediate_size`` (GPT-2: ``n_inner``) and one head count for every
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

import copy
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .errors import NotExpressibleError  # defined in errors.py; re-exported here
from .pruning.rmsnorm import rms_norm_modules
from .pruning.subselect import is_subselect

__all__ = ["NotExpressibleError", "pruned_config", "save_pretrained", "prune_pretrained", "load_pretrained"]


# names (suffixes) of the layers whose output width is the config's MLP width
_MLP_WIDTH = ("intermediate.dense", "mlp.gate_proj", "mlp.up_proj", "mlp.fc1", "mlp.dense_h_to_4h")


def _out_features(m: nn.Module) -> Optional[int]:
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear) and isinstance(w, torch.Tensor):
        return int(w.shape[0])
    if type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor):  # GPT-2: weight (in, out)
        return int(w.shape[1])
    return None


def _observed(model: nn.Module, config: Any) -> Dict[str, Dict[int, List[str]]]:
    """config field -> {value: [modules that need it]} for every width the
    pruned modules show."""
    seen: Dict[str, Dict[int, List[str]]] = defaultdict(lambda: defaultdict(list))
    mlp_field = "n_inner" if hasattr(config, "n_inner") and not hasattr(config, "intermediate_size") else "intermediate_size"
    for name, m in model.named_modules():
        if name.endswith(_MLP_WIDTH) or (mlp_field == "n_inner" and name.endswith("mlp.c_fc")):
            width = _out_features(m)
            if width is not None:
                seen[mlp_field][width].append(name)
        q, k = getattr(m, "q_proj", None), getattr(m, "k_proj", None)
        head_dim = getattr(m, "head_dim", None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(head_dim, int) and head_dim > 0:
            seen["num_attention_heads"][q.weight.shape[0] // head_dim].append(name)
            if hasattr(config, "num_key_value_heads"):
                seen["num_key_value_heads"][k.weight.shape[0] // head_dim].append(name)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Embedding):
        seen["hidden_size"][int(emb.weight.shape[1])].append("input embeddings")
    if hasattr(config, "rms_norm_eps"):  # a narrower stream rescales its RMS norms' eps
        forms = rms_norm_modules(model)
        for name, m in model.named_modules():
            form = forms.get(id(m))
            if form is not None:
                seen["rms_norm_eps"][float(getattr(m, form.eps_attr))].append(name)
    return seen


def pruned_config(model: nn.Module) -> Any:
    """A copy of ``model.config`` with the widths of the pruned ``model``.

    Raises :class:`NotExpressibleError` when no single config describes the
    model (layers of different widths, head sizes the config cannot hold,
    Subselect layers), naming what differs.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise NotExpressibleError(
            f"{type(model).__name__} has no Hugging Face config (model.config); save it with channelcut.save")
    subsets = [name for name, m in model.named_modules() if is_subselect(m)]
    if subsets:
        raise NotExpressibleError(
            f"{len(subsets)} layer(s) read a subset of their input (e.g. {subsets[0]!r}): a Hugging Face "
            "checkpoint cannot hold that. Export with compute(..., constrained=True), or save with channelcut.save.")
    new = copy.deepcopy(config)
    for field, values in _observed(model, config).items():
        if len(values) > 1:
            listing = "; ".join(f"{v} in {names[0]}" + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
                                for v, names in sorted(values.items()))
            raise NotExpressibleError(
                f"the layers need different values of config.{field}: {listing}. A Hugging Face config holds one "
                "value for all layers: prune every layer by the same count (MaskingManager.mask(amount, "
                "scope='local')), or save with channelcut.save.")
        (value,) = values
        if getattr(new, field, None) != value:
            if field in ("num_attention_heads", "hidden_size"):
                # keep the head size explicit: it defaults to hidden_size // heads (Qwen2 and Mistral configs
                # have no head_dim field but their modeling code reads one; _check_shapes checks that it does)
                new.head_dim = int(getattr(new, "head_dim", None) or new.hidden_size // new.num_attention_heads)
            setattr(new, field, value)
    _check_shapes(model, new)
    return new


def _check_shapes(model: nn.Module, config: Any) -> None:
    """Build ``type(model)`` from ``config`` on the meta device and compare
    every tensor shape with ``model``'s. The config is first read back from
    its dict, as ``from_pretrained`` will read it (transformers validates it
    then: e.g. Llama's config refuses a head count that does not divide
    ``hidden_size``, even with an explicit ``head_dim``)."""
    try:
        config = type(config).from_dict(config.to_dict())
    except Exception as exc:
        raise NotExpressibleError(
            f"transformers refuses the pruned config of {type(model).__name__} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[-1].strip()}); save with channelcut.save") from exc
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception as exc:
        raise NotExpressibleError(f"{type(model).__name__} cannot be built from the pruned config: {exc}") from exc
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for key, shape in want.items():
        if key in have and have[key] != shape:
            raise NotExpressibleError(
                f"{key}: the pruned model has shape {shape}, a {type(model).__name__} built from the config would "
                f"have {have[key]}. The config cannot describe this pruning (e.g. heads of a model whose head "
                "size is hidden_size // num_attention_heads); save with channelcut.save.")


def save_pretrained(model: nn.Module, path: Union[str, Path], **kwargs: Any) -> Path:
    """``model.save_pretrained(path, **kwargs)`` with the config of the pruned
    widths (:func:`pruned_config`), so that ``type(model).from_pretrained(path)``
    (or ``AutoModel``) rebuilds the pruned model. ``model.config`` itself is
    left as it was. Returns the path."""
    config = pruned_config(model)
    old = model.config
    model.config = config
    try:
        model.save_pretrained(str(path), **kwargs)
    finally:
        model.config = old
    return Path(path)


def prune_pretrained(src: Union[str, Path], dst: Union[str, Path], pruned_inputs: Any = None, pruned_outputs: Any = None,
                     constrained: bool = False, **kwargs: Any) -> Any:
    """Prune the Hugging Face checkpoint in directory ``src`` into ``dst``
    tensor by tensor, never loading the model (plan on the meta device, slice
    each tensor as it is read from the safetensors shards). See
    :func:`channelcut.hf_stream.prune_pretrained`; returns its
    :class:`~channelcut.hf_stream.StreamReport`."""
    from .hf_stream import prune_pretrained as run

    return run(src, dst, pruned_inputs, pruned_outputs, constrained, **kwargs)


def load_pretrained(path: Union[str, Path], **kwargs: Any) -> nn.Module:
    """Load a checkpoint written by :func:`prune_pretrained` (also one with a
    different width in every layer) as a Hugging Face model. See
    :func:`channelcut.hf_stream.load_pretrained`."""
    from .hf_stream import load_pretrained as run

    return run(path, **kwargs)
