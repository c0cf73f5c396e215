"""Calibrated importance for a checkpoint on disk, one decoder layer at a
time, and the choice of what to remove to reach a parameter count.

Start at :func:`calibrate_pretrained` and :func:`select_to_budget`; together
they feed :func:`channelcut.hf.prune_pretrained`::

    cal = calibrate_pretrained("llama-8b", batches, method="activation")
    budget = select_to_budget(cal.scores, "llama-8b", keep=0.75, round_to=128)
    prune_pretrained("llama-8b", "llama-6b", **budget.request())

**Calibration** (:func:`calibrate_pretrained`) never holds the model:

1. the architecture is built with its parameters on the ``meta`` device
   (buffers real: rotary frequencies are computed as usual);
2. the model's own ``forward`` runs once per batch with each decoder layer's
   ``forward`` replaced by a recorder that keeps the layer's arguments
   (attention masks, position embeddings: whatever the model computes for
   that layer) and passes the hidden states through. The embedding reads
   only the rows of the batch's tokens from the checkpoint;
3. then, layer by layer: the layer's tensors are read from the checkpoint
   (in ``dtype``, on ``device``), the layer runs on every batch's hidden
   states with a forward pre-hook on each ``nn.Linear`` that sums the
   squares of each input channel, and the tensors are dropped again; the
   outputs are the next layer's inputs;
4. the final norm runs on the last hidden states to score the output head's
   inputs (the head itself never runs; for ``"wanda"`` its column norms
   are read in chunks of rows).

Memory: one layer's weights in ``dtype`` plus the calibration batches'
hidden states and one layer's activations. The scores are those of
:class:`channelcut.importance.ActivationNorm` (``"activation"``: the root
mean square of each input channel over every calibration token) and
:class:`channelcut.importance.Wanda` (``"wanda"``: that times the column's
absolute sum) for every ``nn.Linear`` of the model, by weight name: the
in-memory heuristics give the same numbers on the loaded model.

**Selection** (:func:`select_to_budget`) turns per-channel scores (from
:func:`calibrate_pretrained`, or ``MaskingManager(...).scores()``) into a
request for a decoder-only transformer whose layers have
``q/k/v/o_proj`` and ``gate/up/down_proj`` (Llama, Mistral, Qwen2/3, Gemma,
...). Units of three kinds are removed: MLP channels (``down_proj``'s inputs),
key/value groups (a key/value head with the query heads that read it: the
group's channels of ``o_proj``'s inputs; with as many key/value heads as
query heads, single heads) and hidden channels (the residual stream:
``pruned_outputs`` of the embedding). Every kind loses the same fraction of
its units, found by bisection so the pruned model has at most the target
parameter count; the hidden size moves in steps (``round_to`` channels,
each costing every layer's projections), so it is fixed first and a second
bisection lets the other kinds take up what its step overshot. Within a
kind the units are ranked over all layers at once (``scope="global"``, each
layer's scores divided by their mean) or each layer loses the same fraction
(``scope="local"``). ``round_to`` keeps every layer's MLP width and the
hidden size multiples of it. The parameter count is computed from the
widths (every parameter of the model, tied ones once), and it is the count
of the model the request exports (tested against both exports).
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import ChannelcutError, CheckpointError
from .importance import ChannelSquares
from .hf_config import _build, _config_from_dict, _layer_list, _transformers, architecture, build_on_meta
from .hf_stream import CONFIG_FILE, PathLike, _default_dtype, _open_checkpoint, _parameters_on_meta, tensor_names
from .masking.select import round_width
from .safetensors_stream import read_rows, read_tensor

__all__ = ["Calibration", "Budget", "calibrate_pretrained", "select_to_budget", "KINDS", "METHODS"]

METHODS = ("activation", "wanda")
KINDS = ("mlp", "kv_groups", "hidden")
Pair = Tuple[str, int]


class _Recorded(Exception):
    """Raised by the last layer's recorder: the rest of the forward is not needed."""


@dataclass
class Calibration:
    """What :func:`calibrate_pretrained` measured."""

    #: consumer weight name -> score of each input channel (float64, CPU)
    scores: Dict[str, torch.Tensor]
    method: str
    batches: int
    tokens: int
    layers: int
    seconds: float = 0.0
    bytes_read: int = 0  # checkpoint bytes read into memory
    largest_layer_bytes: int = 0  # the largest decoder layer's tensors, in the compute dtype
    hidden_bytes: int = 0  # the calibration batches' hidden states, kept between layers

    def summary(self) -> str:
        mib = 1 << 20
        return (f"{self.method} importance of {len(self.scores)} layers' input channels from {self.tokens} tokens "
                f"({self.batches} batches), {self.layers} decoder layers one at a time in {self.seconds:.1f} s; "
                f"read {self.bytes_read / (1 << 30):.2f} GiB; largest layer {self.largest_layer_bytes / mib:.0f} MiB, "
                f"hidden states {self.hidden_bytes / mib:.1f} MiB")


# ----------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------
def _batches(data: Any, max_batches: Optional[int]) -> List[Dict[str, torch.Tensor]]:
    if isinstance(data, (torch.Tensor, dict)):
        data = [data]
    out: List[Dict[str, torch.Tensor]] = []
    for i, b in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(b, torch.Tensor):
            b = {"input_ids": b}
        if not isinstance(b, dict) or not isinstance(b.get("input_ids"), torch.Tensor) or b["input_ids"].dim() != 2:
            raise ValueError("calibration batches are (batch, tokens) tensors of token ids or dicts with "
                             f"'input_ids' (and 'attention_mask'); batch {i} is {type(b).__name__}")
        if b["input_ids"].dtype not in (torch.int64, torch.int32):
            raise ValueError(f"batch {i}: token ids must be integers, got {b['input_ids'].dtype}")
        out.append(dict(b))
    if not out:
        raise ValueError("calibrate_pretrained needs at least one calibration batch")
    return out


class _Reader:
    """The checkpoint's tensors by model tensor name (tied names resolved)."""

    def __init__(self, folder: Path, model: nn.Module) -> None:
        self.ckpt = _open_checkpoint(folder)
        self.where: Dict[str, str] = {e.name: f for f, e in self.ckpt.keys()}
        canon, _ = tensor_names(model)
        self.aliases: Dict[str, List[str]] = {}
        for name, c in canon.items():
            self.aliases.setdefault(c, []).append(name)
        self.canon = canon
        self.bytes_read = 0

    def find(self, name: str) -> Optional[str]:
        """The checkpoint's key for model tensor ``name`` (or a tied name of it), or None."""
        for n in [name] + self.aliases.get(self.canon.get(name, name), []):
            if n in self.where:
                return n
        return None

    def key(self, name: str) -> str:
        found = self.find(name)
        if found is not None:
            return found
        prefix, near = name, []
        while "." in prefix and not near:  # the nearest enclosing module the checkpoint has tensors under
            prefix = prefix.rpartition(".")[0]
            near = sorted(k for k in self.where if k.startswith(prefix + "."))[:3]
        prefix += "."
        hint = (f"; under {prefix!r} it has {', '.join(near)}: its tensor names are not the model's (transformers "
                "renames some, e.g. mixture-of-experts weights, while loading; streaming reads the model's names)"
                if near else "")
        raise CheckpointError(f"the checkpoint in {self.ckpt.folder} has no tensor for {name!r}{hint}")

    def read(self, name: str) -> torch.Tensor:
        k = self.key(name)
        f = self.where[k]
        t = read_tensor(self.ckpt.folder / f, self.ckpt.headers[f], k)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def rows(self, name: str, rows: Union[range, Sequence[int]]) -> torch.Tensor:
        k = self.key(name)
        f = self.where[k]
        t = read_rows(self.ckpt.folder / f, self.ckpt.headers[f], k, rows)
        self.bytes_read += t.numel() * t.element_size()
        return t


def _materialise(module: nn.Module, prefix: str, reader: _Reader, dtype: torch.dtype, device: torch.device) -> int:
    """Give every parameter (and every checkpointed buffer) of ``module`` its
    checkpoint tensor; returns the bytes it holds."""
    held = 0
    for mname, m in module.named_modules():
        for pname, p in list(m._parameters.items()):
            if p is None:
                continue
            full = ".".join(x for x in (prefix, mname, pname) if x)
            t = reader.read(full)
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{full!r} has shape {tuple(t.shape)} in the checkpoint, the model {tuple(p.shape)}")
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            m._parameters[pname] = nn.Parameter(t, requires_grad=False)
            held += t.numel() * t.element_size()
        for bname, b in list(m._buffers.items()):
            full = ".".join(x for x in (prefix, mname, bname) if x)
            if b is None or bname in m._non_persistent_buffers_set or reader.find(full) is None:
                if b is not None and b.device != device:
                    m._buffers[bname] = b.to(device)
                continue
            t = reader.read(full).to(device)
            m._buffers[bname] = t.to(b.dtype) if t.is_floating_point() and b.is_floating_point() else t
    return held


def _release(module: nn.Module) -> None:
    """Put ``module``'s parameters back on the meta device (frees them), and
    hand the freed memory back to the system."""
    for m in module.modules():
        for pname, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    _trim()


def _trim() -> None:
    """``malloc_trim(0)`` where the C library is glibc: tensors under its
    mmap threshold (up to 32 MiB: a 4096 x 1024 float32 projection) are
    freed into the heap, which keeps them resident and fragmented; one
    layer after another, the resident set would creep up by tens of MiB per
    layer (+1.3 GiB over an 8B model's 32 layers). Trimming returns them."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None)
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _linears(module: nn.Module, prefix: str) -> Dict[str, nn.Linear]:
    return {(f"{prefix}.{n}" if n else prefix) + ".weight": m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def _column_sums(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().abs().sum(0).cpu()


def _record_layer_calls(model: nn.Module, layers: nn.ModuleList, batches: List[Dict[str, torch.Tensor]],
                        reader: _Reader, dtype: torch.dtype, dev: torch.device,
                        ) -> Tuple[List[List[Tuple[tuple, dict]]], List[torch.Tensor]]:
    """Run the model's own forward on each batch with every decoder layer's
    ``forward`` replaced by a recorder; returns each layer's arguments per
    batch (what the model computes for it: masks, position embeddings) and
    the hidden states entering the first layer. The embedding reads only
    the batch's rows from the checkpoint."""
    calls: List[List[Tuple[tuple, dict]]] = [[] for _ in layers]
    hidden: List[torch.Tensor] = []
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    originals = [layer.__dict__.get("forward") for layer in layers]

    def recorder(i: int) -> Callable:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls[i].append((args, kwargs))
            if i == 0:
                hidden.append(hidden_states.detach())
            if i == len(layers) - 1:
                raise _Recorded
            return hidden_states

        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        with torch.no_grad():
            for b in batches:
                uniq, inverse = torch.unique(b["input_ids"], return_inverse=True)
                rows = reader.rows(f"{embed_name}.weight", uniq.tolist()).to(device=dev, dtype=dtype)
                weight = embed._parameters["weight"]
                padding = getattr(embed, "padding_idx", None)
                embed._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
                if padding is not None:
                    embed.padding_idx = None
                handle = embed.register_forward_pre_hook(lambda m, a, inv=inverse: (inv.to(dev),) + tuple(a[1:]))
                try:
                    kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                    model(**kwargs, use_cache=False)
                except _Recorded:
                    pass
                finally:
                    handle.remove()
                    embed._parameters["weight"] = weight
                    if padding is not None:
                        embed.padding_idx = padding
    finally:
        for layer, f in zip(layers, originals):
            if f is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = f
    if len(hidden) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise ChannelcutError(f"{type(model).__name__}'s forward did not call every decoder layer once per batch "
                              "(calibrate_pretrained runs each layer on what the model passes it)")
    return calls, hidden


def _run_layers(layers: nn.ModuleList, list_name: str, calls: List[List[Tuple[tuple, dict]]],
                hidden: List[torch.Tensor], reader: _Reader, dtype: torch.dtype, dev: torch.device,
                stats: ChannelSquares, colsums: Optional[Dict[str, torch.Tensor]],
                progress: Optional[Callable[[int, int], None]]) -> int:
    """Each layer in turn: read it, run it on every batch (``stats`` hooked on
    its ``nn.Linear`` modules; ``hidden`` becomes its outputs), take its
    column sums (Wanda), drop it. Returns the largest layer's bytes."""
    largest = 0
    for i, layer in enumerate(layers):
        prefix = f"{list_name}.{i}"
        largest = max(largest, _materialise(layer, prefix, reader, dtype, dev))
        linears = _linears(layer, prefix)
        hooks = [m.register_forward_pre_hook(stats.hook(w)) for w, m in linears.items()]
        try:
            with torch.no_grad():
                for j, (args, kwargs) in enumerate(calls[i]):
                    out = layer(hidden[j], *args, **kwargs)
                    hidden[j] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
            if colsums is not None:
                for w, m in linears.items():
                    colsums[w] = _column_sums(m.weight)
        finally:
            for h in hooks:
                h.remove()
            _release(layer)
        calls[i] = []
        if progress is not None:
            progress(i + 1, len(layers))
    return largest


def _score_head(model: nn.Module, list_name: str, hidden: List[torch.Tensor], reader: _Reader, dtype: torch.dtype,
                dev: torch.device, stats: ChannelSquares, colsums: Optional[Dict[str, torch.Tensor]]) -> None:
    """The output head's inputs: the final norm (the decoder's ``norm``) of
    the last hidden states; the head itself never runs, and its column sums
    (Wanda) are read in chunks of rows."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = model.get_submodule(list_name.rpartition(".")[0]) if "." in list_name else model
    norm = getattr(base, "norm", None)
    if not isinstance(head, nn.Linear) or not isinstance(norm, nn.Module):
        return
    head_name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    norm_prefix = next(n for n, m in model.named_modules() if m is norm)
    _materialise(norm, norm_prefix, reader, dtype, dev)
    with torch.no_grad():
        for h in hidden:
            stats.hook(head_name)(head, (norm(h),))
    _release(norm)
    if colsums is not None:
        rows, width = head.weight.shape
        chunk = max(1, (64 << 20) // max(1, width * 8))
        total = torch.zeros(width, dtype=torch.float64)
        for start in range(0, rows, chunk):
            total += reader.rows(head_name, range(start, min(rows, start + chunk))).double().abs().sum(0)
        colsums[head_name] = total


def calibrate_pretrained(
    src: PathLike,
    data: Union[torch.Tensor, Dict[str, torch.Tensor], Iterable[Any]],
    *,
    method: str = "activation",
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    max_batches: Optional[int] = None,
    model_class: Optional[type] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Calibration:
    """Score every ``nn.Linear`` input channel of the Hugging Face checkpoint
    ``src`` on calibration batches, one decoder layer in memory at a time.

    Args:
        src: a checkpoint directory (``config.json`` and safetensors weights).
        data: the calibration batches: ``(batch, tokens)`` tensors of token
            ids, or dicts with ``input_ids`` (and ``attention_mask``), or one
            of them. Their hidden states stay in memory between layers
            (``tokens x hidden_size`` values in ``dtype``).
        method: ``"activation"`` (root mean square of each input channel,
            Minitron's activation importance) or ``"wanda"`` (that times the
            absolute sum of the weight column).
        dtype: the dtype the layers compute in (weights are converted as
            they are read).
        device: where layers compute (``"cuda"``: each layer is moved there
            in turn); default CPU.
        max_batches: use at most this many batches of ``data``.
        model_class: the class to build (default: ``config.architectures``).
        progress: called as ``progress(layers_done, layers)``.

    Returns:
        A :class:`Calibration` whose ``scores`` map each weight name
        (``model.layers.3.mlp.down_proj.weight``, ...) to one float64 score
        per input channel: the format of ``MaskingManager.scores()``, and the
        numbers :class:`~channelcut.importance.ActivationNorm` /
        :class:`~channelcut.importance.Wanda` give on the loaded model.

    Raises :class:`~channelcut.CheckpointError` for a checkpoint it cannot
    read (no decoder layer list, a missing tensor), ``ValueError`` for bad
    arguments.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    tf = _transformers()
    folder = Path(src)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face checkpoint directory (no {CONFIG_FILE})")
    batches = _batches(data, max_batches)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    t0 = time.perf_counter()
    config = tf.AutoConfig.from_pretrained(str(folder))
    with _parameters_on_meta(), _default_dtype(dtype):
        model = _build(architecture(config, model_class), config)
    model.eval()
    if dev.type != "cpu":  # buffers (rotary frequencies, ...); the parameters are meta until read
        for m in model.modules():
            for bname, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[bname] = b.to(dev)
    reader = _Reader(folder, model)
    list_name = _layer_list(model, config)
    if list_name is None:
        raise CheckpointError(f"{type(model).__name__} has no list of {getattr(config, 'num_hidden_layers', '?')} "
                              "decoder layers: calibrate_pretrained runs decoder-only language models layer by layer")
    layers: nn.ModuleList = model.get_submodule(list_name)  # type: ignore[assignment]
    vocab = getattr(config, "vocab_size", None)
    for i, b in enumerate(batches):
        ids = b["input_ids"]
        if vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"batch {i} holds token ids outside [0, {vocab}) (the vocabulary)")

    calls, hidden = _record_layer_calls(model, layers, batches, reader, dtype, dev)
    stats = ChannelSquares()
    colsums: Dict[str, torch.Tensor] = {}
    largest = _run_layers(layers, list_name, calls, hidden, reader, dtype, dev, stats,
                          colsums if method == "wanda" else None, progress)
    _score_head(model, list_name, hidden, reader, dtype, dev, stats, colsums if method == "wanda" else None)

    scores: Dict[str, torch.Tensor] = {}
    for w in stats.sums:
        rms = stats.rms(w)
        scores[w] = (rms * colsums[w].to(rms.device) if method == "wanda" else rms).cpu()
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    hidden_bytes = sum(h.numel() * h.element_size() for h in hidden)
    return Calibration(scores, method, len(batches), tokens, len(layers),
                       seconds=time.perf_counter() - t0, bytes_read=reader.bytes_read, largest_layer_bytes=largest,
                       hidden_bytes=hidden_bytes)


# ----------------------------------------------------------------------------
# selection to a parameter budget
# ----------------------------------------------------------------------------
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Budget:
    """A request that brings a model to a parameter count (:func:`select_to_budget`)."""

    pruned_inputs: List[Pair]
    pruned_outputs: List[Pair]
    params_before: int
    params_after: int  # the pruned model's parameter count (every parameter tensor, tied ones once)
    target: int
    removed: Dict[str, float]  # kind -> the fraction of its units removed
    kinds: Tuple[str, ...]
    hidden: int  # hidden size kept
    mlp: List[int] = field(default_factory=list)  # MLP width kept, per layer
    kv_groups: List[int] = field(default_factory=list)  # key/value groups kept, per layer

    def request(self) -> Dict[str, List[Pair]]:
        """Keyword arguments for ``prune_pretrained`` / ``PruningManager.compute``."""
        return {"pruned_inputs": list(self.pruned_inputs), "pruned_outputs": list(self.pruned_outputs)}

    def summary(self) -> str:
        mlp = f"{min(self.mlp)}-{max(self.mlp)}" if self.mlp else "-"
        kv = f"{min(self.kv_groups)}-{max(self.kv_groups)}" if self.kv_groups else "-"
        return (f"{self.params_before:,} -> {self.params_after:,} parameters (target {self.target:,}); "
                f"removed {', '.join(f'{v:.1%} of {k}' for k, v in self.removed.items())}: hidden {self.hidden}, "
                f"MLP widths {mlp}, key/value groups {kv}")


@dataclass
class _Arch:
    """The widths of a decoder-only transformer, and the cost of each parameter in them."""

    layers: str  # the decoder layer list's name
    n: int
    hidden: int
    head_dim: int
    per_group: int  # query heads per key/value head
    groups: List[int]
    mlp: List[int]
    embed: str  # the embedding weight
    head: Optional[str]  # the output head's weight (by the head's own name, also when tied to the embedding)
    # (parameter name, one symbol per dim) for every parameter: an int, "H", ("I", l), ("Q", l), ("KV", l)
    params: List[Tuple[str, Tuple[Any, ...]]]

    def count(self, hidden: int, mlp: Sequence[int], groups: Sequence[int]) -> int:
        total = 0
        for _, dims in self.params:
            n = 1
            for d in dims:
                if d == "H":
                    n *= hidden
                elif isinstance(d, tuple):
                    kind, layer = d
                    n *= (mlp[layer] if kind == "I" else groups[layer] * self.head_dim * (self.per_group if kind == "Q" else 1))
                else:
                    n *= d
            total += n
        return total


def _arch(model: nn.Module, config: Any) -> _Arch:
    list_name = _layer_list(model, config)
    if list_name is None:
        raise ChannelcutError(f"{type(model).__name__}: no list of decoder layers; select_to_budget handles decoder-only "
                              "transformers (Llama, Mistral, Qwen2/3, Gemma, ...)")
    layers = model.get_submodule(list_name)
    H = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or H // heads)
    mlp: List[int] = []
    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        need = [f"self_attn.{p}" for p in _ATTN] + [f"mlp.{p}" for p in _MLP]
        lacking = [n for n in need if not isinstance(mods.get(n), nn.Linear)]
        if lacking:
            raise ChannelcutError(
                f"{list_name}.{i} has no {', '.join(lacking)} (nn.Linear): select_to_budget handles layers with "
                f"self_attn.{{{','.join(_ATTN)}}} and mlp.{{{','.join(_MLP)}}} (Llama, Mistral, Qwen2/3, Gemma, ...)")
        q, o, k = mods["self_attn.q_proj"], mods["self_attn.o_proj"], mods["self_attn.k_proj"]
        if q.out_features != heads * head_dim or k.out_features != kv * head_dim or o.in_features != heads * head_dim:
            raise ChannelcutError(f"{list_name}.{i}: attention widths do not match {heads} heads and {kv} key/value "
                                  f"heads of {head_dim} (is the model already pruned?)")
        mlp.append(mods["mlp.down_proj"].in_features)
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed) + ".weight"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_mod = next((n for n, m in model.named_modules() if m is head), None)
    syms = {"q_proj": (("Q",), "H"), "k_proj": (("KV",), "H"), "v_proj": (("KV",), "H"), "o_proj": ("H", ("Q",)),
            "gate_proj": (("I",), "H"), "up_proj": (("I",), "H"), "down_proj": ("H", ("I",))}
    params: List[Tuple[str, Tuple[Any, ...]]] = []
    for name, p in model.named_parameters():  # tied parameters once
        mname, _, pname = name.rpartition(".")
        shape = tuple(p.shape)
        dims: Tuple[Any, ...] = shape
        parts = mname.split(".")
        layer = None
        if mname.startswith(list_name + ".") and len(parts) > len(list_name.split(".")):
            layer = int(parts[len(list_name.split("."))])
        leaf = parts[-1]
        if layer is not None and leaf in syms and mname.endswith(("self_attn." + leaf, "mlp." + leaf)):
            out_sym, in_sym = syms[leaf]
            sym = [((s[0], layer) if isinstance(s, tuple) else s) for s in (out_sym, in_sym)]
            dims = tuple(sym) if pname == "weight" else (sym[0],)
        elif name == embed_name or (head_mod is not None and mname == head_mod and pname == "weight"):
            dims = (shape[0], "H")
        elif p.dim() == 1 and shape[0] == H and "norm" in leaf:
            dims = ("H",)
        params.append((name, dims))
    head_name = f"{head_mod}.weight" if isinstance(head, nn.Linear) and head_mod is not None else None
    return _Arch(list_name, len(layers), H, head_dim, heads // kv, [kv] * len(layers), mlp, embed_name, head_name,
                 params)


def _model_of(source: Any) -> Tuple[nn.Module, Any]:
    if isinstance(source, nn.Module):
        return source, source.config
    tf = _transformers()
    if isinstance(source, (str, Path)):
        config = tf.AutoConfig.from_pretrained(str(source))
    elif isinstance(source, dict):
        config = _config_from_dict(source)
    else:
        config = source
    return build_on_meta(config, architecture(config, None)), config


def _per_layer(scores: Dict[str, torch.Tensor], name: str, width: int) -> torch.Tensor:
    s = scores.get(name)
    if s is None:
        raise ChannelcutError(f"no scores for {name!r}: calibrate the whole model (calibrate_pretrained) "
                              "or pass MaskingManager(model, [x]).importance(...).scores()")
    s = s.detach().double().cpu().flatten()
    if s.numel() != width:
        raise ChannelcutError(f"{len(s)} scores for {name!r}, which has {width} input channels")
    return s


def _normalised(s: torch.Tensor) -> torch.Tensor:
    m = s.mean()
    return s / m if float(m) > 0 else torch.zeros_like(s)


def _unit_scores(scores: Dict[str, torch.Tensor], arch: _Arch, kinds: Tuple[str, ...],
                 ) -> Tuple[Dict[str, List[torch.Tensor]], Optional[torch.Tensor]]:
    """Per kind, one score per unit and layer (MLP channels: ``down_proj``'s
    inputs; KV groups: the sum over the group's ``o_proj`` inputs); and one
    score per hidden channel (the mean-normalised sum over its readers)."""
    L, hd, per, pre = arch.n, arch.head_dim, arch.per_group, arch.layers
    units: Dict[str, List[torch.Tensor]] = {}
    if "mlp" in kinds:
        units["mlp"] = [_per_layer(scores, f"{pre}.{i}.mlp.down_proj.weight", arch.mlp[i]) for i in range(L)]
    if "kv_groups" in kinds:
        units["kv_groups"] = [
            _per_layer(scores, f"{pre}.{i}.self_attn.o_proj.weight", arch.groups[i] * per * hd)
            .view(arch.groups[i], per * hd).sum(1) for i in range(L)]
    hidden_scores = None
    if "hidden" in kinds:
        readers = [f"{pre}.{i}.{m}.weight" for i in range(L)
                   for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
        hidden_scores = sum(_normalised(_per_layer(scores, r, arch.hidden)) for r in readers)
        head_scores = scores.get(arch.head) if arch.head is not None else None
        if head_scores is not None:
            hidden_scores = hidden_scores + _normalised(_per_layer({"head": head_scores}, "head", arch.hidden))

    return units, hidden_scores


def select_to_budget(
    scores: Dict[str, torch.Tensor],
    model: Any,
    *,
    target_params: Optional[int] = None,
    keep: Optional[float] = None,
    kinds: Sequence[str] = KINDS,
    scope: str = "global",
    round_to: Optional[int] = None,
) -> Budget:
    """Choose MLP channels, key/value groups and hidden channels to remove so
    that the model has at most ``target_params`` parameters.

    Args:
        scores: weight name -> score per input channel, as
            :func:`calibrate_pretrained` or ``MaskingManager.scores()`` give
            (higher: more important). Used: ``down_proj`` (MLP channels),
            ``o_proj`` (a group's score is the sum over its channels),
            ``q/k/v_proj``, ``gate/up_proj`` and the output head (a hidden
            channel's score is the sum over those readers, each layer's
            scores divided by their mean).
        model: the model (an ``nn.Module`` with ``.config``), its checkpoint
            directory, or its config: only shapes are used (built on meta).
        target_params: the parameter count to reach (at most); or
        keep: the fraction of the parameters to keep, in ``(0, 1]``.
        kinds: what to remove, from ``("mlp", "kv_groups", "hidden")``.
        scope: ``"global"`` (one ranking per kind over all layers) or
            ``"local"`` (every layer loses the same fraction).
        round_to: keep each layer's MLP width and the hidden size multiples
            of this (64 or 128 for tensor cores).

    Returns:
        A :class:`Budget`: the request (``budget.request()`` goes to
        ``prune_pretrained``), the widths kept and the parameter counts.

    Every layer keeps at least one key/value group, ``round_to`` (or one)
    MLP channels; the hidden size keeps at least ``round_to`` (or one)
    channels. Raises :class:`~channelcut.ChannelcutError` for a model it
    does not handle or scores that do not fit it, ``ValueError`` when the
    target is out of reach.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    if scope not in ("global", "local"):
        raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
    net, config = _model_of(model)
    arch = _arch(net, config)
    before = arch.count(arch.hidden, arch.mlp, arch.groups)
    if (target_params is None) == (keep is None):
        raise ValueError("pass exactly one of target_params= (a parameter count) and keep= (a fraction)")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
        target = int(before * keep)
    else:
        if isinstance(target_params, bool) or not isinstance(target_params, int) or target_params <= 0:
            raise ValueError(f"target_params must be a positive integer, got {target_params!r}")
        target = target_params
    L, hd, per = arch.n, arch.head_dim, arch.per_group
    pre = arch.layers

    units, hidden_scores = _unit_scores(scores, arch, kinds)

    # per kind and layer, the units from least to most important; and, for a
    # global ranking, which layer owns each position of the ranking over all layers
    ascending = {k: [torch.argsort(s, stable=True) for s in v] for k, v in units.items()}
    owners = {k: torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(v)])[
        torch.argsort(torch.cat([_normalised(s) for s in v]), stable=True)] for k, v in units.items()}
    hidden_order = torch.argsort(hidden_scores, stable=True) if hidden_scores is not None else None
    floor = round_to or 1

    def choose(f: float, f_hidden: Optional[float] = None,
               ) -> Tuple[int, Dict[str, List[int]], Dict[str, List[List[int]]], List[int]]:
        """Remove about ``f`` of each kind's units (``f_hidden`` of the hidden
        channels, default ``f``): the parameter count, widths kept, units removed."""
        removed: Dict[str, List[List[int]]] = {}
        widths = {"mlp": list(arch.mlp), "kv_groups": list(arch.groups)}
        for kind in units:
            sizes = widths[kind]
            if scope == "global":
                want = int(math.floor(f * len(owners[kind]) + 0.5))
                counts = torch.bincount(owners[kind][:want], minlength=L).tolist()
            else:
                counts = [int(math.floor(f * w + 0.5)) for w in sizes]
            taken: List[List[int]] = []
            for i, w in enumerate(sizes):
                if kind == "mlp":
                    k = round_width(counts[i], w, round_to, w - min(floor, w)) if round_to else min(counts[i], w - 1)
                else:
                    k = min(counts[i], w - 1)
                taken.append(ascending[kind][i][:k].tolist())
            removed[kind] = taken
            widths[kind] = [w - len(t) for w, t in zip(sizes, taken)]
        hidden_removed: List[int] = []
        if hidden_order is not None:
            k = int(math.floor((f if f_hidden is None else f_hidden) * arch.hidden + 0.5))
            k = round_width(k, arch.hidden, round_to, arch.hidden - floor) if round_to else min(k, arch.hidden - 1)
            hidden_removed = hidden_order[:k].tolist()
        n = arch.count(arch.hidden - len(hidden_removed), widths["mlp"], widths["kv_groups"])
        return n, widths, removed, hidden_removed

    lo, hi = 0.0, 1.0
    best = choose(0.0)
    if best[0] <= target:
        hi = 0.0
    else:
        top = choose(1.0)
        if top[0] > target:
            raise ValueError(f"removing all it may of {', '.join(kinds)} leaves {top[0]:,} parameters, above the "
                             f"target {target:,} (the model has {before:,}); add kinds or aim higher")
        best = top
        for _ in range(40):
            mid = (lo + hi) / 2
            got = choose(mid)
            if got[0] <= target:
                hi, best = mid, got
            else:
                lo = mid
        if hidden_order is not None and len(units):
            # the hidden size moves in steps (round_to): with it fixed, the
            # other kinds give back what the step overshot
            f_hidden, lo2, hi2 = hi, 0.0, hi
            for _ in range(40):
                mid = (lo2 + hi2) / 2
                got = choose(mid, f_hidden)
                if got[0] <= target:
                    hi2, best = mid, got
                else:
                    lo2 = mid
    params, widths, removed, hidden_removed = best
    pruned_inputs: List[Pair] = []
    for i, chans in enumerate(removed.get("mlp", [])):
        pruned_inputs += [(f"{pre}.{i}.mlp.down_proj.weight", c) for c in sorted(chans)]
    width = per * hd
    for i, gs in enumerate(removed.get("kv_groups", [])):
        pruned_inputs += [(f"{pre}.{i}.self_attn.o_proj.weight", g * width + c) for g in sorted(gs) for c in range(width)]
    pruned_outputs = [(arch.embed, c) for c in sorted(hidden_removed)]
    share = {k: sum(map(len, v)) / max(1, sum(map(len, units[k]))) for k, v in removed.items()}
    if hidden_order is not None:
        share["hidden"] = len(hidden_removed) / arch.hidden
    return Budget(pruned_inputs, pruned_outputs, before, params, target, share, kinds,
                  arch.hidden - len(hidden_removed), widths["mlp"], widths["kv_groups"])
