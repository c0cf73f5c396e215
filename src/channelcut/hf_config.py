"""The Hugging Face config of a pruned model. Start at :func:`pruned_config`.

:func:`pruned_config` derives the one config that describes a pruned model's
widths (MLP width, attention heads, key/value heads, hidden size and the RMS
norms' eps) and checks it by building the model from it on the meta device;
:func:`save_pretrained` writes a checkpoint with it. For a checkpoint
streamed from disk (``hf_stream.py``), :func:`describe_config` chooses what
``config.json`` holds: that config, transformers' ``per_layer_config`` where
the modeling code builds per-layer widths from it, or the source config and
the plan (:func:`channelcut.hf.load_pretrained` applies it).
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .errors import ChannelcutError, CheckpointError, NotExpressibleError
from .io import PLAN_FILE
from .pruning.rmsnorm import rms_norm_modules
from .pruning.subselect import is_subselect

LOADS_WITH_HF = "transformers"
LOADS_WITH_US = "channelcut.hf.load_pretrained"


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
    try:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # audio models (Wav2Vec2) have none
        emb = None
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
    try:
        _check_shapes(model, new)
    except NotExpressibleError:
        inferred = _infer_from_shapes(model, new)
        if inferred is None:
            raise
        new = inferred
    return new


#: width fields whose None means a default derived from another (GPT-J, CodeGen: 4 x n_embd)
_DEFAULTED_WIDTHS = ("n_inner",)


def _build_meta(model: nn.Module, config: Any) -> Optional[Dict[str, Tuple[int, ...]]]:
    """:func:`_meta_shapes`, or None where the config is refused."""
    try:
        return _meta_shapes(model, config)
    except NotExpressibleError:
        return None


def _infer_from_shapes(model: nn.Module, config: Any, max_tries: int = 64) -> Optional[Any]:
    """A config for the architectures whose width fields :func:`_observed`
    does not know (``ffn_dim``, ``d_ff``, ``encoder_ffn_dim``, ``hidden_dim``,
    a fused gate-up of twice the MLP width, ...): build the model from
    ``config`` on meta, collect which sizes changed (old -> new, each to one
    value), and set the integer fields that hold an old size (or half or a
    quarter of it, for fused projections) to the new one; the first
    assignment whose model has every shape of ``model`` wins. None if none."""
    have = _build_meta(model, config)
    if have is None:
        return None
    want = _shapes(model)
    changes: Dict[int, set] = defaultdict(set)
    for key, shape in want.items():
        if key in have and len(have[key]) == len(shape):
            for a, b in zip(have[key], shape):
                if a != b:
                    changes[a].add(b)
    if not changes or any(len(v) != 1 for v in changes.values()):
        return None
    values = config.to_dict()
    fields = {f: v for f, v in values.items() if type(v) is int and v > 1}
    defaulted = [f for f in _DEFAULTED_WIDTHS if f in values and values[f] is None]
    options: List[List[Tuple[str, int]]] = []  # per changed size: the (field, new value) to set together
    for old, (new_size,) in changes.items():
        sets = []
        for k in (1, 2, 4):
            if old % k or new_size % k:
                continue
            names = [f for f, v in fields.items() if v == old // k]
            if names:  # all of them together, then each alone
                sets.append([(f, new_size // k) for f in names])
                if len(names) > 1:
                    sets += [[(f, new_size // k)] for f in names]
        sets += [[(f, new_size)] for f in defaulted]
        if not sets:
            return None
        options.append(sets)
    tries = 0

    def search(i: int, chosen: List[Tuple[str, int]]) -> Optional[Any]:
        nonlocal tries
        if i == len(options):
            tries += 1
            cand = copy.deepcopy(config)
            for f, v in chosen:
                setattr(cand, f, v)
            built = _build_meta(model, cand)
            return cand if built is not None and all(built.get(k) == want[k] for k in have) else None
        for opt in options[i]:
            if tries >= max_tries:
                return None
            found = search(i + 1, chosen + opt)
            if found is not None:
                return found
        return None

    return search(0, [])


def _shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_shapes(model: nn.Module, config: Any) -> Dict[str, Tuple[int, ...]]:
    """The tensor shapes of ``type(model)`` built from ``config`` (read back
    from its dict first) on the meta device; NotExpressibleError where
    transformers refuses the config or the model can not be built."""
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
    return _shapes(fresh)


def _check_shapes(model: nn.Module, config: Any) -> None:
    """Build ``type(model)`` from ``config`` on the meta device and compare
    every tensor shape with ``model``'s. The config is first read back from
    its dict, as ``from_pretrained`` will read it (transformers validates it
    then: e.g. Llama's config refuses a head count that does not divide
    ``hidden_size``, even with an explicit ``head_dim``)."""
    have = _meta_shapes(model, config)
    for key, shape in _shapes(model).items():
        if key in have and have[key] != shape:
            raise NotExpressibleError(
                f"{key}: the pruned model has shape {shape}, a {type(model).__name__} built from the config would "
                f"have {have[key]}. The config cannot describe this pruning (e.g. heads of a model whose head "
                "size is hidden_size // num_attention_heads); save with channelcut.save.")


def save_pretrained(model: nn.Module, path: Union[str, Path], **kwargs: Any) -> Path:
    """``model.save_pretrained(path, **kwargs)`` with the config of the pruned
    widths (:func:`pruned_config`), so that ``type(model).from_pretrained(path)``
    (or ``AutoModel``) rebuilds the pruned model. ``model.config`` itself is
    left as it was. Returns the path.

    A model whose mixture-of-experts blocks were split (one module per
    expert, :mod:`channelcut.moe`) has no such config: its experts may keep
    different widths, and its parameters are named per expert. It raises
    :class:`~channelcut.errors.ChannelcutError`; ``channelcut.save`` and
    ``channelcut.load`` keep it."""
    from .moe import SplitExperts

    split = [n for n, m in model.named_modules() if isinstance(m, SplitExperts)]
    if split:
        raise ChannelcutError(
            f"{len(split)} mixture-of-experts block(s) ({split[0]}, ...) hold one module per expert, which no "
            f"{type(model).__name__} config can describe; save the pruned model with channelcut.save(model, path) "
            "and load it with channelcut.load(path)")
    config = pruned_config(model)
    old = model.config
    model.config = config
    try:
        model.save_pretrained(str(path), **kwargs)
    finally:
        model.config = old
    return Path(path)


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is in the test extra
        raise ChannelcutError("prune_pretrained/load_pretrained need transformers: pip install transformers") from exc
    return transformers


def architecture(config: Any, cls: Optional[type] = None) -> type:
    """The class that builds the checkpoint: ``cls`` if given, else the
    first of ``config.architectures``, else ``AutoModelForCausalLM``'s."""
    if cls is not None:
        return cls
    tf = _transformers()
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(tf, name, None)
        if isinstance(cls, type):
            return cls
        raise CheckpointError(
            f"the config names architecture {name!r}, which this transformers ({tf.__version__}) does not have "
            "(custom code is not run); pass model_class=")
    try:
        return tf.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise CheckpointError(f"the config ({type(config).__name__}) names no architecture; pass model_class=") from None


def _build(cls: type, config: Any) -> nn.Module:
    build = getattr(cls, "_from_config", None)
    return build(config) if build is not None else cls(config)


def build_on_meta(config: Any, cls: type) -> nn.Module:
    """``cls`` built from ``config`` with every tensor on the meta device."""
    with torch.device("meta"):
        model = _build(cls, config)
    return model.eval()


# ----------------------------------------------------------------------------
# the config of the pruned model
# ----------------------------------------------------------------------------
def _layer_list(model: nn.Module, config: Any) -> Optional[str]:
    """The name of the ModuleList of decoder layers (``model.layers``)."""
    n = getattr(config, "num_hidden_layers", None)
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and name]
    return min(found, key=len) if len(found) >= 1 and n else None


def describe_config(model: nn.Module, source: Dict[str, Any], attributes: Optional[Dict[str, Dict[str, int]]] = None,
                    ) -> Tuple[Dict[str, Any], str, str, Optional[str]]:
    """The ``config.json`` of the pruned (meta) ``model``, whose unpruned
    config file held ``source``. Returns (config dict, kind, loads_with, why):

    - ``"pruned"``: one value per field (:func:`channelcut.hf.pruned_config`),
      loads with ``from_pretrained``;
    - ``"per-layer"``: the source's fields plus transformers'
      ``per_layer_config`` with each layer's widths, where the modeling code
      builds those shapes from it (checked by building the model on meta):
      loads with ``from_pretrained``;
    - ``"source"``: no config the modeling code builds can hold the model
      (subset reads, a field that is not per layer, per-layer widths that
      Llama's modeling code refuses): the source config with a
      ``"channelcut"`` entry pointing at the plan; ``from_pretrained``
      refuses the shapes (a size-mismatch error), :func:`load_pretrained`
      applies the plan.

    ``attributes``: the module attributes the spec sets (``spec.attributes``);
    a config that builds the shapes but not these values is not used.
    """
    config = model.config
    try:
        new = pruned_config(model)
    except NotExpressibleError as exc:
        why = re.split(r"(?<!e\.g)\. (?=[A-Z])", str(exc))[0]  # the finding, not the advice that follows
    else:
        why = _lost_attributes(build_on_meta(new, type(model)), attributes)
        if why is None:
            return _updated(source, config, new), "pruned", LOADS_WITH_HF, None
        return _marked(source), "source", LOADS_WITH_US, why
    if any(is_subselect(m) for _, m in model.named_modules()):
        return _marked(source), "source", LOADS_WITH_US, why
    prefix = _layer_list(model, config)
    per_layer: Dict[int, Dict[str, int]] = {}
    for fname, values in _observed(model, config).items():
        for value, modules in values.items():
            if value == getattr(config, fname, None):
                continue
            for mname in modules:
                if prefix is None or not mname.startswith(prefix + "."):  # e.g. hidden_size: one for all layers
                    return _marked(source), "source", LOADS_WITH_US, why
                per_layer.setdefault(int(mname[len(prefix) + 1:].split(".")[0]), {})[fname] = value
    raw = dict(source)
    if source.get("per_layer_config"):
        return _marked(source), "source", LOADS_WITH_US, why + " (the source config has its own per_layer_config)"
    for overrides in per_layer.values():
        if "num_attention_heads" in overrides and "head_dim" not in source:
            raw["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    digits = len(str(max(per_layer, default=0)))
    raw["per_layer_config"] = {str(i).zfill(digits): per_layer[i] for i in sorted(per_layer)}
    try:
        built = build_on_meta(_config_from_dict(raw), type(model))
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in built.state_dict().items()}
        loads = want == have and _lost_attributes(built, attributes) is None
    except Exception:  # e.g. Llama: AmbiguousGlobalPerLayerAttributeError (its config may not even validate)
        loads = False
    if loads:
        return raw, "per-layer", LOADS_WITH_HF, why
    return _marked(source), "source", LOADS_WITH_US, why + f"; {type(model).__name__} does not build per-layer widths from a config"


def _lost_attributes(built: nn.Module, attributes: Optional[Dict[str, Dict[str, int]]]) -> Optional[str]:
    """What a model built from a config gets wrong of the attributes the spec
    sets (None: nothing)."""
    modules = dict(built.named_modules())
    for mname, attrs in (attributes or {}).items():
        for attr, value in attrs.items():
            have = getattr(modules.get(mname), attr, None)
            if have != value:
                return f"the export sets {mname}.{attr} = {value}, a model built from the config has {have}"
    return None


def _marked(source: Dict[str, Any]) -> Dict[str, Any]:
    """The source config with an entry saying where the pruned shapes are."""
    raw = dict(source)
    raw["channelcut"] = {
        "load_with": "channelcut.hf.load_pretrained(path)",
        "plan": PLAN_FILE,
        "note": "the weights are pruned; this config is the unpruned model's (from_pretrained refuses the shapes)",
    }
    return raw


def _config_from_dict(raw: Dict[str, Any]) -> Any:
    """The config object of a ``config.json`` dict (without AutoConfig's file lookup)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"config.json has model_type {model_type!r}, which this transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(dict(raw))


def _updated(source: Dict[str, Any], old: Any, new: Any) -> Dict[str, Any]:
    """``source`` (the config file as read) with the fields where the config
    objects ``old`` and ``new`` differ set to ``new``'s values (the rest of
    the file is kept as it was)."""
    a, b = old.to_dict(), new.to_dict()
    out = dict(source)
    for k, v in b.items():
        if a.get(k, object()) != v:
            out[k] = v
    return out
