"""Prune a Hugging Face checkpoint on disk without loading it, and load the
result. Start at :func:`prune_pretrained` and :func:`load_pretrained`
(also reachable as ``channelcut.hf.prune_pretrained`` / ``load_pretrained``).

:func:`prune_pretrained` never holds the model's weights:

1. **plan** (:func:`plan_on_meta`): the config is read, the model is built on
   the ``meta`` device (shapes, no storage) and ``PruningManager.compute``
   traces it; the spec is applied to the meta model too
   (:func:`apply_on_meta`), which gives every pruned tensor's shape and the
   pruned modules' attributes for free;
2. **describe**: the pruned widths become a config (:func:`describe_config`):
   one value per field where every layer agrees (plain ``from_pretrained``
   loads the result), else transformers' ``per_layer_config`` (loaded by
   ``from_pretrained`` where the modeling code honours it, by
   :func:`load_pretrained` elsewhere), else the source config with the plan;
3. **write** (:func:`write_pruned_shards`): each output shard's header is
   computed from the shapes, then each tensor the spec changes is read from
   the source shard, passed through :func:`channelcut.pruning.pruner.sliced`
   (the one definition of a pruned tensor, as ``prune()`` uses it: the
   result is bit for bit the in-memory export) and written; tensors the spec
   does not touch, and those it only keeps rows of, are copied file to file
   by the kernel (in a second thread). Memory: one source tensor and its
   pruned copy at a time. Shard names and the index file are the source's,
   ``total_size`` updated; config, generation config, tokenizer files and
   everything else that is not weights are copied; ``plan.json``
   (``channelcut.io``'s plan format) records the export.

The output directory is written under a temporary name next to ``dst`` and
renamed at the end: on any error ``dst`` is left as it was (absent).

:func:`load_pretrained` reads such a directory back as an ordinary
Hugging Face model: with ``from_pretrained`` when the config describes it,
otherwise by building the unpruned model with its parameters on ``meta``,
applying the plan there and assigning the saved tensors (never the
unpruned weights).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .errors import ChannelcutError, CheckpointError  # noqa: F401  (CheckpointError: re-exported)
from .hf_config import (LOADS_WITH_HF, LOADS_WITH_US, _build, _config_from_dict, _transformers,  # noqa: F401
                        architecture, build_on_meta, describe_config)
from .io import FORMAT, FORMAT_VERSION, PLAN_FILE, MissingTensorError, PlanMismatchError, read_plan
from .io import _check_step, _check_subselections, _dumps, _parse_step  # one plan format, one parser
from .pruning.manager import PruningManager
from .pruning.subselect import is_subselect, subselection_of
from .pruning.pruner import applied_specs, prune_model, sliced
from .pruning.spec import MaskEntry, NormRescale, PruningSpec
from .safetensors_stream import DTYPES, Entry, Header, ShardWriter, read_header, read_tensor

__all__ = [
    "CheckpointError",
    "StreamReport",
    "prune_pretrained",
    "load_pretrained",
    "plan_on_meta",
    "apply_on_meta",
    "default_inputs",
    "describe_config",
]

PathLike = Union[str, "os.PathLike[str]"]
Pairs = Optional[Iterable[Tuple[str, int]]]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_FORMAT = "safetensors-hf"  # plan["weights"]["format"] of a prune_pretrained checkpoint
# files of other weight formats: never copied (they would hold the unpruned weights)
_OTHER_WEIGHTS = re.compile(r".*\.(bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|onnx_data|npz)$|.*\.(bin|h5|msgpack)\.index\.json$")


@dataclass
class StreamReport:
    """What :func:`prune_pretrained` did."""

    dst: Path
    spec: PruningSpec
    config: str  # "pruned" (one value per field), "per-layer" (config.per_layer_config), "source" (unchanged)
    loads_with: str  # "transformers" (from_pretrained) or "channelcut.hf.load_pretrained"
    why: Optional[str]  # why the config is not "pruned" (what differs between layers), else None
    files: List[str]  # weight files written, in order
    tensors_sliced: int = 0  # tensors the spec changes
    tensors_copied: int = 0  # tensors copied through unchanged
    rows_copied: int = 0  # of the changed ones: kept rows copied by the kernel (never in memory)
    bytes_read: int = 0  # bytes of source tensors read into memory (to be sliced)
    bytes_written: int = 0  # tensor bytes in the output shards
    source_bytes: int = 0  # tensor bytes in the source shards
    largest_sliced: int = 0  # bytes of the largest source tensor held in memory
    plan_s: float = 0.0
    write_s: float = 0.0
    skipped: List[str] = field(default_factory=list)  # source files not copied (weights in other formats)

    def summary(self) -> str:
        gb = 1 << 30
        lines = [
            f"wrote {self.dst}: {len(self.files)} shard(s), {self.bytes_written / gb:.3f} GiB of tensors "
            f"(source {self.source_bytes / gb:.3f} GiB); {self.tensors_sliced} tensors sliced ({self.rows_copied} of "
            f"them as kept rows copied by the kernel), {self.tensors_copied} copied through",
            f"plan {self.plan_s:.2f} s, write {self.write_s:.2f} s; largest tensor in memory "
            f"{self.largest_sliced / (1 << 20):.1f} MiB",
            f"config: {self.config}; loads with {self.loads_with}" + (f" ({self.why})" if self.why else ""),
        ]
        if self.skipped:
            lines.append(f"not copied (weights in another format): {', '.join(self.skipped)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------
# the source checkpoint
# ----------------------------------------------------------------------------
@dataclass
class _Checkpoint:
    folder: Path
    files: List[str]  # shard file names, in order
    index: Optional[Dict[str, Any]]  # the parsed index file, or None (one file)
    headers: Dict[str, Header]

    def keys(self) -> Iterator[Tuple[str, Entry]]:
        for f in self.files:
            for e in self.headers[f].entries.values():
                yield f, e


def _open_checkpoint(folder: Path) -> _Checkpoint:
    index_path, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index_path} is not a safetensors index (a JSON object with a weight_map)") from exc
        for f in files:
            if not isinstance(f, str) or "/" in f or "\\" in f or not (folder / f).is_file():
                raise CheckpointError(f"{index_path} names the shard {f!r}, which is not a file in {folder}")
        headers = {f: read_header(folder / f) for f in files}
        for f, h in headers.items():
            for key in h.entries:
                if weight_map.get(key) != f:
                    raise CheckpointError(f"{f} holds {key!r}, but {INDEX_FILE} maps it to {weight_map.get(key)!r}")
        for key, f in weight_map.items():
            if key not in headers[f].entries:
                raise CheckpointError(f"{INDEX_FILE} maps {key!r} to {f}, which does not hold it")
        return _Checkpoint(folder, files, index, headers)
    if single.is_file():
        return _Checkpoint(folder, [SINGLE_FILE], None, {SINGLE_FILE: read_header(single)})
    others = sorted(p.name for p in folder.iterdir() if _OTHER_WEIGHTS.match(p.name))
    hint = f" It has {', '.join(others[:4])}: save it with safetensors first (save_pretrained does)." if others else ""
    raise CheckpointError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: prune_pretrained streams safetensors checkpoints.{hint}")


# ----------------------------------------------------------------------------
# the model on meta, and the plan
# ----------------------------------------------------------------------------
def default_inputs(config: Any) -> Dict[str, torch.Tensor]:
    """An example input for the model's modality: 8 token ids for a text
    model, one image of the config's size for a vision model."""
    if any(hasattr(config, k) for k in ("vision_config", "audio_config")) and hasattr(config, "text_config"):
        raise ChannelcutError(
            f"{type(config).__name__} is a multimodal model: pass inputs= (a dict of example tensors for its forward)")
    if getattr(config, "vocab_size", None):
        return {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if size and channels:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {"pixel_values": torch.zeros(1, channels, h, w)}
    raise ChannelcutError(f"cannot make an example input for {type(config).__name__}: pass inputs=")


def tensor_names(model: nn.Module) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """(every parameter/buffer name -> the canonical name of its tensor, the
    tensors by canonical name). The canonical name is the first one in
    module order, as the tracer (and so the spec) names it; tied tensors
    (``lm_head.weight`` tied to ``model.embed_tokens.weight``) share one."""
    first: Dict[int, str] = {}
    canon: Dict[str, str] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for table in (m._parameters, m._buffers):
            for pname, t in table.items():
                if t is None:
                    continue
                full = f"{mname}.{pname}" if mname else pname
                c = first.setdefault(id(t), full)
                canon[full] = c
                tensors.setdefault(c, t)
    return canon, tensors


def apply_on_meta(model: nn.Module, spec: PruningSpec) -> None:
    """Apply ``spec`` to a model whose tensors are on the meta device: every
    sliced tensor gets its pruned shape (no data), and the module attributes,
    subset reads and the rest come from :func:`prune_model` itself. Tensors
    that are not on meta (e.g. buffers a model makes for real) are sliced
    for real with :func:`sliced`."""
    _, tensors = tensor_names(model)
    deltas, zeros = _per_tensor(spec)
    before = {n: tuple(tensors[n].shape) for n in dict.fromkeys([*deltas, *spec.slices, *zeros])}
    with torch.no_grad():
        for name, dims in spec.slices.items():
            t = tensors[name]
            if t.is_meta:
                shape = list(t.shape)
                for d, kept in dims.items():
                    shape[d] = len(kept)
                t.data = torch.empty(shape, dtype=t.dtype, device="meta")
            else:
                t.data = sliced(t.data, dims, deltas.get(name), zeros.get(name, ()))
        for name in set(deltas) | set(zeros):
            t = tensors[name]
            if name not in spec.slices and not t.is_meta:
                t.data = sliced(t.data, {}, deltas.get(name), zeros.get(name, ()))
    # shapes are in place: prune_model fixes attributes and installs subset reads
    # (its slicing would read the meta tensors' values, which they do not have)
    prune_model(model, replace(spec, slices={n: {} for n in spec.slices}, folds=[], zeros=[]))
    record = applied_specs(model)[-1]  # what channelcut.save reads: the real spec, the real shapes before
    record.spec, record.shapes_before = spec, before


def _rescaled(spec: PruningSpec) -> Dict[str, NormRescale]:
    """Norm weight name -> its rescaling (a narrower RMS norm)."""
    return {r.weight: r for r in spec.rescales if r.weight is not None}


def _per_tensor(spec: PruningSpec) -> Tuple[Dict[str, List[float]], Dict[str, List[MaskEntry]]]:
    """(bias name -> folded delta, parameter name -> zero-column entries), as
    ``prune_model`` groups them."""
    deltas = {f.bias: f.delta for f in spec.folds}
    zeros: Dict[str, List[MaskEntry]] = {}
    for e in spec.zeros:
        zeros.setdefault(e.param, []).append(e)
    return deltas, zeros


def plan_on_meta(
    config: Any,
    pruned_inputs: Pairs = None,
    pruned_outputs: Pairs = None,
    constrained: bool = False,
    inputs: Optional[Any] = None,
    cls: Optional[type] = None,
    **compute_kwargs: Any,
) -> Tuple[nn.Module, PruningSpec, Dict[str, Tuple[int, ...]]]:
    """Build the model of ``config`` on meta, compute the spec of the request
    and apply it there. Returns (the pruned meta model, the spec, every
    tensor's shape before pruning by canonical name)."""
    if pruned_inputs is None and pruned_outputs is None:
        raise ChannelcutError(
            "prune_pretrained needs pruned_inputs or pruned_outputs: finding the channels a model's weights already "
            "zero reads every weight, which a streaming export never holds (load the model and use "
            "PruningManager(model).compute(inputs) for that)")
    model = build_on_meta(config, architecture(config, cls))
    _, tensors = tensor_names(model)
    before = {n: tuple(t.shape) for n, t in tensors.items()}
    manager = PruningManager(model).compute(
        default_inputs(config) if inputs is None else inputs,
        pruned_inputs=pruned_inputs, pruned_outputs=pruned_outputs, constrained=constrained, **compute_kwargs)
    spec = manager.spec
    assert spec is not None
    manager.graph = None  # the traces are the plan's largest data; the spec is all that is needed now
    apply_on_meta(model, spec)
    return model, spec, before


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------
def _output_entries(
    ckpt: _Checkpoint, canon: Dict[str, str], before: Dict[str, Tuple[int, ...]], after: Dict[str, Tuple[int, ...]],
    touched: set, persistent: set, model_name: str,
) -> Dict[str, List[Entry]]:
    """Every output shard's entries (source order, pruned shapes); checks that
    each key is a model tensor of the config's shape, and that each tensor
    the spec changes is in the checkpoint."""
    out: Dict[str, List[Entry]] = {f: [] for f in ckpt.files}
    seen = set()
    for f, e in ckpt.keys():
        c = canon.get(e.name)
        if c is None:
            raise CheckpointError(
                f"the checkpoint holds {e.name!r} ({f}), which a {model_name} built from its config does "
                "not have: cannot tell how pruning changes it (is config.json the checkpoint's own?)")
        if tuple(e.shape) != before[c]:
            raise CheckpointError(
                f"{e.name!r} has shape {tuple(e.shape)} in {f}, but the model built from config.json has "
                f"{before[c]}: the config does not describe this checkpoint")
        seen.add(c)
        out[f].append(Entry(e.name, e.dtype, after[c]))
    for es in out.values():  # widest dtype first (stable): every tensor stays aligned to its item size
        es.sort(key=lambda e: -DTYPES[e.dtype].itemsize)
    missing = sorted(n for n in touched if n not in seen and n in persistent)
    if missing:
        raise CheckpointError(
            f"the export changes {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ", which the checkpoint does not hold (under this or a tied name)")
    return out


def write_pruned_shards(
    ckpt: _Checkpoint, out_dir: Path, entries: Dict[str, List[Entry]], spec: PruningSpec, canon: Dict[str, str],
    report: StreamReport, progress: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Write each output shard of ``entries`` from the source shards (see the
    module docstring). Each tensor goes one of three ways:

    - the spec leaves it alone: the kernel copies its bytes;
    - the spec only keeps rows of it (``slices == {0: kept}``, no fold, no
      zero columns: an MLP's gate/up projection, a q/k/v projection): the
      kernel copies the kept rows, as runs of consecutive rows. That is
      byte for byte what :func:`sliced` computes for it (``index_select``
      along dim 0), without the tensor entering memory;
    - anything else: read into one reused buffer, :func:`sliced`, written.

    The kernel copies run in a second thread while this one slices, and this
    one helps with them once its slicing is done (each tensor is written at
    its own offset); memory stays one source tensor and its slice."""
    deltas, zeros = _per_tensor(spec)
    rescaled = _rescaled(spec)
    touched = set(spec.slices) | set(deltas) | set(zeros) | set(rescaled)
    index: Dict[Any, torch.Tensor] = {}  # kept-index tensors, shared like prune_model shares them
    total = sum(h.data_size for h in ckpt.headers.values())
    buffer: Optional[torch.Tensor] = None
    done = 0
    if progress is not None:
        progress(0, total)  # the plan is complete; writing starts
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="channelcut-copy") as pool:
        for f in ckpt.files:
            header = ckpt.headers[f]
            meta = dict(header.metadata) if header.metadata else {"format": "pt"}
            by_kernel: List[Tuple[Entry, Optional[List[Tuple[int, int]]]]] = []  # (entry, kept row runs or None: all)
            in_memory: List[Entry] = []
            for o in entries[f]:
                e, c = header.entries[o.name], canon[o.name]
                if c not in touched:
                    by_kernel.append((e, None))
                elif c not in deltas and c not in zeros and c not in rescaled and set(spec.slices.get(c, {})) == {0}:
                    by_kernel.append((e, _row_runs(e, header, spec.slices[c][0])))
                else:
                    in_memory.append(e)
            need = max((e.nbytes for e in in_memory), default=0)
            if need and (buffer is None or buffer.numel() < need):
                buffer = None
                buffer = torch.empty(need, dtype=torch.uint8)
            with open(ckpt.folder / f, "rb", buffering=0) as src, ShardWriter(out_dir / f, entries[f], meta) as w:
                jobs = collections.deque(by_kernel)
                copying = pool.submit(_copy_all, w, ckpt.folder / f, header, jobs)
                try:
                    for e in in_memory:
                        c = canon[e.name]
                        t = read_tensor(src, header, e.name, buffer)
                        out = sliced(t, spec.slices.get(c, {}), deltas.get(c), zeros.get(c, ()), index,
                                     rescale=rescaled.get(c))
                        del t
                        w.write(e.name, out)
                        report.bytes_written += out.numel() * out.element_size()
                        del out
                        report.bytes_read += e.nbytes
                        report.largest_sliced = max(report.largest_sliced, e.nbytes)
                        done += e.nbytes
                        if progress is not None:
                            progress(done, total)
                    _copy_all(w, ckpt.folder / f, header, jobs)  # help with what is left to copy
                finally:
                    jobs.clear()
                    wait([copying])  # never close the files under the copying thread
                copying.result()
            for e, runs in by_kernel:
                report.bytes_written += e.nbytes if runs is None else sum(n for _, n in runs)
                done += e.nbytes
            report.tensors_sliced += len(in_memory) + sum(1 for _, runs in by_kernel if runs is not None)
            report.tensors_copied += sum(1 for _, runs in by_kernel if runs is None)
            report.rows_copied += sum(1 for _, runs in by_kernel if runs is not None)
            report.source_bytes += sum(e.nbytes for e in header.entries.values())
            if progress is not None and by_kernel:
                progress(done, total)
            report.files.append(f)
    del buffer
    if ckpt.index is not None:
        index_out = copy.deepcopy(ckpt.index)
        index_out.setdefault("metadata", {})
        if not isinstance(index_out["metadata"], dict):
            index_out["metadata"] = {}
        index_out["metadata"]["total_size"] = sum(e.nbytes for es in entries.values() for e in es)
        (out_dir / INDEX_FILE).write_text(json.dumps(index_out, indent=2) + "\n", encoding="utf-8")


def _row_runs(e: Entry, header: Header, kept: List[int]) -> List[Tuple[int, int]]:
    """File byte ranges ``(offset, nbytes)`` of rows ``kept`` of tensor ``e``,
    in that order, consecutive rows merged into one range."""
    row = e.nbytes // e.shape[0] if e.shape and e.shape[0] else 0
    base = header.data_start + e.begin
    runs: List[Tuple[int, int]] = []
    start = prev = -2
    for k in kept:
        if k == prev + 1:
            prev = k
            continue
        if start >= 0:
            runs.append((base + start * row, (prev - start + 1) * row))
        start = prev = k
    if start >= 0:
        runs.append((base + start * row, (prev - start + 1) * row))
    return runs


def _copy_all(w: ShardWriter, src: Path, header: Header,
              jobs: "collections.deque[Tuple[Entry, Optional[List[Tuple[int, int]]]]]") -> None:
    """Take copies from ``jobs`` until none is left (two threads share it).
    Each thread reads through its own descriptor: the kernel keeps one
    read-ahead state per open file, and two threads reading different
    places through one would defeat it."""
    fd = os.open(src, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while True:
            try:
                e, runs = jobs.popleft()
            except IndexError:
                return
            if runs is None:
                w.copy_from(e.name, fd, header.data_start + e.begin, e.nbytes)
            else:
                w.copy_runs(e.name, fd, runs)
    finally:
        os.close(fd)


def _copy_other_files(src: Path, dst: Path, report: StreamReport) -> None:
    """Everything in ``src`` that is not weights (tokenizer, generation config,
    README, ...), sub-folders included; not the config (written anew), not
    a plan of an earlier export, not other weight formats (reported)."""
    skip = {INDEX_FILE, CONFIG_FILE, PLAN_FILE}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in (".git", ".cache"))
        rel = Path(root).relative_to(src)
        for name in sorted(files):
            rel_name = str(rel / name) if str(rel) != "." else name
            if rel_name in report.files or rel_name in skip or name.endswith(".safetensors"):
                continue
            if _OTHER_WEIGHTS.match(name):
                report.skipped.append(rel_name)
                continue
            (dst / rel).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root) / name, dst / rel / name)


def _plan(model: nn.Module, spec: PruningSpec, before: Dict[str, Tuple[int, ...]], config_kind: str,
          loads_with: str, config_before: Dict[str, Any], weights_file: str, source: Path) -> Dict[str, Any]:
    from ._version import __version__

    canon, _ = tensor_names(model)
    shapes_before = {n: list(before[n]) for n in dict.fromkeys([*spec.slices, *_per_tensor(spec)[0], *_per_tensor(spec)[1],
                                                                *_rescaled(spec)])}
    state = model.state_dict(keep_vars=True)
    cls = type(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "channelcut_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "weights": {"format": WEIGHTS_FORMAT, "file": weights_file},
        "loads_with": loads_with,
        "config": config_kind,
        # the fields of config.json that differ from the unpruned model's (null: absent there)
        "config_before": config_before,
        "summary": {
            "parameters": sum(t.numel() for t in {id(p): p for p in model.parameters()}.values()),
            "modes": [spec.mode],
            "copied_channels_per_inference": spec.copied_channels,
        },
        "steps": [_step_dict(spec, shapes_before)],
        "subselections": {name: sel for name, m in model.named_modules() if (sel := subselection_of(m)) is not None},
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "aliases": {k: canon[k] for k in state if canon.get(k, k) != k},
        "metadata": {"source": str(source)},
    }


def _step_dict(spec: PruningSpec, shapes_before: Dict[str, List[int]]) -> Dict[str, Any]:
    """What ``channelcut.io`` stores for one export step (``spec.to_dict()``
    without the mock's masks and the barriers, plus the shapes before), built
    without copying: ``to_dict`` goes through ``dataclasses.asdict``, which
    copies every index list element by element (0.9 s for an 8k-channel
    request on a 4-layer model, and the masks it copies are then dropped).
    ``PruningSpec.from_dict`` reads it back."""
    step: Dict[str, Any] = {"mode": spec.mode, "shapes_before": shapes_before}
    for f in fields(spec):
        if f.name in ("mode", "masks", "barriers"):
            continue
        value = getattr(spec, f.name)
        if f.name == "slices":
            value = {k: {str(d): kept for d, kept in dims.items()} for k, dims in value.items()}
        elif isinstance(value, list):
            value = [{g.name: getattr(v, g.name) for g in fields(v)} if is_dataclass(v) else v for v in value]
        step[f.name] = value
    step["copied_channels"] = spec.copied_channels
    return step


# ----------------------------------------------------------------------------
# prune_pretrained
# ----------------------------------------------------------------------------
def prune_pretrained(
    src: PathLike,
    dst: PathLike,
    pruned_inputs: Pairs = None,
    pruned_outputs: Pairs = None,
    constrained: bool = False,
    *,
    inputs: Optional[Any] = None,
    model_class: Optional[type] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    **compute_kwargs: Any,
) -> StreamReport:
    """Write the channel-pruned copy of the Hugging Face checkpoint ``src``
    (a local directory with ``config.json`` and safetensors weights) to
    ``dst``, tensor by tensor, without loading the model.

    Args:
        src: the checkpoint directory (single ``model.safetensors`` or shards
            with ``model.safetensors.index.json``).
        dst: the directory to write; must not exist unless ``overwrite``.
        pruned_inputs, pruned_outputs, constrained: the request, as for
            :meth:`channelcut.PruningManager.compute` (parameter names are
            the model's, e.g. ``model.layers.0.mlp.down_proj.weight``).
        inputs: example inputs for tracing (default: :func:`default_inputs`).
        model_class: the class to build (default: ``config.architectures``).
        overwrite: replace an existing ``dst`` (only once the new one is
            complete).
        progress: called as ``progress(bytes_done, bytes_total)`` once with
            0 when the plan is done and writing starts, then after each tensor.
        compute_kwargs: ``reorder``, ``baseline``, ``copy_cost`` of ``compute``.

    Returns:
        A :class:`StreamReport` (the spec, which config was written and what
        loads it, sizes and timings).

    The result equals, tensor for tensor and bit for bit, the ``state_dict``
    of the model loaded in memory and pruned with the same request; its
    ``config.json`` describes it where a config can (see
    :func:`describe_config`). Raises :class:`CheckpointError` for a
    checkpoint it cannot stream, the request's own errors
    (:class:`~channelcut.UnknownParameterError`, ...) for a bad request;
    ``dst`` is not created (or left as it was) on any error.
    """
    tf = _transformers()
    src_dir, dst_dir = Path(src), Path(dst)
    if not (src_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{src_dir} is not a Hugging Face checkpoint directory (no {CONFIG_FILE})")
    if dst_dir.exists() and not overwrite:
        raise FileExistsError(f"{dst_dir} exists; pass overwrite=True to replace it")
    if dst_dir.resolve() == src_dir.resolve() or src_dir.resolve() in dst_dir.resolve().parents:
        raise ValueError(f"dst ({dst_dir}) must be outside src ({src_dir})")
    _refuse_plan_only_source(src_dir)
    ckpt = _open_checkpoint(src_dir)
    source_raw = json.loads((src_dir / CONFIG_FILE).read_text(encoding="utf-8"))

    t0 = time.perf_counter()
    config = tf.AutoConfig.from_pretrained(str(src_dir))
    model, spec, before = plan_on_meta(config, pruned_inputs, pruned_outputs, constrained, inputs, model_class,
                                       **compute_kwargs)
    canon, tensors = tensor_names(model)
    after = {n: tuple(t.shape) for n, t in tensors.items()}
    deltas, zeros = _per_tensor(spec)
    persistent = set(model.state_dict(keep_vars=True))
    entries = _output_entries(ckpt, canon, before, after, set(spec.slices) | set(deltas) | set(zeros) | set(_rescaled(spec)),
                              persistent,
                              type(model).__name__)
    raw, kind, loads_with, why = describe_config(model, source_raw, spec.attributes)
    config_before = {k: source_raw.get(k) for k in raw if source_raw.get(k, object()) != raw[k]}
    plan_s = time.perf_counter() - t0

    report = StreamReport(dst_dir, spec, kind, loads_with, why, [], plan_s=plan_s)
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.", suffix=".partial", dir=dst_dir.parent))
    try:
        t1 = time.perf_counter()
        write_pruned_shards(ckpt, tmp, entries, spec, canon, report, progress)
        _copy_other_files(src_dir, tmp, report)
        (tmp / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        weights_file = INDEX_FILE if ckpt.index is not None else SINGLE_FILE
        plan = _plan(model, spec, before, kind, loads_with, config_before, weights_file, src_dir)
        (tmp / PLAN_FILE).write_text(_dumps(plan) + "\n", encoding="utf-8")
        _replace_dir(tmp, dst_dir, overwrite)
        report.write_s = time.perf_counter() - t1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _refuse_plan_only_source(src: Path) -> None:
    if not (src / PLAN_FILE).is_file():
        return
    try:
        plan = json.loads((src / PLAN_FILE).read_text(encoding="utf-8"))
    except ValueError:
        return
    if isinstance(plan, dict) and plan.get("format") == FORMAT and plan.get("loads_with") == LOADS_WITH_US:
        raise CheckpointError(
            f"{src} is a pruned checkpoint whose shapes only its {PLAN_FILE} describes; pruning it again is not "
            "supported (prune the original checkpoint with the combined request)")


def _replace_dir(tmp: Path, dst: Path, overwrite: bool) -> None:
    if not dst.exists():
        os.replace(tmp, dst)
        return
    if not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / "x")
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# load_pretrained
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no storage,
    no initialisation cost) but their buffers real, so that buffers a model
    computes at construction (rotary frequencies, ...) are right."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@contextlib.contextmanager
def _default_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    old = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _config_dtype(config: Any) -> Optional[torch.dtype]:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def load_pretrained(path: PathLike, *, dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
                    model_class: Optional[type] = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a checkpoint written by :func:`prune_pretrained` as an ordinary
    Hugging Face model (``generate()`` works), in eval mode.

    Where the config describes the pruned model this is ``from_pretrained``
    (``from_pretrained_kwargs`` are passed on). Otherwise (per-layer widths
    the modeling code cannot build, subset reads) the unpruned architecture
    is built with its parameters on the meta device, the saved plan is
    applied there (shapes and module attributes, no weights), and the saved
    tensors are assigned, shard by shard: memory is the pruned model's, never
    the unpruned one's. The model's ``config`` is then the unpruned
    architecture's (the modules carry the pruned widths).

    Args:
        dtype: convert floating-point weights to this dtype (default: as saved).
        device: move the model there (default: CPU).
        model_class: the class to build (default: ``config.architectures``).

    Raises :class:`~channelcut.io.PlanFormatError` / :class:`PlanMismatchError`
    / :class:`MissingTensorError` for a damaged or mismatched directory.
    """
    tf = _transformers()
    folder = Path(path)
    plan = read_plan(folder) if (folder / PLAN_FILE).is_file() else None
    if plan is not None and plan.get("loads_with") == LOADS_WITH_US and from_pretrained_kwargs:
        raise TypeError(f"{folder} is loaded by applying its plan, not by from_pretrained: "
                        f"{', '.join(from_pretrained_kwargs)} do(es) not apply (dtype= and device= do)")
    if plan is None or plan.get("loads_with") != LOADS_WITH_US:
        config = tf.AutoConfig.from_pretrained(str(folder))
        kwargs = dict(from_pretrained_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = architecture(config, model_class).from_pretrained(str(folder), **kwargs)
        return (model.to(device) if device is not None else model).eval()

    raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    for k, v in (plan.get("config_before") or {}).items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    config = _config_from_dict(raw)
    config._name_or_path = str(folder)
    cls = architecture(config, model_class)
    with _parameters_on_meta(), _default_dtype(_config_dtype(config)):
        model = _build(cls, config)
    model.eval()
    hint = f" The directory was written for a {plan.get('model_class', '?')}."
    for i, raw_step in enumerate(plan["steps"]):
        spec, shapes_before = _parse_step(raw_step, i)
        _check_step(model, spec, shapes_before, i, hint)
        apply_on_meta(model, spec)
    _check_subselections(model, plan, hint)
    have = {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    if have != {k: list(v) for k, v in plan["shapes"].items()}:
        bad = next(k for k in sorted(set(have) | set(plan["shapes"])) if have.get(k) != plan["shapes"].get(k))
        raise PlanMismatchError(
            f"after applying the plan, {bad!r} has shape {have.get(bad)}, the saved model {plan['shapes'].get(bad)}.{hint}")
    _assign_saved(model, folder, dtype)
    for _, m in model.named_modules():
        if is_subselect(m) and m.subselect_index.is_meta:  # made on the meta parameters' device
            w = next(m.parameters(recurse=False))
            m.__dict__["subselect_index"] = torch.tensor(m.subselect_indices, dtype=torch.long, device=w.device)
    gen = folder / "generation_config.json"
    if gen.is_file() and hasattr(model, "generation_config"):
        model.generation_config = tf.GenerationConfig.from_pretrained(str(folder))
    if device is not None:
        model.to(device)
    return model


def _assign_saved(model: nn.Module, folder: Path, dtype: Optional[torch.dtype]) -> None:
    """Give every parameter and persistent buffer of the (pruned, meta) model
    its saved tensor; tied names get one shared tensor."""
    canon, tensors = tensor_names(model)
    ckpt = _open_checkpoint(folder)
    owners: Dict[str, List[Tuple[nn.Module, str, bool]]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, c in canon.items():
        mname, _, attr = name.rpartition(".")
        m = modules[mname]
        owners.setdefault(c, []).append((m, attr, attr in m._parameters))
    done = set()
    for f in ckpt.files:
        header = ckpt.headers[f]
        with open(folder / f, "rb", buffering=0) as fh:
            for e in header.entries.values():
                c = canon.get(e.name)
                if c is None:
                    raise PlanMismatchError(f"{f} holds {e.name!r}, which the model does not have")
                if c in done:
                    continue
                old = tensors[c]
                if tuple(e.shape) != tuple(old.shape):
                    raise PlanMismatchError(f"{e.name!r} has shape {tuple(e.shape)} in {f}, the model {tuple(old.shape)}")
                t = read_tensor(fh, header, e.name)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                new: torch.Tensor = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
                for m, attr, is_param in owners[c]:
                    (m._parameters if is_param else m._buffers)[attr] = new
                done.add(c)
    state = model.state_dict(keep_vars=True)
    lacking = [k for k, v in state.items() if v.is_meta]
    if lacking:
        raise MissingTensorError(
            f"the checkpoint lacks {len(lacking)} tensor(s) the model needs: {', '.join(lacking[:5])}"
            + (" ..." if len(lacking) > 5 else ""))
